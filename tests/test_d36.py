"""d36, the published 512px model (depth 36, width 2304, 36 heads, shared AdaLN, ladder 1…32), at its real size on
abstract params: `amskv_jax.memory`'s figures for every policy against a hand computation from the ladder, and
`generate` lowering and compiling for 512px images without a single weight in memory."""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from amskv_jax import memory
from amskv_jax.checkpoint import param_shapes
from amskv_jax.config import get_preset
from amskv_jax.generate import generate
from convert.mapping import is_buffer

D36 = get_preset("d36")
PUBLISHED_KEYS = Path(__file__).parent / "fixtures" / "published_keys" / "var_d36.json"
WIDTH = 2304  # 36 heads of 64
TOKENS = [1, 4, 9, 16, 36, 81, 169, 324, 576, 1024]  # pn² of the 512px ladder 1, 2, 3, 4, 6, 9, 13, 18, 24, 32
L = 2240  # sum(TOKENS)
CONDENSED = 1 + 4  # the 2 coarsest scales

# Slots per policy whose rule does not depend on a budget allocation, by hand. A scale is written only if a later scale reads it (the last scale, 1024 tokens, never
# is), and a layer holds at most what is live at once: after scale s writes, the scales a later query still reads.
SLOTS = {
    # every layer: every scale but the last
    "full": 36 * (L - 1024),
    # the scale just written, read by the next one: at most scale 8's 576 tokens
    "sliding": 36 * 576,
    "condensed": 36 * CONDENSED,
}


def _by_hand(slots: int, batch: int, itemsize: int) -> tuple[int, int]:
    """(cache_bytes, peak_kv_bytes): K and V for 2·batch rows over the slots, int32 slot map; the peak adds one
    layer's fresh K and V of the largest scale (1024 tokens)."""
    rows = 2 * batch
    cache = 2 * rows * slots * WIDTH * itemsize + 4 * slots
    return cache, cache + 2 * rows * 1024 * WIDTH * itemsize


def test_d36_is_the_published_512px_shape():
    v = D36.var
    assert (v.depth, v.embed_dim, v.num_heads, v.head_dim, v.shared_aln) == (36, WIDTH, 36, 64, True)
    assert [pn * pn for pn in v.patch_nums] == TOKENS and v.seq_len == L
    assert D36.vqvae.image_size == 512


@pytest.mark.parametrize("batch, dtype", [(1, "bfloat16"), (16, "bfloat16"), (8, "float32")])
def test_memory_table_matches_the_hand_computation(batch, dtype):
    itemsize = 2 if dtype == "bfloat16" else 4
    rows = {row.policy: row for row in memory.memory_table(D36.var, batch, dtype)}
    assert set(SLOTS) | {"reference", "amskv"} <= set(rows)
    full = _by_hand(SLOTS["full"], batch, itemsize)[0]
    for name, slots in SLOTS.items():
        cache, peak = _by_hand(slots, batch, itemsize)
        assert rows[name].slots == slots, name
        assert (rows[name].cache_bytes, rows[name].peak_kv_bytes) == (cache, peak), name
        assert rows[name].reduction_vs_full == pytest.approx(1 - cache / full), name
    reference = 2 * batch * 36 * L * 2 * WIDTH * itemsize  # every token of every scale, K and V, in every layer
    assert rows["reference"].cache_bytes == reference


def test_memory_command_line_prints_the_d36_figures(capsys):
    assert memory.main(["--model", "d36", "--batch", "16", "--json"]) == 0
    printed = {row["policy"]: row for row in json.loads(capsys.readouterr().out)}
    assert printed["full"]["cache_bytes"] == _by_hand(SLOTS["full"], 16, 2)[0]  # 12.02 GiB
    assert printed["condensed"]["cache_bytes"] == _by_hand(SLOTS["condensed"], 16, 2)[0]
    assert 0.75 <= printed["amskv"]["reduction_vs_full"] < 1  # AMS-KV's named cuts are at least 75%


def test_generate_compiles_for_512px_on_abstract_params():
    params = param_shapes(D36)  # jax.eval_shape of the modules' init: shapes and dtypes, no values
    published = json.loads(PUBLISHED_KEYS.read_text())["keys"]
    count = sum(math.prod(shape) for key, shape, _ in published if not is_buffer(key))
    assert sum(x.size for x in jax.tree.leaves(params["var"])) == count == 2_353_893_904
    # the scanned layer loop, as on an accelerator (this CPU would unroll 36 layers: minutes of compiling)
    fn = jax.jit(functools.partial(generate, config=D36, dtype="bfloat16", layer_loop="scan"))
    labels = jax.ShapeDtypeStruct((1,), jnp.int32)
    key = jax.eval_shape(lambda: jax.random.key(0))
    compiled = fn.lower(params, labels, key).compile()
    out = jax.eval_shape(fn, params, labels, key)
    assert out.images.shape == (1, 512, 512, 3)
    assert [t.shape for t in out.tokens] == [(1, n) for n in TOKENS]
    assert compiled.memory_analysis().argument_size_in_bytes >= 4 * count  # the float32 VAR weights
