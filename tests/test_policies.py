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
from amskv_jax.config import PRESETS, get_preset
from amskv_jax.errors import UserError
from amskv_jax.generate import generate
from amskv_jax.policies import (
    AMSKV, CALIBRATION_FORMAT, DEFAULT_POLICY, POLICIES, CondensedOnly, FullCache, Ladder, ScaleBudget, SlidingWindow,
    budget_levels, fifo_reads, policy_from_name,
)
from conftest import random_model

LADDER = get_preset("tiny-ladder256").var
CALIBRATION = {"format": CALIBRATION_FORMAT, "depth": 2, "patch_nums": list(LADDER.patch_nums),
               "demanding_layers": [1], "scores": {"similarity": [0.5, 0.1], "dispersion": [0.2, 0.3]}}
EXTRA = [SlidingWindow(3), CondensedOnly(3), Ladder(span=2), Ladder(span=1, condensed_scales=0)]


def _all_policies(config):
    """Every named policy, some more settings, and AMS-KV with budgets between and at the ladder's levels."""
    levels = budget_levels(config.patch_nums)
    budgets = [levels[(i * 7) % len(levels)] + (i % 3) for i in range(config.depth)]  # off-level budgets too
    return [policy_from_name(name, config) for name in POLICIES] + EXTRA + [
        AMSKV(budgets=budgets), AMSKV(budgets=(None,) * config.depth, condensed_scales=1)
    ]


def test_condensed_two_plus_the_latest_scale_needs_174_slots_per_layer_at_256px():
    assert AMSKV(budgets=(174, 174)).layout(LADDER).capacities == (174, 174)
    assert AMSKV(budgets=(173, 173)).layout(LADDER).capacities == (169, 169)  # scale 8 no longer fits beside 0, 1
    assert FullCache().layout(LADDER).capacities == (424, 424)  # the reference concatenates 680


def test_amskv_locks_the_condensed_scales_and_evicts_whole_scales_first_in_first_out():
    sizes = [pn * pn for pn in LADDER.patch_nums]  # 1 4 9 16 25 36 64 100 169 256
    assert fifo_reads(9, sizes, 2, 5 + 169 + 100) == (0, 1, 7, 8)
    assert fifo_reads(9, sizes, 2, 5 + 169 + 100 - 1) == (0, 1, 8)  # scale 7 evicted whole, never in part
    assert fifo_reads(8, sizes, 2, 5 + 100 + 64) == (0, 1, 6, 7)
    assert fifo_reads(9, sizes, 2, 100) == (0, 1)  # scale 8 alone does not fit: nothing older is kept past it
    assert fifo_reads(1, sizes, 2, 5) == (0,) and fifo_reads(4, sizes, 2, None) == (0, 1, 2, 3)
    layout = AMSKV(budgets=(174, 274)).layout(LADDER)
    assert layout.layers[0].reads[9] == (0, 1, 8) and layout.layers[1].reads[9] == (0, 1, 7, 8)
    assert layout.layers[0].reads[2] == (0, 1) and layout.capacities == (174, 274)


def test_budget_levels_are_the_capacities_budgets_can_reach_and_two_level_fills_the_cut():
    levels = budget_levels(LADDER.patch_nums)
    assert levels[0] == 5 and levels[-1] == 424 and 174 in levels and 173 not in levels
    for budget in range(5, 425, 7):  # every budget holds exactly its highest level below it
        held = max(level for level in levels if level <= budget)
        assert AMSKV(budgets=(budget, budget)).layout(LADDER).capacities == (held, held)
    d30 = get_preset("d30").var
    budgets = {}
    for cut in (0.5, 0.7, 0.8, 0.9):
        policy = AMSKV.two_level(d30.patch_nums, 30, cut, demanding_layers=range(6))
        c_max, c_min = budgets[cut] = policy.budgets[0], policy.budgets[-1]
        assert set(policy.budgets[:6]) == {c_max} and set(policy.budgets[6:]) == {c_min} and c_max >= c_min
        total = (1 - cut) * 30 * 424
        assert sum(policy.layout(d30).capacities) <= total
        if c_max < levels[-1]:  # the demanding layers' next level would not leave the others the condensed scales
            assert 6 * levels[levels.index(c_max) + 1] + 24 * levels[0] > total
        assert 6 * c_max + 24 * levels[levels.index(c_min) + 1] > total  # nor one level more for the others
    # the demanding layers keep everything while the cut allows, then the others shrink to the condensed scales
    assert budgets[0.5] == (424, 155) and budgets[0.7] == (424, 46) and budgets[0.8] == (399, 5)
    assert budgets[0.9] == (174, 5)
    assert AMSKV.two_level(d30.patch_nums, 30, 0.8, ()).budgets == (82,) * 30  # no demanding layer: uniform


