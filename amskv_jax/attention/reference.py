"""Pure-JAX attention: the truth every kernel is tested against.

VAR's attention (reference `models/basic_var.py`, `SelfAttention`) with `attn_l2_norm=True` L2-normalises q and k
over the head dim, multiplies q by the per-head `exp(min(scale_mul, log 100))` and uses softmax scale 1; without
it the softmax scale is 0.25/√Dh. Scores, softmax and accumulation are float32 whatever the input dtype.

Shapes: q [B, l, H, D] (this scale's queries), k/v [B, l, H, D] (their fresh keys/values, raw), cache_k/cache_v
[B, S, H, D] (cached keys already normalised), cache_mask bool [S] or [l, S] (the slots these queries may read).

Quantised caches (`quant.py`: int8 / float8_e4m3fn / int4 / int2 storage) come with `scales` (`quant.KVScales`: K's
[B, G, H, D] per channel per written scale, V's [B, S, H] per token, and for int4 / int2 the minima; their codes
packed, cache_k/cache_v [B, S, H, D / P]) and `k_group`, the static int [S] group of each slot
(`LayerLayout.slot_groups(si)`). They are dequantised here before the same computation: K to float32 (the dtype the
scores use anyway), V to the fresh values' dtype (the compute dtype), which is then the output's dtype.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from amskv_jax import quant

MAX_SCALE_MUL = math.log(100.0)


def l2_normalize(x: jax.Array) -> jax.Array:
    """x / max(‖x‖₂, 1e-12) over the last axis, computed in float32 (as torch's F.normalize under autocast)."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def prepare_qk(q: jax.Array, k: jax.Array, scale_mul_H: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Apply VAR's q/k treatment: L2 norm and clamped per-head scale, or the fixed 0.25/√D scale on q."""
    if scale_mul_H is None:
        return q.astype(jnp.float32) * (0.25 / math.sqrt(q.shape[-1])), k.astype(jnp.float32)
    scale = jnp.exp(jnp.minimum(scale_mul_H.astype(jnp.float32), MAX_SCALE_MUL))
    return l2_normalize(q) * scale[None, None, :, None], l2_normalize(k)


def masked_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, cached: tuple | None = None, low: tuple | None = None,
) -> jax.Array:
    """softmax(q·kᵀ masked) · v with prepared q, k. q [B,l,H,D], k/v [B,n,H,D], mask bool [l,n] -> [B,l,H,D].

    `cached = (k_c, v_c, fresh_LN)`: where fresh_LN (bool [l, n]) is False, a query reads key/value n as a cache
    would hold it (k_c, v_c, e.g. `quant.fake_quantize_kv`), else as given (its own scale, never cached).
    `low = (k_l, v_l, low_LN)` (with `cached`): where low_LN is True, as a low-precision tier holds it instead
    (MiKV, `cache.LayerLayout.low`).
    Every query row is assumed to have at least one valid key (VAR queries always see their own scale).
    """
    if low is not None and cached is None:
        raise ValueError("a low-precision tier goes with `cached` (the other reads)")
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k.astype(q.dtype), preferred_element_type=jnp.float32)
    if cached is not None:
        k_c, v_c, fresh = cached
        scores_c = jnp.einsum("bqhd,bkhd->bhqk", q, k_c.astype(q.dtype), preferred_element_type=jnp.float32)
        scores = jnp.where(fresh[None, None], scores, scores_c)
    if low is not None:
        k_l, v_l, from_low = low
        scores_l = jnp.einsum("bqhd,bkhd->bhqk", q, k_l.astype(q.dtype), preferred_element_type=jnp.float32)
        scores = jnp.where(from_low[None, None], scores_l, scores)
    scores = jnp.where(mask[None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    if cached is None:
        out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    else:
        not_cached = fresh if low is None else fresh | from_low
        own, read = jnp.where(fresh, probs, 0.0), jnp.where(not_cached, 0.0, probs)
        out = jnp.einsum("bhqk,bkhd->bqhd", own.astype(v.dtype), v, preferred_element_type=jnp.float32)
        out += jnp.einsum("bhqk,bkhd->bqhd", read.astype(v_c.dtype), v_c, preferred_element_type=jnp.float32)
        if low is not None:
            read_low = jnp.where(from_low, probs, 0.0)
            out += jnp.einsum("bhqk,bkhd->bqhd", read_low.astype(v_l.dtype), v_l, preferred_element_type=jnp.float32)
    return out.astype(v.dtype)


def dequantize_cache(cache_k, cache_v, scales: quant.KVScales | None, k_group, dtype):
    """(float32 keys, values in `dtype`) of a quantised cache; an unquantised one (scales None) unchanged."""
    if scales is None:
        return cache_k, cache_v
    if k_group is None:
        raise ValueError("a quantised cache needs its scales and k_group together")
    return scales.dequantize_k(cache_k, k_group), scales.dequantize_v(cache_v, dtype)


def cached_attention_reference(
    q, k, v, cache_k, cache_v, cache_mask, scale_mul_H, scales: quant.KVScales | None = None, k_group=None
):
    """This scale's queries against [cache (masked), own fresh K/V (all valid)]. Returns [B, l, H, D] in
    cache_v's dtype (v's dtype for a quantised cache, dequantised first: see the module docstring)."""
    cache_k, cache_v = dequantize_cache(cache_k, cache_v, scales, k_group, v.dtype)
    q, k = prepare_qk(q, k, scale_mul_H)
    l, capacity = q.shape[1], cache_k.shape[1]
    mask = jnp.concatenate(
        [jnp.broadcast_to(cache_mask, (l, capacity)), jnp.ones((l, k.shape[1]), bool)], axis=1
    )
    keys = jnp.concatenate([cache_k.astype(jnp.float32), k], axis=1)
    values = jnp.concatenate([cache_v, v.astype(cache_v.dtype)], axis=1)
    return masked_attention(q, keys, values, mask)
