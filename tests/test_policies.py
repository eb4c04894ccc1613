"""Cache policies: what each layer keeps, that masks never expose an excluded scale, that slot reuse gives the
smallest capacity, that a policy keeping everything is the full cache, and that bad settings fail early."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amskv_jax.attention import cached_attention, masked_attention, prepare_qk
from amskv_jax.cache import init_cache
from amskv_jax.checkpoint import Model, init_params
from amskv_jax.config import PRESETS, get_preset
from amskv_jax.generate import generate
from amskv_jax.policies import (
    AMSKV, DEFAULT_POLICY, POLICIES, CondensedOnly, FullCache, ScaleBudget, SlidingWindow, policy_from_name,
)

LADDER = get_preset("tiny-ladder256").var
EXTRA = [AMSKV(2, 2), AMSKV(1, 0, demanding_layers=(0,), demanding_window=3), SlidingWindow(3), CondensedOnly(3)]


def _all_policies(config):
    return [policy_from_name(name, config) for name in POLICIES] + EXTRA


def test_condensed_two_plus_window_one_needs_174_slots_per_layer_at_256px():
    assert AMSKV(condensed_scales=2, local_window=1).layout(LADDER).capacities == (174, 174)
    assert FullCache().layout(LADDER).capacities == (424, 424)  # the reference concatenates 680


def test_amskv_keeps_condensed_and_local_scales_and_demanding_layers_their_window():
    policy = AMSKV(condensed_scales=2, local_window=1, demanding_layers=(1,), demanding_window=3)
    layout = policy.layout(LADDER)
    assert layout.layers[0].reads[9] == (0, 1, 8) and layout.layers[1].reads[9] == (0, 1, 6, 7, 8)
    assert layout.layers[0].reads[2] == (0, 1)
    condensed = CondensedOnly(2).layout(LADDER).layers[0]
    assert [condensed.written(si) for si in range(10)] == [True, True] + [False] * 8  # never read, never written
    assert SlidingWindow(2).layout(LADDER).layers[0].reads[9] == (7, 8)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_no_query_can_read_an_excluded_scale_and_capacity_is_the_most_live_tokens(preset):
    """Replays every write of every layer from empty slots (independently of the layout's own bookkeeping) and
    checks, before each scale attends, that the readable slots hold exactly its kept scales, each one whole."""
    config = get_preset(preset).var
    sizes = [pn * pn for pn in config.patch_nums]
    for policy in _all_policies(config):
        for layer, plan in enumerate(policy.layout(config).layers):
            held = np.full(plan.capacity, -1)
            last_reader = [max((t for t, r in enumerate(plan.reads) if s in r), default=-1) for s in range(len(sizes))]
            for si in range(len(sizes)):
                assert plan.reads[si] == policy.reads(layer, si, config.depth, config.patch_nums)
                readable = held[plan.read_mask(si)]
                assert set(readable.tolist()) <= set(plan.reads[si]), (policy, layer, si)
                assert all((readable == s).sum() == sizes[s] for s in plan.reads[si]), (policy, layer, si)
                assert plan.written(si) == (last_reader[si] > si)
                for seg in plan.writes[si]:
                    assert all(last_reader[s] <= si for s in held[seg.slot : seg.slot + seg.length] if s >= 0)
                    held[seg.slot : seg.slot + seg.length] = si
            live = [sum(sizes[s] for s in range(t + 1) if last_reader[s] > t) for t in range(len(sizes))]
            assert plan.capacity == max(live), (policy, layer)


def _cached_vs_gathered_error(layout, qkv, scale_mul):
    """Max |cached attention - attention over the gathered kept tokens| over every layer and scale."""
    errors = []
    for plan in layout.layers:
        rows, _, heads, dim = qkv[0][0].shape
        cache = init_cache(dataclasses.replace(layout, layers=(plan,)), rows, heads, dim, jnp.float32).kinds[0]
        for si, (q, k, v) in enumerate(qkv):
            layer = cache.layer(0)
            out = cached_attention(q, k, v, layer.k, layer.v, layer.read_mask(plan.reads[si]), scale_mul)
            kept = list(plan.reads[si]) + [si]
            q_p, k_all = prepare_qk(q, jnp.concatenate([qkv[s][1] for s in kept], axis=1), scale_mul)
            v_all = jnp.concatenate([qkv[s][2] for s in kept], axis=1)
            want = masked_attention(q_p, k_all, v_all, jnp.ones((q.shape[1], k_all.shape[1]), bool))
            errors.append(jnp.abs(out - want).max())
            if plan.written(si):
                cache = cache.write(0, plan.writes[si], si, prepare_qk(q, k, scale_mul)[1], v)
    return jnp.stack(errors).max()


@pytest.mark.parametrize(
    "policy",
    [AMSKV(2, 1, demanding_layers=(1,), demanding_window=2), ScaleBudget(drafter_layers=(0,))],
    ids=["amskv-demanding-layer", "scalebudget-empty-refiner"],
)
def test_masked_attention_over_the_cache_equals_attention_over_the_gathered_kept_tokens(policy):
    """Random per-scale K/V written through the layout (slot reuse included); every scale's cached attention
    equals plain attention over the kept scales' tokens gathered from the originals, plus its own."""
    config = dataclasses.replace(LADDER, patch_nums=(1, 2, 3, 4, 5))  # short ladder: quick to compile
    sizes = [pn * pn for pn in config.patch_nums]
    keys = jax.random.split(jax.random.key(0), 3 * len(sizes))
    qkv = [[jax.random.normal(keys[3 * si + i], (2, n, 2, 8)) for i in range(3)] for si, n in enumerate(sizes)]
    error = jax.jit(_cached_vs_gathered_error, static_argnums=0)(policy.layout(config), qkv, jnp.array([0.5, 1.5]))
    assert float(error) < 2e-6


def random_model(preset: str, seed: int = 0) -> Model:
    """A model with N(0, 0.05²) weights, made without running the initialisers (much faster than init_params)."""
    config = get_preset(preset)
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: init_params(config, seed))
    params = jax.tree.map(lambda s: jnp.asarray(0.05 * rng.standard_normal(s.shape), s.dtype), shapes)
    return Model(config, params, f"preset {preset}, N(0, 0.05^2) weights (seed {seed})")


