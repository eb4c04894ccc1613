"""Quantised KV-cache storage: `kv_dtype = None | "bfloat16" | "int8" | "float8_e4m3fn"`.

`kv_dtype` is how the cache *stores* K and V; the model still computes in its own dtype. None (the default) keeps
the cache in the compute dtype, as before. "bfloat16" stores bf16 without scales. "int8" and "float8_e4m3fn" store
the quantised values with float32 scales beside them in the cache (`KindCache`) (their bytes are counted by
`cache.cache_bytes`); K/V are quantised when written (`KindCache.write`) and dequantised inside the attention, on
every path (`attention/`), with the same layout and the same masks. Every cache policy composes with it: the policy
fixes the slots, the storage dtype only what a slot holds.

Scales (KIVI style: K per channel, V per token), with `qmax` 127 for int8 and 448 (the largest finite e4m3fn) for
float8: a group of values x is stored as round(x / s) with s = absmax(x) / qmax, and read as stored · s.

* V, per token: one scale per (row, slot, head), the absmax over the head dim. `v_scale` is float32
  [rows, capacity, H], slot-aligned like `v`, so it is written through the same segments.
* K, per channel: one scale per (row, head, channel) *for each written scale* ("group"): the absmax, over the
  pn² tokens of that scale, of each channel. Why per written scale: K is written scale by scale into slots, and a
  per-channel scale needs a fixed set of tokens to be computed from at write time; the tokens of one scale are
  exactly what one `write` receives, so the scale is computed once, never revised, and the stored values never
  re-quantised (a per-slot-block scale would change when a later scale fills the rest of the block). Groups are
  allocated statically, like slots (`LayerLayout.group` / `slot_groups`): a scale's group is reused once no later
  query reads that scale, so `k_scale` is float32 [rows, group_capacity, H, Dh] with group_capacity the most scales
  live at once (2 for AMS-KV's condensed-only layers, 3 for its window-1 layers, 9 for the full cache at 256px). A
  slot's group is a compile-time fact (`LayerLayout.slot_groups(si)`), so dequantising K is a static gather.
  Channel outliers, which KIVI found in K, then cost precision only in their own channel. Cached K is L2-normalised
  per head (|k| <= 1), so every scale is <= 1/qmax and nothing overflows.
  The cost, for AMS-KV's small layers: a group's per-channel scales (Dh floats) can outweigh a 1- or 4-token scale's
  int8 values; summed over d30's default layout the K scales add about 14 % to the int8 K bytes (V's add 6.25 %),
  still far below a bf16 cache (see `python -m amskv_jax.memory --kv-dtype int8`).

Error, per stored element, exactly: int8 rounds to the nearest step, |x − x̂| <= s/2 = absmax/254 (plus float32
rounding of the product). float8_e4m3fn keeps 3 mantissa bits: |x − x̂| <= 2^-4·|x| for |x|/s >= 2^-6 (normal
numbers), and <= 2^-10·s below (the subnormal step is 2^-9·s), i.e. <= max(|x|/16, absmax/458752).
The attention's own rounding is on top of that: in bf16 the dequantised V is rounded to bf16 as a bf16 cache
would be; dequantised K is f32 in the reference, hi + lo bf16 parts in the GPU kernel.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

KV_DTYPES = ("bfloat16", "int8", "float8_e4m3fn")
QMAX = {jnp.dtype(jnp.int8): 127.0, jnp.dtype(jnp.float8_e4m3fn): 448.0}
SCALE_DTYPE = jnp.float32


def check_kv_dtype(kv_dtype: str | None) -> str | None:
    """Raise for an unknown storage dtype; returns it unchanged (None: the compute dtype)."""
    if kv_dtype is not None and kv_dtype not in KV_DTYPES:
        raise ValueError(f"unknown kv_dtype {kv_dtype!r}; allowed: None (the compute dtype), {', '.join(KV_DTYPES)}")
    return kv_dtype


def storage_dtype(kv_dtype: str | None, compute_dtype) -> jnp.dtype:
    """The dtype of the K/V buffers: `kv_dtype`, or the compute dtype when None."""
    check_kv_dtype(kv_dtype)
    return jnp.dtype(compute_dtype if kv_dtype is None else kv_dtype)


def is_quantized(dtype) -> bool:
    """Whether a storage dtype (name or dtype) carries scales (int8, float8_e4m3fn)."""
    return dtype is not None and jnp.dtype(dtype) in QMAX


def _quantize(x: jax.Array, axis, dtype) -> tuple[jax.Array, jax.Array]:
    """x in `dtype` with one float32 scale per slice over `axis` (reduced away): absmax/qmax."""
    dtype = jnp.dtype(dtype)
    qmax = QMAX[dtype]
    x = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=axis, keepdims=True) / qmax
    y = x / jnp.where(scale > 0, scale, 1.0)
    if jnp.issubdtype(dtype, jnp.integer):
        y = jnp.round(y)
    y = jnp.clip(y, -qmax, qmax).astype(dtype)  # clip: float8 turns values past 448 + 16 into NaN
    return y, jnp.squeeze(scale, axis).astype(SCALE_DTYPE)


def quantize_k(k_BlHD: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """One scale's keys [B, l, H, D] -> (values [B, l, H, D], per-channel scales [B, H, D] over the l tokens)."""
    return _quantize(k_BlHD, 1, dtype)


