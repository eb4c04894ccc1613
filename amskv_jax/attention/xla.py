"""XLA attention that reads only the cache slots the layout keeps: the `impl="xla"` path (CPU, and any mesh).

Same contract as `reference.cached_attention_reference` (q/k/v [B, l, H, D] raw, cache_k/cache_v [B, S, H, D] with
keys already normalised, cache_mask bool [S] or [l, S], scale_mul_H [H] or None; returns [B, l, H, D] in cache_v's
dtype, in v's for a quantised cache), plus `static_mask`, the layout's read mask known at trace time
(`LayerLayout.read_mask(si)`).

The reference concatenates the whole cache with the fresh K/V, casts it to float32 and attends over every slot,
masked or not. Here:

* the live slots of `static_mask` form a few contiguous runs, known at trace time (`live_runs`); each run is a
  static slice of the cache, so dead slots are never read and a layer's cost follows its live slots, not its
  capacity (AMS-KV's condensed layers read 5 slots of hundreds). No gather, no padding;
* the fresh K/V are a further key source: nothing is concatenated, the cache is never copied;
* the sources' scores are combined through their softmax statistics: one max over all sources (the fresh keys are
  always valid, so it is finite), each source's exp(scores − max) divided by the common sum, then its values
  summed in. This is the reference's softmax split by columns, so the probabilities are rounded to the value
  dtype after normalising, as there.

Quantised caches (int8 / float8_e4m3fn / int4 / int2, `quant.py`): a run is also cut where the K-scale group
changes (`k_group`, static), so each run takes one group's per-channel scales (and minima) by a static index; K is
dequantised to float32 and V to the fresh values' dtype, slice by slice (packed codes unpacked), as the reference
does for the whole cache.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from amskv_jax import quant
from amskv_jax.attention.reference import prepare_qk


def live_runs(static_mask: np.ndarray, k_group: np.ndarray | None = None) -> tuple[tuple[int, int], ...]:
    """Contiguous runs [start, stop) of the slots `static_mask` marks readable, also cut where `k_group` changes."""
    live = np.asarray(static_mask, bool)
    key = np.zeros(live.shape, np.int64) if k_group is None else np.asarray(k_group, np.int64)
    starts = live & np.concatenate([[True], ~live[:-1] | (key[1:] != key[:-1])])
    stops = live & np.concatenate([~live[1:] | (key[1:] != key[:-1]), [True]])
    return tuple((int(a), int(b) + 1) for a, b in zip(np.flatnonzero(starts), np.flatnonzero(stops), strict=True))


def cached_attention(
    q, k, v, cache_k, cache_v, cache_mask, scale_mul_H, *,
    static_mask: np.ndarray | tuple[bool, ...] | None = None,
    scales: quant.KVScales | None = None,
    k_group: np.ndarray | tuple[int, ...] | None = None,
):
    """Attention over the static live slices of the cache plus the fresh K/V (see the module docstring).

    static_mask: bool [S] (numpy or tuple), a superset of every slot `cache_mask` may set; None reads every slot.
    """
    capacity, l = cache_k.shape[1], q.shape[1]
    static_mask = np.ones(capacity, bool) if static_mask is None else np.asarray(static_mask, bool)
    if static_mask.shape != (capacity,):
        raise ValueError(f"static_mask must have shape ({capacity},) like the cache, got {static_mask.shape}")
    quantized = scales is not None
    if quantized and k_group is None:
        raise ValueError("a quantised cache needs its scales and k_group together")
    k_group = np.asarray(k_group, np.int32) if quantized else None
    out_dtype = v.dtype if quantized else cache_v.dtype
    q, k = prepare_qk(q, k, scale_mul_H)

    sources = []  # (keys [B, n, H, D], values [B, n, H, D] in out_dtype, valid bool [l, n] or None)
    for start, stop in live_runs(static_mask, k_group):
        keys, values = cache_k[:, start:stop], cache_v[:, start:stop]
        if quantized:
            k_scale, k_min = scales.k_group(int(k_group[start]))  # [B, H, D] each
            keys = quant.dequantize(keys, k_scale[:, None], None if k_min is None else k_min[:, None], scales.kv_dtype)
            values = scales.dequantize_v(values, out_dtype, slice(start, stop))
        valid = jnp.broadcast_to(cache_mask[..., start:stop], (l, stop - start))
        sources.append((keys, values, valid))
    sources.append((k, v.astype(out_dtype), None))

    scores = []
    for keys, _, valid in sources:
        s = jnp.einsum("bqhd,bkhd->bhqk", q, keys.astype(jnp.float32), preferred_element_type=jnp.float32)
        scores.append(s if valid is None else jnp.where(valid[None, None], s, -jnp.inf))
    m = jnp.max(jnp.stack([jnp.max(s, axis=-1) for s in scores]), axis=0)[..., None]  # [B, H, l, 1]
    exps = [jnp.exp(s - m) for s in scores]
    total = sum(jnp.sum(e, axis=-1, keepdims=True) for e in exps)
    out = sum(
        jnp.einsum("bhqk,bkhd->bqhd", (e / total).astype(out_dtype), values, preferred_element_type=jnp.float32)
        for e, (_, values, _) in zip(exps, sources, strict=True)
    )
    return out.astype(out_dtype)
