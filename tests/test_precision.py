"""Per-layer precision (`policies.PerLayerPrecision`, KVTuner's idea): each layer's cache in its own storage dtype,
as separate cache kinds of exactly their storage's bytes; generation under it reproduced by teacher forcing; one
compiled scoring program for every per-layer choice; the search that picks capacity and precision under one byte
bound; and its calibration file loaded back (or refused)."""
from __future__ import annotations

import dataclasses
import functools
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amskv_jax import sampling
from amskv_jax.cache import cache_bytes, init_cache, layer_bytes
from amskv_jax.config import get_preset
from amskv_jax.errors import UserError
from amskv_jax.generate import generate
from amskv_jax.nll import policy_nll, unguided_nll
from amskv_jax.policies import AMSKV, FullCache, MiKV, PerLayerPrecision, budget_levels, read_calibration
from amskv_jax.search import search_budgets
from amskv_jax.var import VAR
from amskv_jax.vqvae import VQVAE
from conftest import random_model


def _rel(out, ref) -> float:
    return float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))


def test_each_storage_is_its_own_kind_of_its_own_bytes():
    """Two layers of one slot plan in two storages make two kinds; a layer without its own storage takes the
    cache's; `cache_bytes` is the sum of the buffers."""
    c = get_preset("tiny").var
    layout = PerLayerPrecision(FullCache(), (None, "int4")).layout(c)
    assert len(layout.kinds) == 2 and layout.storages("int8") == ("int8", "int4")
    cache = init_cache(layout, rows=4, num_heads=c.num_heads, head_dim=c.head_dim, dtype=jnp.bfloat16,
                       kv_dtype="int8")
    assert [kind.scales.kv_dtype for kind in cache.kinds] == ["int8", "int4"]
    assert cache.kinds[0].k.shape[-1] == c.head_dim and cache.kinds[1].k.shape[-1] == c.head_dim // 2
    actual = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
    assert cache_bytes(layout, 4, c.num_heads, c.head_dim, jnp.bfloat16, "int8") == actual
    plain = PerLayerPrecision(FullCache(), (None, None)).layout(c)
    assert len(plain.kinds) == 1 and cache_bytes(plain, 4, c.num_heads, c.head_dim, jnp.bfloat16) > actual


def _forcing_errors(model, layout, forced: dict) -> tuple[dict, object, np.ndarray]:
    """Generate 4 images under `layout` (greedy, logits kept), then teacher-force their tokens under each layout of
    `forced`: ({name: the largest relative error of the guided logits over the scales}, the generation, the
    teacher-forcing inputs)."""
    c = model.config.var
    labels = jnp.arange(4) % c.num_classes
    out = generate(model.params, labels, jax.random.key(0), config=model.config, layout=layout, top_k=0, top_p=0.0,
                   return_logits=True)
    x = VQVAE(model.config.vqvae).apply(model.params["vqvae"], out.tokens, method=VQVAE.idx_to_var_input)
    rows = sampling.guidance_rows(labels, c.num_classes)
    errors = {}
    for name, other in forced.items():
        logits = VAR(c).apply(model.params["var"], rows, jnp.repeat(x, 2, axis=0), layout=other)
        errors[name] = max(
            _rel(sampling.apply_guidance(logits[:, b:e], 1.5, sampling.guidance_ratio(si, c.num_scales)), ref)
            for si, ((b, e), ref) in enumerate(zip(c.begin_ends, out.logits, strict=True))
        )
    return errors, out, np.asarray(x)


@pytest.mark.parametrize("policy", [
    PerLayerPrecision(FullCache(), (None, "int4")),
    PerLayerPrecision(AMSKV(budgets=(10, None), condensed_scales=1), ("int8", "int2")),
], ids=["full-compute-int4", "amskv-int8-int2"])
def test_teacher_forcing_reproduces_generation_with_per_layer_storage(policy):
    """Cached per-scale logits of a generation under the policy against teacher forcing under its layout (which
    reads each layer's earlier scales in that layer's storage): within the quantised-cache bound of
    `test_quant.py` (rounding flips a few elements); teacher forcing that ignores the storage is 10× further."""
    model = random_model("tiny")
    c = model.config.var
    errors, _, _ = _forcing_errors(model, policy.layout(c), {"storage": policy.layout(c),
                                                             "ignored": policy.policy.layout(c)})
    assert errors["storage"] < 3e-3 and errors["ignored"] > 10 * errors["storage"], errors