def test_amskv_with_windows_keeping_everything_gives_exactly_the_full_cache_tokens_and_logits():
    model = random_model("tiny")
    config = model.config.var
    everything = AMSKV(condensed_scales=0, local_window=3, demanding_layers=(1,), demanding_window=None)
    full, same = FullCache().layout(config), everything.layout(config)
    assert [p.reads for p in same.layers] == [p.reads for p in full.layers]
    assert [p.writes for p in same.layers] == [p.writes for p in full.layers]
    outs = [
        generate(model.params, [1, 4], jax.random.key(3), config=model.config, layout=layout, top_k=20,
                 return_logits=True)
        for layout in (full, same)
    ]
    for a, b in zip(outs[0].tokens + outs[0].logits, outs[1].tokens + outs[1].logits, strict=True):
        np.testing.assert_array_equal(a, b)


def test_named_policies_meet_the_memory_goals_and_the_baselines_fit_the_default_memory():
    config = get_preset("d30").var
    slots = {name: sum(policy_from_name(name, config).layout(config).capacities) for name in POLICIES}
    assert DEFAULT_POLICY == "amskv"
    assert slots["full"] == 30 * 424
    assert 1 - slots["amskv"] / slots["full"] >= 0.80 and 1 - slots["amskv-aggressive"] / slots["full"] >= 0.90
    assert slots["scalebudget"] <= slots["amskv"] < slots["scalebudget"] + 424


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: AMSKV(local_window=-1), "local_window must be an integer >= 0, got -1"),
        (lambda: AMSKV(condensed_scales=-2), "condensed_scales must be an integer >= 0"),
        (lambda: AMSKV(local_window=2, demanding_window=1), r"demanding_window \(1\) must be >= local_window"),
        (lambda: SlidingWindow(window=-1), "window must be an integer >= 0"),
        (lambda: ScaleBudget(refiner_window=-1), "refiner_window must be an integer >= 0"),
        (lambda: AMSKV(demanding_layers=(2,)).layout(LADDER), r"demanding_layers \[2\] out of range.*layers 0..1"),
        (lambda: ScaleBudget(drafter_layers=(-1,)).layout(LADDER), r"drafter_layers \[-1\] out of range"),
        (lambda: AMSKV(depth=30).layout(LADDER), "made for a model of depth 30, not 2"),
        (lambda: CondensedOnly(11).layout(LADDER), "condensed_scales 11 exceeds the 10 scales"),
        (lambda: policy_from_name("h2o", LADDER), "unknown policy 'h2o'; known policies: full, amskv"),
    ],
)
def test_invalid_settings_are_refused_with_a_clear_message(make, message):
    with pytest.raises(ValueError, match=message):
        make()
