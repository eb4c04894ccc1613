"""The static slot layout and the cache pytree: slot reuse, capacities, masks that never read a stale slot."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from amskv_jax.cache import build_layout, cache_bytes, init_cache
from amskv_jax.config import PATCH_NUMS_256, get_preset
from amskv_jax.policies import FullCache


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