def quantize_v(v_BlHD: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """Values [B, l, H, D] -> (values [B, l, H, D], per-token scales [B, l, H] over the head dim)."""
    return _quantize(v_BlHD, 3, dtype)


def dequantize_k(k_BSHD: jax.Array, k_scale_BGHD: jax.Array, k_group: np.ndarray) -> jax.Array:
    """float32 keys: each slot's values times the per-channel scales of its group (k_group: static int [S])."""
    scales = jnp.take(k_scale_BGHD, jnp.asarray(np.asarray(k_group), jnp.int32), axis=1)  # [B, S, H, D]
    return k_BSHD.astype(jnp.float32) * scales


def dequantize_v(v_BSHD: jax.Array, v_scale_BSH: jax.Array, dtype=jnp.float32) -> jax.Array:
    """Values times their per-token scales, in `dtype`."""
    return (v_BSHD.astype(jnp.float32) * v_scale_BSH[..., None]).astype(dtype)


def fake_quantize_kv(k_BLHD: jax.Array, v_BLHD: jax.Array, patch_nums: tuple[int, ...], dtype):
    """What a quantised cache gives back for teacher-forced K/V of all L tokens (teacher forcing under a quantised
    cache, `VAR.__call__(..., kv_dtype=...)`): K (already L2-normalised, as cached) quantised per channel over each
    scale's tokens, as each scale's write does, and dequantised to float32; V per token, dequantised to its own
    dtype, as the attention reads them."""
    if not is_quantized(dtype):
        raise ValueError(f"fake_quantize_kv needs a quantised storage dtype ({', '.join(map(str, QMAX))}), got {dtype}")
    dtype = jnp.dtype(dtype)
    keys, begin = [], 0
    for pn in patch_nums:
        stored, scale_BHD = quantize_k(k_BLHD[:, begin:begin + pn * pn], dtype)
        keys.append(stored.astype(jnp.float32) * scale_BHD[:, None])
        begin += pn * pn
    stored, scale_BLH = quantize_v(v_BLHD, dtype)
    return jnp.concatenate(keys, axis=1), dequantize_v(stored, scale_BLH, v_BLHD.dtype)


def error_bound(x: jax.Array, absmax: jax.Array, dtype) -> jax.Array:
    """The largest |x − dequantize(quantize(x))| per element allowed (see the module docstring); float32."""
    dtype = jnp.dtype(dtype)
    scale = absmax.astype(jnp.float32) / QMAX[dtype]
    if jnp.issubdtype(dtype, jnp.integer):
        return scale / 2
    return jnp.maximum(jnp.abs(x.astype(jnp.float32)) * 2.0**-4, scale * 2.0**-10)