def test_one_scoring_program_serves_every_per_layer_storage():
    """`unguided_nll` with the search's choices (storage codes an argument) equals the layout's own program and
    `policy_nll`; storing layers in int2 moves the NLL."""
    model = random_model("tiny")
    c = model.config.var
    rng = np.random.default_rng(0)
    n = 6
    gt = rng.integers(0, c.vocab_size, (n, c.seq_len)).astype(np.int32)
    x = rng.standard_normal((n, c.seq_len - c.first_l, c.cvae)).astype(np.float32)
    labels = np.arange(n) % c.num_classes
    choices = (None, "int8", "int4", "int2")
    for storages in [("int2", None), ("int4", "int2")]:
        layout = PerLayerPrecision(FullCache(), storages).layout(c)
        shared = unguided_nll(model, layout, gt, x, labels, batch=4, choices=choices)
        own = unguided_nll(model, layout, gt, x, labels, batch=4)
        both = policy_nll(model, {"p": layout}, gt, x, labels, batch=4)["p"].mean_unguided
        assert shared == pytest.approx(own, rel=1e-6) and own == pytest.approx(both, rel=1e-6)
    plain = unguided_nll(model, FullCache().layout(c), gt, x, labels, batch=4, choices=choices)
    assert abs(shared - plain) > 1e-4
    with pytest.raises(UserError, match="teacher forcing reproduces quantised caches"):
        policy_nll(model, {"p": PerLayerPrecision(FullCache(), ("bfloat16", None)).layout(c)}, gt, x, labels)


CONFIG = dataclasses.replace(get_preset("tiny-ladder256").var, depth=3, patch_nums=(1, 2, 3, 4, 5, 6))
LEVELS = budget_levels(CONFIG.patch_nums)
STORAGES = (None, "int8", "int4", "int2")
LOSS = {None: 0.0, "int8": 0.001, "int4": 0.004, "int2": 0.05}  # what storing a layer in each costs
WEIGHTS = np.array([3.0, 1.0, 2.0])


def _policy_parts(policy):
    if isinstance(policy, PerLayerPrecision):
        return policy.policy.budgets, policy.kv_dtypes
    return policy.budgets, (None,) * CONFIG.depth


def separable(policy) -> float:
    budgets, storages = _policy_parts(policy)
    return float(sum(w * np.exp(-b / 20) + LOSS[s] for w, b, s in zip(WEIGHTS, budgets, storages, strict=True)))


def test_the_search_trades_capacity_for_precision_within_the_byte_bound():
    """On a separable score the mixed search finds the brute-force optimum over every (level, storage) per layer
    within the byte bound, stays within it, and beats the capacity-only search at the same fraction."""
    budget = 0.2  # at 0.1 the tiny config's float32 scales outweigh what low bits save: compute dtype only
    mixed = search_budgets(CONFIG, separable, budget, progress=False, precisions=STORAGES[1:])
    plans = {level: AMSKV(budgets=(level,) * 3).layout(CONFIG).layers[0] for level in LEVELS}

    def row_bytes(level, storage):
        return layer_bytes(dataclasses.replace(plans[level], kv_dtype=storage), 1, CONFIG.num_heads,
                           CONFIG.head_dim, jnp.bfloat16)

    assert mixed.full_bytes == 3 * row_bytes(LEVELS[-1], None)
    assert mixed.bytes == sum(row_bytes(b, s) for b, s in zip(mixed.budgets, mixed.kv_dtypes, strict=True))
    assert mixed.bytes <= mixed.byte_bound == int(budget * mixed.full_bytes)
    layout = mixed.policy(CONFIG.patch_nums).layout(CONFIG)
    assert cache_bytes(layout, 1, CONFIG.num_heads, CONFIG.head_dim, jnp.bfloat16) == mixed.bytes
    options = list(itertools.product(LEVELS, STORAGES))
    best = min(
        separable(PerLayerPrecision(AMSKV(budgets=tuple(o[0] for o in combo)), tuple(o[1] for o in combo)))
        for combo in itertools.product(options, repeat=3)
        if sum(row_bytes(*o) for o in combo) <= mixed.byte_bound
    )
    assert mixed.nll == pytest.approx(best, rel=1e-9)
    capacity_only = search_budgets(CONFIG, separable, budget, progress=False)
    assert capacity_only.kv_dtypes is None and mixed.nll < capacity_only.nll
    assert any(s is not None for s in mixed.kv_dtypes)


