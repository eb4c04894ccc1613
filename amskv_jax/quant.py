"""Quantised KV-cache storage: `kv_dtype = None | "bfloat16" | "int8" | "float8_e4m3fn" | "int4" | "int2"`.

`kv_dtype` is how the cache *stores* K and V; the model still computes in its own dtype. None (the default) keeps
the cache in the compute dtype. "bfloat16" stores bf16 without scales. The quantised ones store the values with
float32 scales beside them in the cache (`KVScales`, one value: `LayerCache.scales`; their bytes are counted by
`cache.cache_bytes`); K/V are quantised when written (`KindCache.write`) and dequantised inside the attention, on
every path (`attention/`), with the same layout and the same masks. Every cache policy composes with it: the policy
fixes the slots, the storage dtype only what a slot holds.

Groups (KIVI's: K per channel, V per token), the same for every quantised dtype:

* V, per token: one group per (row, slot, head), over the head dim. Its scale `KVScales.v` is float32
  [rows, capacity, H], slot-aligned like `v`, so it is written through the same segments.
* K, per channel: one group per (row, head, channel) *for each written scale* ("K-scale group"), over the pn²
  tokens of that scale. Why per written scale: K is written scale by scale into slots, and a per-channel scale needs
  a fixed set of tokens to be computed from at write time; the tokens of one scale are exactly what one `write`
  receives, so the scale is computed once, never revised, and the stored values never re-quantised (a
  per-slot-block scale would change when a later scale fills the rest of the block). Groups are allocated
  statically, like slots (`LayerLayout.group` / `slot_groups`): a scale's group is reused once no later query reads
  that scale, so `KVScales.k` is float32 [rows, group_capacity, H, Dh] with group_capacity the most scales live at
  once (2 for AMS-KV's condensed-only layers, 3 for its window-1 layers, 9 for the full cache at 256px). A slot's
  group is a compile-time fact (`LayerLayout.slot_groups(si)`), so dequantising K is a static gather. Channel
  outliers, which KIVI found in K, then cost precision only in their own channel.

Two schemes:

* Symmetric, 8 bits ("int8", "float8_e4m3fn"): x stored as round(x / s), s = absmax / qmax (qmax 127 for int8, 448,
  the largest finite e4m3fn, for float8), read as stored · s. Cached K is L2-normalised per head (|k| <= 1), so
  every scale is <= 1/qmax and nothing overflows.
* Asymmetric, low-bit ("int4", "int2": KIVI's scheme): x stored as q = round((x − m) / s) in [0, 2^b − 1], with
  m = min and s = (max − min) / (2^b − 1) of the group, read as q · s + m. The minima `KVScales.k_min`, `v_min` are
  float32 of the scales' shapes. The codes are **packed** into uint8 along the head dim, so the buffers are
  [.., Dh·b/8] and memory really shrinks: byte j of a head holds the codes of channels j + p·Dh/P in bits
  [b·p, b·p + b) for p < P = 8/b ("column chunks": chunk p is channels [p·Dh/P, (p+1)·Dh/P)). Packing by chunks
  rather than by neighbouring channels lets a kernel unpack a chunk with one shift and mask and use it as a tile of
  its own (Triton has no cheap interleave); the head dim must be a multiple of P.

Cost of the scales: a K group's per-channel scales (Dh floats, twice that with minima) can outweigh a 1- or 4-token
scale's values; summed over d30's default layout the int8 K scales add about 14 % to the int8 K bytes (V's add
6.25 %); low-bit storage doubles the float32 metadata and shrinks the values, so at int2 with Dh = 64 V's scale and
minimum (8 bytes) are half its 16 bytes of codes (see `python -m amskv_jax.memory --kv-dtype int8 int4 int2`).

Error, per stored element, exactly: int8 rounds to the nearest step, |x − x̂| <= s/2 = absmax/254; int4 / int2
likewise |x − x̂| <= s/2 = (max − min)/30 and /6; all plus float32 rounding. float8_e4m3fn keeps 3 mantissa bits:
|x − x̂| <= 2^-4·|x| for |x|/s >= 2^-6 (normal numbers), and <= 2^-10·s below (the subnormal step is 2^-9·s), i.e.
<= max(|x|/16, absmax/458752). A group whose values are all equal (a 1-token scale's K) is exact under the
asymmetric scheme (s = 0, x̂ = m). The attention's own rounding is on top of that: in bf16 the dequantised V is
rounded to bf16 as a bf16 cache would be; dequantised K is f32 in the reference, hi + lo bf16 parts in the GPU kernel.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from amskv_jax.errors import UserError

SYMMETRIC = {"int8": 127.0, "float8_e4m3fn": 448.0}  # kv_dtype -> qmax
ASYMMETRIC = {"int4": 4, "int2": 2}  # kv_dtype -> bits per code, packed into uint8
KV_DTYPES = ("bfloat16", *SYMMETRIC, *ASYMMETRIC)
SCALE_DTYPE = jnp.float32
PACKED_DTYPE = jnp.uint8


@flax.struct.dataclass
class KVScales:
    """A quantised cache's scales, travelling as one value with its storage dtype (static). In a `LayerCache`:
    k float32 [rows, group_capacity, H, Dh] (per channel per written scale), v float32 [rows, capacity, H] (per
    token); k_min, v_min: the asymmetric scheme's minima, of the same shapes (None for int8 / float8). In a
    `KindCache` each has a leading layer axis."""

    k: jax.Array
    v: jax.Array
    k_min: jax.Array | None = None
    v_min: jax.Array | None = None
    kv_dtype: str = flax.struct.field(pytree_node=False, default="int8")

    def k_group(self, group: int) -> tuple[jax.Array, jax.Array | None]:
        """(scale, minimum or None) of K-scale group `group` (static): [rows, H, Dh] each."""
        return self.k[:, group], None if self.k_min is None else self.k_min[:, group]

    def dequantize_k(self, k_BSHD: jax.Array, k_group: np.ndarray) -> jax.Array:
        """float32 keys [B, S, H, Dh]: each slot's codes with its group's per-channel scales (k_group: static int
        [S], `LayerLayout.slot_groups(si)`)."""
        index = jnp.asarray(np.asarray(k_group), jnp.int32)
        take = lambda x: None if x is None else jnp.take(x, index, axis=1)  # noqa: E731  [B, S, H, Dh]
        return dequantize(k_BSHD, take(self.k), take(self.k_min), self.kv_dtype)

    def dequantize_v(self, v_BSHD: jax.Array, dtype=jnp.float32, slots: slice = slice(None)) -> jax.Array:
        """Values [B, n, H, Dh] in `dtype`: the codes of slots `slots` (static) with their per-token scales."""
        scale, minimum = _expand((self.v[:, slots], None if self.v_min is None else self.v_min[:, slots]), -1)
        return dequantize(v_BSHD, scale, minimum, self.kv_dtype).astype(dtype)


def check_kv_dtype(kv_dtype: str | None, head_dim: int | None = None) -> str | None:
    """Raise for an unknown storage dtype, or one the head dim cannot be packed in; returns it unchanged (None: the
    compute dtype). Every platform stores all of them (low-bit codes are packed into uint8)."""
    if kv_dtype is not None and kv_dtype not in KV_DTYPES:
        raise UserError(f"unknown kv_dtype {kv_dtype!r}; allowed: None (the compute dtype), {', '.join(KV_DTYPES)}")
    if head_dim is not None and kv_dtype in ASYMMETRIC and head_dim % chunks(kv_dtype):
        allowed = [k for k in KV_DTYPES if k not in ASYMMETRIC or head_dim % chunks(k) == 0]
        raise UserError(f"kv_dtype {kv_dtype!r} packs {chunks(kv_dtype)} codes per byte along the head dim, which "
                         f"is {head_dim}; allowed for this model: None (the compute dtype), {', '.join(allowed)}")
    return kv_dtype


def is_quantized(kv_dtype: str | None) -> bool:
    """Whether a storage dtype carries scales (int8, float8_e4m3fn, int4, int2)."""
    return kv_dtype in SYMMETRIC or kv_dtype in ASYMMETRIC


def chunks(kv_dtype: str | None) -> int:
    """Codes per stored element along the head dim: P = 8 / bits for packed storage, else 1."""
    return 8 // ASYMMETRIC[kv_dtype] if kv_dtype in ASYMMETRIC else 1


def storage_dtype(kv_dtype: str | None, compute_dtype) -> jnp.dtype:
    """The dtype of the K/V buffers: uint8 for packed low-bit codes, `kv_dtype`, or the compute dtype when None."""
    check_kv_dtype(kv_dtype)
    if kv_dtype in ASYMMETRIC:
        return jnp.dtype(PACKED_DTYPE)
    return jnp.dtype(compute_dtype if kv_dtype is None else kv_dtype)


def value_bits(kv_dtype: str | None, compute_dtype) -> int:
    """Bits per stored K/V element (before packing): what the memory counts."""
    return ASYMMETRIC[kv_dtype] if kv_dtype in ASYMMETRIC else 8 * storage_dtype(kv_dtype, compute_dtype).itemsize


def _range(x: jax.Array, axis, kv_dtype: str) -> tuple[jax.Array, jax.Array | None]:
    """(scale, minimum or None) per group over `axis` (kept), float32."""
    if kv_dtype in SYMMETRIC:
        return jnp.max(jnp.abs(x), axis=axis, keepdims=True) / SYMMETRIC[kv_dtype], None
    lo, hi = jnp.min(x, axis=axis, keepdims=True), jnp.max(x, axis=axis, keepdims=True)
    return (hi - lo) / (2 ** ASYMMETRIC[kv_dtype] - 1), lo


def _quantize(x: jax.Array, axis, kv_dtype: str) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """(stored values, scale, minimum or None): one float32 scale (and minimum) per slice over `axis` (reduced
    away); asymmetric codes packed along the last axis."""
    x = x.astype(jnp.float32)
    scale, minimum = _range(x, axis, kv_dtype)
    safe = jnp.where(scale > 0, scale, 1.0)
    if kv_dtype in SYMMETRIC:
        qmax, y = SYMMETRIC[kv_dtype], x / safe
        if kv_dtype == "int8":
            y = jnp.round(y)
        stored = jnp.clip(y, -qmax, qmax).astype(kv_dtype)  # clip: float8 turns values past 448 + 16 into NaN
    else:
        codes = jnp.clip(jnp.round((x - minimum) / safe), 0, 2 ** ASYMMETRIC[kv_dtype] - 1)
        stored = pack(codes.astype(jnp.int32), kv_dtype)
    squeeze = lambda a: None if a is None else jnp.squeeze(a, axis).astype(SCALE_DTYPE)  # noqa: E731
    return stored, squeeze(scale), squeeze(minimum)


def pack(codes: jax.Array, kv_dtype: str) -> jax.Array:
    """int codes [..., Dh] in [0, 2^b) -> uint8 [..., Dh / P]: chunk p's codes in bits [b·p, b·p + b)."""
    bits, parts = ASYMMETRIC[kv_dtype], chunks(kv_dtype)
    width = codes.shape[-1] // parts
    packed = sum(codes[..., p * width:(p + 1) * width] << (bits * p) for p in range(parts))
    return packed.astype(PACKED_DTYPE)


