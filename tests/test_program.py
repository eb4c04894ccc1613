"""The compiled program of `generate`: it never copies a cache stack (every write in place), and its two layer loops
(the scan, the per-layer Python loop) and its chunks of rows give the same generation."""
from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amskv_jax.cache import init_cache
from amskv_jax.checkpoint import init_params
from amskv_jax.config import get_preset
from amskv_jax.errors import UserError
from amskv_jax import generate as gen_module, memory
from amskv_jax.generate import generate
from amskv_jax.memory import abstract_params
from amskv_jax.policies import AMSKV, FullCache
from amskv_jax.var import VAR, per_layer_blocks
from bench import compile_time

# what these tests read (copies in the optimised HLO) and compare (the sampled tokens of two programs) is the users'
pytestmark = pytest.mark.usefixtures("users_codegen")

TINY = get_preset("tiny")
# depth 3 and one demanding layer: AMS-KV's two kinds interleave (kinds 0, 1, 0), as calibration may place them
CONFIG = dataclasses.replace(TINY, var=dataclasses.replace(TINY.var, depth=3))
LAYOUTS = {
    "full": FullCache().layout(CONFIG.var),
    "amskv": AMSKV(budgets=(10, None, 10), condensed_scales=1).layout(CONFIG.var),  # condensed + the latest scale
}


def compiled_generate(layout, kv_dtype: str | None, layer_loop: str, params=None, labels=(0,), dtype: str = "float32",
                      row_chunk: int | None = None, top_k: int = 8, return_logits: bool = False):
    """`generate` jitted and compiled for `labels` (by default on abstract params, the weights in the compute dtype):
    (the compiled program, which runs as `program(params, labels, key)`, its optimised HLO text)."""
    fn = jax.jit(functools.partial(
        generate, config=CONFIG, layout=layout, top_k=top_k, kv_dtype=kv_dtype, layer_loop=layer_loop, dtype=dtype,
        row_chunk=row_chunk, return_logits=return_logits,
    ))
    params = abstract_params(CONFIG, dtype) if params is None else params
    program = fn.lower(params, jnp.asarray(labels, jnp.int32), jax.random.key(0)).compile()
    return program, program.as_text()


def cache_stack_copies(text: str, layout, kv_dtype: str | None, batch: int = 1, dtype: str = "float32") -> list[str]:
    """The copies of a cache stack (`bench.compile_time.cache_stack_copies`) in `compiled_generate`'s text."""
    c = CONFIG.var
    cache = jax.eval_shape(lambda: init_cache(layout, 2 * batch, c.num_heads, c.head_dim, dtype, kv_dtype))
    return compile_time.cache_stack_copies(text, cache)


def scan_copies(config, layout, images: int, dtype: str, kv_dtype: str | None = None) -> list[str]:
    """The cache-stack copies of `generate`'s scanned program for `config` (abstract weights in `dtype`)."""
    c = config.var
    fn = jax.jit(functools.partial(generate, config=config, layout=layout, top_k=8, kv_dtype=kv_dtype,
                                   layer_loop="scan", dtype=dtype))
    lowered = fn.lower(abstract_params(config, dtype), jnp.zeros((images,), jnp.int32), jax.random.key(0))
    cache = jax.eval_shape(lambda: init_cache(layout, 2 * images, c.num_heads, c.head_dim, dtype, kv_dtype))
    return compile_time.cache_stack_copies(lowered.compile().as_text(), cache)


def test_a_scale_written_in_two_segments_under_the_scan_copies_nothing():
    """d30 (abstract bfloat16 weights, 8 images), two kinds under the scanned loop's masked writes: six layers of 274 slots,
    which take scale 8's 169 tokens in two segments (their ring buffer wraps), and 24 of the condensed scales alone.
    Written piece by piece, XLA copied those stacks 4 times (smaller models' wrapping layouts did not show it)."""
    config = get_preset("d30")
    layout = AMSKV(budgets=(274,) * 6 + (5,) * 24).layout(config.var)
    assert layout.kind_sizes == (6, 24) and len(layout.kinds[0].writes[8]) == 2
    assert scan_copies(config, layout, 8, "bfloat16") == []


