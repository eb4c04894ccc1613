"""The static slot layout and the cache pytree: slot reuse, capacities, masks that never read a stale slot."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amskv_jax.cache import build_layout, cache_bytes, init_cache
from amskv_jax.config import PATCH_NUMS_256, get_preset
from amskv_jax.policies import AMSKV, FullCache


def _condensed_plus_window(condensed: int, window: int):
    def reads(layer, si):
        return tuple(s for s in range(si) if s < condensed or s >= si - window)

    return reads


def test_full_cache_holds_every_earlier_scale_and_never_writes_the_last():
    layout = FullCache().layout(get_preset("tiny-ladder256").var)
    sizes = [pn * pn for pn in PATCH_NUMS_256]
    assert layout.capacities == (sum(sizes[:-1]),) * 2  # 424 at 256px: the last scale is never cached
    plan = layout.layers[0]
    assert not plan.written(len(sizes) - 1)
    assert plan.read_mask(9).sum() == 424 and plan.read_mask(0).sum() == 0


def test_slot_reuse_gives_condensed_plus_one_local_scale_174_slots():
    layout = build_layout(_condensed_plus_window(2, 1), 1, PATCH_NUMS_256, "c2w1")
    assert layout.capacities == (5 + 169,)


def test_capacity_equals_most_live_tokens_and_masks_read_exactly_the_kept_scales():
    sizes = [pn * pn for pn in PATCH_NUMS_256]
    for condensed, window in [(0, 1), (2, 0), (2, 2), (1, 3), (3, 9)]:
        reads = _condensed_plus_window(condensed, window)
        plan = build_layout(reads, 1, PATCH_NUMS_256, "test").layers[0]
        last_reader = {s: max((t for t in range(10) if s in reads(0, t)), default=-1) for s in range(10)}
        most_live = max(sum(sizes[s] for s in range(t + 1) if last_reader[s] > t) for t in range(10))
        assert plan.capacity == most_live
        for si in range(10):
            held = plan.slot_scales(si)
            for s in range(si):  # every kept scale is fully present, every other scale is masked
                present = (held == s) & plan.read_mask(si)
                assert present.sum() == (sizes[s] if s in reads(0, si) else 0), (condensed, window, si, s)


def test_write_then_read_mask_follows_the_layout():
    layout = build_layout(_condensed_plus_window(1, 1), 1, (1, 2, 3, 4), "c1w1")
    plan = layout.layers[0]
    cache = init_cache(layout, rows=2, num_heads=1, head_dim=4, dtype=jnp.float32).kinds[0]
    for si, pn in enumerate((1, 2, 3, 4)):
        mask = np.asarray(cache.layer(0).read_mask(plan.reads[si]))
        np.testing.assert_array_equal(mask, plan.read_mask(si))
        k = jnp.full((2, pn * pn, 1, 4), float(si + 1))
        if plan.written(si):
            cache = cache.write(0, plan.writes[si], si, k, k)
    np.testing.assert_array_equal(np.asarray(cache.layer(0).slot_scale), plan.slot_scales(3))
    # slot contents match the scale recorded for them
    for slot, s in enumerate(plan.slot_scales(3)):
        if s >= 0:
            assert float(cache.layer(0).k[0, slot, 0, 0]) == s + 1


def test_cache_bytes_matches_the_buffers():
    layout = FullCache().layout(get_preset("tiny").var)
    cache = init_cache(layout, rows=4, num_heads=2, head_dim=64, dtype=jnp.bfloat16)
    actual = sum(x.size * x.dtype.itemsize for kind in cache.kinds for x in (kind.k, kind.v, kind.slot_scale))
    assert cache_bytes(layout, rows=4, num_heads=2, head_dim=64, dtype=jnp.bfloat16) == actual


@pytest.mark.parametrize("dtype, kv_dtype", [("float32", None), ("bfloat16", None), ("float32", "int8"),
                                             ("float32", "int4")])
@pytest.mark.parametrize("layers", [1, 2])
def test_a_masked_write_of_a_wrapping_scale_is_the_plain_write_where_active_and_nothing_elsewhere(
        layers, dtype, kv_dtype):
    """`KindCache.write(active=...)` of a scale in two segments (one gather, one scatter: `cache.masked_scatter`)
    against the plain write (`active=None`, a slice update per segment), into layer 1 of `layers` (or 0) at rows
    [2, 4) of 4, over a cache whose earlier scales hold random values."""
    config = get_preset("tiny-ladder256").var
    layout = AMSKV(budgets=(46, 46 if layers == 2 else 5)).layout(config)  # kind 0: the 46-slot layers
    assert layout.kind_sizes[0] == layers
    plan, si = layout.kinds[0], 4
    assert len(plan.writes[si]) == 2  # scale 4's 25 tokens in two runs of free slots, 9 then 16
    cache = init_cache(layout, rows=4, num_heads=2, head_dim=8, dtype=dtype, kv_dtype=kv_dtype).kinds[0]
    rng = np.random.default_rng(0)
    tokens = lambda s, rows: jnp.asarray(rng.normal(size=(rows, config.patch_nums[s] ** 2, 2, 8)), dtype)  # noqa: E731
    for s in range(si):
        for index in range(layers):
            cache = cache.write(index, plan.writes[s], s, tokens(s, 4), tokens(s, 4), group=plan.group(s))
    index, k, v = layers - 1, tokens(si, 2), tokens(si, 2)
    write = lambda active: cache.write(index, plan.writes[si], si, k, v, group=plan.group(si), row=2,  # noqa: E731
                                       active=active, mark=False)
    plain, written, kept = write(None), write(jnp.bool_(True)), write(jnp.bool_(False))
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(written), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, c in zip(jax.tree.leaves(cache), jax.tree.leaves(kept), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
    assert not all(np.array_equal(np.asarray(a), np.asarray(b))
                   for a, b in zip(jax.tree.leaves(cache), jax.tree.leaves(plain), strict=True))