def unpack_chunk(packed: jax.Array, kv_dtype: str, p: int) -> jax.Array:
    """Chunk p's codes (channels [p·Dh/P, (p+1)·Dh/P)) of packed uint8 [..., Dh / P], as int32."""
    bits = ASYMMETRIC[kv_dtype]
    return (packed.astype(jnp.int32) >> (bits * p)) & (2**bits - 1)


def dequantize(stored: jax.Array, scale: jax.Array, minimum: jax.Array | None, kv_dtype: str) -> jax.Array:
    """float32 values [..., Dh] of stored values with scales (and minima) broadcast to [..., Dh]."""
    if kv_dtype in SYMMETRIC:
        return stored.astype(jnp.float32) * scale
    codes = jnp.concatenate([unpack_chunk(stored, kv_dtype, p) for p in range(chunks(kv_dtype))], axis=-1)
    return codes.astype(jnp.float32) * scale + minimum


def quantize_k(k_BlHD: jax.Array, kv_dtype: str) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """One scale's keys [B, l, H, Dh] -> (stored [B, l, H, Dh or Dh/P], per-channel scales [B, H, Dh] over the l
    tokens, minima [B, H, Dh] or None)."""
    return _quantize(k_BlHD, 1, kv_dtype)


def quantize_v(v_BlHD: jax.Array, kv_dtype: str) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Values [B, l, H, Dh] -> (stored [B, l, H, Dh or Dh/P], per-token scales [B, l, H] over the head dim, minima
    [B, l, H] or None)."""
    return _quantize(v_BlHD, 3, kv_dtype)


def fake_quantize_kv(k_BLHD: jax.Array, v_BLHD: jax.Array, patch_nums: tuple[int, ...], kv_dtype: str):
    """What a quantised cache gives back for teacher-forced K/V of all L tokens (teacher forcing under a quantised
    cache, `VAR.__call__(..., kv_dtype=...)`): K (already L2-normalised, as cached) quantised per channel over each
    scale's tokens, as each scale's write does, and dequantised to float32; V per token, dequantised to its own
    dtype, as the attention reads them. The same functions as the cache's write and read, so the same values."""
    if not is_quantized(kv_dtype):
        raise ValueError(f"fake_quantize_kv needs a quantised storage dtype "
                         f"({', '.join((*SYMMETRIC, *ASYMMETRIC))}), got {kv_dtype}")
    keys, begin = [], 0
    for pn in patch_nums:
        stored, scale, minimum = quantize_k(k_BLHD[:, begin:begin + pn * pn], kv_dtype)
        keys.append(dequantize(stored, *_expand((scale, minimum), 1), kv_dtype))
        begin += pn * pn
    stored, scale, minimum = quantize_v(v_BLHD, kv_dtype)
    v = dequantize(stored, *_expand((scale, minimum), -1), kv_dtype).astype(v_BLHD.dtype)
    return jnp.concatenate(keys, axis=1), v


def read_as_stored(k_BLHD: jax.Array, v_BLHD: jax.Array, patch_nums: tuple[int, ...], choices: tuple, code=0):
    """(K float32, V in its own dtype) of all L tokens as storage `choices[code]` gives them back
    (`fake_quantize_kv`; None: unquantised, as they are). `code` may be traced (a scanned layer loop whose layers
    have their own precision): `lax.switch` runs the chosen storage's branch only."""

    def branch(kv_dtype):
        if kv_dtype is None:
            return lambda k, v: (k.astype(jnp.float32), v)
        return lambda k, v: fake_quantize_kv(k, v, patch_nums, kv_dtype)

    if len(choices) == 1:
        return branch(choices[0])(k_BLHD, v_BLHD)
    return jax.lax.switch(code, [branch(kv_dtype) for kv_dtype in choices], k_BLHD, v_BLHD)


def _expand(arrays, axis: int) -> list:
    """Each array with a new axis `axis` (None stays None)."""
    return [None if a is None else jnp.expand_dims(a, axis) for a in arrays]