@pytest.mark.parametrize("kv_dtype, dtype", [(None, "bfloat16"), ("int8", "float32")])
def test_a_one_layer_kind_written_in_two_segments_under_the_scan_copies_nothing(kv_dtype, dtype):
    """Two one-layer kinds under the scanned loop's masked writes, the first of 46 slots, which takes scale 4's 25
    tokens in two segments (its ring buffer wraps). Piece by piece, or as the layer's rows read whole, XLA copied
    the stacks (2 copies in bfloat16, 3 with an int8 cache; the shipped emoji16l's `amskv`, 7)."""
    config = get_preset("tiny-ladder256")
    layout = AMSKV(budgets=(46, 5)).layout(config.var)
    assert layout.kind_sizes == (1, 1) and len(layout.kinds[0].writes[4]) == 2
    assert scan_copies(config, layout, 1, dtype, kv_dtype) == []


# The full cache, AMS-KV's two kinds unquantised and int8 and both layer loops are checked on the programs that
# `test_layer_loops_and_chunks_of_rows_generate_the_same` runs; these two add bfloat16 weights and packed int4 codes.
@pytest.mark.parametrize("policy, kv_dtype, layer_loop, dtype", [
    ("amskv", None, "scan", "bfloat16"),
    ("amskv", "int4", "scan", "float32"),  # packed codes: uint8 stacks
])
def test_generate_never_copies_a_cache_stack(policy, kv_dtype, layer_loop, dtype):
    layout = LAYOUTS[policy]
    assert len(layout.kinds) == (2 if policy == "amskv" else 1)
    _, text = compiled_generate(layout, kv_dtype, layer_loop, dtype=dtype)
    assert cache_stack_copies(text, layout, kv_dtype, dtype=dtype) == []
    if dtype == "bfloat16":
        # nor a float32 copy of a bfloat16 weight stack: XLA:CPU slices a bfloat16 stack by converting it whole to
        # float32 (held for the whole program) unless the scan slices its bits (`var.stacks_as_bits`)
        stacks = jax.tree.leaves(abstract_params(CONFIG, dtype)["var"]["params"]["blocks"])
        shapes = {"f32[" + ",".join(map(str, leaf.shape)) + "]" for leaf in stacks if leaf.ndim >= 3}
        assert shapes and not [shape for shape in shapes if shape in text]


@pytest.fixture(scope="module")
def params():
    return jax.device_put(init_params(CONFIG, seed=3))