def test_a_searched_precision_file_loads_and_a_bad_one_is_refused(tmp_path):
    c = CONFIG
    data = {
        "format": "amskv-calibration/1", "depth": 3, "patch_nums": list(c.patch_nums), "demanding_layers": [0],
        "scores": {"similarity": [0.1, 0.2, 0.3], "dispersion": [0.1, 0.2, 0.3]},
        "search": {"budgets": [55, 14, 5], "condensed_scales": 2, "kv_dtypes": [None, "int4", "int2"]},
    }
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(data))
    policy = AMSKV.from_calibration(read_calibration(path, c))
    assert policy == PerLayerPrecision(AMSKV(budgets=(55, 14, 5), patch_nums=c.patch_nums), (None, "int4", "int2"))
    assert policy.layout(c).storages(None) == (None, "int4", "int2")
    data["search"]["kv_dtypes"] = [None, "int3", "int2"]
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"mixed\.json: search\.kv_dtypes must be 3 storage dtypes"):
        read_calibration(path, c)


# --- MiKV on scales: the scales a policy drops kept in a low-precision tier ---------------------------------------

@pytest.mark.parametrize("preset", ["tiny", "tiny-ladder256"])
def test_mikv_tiers_split_every_earlier_scale_and_count_their_bytes(preset):
    c = get_preset(preset).var
    base = AMSKV(budgets=(budget_levels(c.patch_nums)[0],) * c.depth)
    layout = MiKV(base, "int2").layout(c)
    for plan, kept in zip(layout.layers, base.layout(c).layers, strict=True):
        assert plan.reads == kept.reads and plan.low.kv_dtype == "int2"
        for si in range(c.num_scales):
            assert sorted(plan.reads[si] + plan.low.reads[si]) == list(range(si))
    cache = init_cache(layout, rows=2, num_heads=c.num_heads, head_dim=c.head_dim, dtype=jnp.bfloat16)
    actual = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
    assert cache_bytes(layout, 2, c.num_heads, c.head_dim, jnp.bfloat16) == actual
    full = cache_bytes(FullCache().layout(c), 2, c.num_heads, c.head_dim, jnp.bfloat16)
    assert cache_bytes(base.layout(c), 2, c.num_heads, c.head_dim, jnp.bfloat16) < actual
    assert actual < full


def test_teacher_forcing_reproduces_generation_under_mikv():
    """As with per-layer storage: a generation's cached logits under MiKV (AMS-KV's kept scales as computed, the
    dropped ones in int4) against teacher forcing under its layout; teacher forcing under AMS-KV alone (the
    dropped scales unread) or the full cache (read exactly) is 10× further."""
    model = random_model("tiny")
    c = model.config.var
    base = AMSKV(budgets=(10, None), condensed_scales=1)  # layer 0 drops scale 1 at scale 3; layer 1 drops none
    policy = MiKV(base, "int4")
    layout = policy.layout(c)
    errors, out, x = _forcing_errors(model, layout, {"mikv": layout, "amskv": base.layout(c),
                                                     "full": FullCache().layout(c)})
    assert errors["mikv"] < 3e-3 and min(errors["amskv"], errors["full"]) > 10 * errors["mikv"], errors
    gt, labels = np.asarray(jnp.concatenate(out.tokens, axis=1)), np.arange(4) % c.num_classes
    scored = unguided_nll(model, layout, gt, x, labels, batch=4)
    assert scored == pytest.approx(policy_nll(model, {"m": layout}, gt, x, labels, batch=4)["m"].mean_unguided,
                                   rel=1e-6)


def test_mikv_refuses_an_unquantised_tier():
    with pytest.raises(UserError, match="MiKV's low_dtype must be a quantised storage dtype; got 'bfloat16'"):
        MiKV(AMSKV(budgets=(5, 5)), "bfloat16")


def test_the_pallas_kernel_reads_both_tiers_as_the_xla_path_does():
    """MiKV through `impl="pallas"` (the GPU kernel, interpreted on CPU) gives the XLA path's tokens and logits."""
    model = random_model("tiny")
    c = model.config.var
    layout = MiKV(AMSKV(budgets=(10, None), condensed_scales=1), "int4").layout(c)
    run = functools.partial(generate, model.params, jnp.arange(4) % c.num_classes, jax.random.key(0),
                            config=model.config, layout=layout, top_k=0, top_p=0.0, return_logits=True)
    xla, pallas = run(impl="xla"), run(impl="pallas")
    for a, b in zip(xla.tokens, pallas.tokens, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(xla.logits, pallas.logits, strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5)