def test_ladder_windows_shift_from_the_oldest_scales_in_layer_0_to_the_newest_in_the_last_layer():
    config = dataclasses.replace(LADDER, depth=4)
    layout = Ladder(span=2).layout(config)
    assert [plan.reads[9] for plan in layout.layers] == [(0, 1, 2, 3), (0, 1, 4, 5), (0, 1, 5, 6), (0, 1, 7, 8)]
    assert all(plan.reads[3] == (0, 1, 2) for plan in layout.layers)  # history shorter than the span: all of it
    assert set().union(*(plan.reads[9] for plan in layout.layers)) == set(range(9))  # together: the whole history
    assert sum(layout.capacities) < 0.5 * sum(FullCache().layout(config).capacities)
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
    [AMSKV(budgets=(14, 30)), ScaleBudget(drafter_layers=(0,)), Ladder(span=1)],
    ids=["amskv-two-budgets", "scalebudget-empty-refiner", "ladder"],
)
def test_masked_attention_over_the_cache_equals_attention_over_the_gathered_kept_tokens(policy):
    """Random per-scale K/V written through the layout (slot reuse included); every scale's cached attention
    equals plain attention over the kept scales' tokens gathered from the originals, plus its own."""
    config = dataclasses.replace(LADDER, patch_nums=(1, 2, 3, 4, 5))  # short ladder: quick to compile
    sizes = [pn * pn for pn in config.patch_nums]
    rng = np.random.default_rng(0)
    qkv = [[jnp.asarray(rng.standard_normal((2, n, 2, 8), np.float32)) for _ in range(3)] for n in sizes]
    error = jax.jit(_cached_vs_gathered_error, static_argnums=0)(policy.layout(config), qkv, jnp.array([0.5, 1.5]))
    assert float(error) < 2e-6


def test_amskv_with_budgets_keeping_everything_gives_exactly_the_full_cache_tokens_and_logits():
    model = random_model("tiny")
    config = model.config.var
    everything = AMSKV(budgets=(14, None), condensed_scales=0)
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
    for name, cut in (("amskv", 0.75), ("amskv-70", 0.70), ("amskv-80", 0.80), ("amskv-90", 0.90)):
        assert 1 - slots[name] / slots["full"] >= cut, name
    assert slots["scalebudget"] <= slots["amskv"] < slots["scalebudget"] + 424


def test_scalebudget_keeps_one_drafter_where_a_whole_layer_exceeds_the_default_memory():
    """A 6-layer model on the 256px ladder (emoji16l's shape): the default AMS-KV holds 380 slots, one whole layer
    424, so 'as many drafters as fit' would be none and the policy no cache at all."""
    config = dataclasses.replace(get_preset("d16").var, depth=6)
    default = sum(policy_from_name("amskv", config).layout(config).capacities)
    assert default < 424
    policy = policy_from_name("scalebudget", config)
    assert policy.drafter_layers == (0,)
    assert sum(policy.layout(config).capacities) == 424


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: AMSKV(budgets=(5, -1)), "every budget must be an integer >= 0 or None"),
        (lambda: AMSKV(budgets=(5, 5), condensed_scales=-2), "condensed_scales must be an integer >= 0"),
        (lambda: AMSKV(budgets=5), "budgets must be a sequence of per-layer slot counts, got 5"),
        (lambda: AMSKV(budgets=(5, 4)).layout(LADDER), r"budgets \[\(1, 4\)\] .* below the 5 slots of the 2 condensed"),
        (lambda: AMSKV(budgets=(5, 5), patch_nums=(1, 2)).layout(LADDER), r"chosen for the ladder \[1, 2\], not"),
        (lambda: AMSKV.two_level(LADDER.patch_nums, 2, 1.0, ()), r"cut must be in \[0, 1\), got 1.0"),
        (lambda: AMSKV.two_level(LADDER.patch_nums, 2, 0.995, ()), "the condensed scales alone need 10"),
        (lambda: Ladder(span=-1), "span must be an integer >= 0"),
        (lambda: SlidingWindow(window=-1), "window must be an integer >= 0"),
        (lambda: ScaleBudget(refiner_window=-1), "refiner_window must be an integer >= 0"),
        (lambda: AMSKV.two_level(LADDER.patch_nums, 2, 0.5, (2,)), r"demanding_layers \[2\] out of range.*0..1"),
        (lambda: ScaleBudget(drafter_layers=(-1,)).layout(LADDER), r"drafter_layers \[-1\] out of range"),
        (lambda: AMSKV(budgets=(5,) * 30).layout(LADDER), "made for a model of depth 30, not 2"),
        (lambda: CondensedOnly(11).layout(LADDER), "condensed_scales 11 exceeds the 10 scales"),
        (lambda: policy_from_name("h2o", LADDER), "unknown policy 'h2o'; known policies: full, amskv"),
        (lambda: policy_from_name("amskv", LADDER, {**CALIBRATION, "patch_nums": [1, 2, 3]}),
         r"the calibration is for the ladder \[1, 2, 3\], not \[1, 2, 3, 4"),
        (lambda: policy_from_name("amskv", LADDER, {**CALIBRATION, "depth": 3}),
         "the calibration is for a model of depth 3, not 2"),
    ],
)
def test_invalid_settings_are_refused_with_a_clear_message(make, message):
    with pytest.raises(UserError, match=message):
        make()