# Each case runs three programs that differ in the layer loop and in the chunk of rows the blocks take at a time
# (4: both images' conditional and unconditional rows at once); every other pair differs in both, so each
# mechanism is compared with another setting of itself. No program copies a cache stack (AMS-KV's demanding kind
# here is a one-layer stack, which the unrolled loop over all rows once copied).
@pytest.mark.parametrize("policy, kv_dtype, runs", [
    ("full", None, (("scan", 4, False), ("unrolled", 1, False), ("unrolled", 2, True))),
    ("amskv", "int8", (("unrolled", 4, False), ("scan", 2, False), ("unrolled", 1, True))),
])
def test_layer_loops_and_chunks_of_rows_generate_the_same(params, policy, kv_dtype, runs):
    """(layer_loop, row_chunk, per-layer params): tokens equal, logits and images to float rounding (matmuls over
    fewer rows round differently; with int8 that can move a cached value by one quantisation step)."""
    layout, labels, outs = LAYOUTS[policy], (1, 4), []
    for loop, chunk, per_layer in runs:
        run_params = {**params, "var": per_layer_blocks(params["var"])} if per_layer else params
        program, text = compiled_generate(layout, kv_dtype, loop, run_params, labels, row_chunk=chunk, top_k=20,
                                          return_logits=True)
        assert cache_stack_copies(text, layout, kv_dtype, batch=len(labels)) == [], (loop, chunk, per_layer)
        outs.append(program(run_params, jnp.asarray(labels, jnp.int32), jax.random.key(2)))
    tol = 1e-5 if kv_dtype is None else 1e-3
    for out in outs[1:]:
        for a, b in zip(outs[0].tokens, out.tokens, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(outs[0].logits, out.logits, strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)
        np.testing.assert_allclose(np.asarray(outs[0].images), np.asarray(out.images), atol=1e-5)


def test_teacher_forcing_with_per_layer_params_equals_the_scan(params):
    model, layout = VAR(CONFIG.var), LAYOUTS["amskv"]
    labels = jnp.array([3, 7], jnp.int32)
    x = jnp.asarray(np.random.default_rng(1).standard_normal(
        (2, CONFIG.var.seq_len - CONFIG.var.first_l, CONFIG.var.cvae), np.float32))
    stacked = model.apply(params["var"], labels, x, layout)
    per_layer = model.apply(per_layer_blocks(params["var"]), labels, x, layout)
    np.testing.assert_allclose(np.asarray(per_layer), np.asarray(stacked), rtol=1e-5, atol=1e-5)


def test_per_layer_params_refuse_the_scan(params):
    with pytest.raises(UserError, match="per-layer"):
        generate({**params, "var": per_layer_blocks(params["var"])}, [1], jax.random.key(0), config=CONFIG,
                 layer_loop="scan")


@pytest.mark.parametrize("row_chunk", [3, 0, 8, True])
def test_a_row_chunk_that_does_not_divide_the_rows_is_refused(params, row_chunk):
    with pytest.raises(UserError, match=r"row_chunk must be None \(automatic\) or a divisor of the 4 rows"):
        generate(params, [1, 4], jax.random.key(0), config=CONFIG, row_chunk=row_chunk)


def test_on_one_cpu_device_the_scan_reads_the_bf16_stacks_bits_in_place(params, monkeypatch):
    """`generate` hands XLA:CPU's scanned loop uint16 views of the bfloat16 stacks (the same memory, no copy; other
    backends get the stacks as they are), so the program holds no copy of them; tokens equal the program that
    bitcasts inside (jit of `generate`), and `amskv_jax.memory` compiles exactly the program that ran (same
    arguments and temporaries)."""
    bf16 = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16) if jnp.issubdtype(a.dtype, jnp.floating) else a, params)
    calls = []
    real = gen_module._generate
    monkeypatch.setattr(gen_module, "_generate", lambda *a, **k: calls.append((a, k)) or real(*a, **k))
    labels, layout = [1, 4], LAYOUTS["amskv"]
    out = generate(bf16, labels, jax.random.key(2), config=CONFIG, layout=layout, dtype="bfloat16", layer_loop="scan")
    (args, kwargs), = calls
    given = jax.tree.leaves(bf16["var"]["params"]["blocks"])
    handed = jax.tree.leaves(args[0]["var"]["params"]["blocks"])
    if jax.default_backend() == "cpu":
        assert kwargs["stack_bits"] == "bfloat16"
        assert all(h.dtype == jnp.uint16 and h.unsafe_buffer_pointer() == g.unsafe_buffer_pointer()
                   for g, h in zip(given, handed, strict=True))
    else:  # a backend with native bfloat16 slices the stacks as they are
        assert kwargs["stack_bits"] is None and all(h.dtype == jnp.bfloat16 for h in handed)
    inside = jax.jit(functools.partial(generate, config=CONFIG, layout=layout, dtype="bfloat16", layer_loop="scan"))(
        bf16, jnp.asarray(labels, jnp.int32), jax.random.key(2))
    for a, b in zip(out.tokens, inside.tokens, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ran = real.lower(*args, **kwargs).compile()
    stacks = {f"u16[{','.join(map(str, leaf.shape))}]" for leaf in handed}
    assert not [t for t in re.findall(r"= (\w+\[[\d,]*\])\{[\d,]*\} copy\(", ran.as_text()) if t in stacks]
    compiled = memory.program_memory(CONFIG, layout, len(labels), "bfloat16", impl="xla", layer_loop="scan")
    stats = ran.memory_analysis()
    assert (compiled.argument_bytes, compiled.temp_bytes) == (stats.argument_size_in_bytes, stats.temp_size_in_bytes)
