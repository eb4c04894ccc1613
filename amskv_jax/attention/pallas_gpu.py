"""GPU Pallas (Triton) kernel: this scale's queries against the cache plus their own fresh K/V, skipping dead blocks.

Same contract as `reference.cached_attention_reference` (q/k/v [B, l, H, D] raw, cache_k/cache_v [B, S, H, D] with
keys already normalised, cache_mask bool [S], scale_mul_H [H] or None; returns [B, l, H, D] in cache_v's dtype), plus
`static_mask`, the layout's compile-time read mask (`LayerLayout.read_mask(si)`).

One program per (row, head, query block); classifier-free-guidance rows are just rows of the grid. Each program:

* loads its `block_q` queries once, L2-normalises them and multiplies by the clamped per-head scale (fused; folded
  with log2(e) so the softmax runs on exp2);
* walks the cache in `block_k`-slot blocks, but only the blocks in which `static_mask` has a valid slot: the valid
  blocks form a few contiguous runs, known at trace time, and each run is one loop with static bounds. Dead blocks
  are never loaded. Inside a block the dynamic `cache_mask` is applied per slot;
* then walks the fresh keys (normalised in the kernel) as a second key source, so the cache is never concatenated
  or copied;
* keeps the online softmax (running max, sum, f32 accumulator) and writes its rows once.

Dots take the cache's dtype and accumulate in f32; f32 runs at HIGHEST precision (no TF32). With a 16-bit cache the
scaled queries (and the fresh keys, which the reference keeps in f32) are split into hi + lo bf16 tiles and q·k is
hi·k + lo·k (+ hi·k_lo). A single bf16 q carries 8 mantissa bits, and with the per-head scale near its clamp (100)
that moved the logits enough for 2.8e-2 relative error against the reference (measured on random inputs shaped like
d16's last scale); the split brings it to 5e-3, the bf16 rounding of the output, for one more tensor-core dot per
block (two bf16 dots cost what one TF32 dot does, with about 16 mantissa bits to TF32's 10). p·v is one bf16 dot,
with p rounded to the value dtype as in the reference.
Queries and keys are not padded in memory: partial blocks use masked loads and stores. `interpret=True` runs the
same kernel on CPU (the tests).

Quantised caches (int8 / float8_e4m3fn / int4 / int2, `quant.py`) are dequantised in the kernel as each key block
is loaded: the scales (`quant.KVScales`) come as more inputs, K's [B, G, H, D] (per channel, one row per written
scale), V's [B, S, H] (per slot), the slot -> group map [S] (static, `LayerLayout.slot_groups(si)`) and for int4 /
int2 the two minima. A block's per-slot K scales are selected from the few group rows its run can hold (known at
trace time: the layout's groups of the run's readable slots; 1-3 for AMS-KV), so there is no gather. int4 / int2
codes are packed along the head dim in P = 2 or 4 column chunks (`quant.py`): the kernel works chunk by chunk
(q·k as the sum of P chunk dots, p·v into P output chunks), each chunk of a packed block one shift and mask away,
so nothing is interleaved; chunks need >= 16 channels (Triton's smallest dot), so D >= 16·P. The dequantised K
(f32) is split into hi + lo parts like the fresh keys, so the scores match the reference's f32 keys (one more dot
per block than a bf16 cache); V is dequantised to the compute dtype (the fresh values' dtype, also the output's), as
the reference does. The quantised bytes are what is read from memory: 1 byte per element instead of 2 (int4: 1/2,
int2: 1/4), plus 4 bytes per slot and head for V's scale (8 with its minimum).

Block sizes (`block_sizes(l)`; chosen by reasoning for an H100, not yet measured on one; `bench/attention.py` sweeps
them): Triton's dots need every tile dimension >= 16 and a power of two. `block_q` is the smallest power of two >= l
up to 64 (16 for scales of 1-16 tokens), then 128 from 512 queries on: small scales waste fewest padded rows, and at
batch 1 (2 rows with guidance) d16's last scale (256 queries, 16 heads) makes 2·16·4 = 128 programs with 64-query
blocks, about one wave on 132 SMs, where 128-query blocks would leave half the SMs idle; 64x64 f32 score tiles are
the usual Triton flash shape for head dim 64 at 4 warps. `block_k` is 64: it is the skipping granularity, and
AMS-KV's dead regions are whole scales of 25-169 tokens, most of which a 64-slot block can skip where a 128-slot
block would often straddle a live slot; caches are at most a few hundred slots, so the loop overhead is small.
Fresh keys use the smallest power of two >= l up to `block_k`.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from amskv_jax import quant
from amskv_jax.attention.reference import MAX_SCALE_MUL
from amskv_jax.errors import UserError

BLOCK_K = 64
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)  # finite: a fully masked block must not produce NaNs
LOG2E = math.log2(math.e)


def block_sizes(l: int) -> tuple[int, int]:
    """(block_q, block_k) for a scale of l queries (see the module docstring for why)."""
    block_q = 128 if l >= 512 else min(64, max(16, pl.next_power_of_2(l)))
    return block_q, BLOCK_K


def valid_block_runs(static_mask: np.ndarray, block_k: int) -> tuple[tuple[int, int], ...]:
    """Contiguous runs [start, stop) of key blocks holding at least one slot `static_mask` marks valid."""
    capacity = static_mask.shape[0]
    padded = np.zeros(pl.cdiv(capacity, block_k) * block_k, bool)
    padded[:capacity] = static_mask
    live = padded.reshape(-1, block_k).any(axis=1)
    edges = np.flatnonzero(np.diff(np.concatenate([[False], live, [False]]).astype(np.int8)))
    return tuple((int(a), int(b)) for a, b in zip(edges[::2], edges[1::2]))


def _zero(dtype) -> int | float:
    """The `other` of a masked load: Triton casts it to the ref's dtype, but not from an int to float8."""
    return 0 if jnp.issubdtype(dtype, jnp.integer) else 0.0


def _split(x, dtype) -> tuple[jax.Array, ...]:
    """f32 x as a sum of `dtype` tiles: (x,) for f32; hi + lo for 16-bit types (about 16 mantissa bits)."""
    if dtype == jnp.float32:
        return (x,)
    hi = x.astype(dtype)
    return hi, (x - hi.astype(jnp.float32)).astype(dtype)


def _kernel(
    q_ref, k_ref, v_ref, cache_k_ref, cache_v_ref, mask_ref, scale_ref, *refs,
    runs, run_groups, kv_dtype, l, capacity, block_q, block_k, block_fresh, l2_norm, precision,
):
    """Refs (one row, one head): q/k/v [l, D], cache_k/cache_v [S, D / P], mask int32 [S], scale f32 [H], then for
    a quantised cache (run_groups not None) k_scale f32 [G, D], v_scale f32 [S], group int32 [S], and for int4 / int2
    k_min f32 [G, D], v_min f32 [S]; last o [l, D].

    Everything with a head dim is handled in P column chunks of D / P channels (P = `quant.chunks(kv_dtype)`, 1
    unless the codes are packed): chunk p of a packed key or value block is its codes shifted by b·p and masked, so
    q·k is the sum of the chunks' dots and p·v fills each chunk of the output on its own."""
    head, qi = pl.program_id(1), pl.program_id(2)
    quantized, parts = run_groups is not None, quant.chunks(kv_dtype)
    asymmetric = kv_dtype in quant.ASYMMETRIC
    if asymmetric:
        k_scale_ref, v_scale_ref, group_ref, k_min_ref, v_min_ref, o_ref = refs
    elif quantized:
        k_scale_ref, v_scale_ref, group_ref, o_ref = refs
    else:
        (o_ref,) = refs
    if quantized:
        dot_dtype = v_dtype = v_ref.dtype  # the compute dtype
    else:
        dot_dtype, v_dtype = cache_k_ref.dtype, cache_v_ref.dtype
    width = q_ref.shape[-1] // parts
    cols = [pl.ds(p * width, width) for p in range(parts)]

    def load_chunks(ref, rows, valid):
        """f32 [n, D / P] chunks of rows `rows` of a [*, D] ref (0 where not valid)."""
        return [plgpu.load(ref.at[rows, col], mask=valid[:, None], other=0.0).astype(jnp.float32) for col in cols]

    def l2_normalize(chunks):
        inv = jax.lax.rsqrt(jnp.maximum(sum(jnp.sum(c * c, axis=-1) for c in chunks), 1e-24))
        return [c * inv[:, None] for c in chunks]

    q_rows = qi * block_q + jnp.arange(block_q) < l
    q = load_chunks(q_ref, pl.ds(qi * block_q, block_q), q_rows)
    if l2_norm:
        q = l2_normalize(q)
    q_parts = [_split(c * (scale_ref[head] * LOG2E), dot_dtype) for c in q]  # scores come out in log2 units

    def attend(carry, k_parts, v, valid):
        """One online-softmax step over a key block. k_parts: per chunk the [n, D / P] dot_dtype parts; v: per chunk
        [n, D / P] v_dtype; valid bool [n]."""
        o, m, s = carry
        pairs = [(qp, kp) for qc, kc in zip(q_parts, k_parts, strict=True)
                 for i, qp in enumerate(qc) for j, kp in enumerate(kc) if i + j < 2]  # no lo·lo
        qk = plgpu.dot(*pairs[0], trans_b=True, precision=precision)
        for qp, kp in pairs[1:]:
            qk += plgpu.dot(qp, kp, trans_b=True, precision=precision)
        qk = jnp.where(valid[None, :], qk, MASK_VALUE)
        m_next = jnp.maximum(m, jnp.max(qk, axis=1))
        alpha = jnp.exp2(m - m_next)
        p = jnp.where(valid[None, :], jnp.exp2(qk - m_next[:, None]), 0.0)
        p_v = p.astype(v_dtype)
        o = tuple(alpha[:, None] * oc + plgpu.dot(p_v, vc, precision=precision) for oc, vc in zip(o, v, strict=True))
        return o, m_next, alpha * s + jnp.sum(p, axis=1)

    def group_rows(ref, groups, group, p):
        """[block_k, D / P]: chunk p of each slot's row of a per-group ref (k_scale, k_min), selected among the
        run's static groups."""
        out = jnp.zeros((block_k, width), jnp.float32)
        for g in groups:
            out = jnp.where((group == g)[:, None], plgpu.load(ref.at[pl.ds(g, 1), cols[p]]), out)
        return out

    def cache_block(groups, j, carry):
        slot = j * block_k + jnp.arange(block_k)
        inside = slot < capacity
        rows = pl.ds(j * block_k, block_k)
        valid = plgpu.load(mask_ref.at[rows], mask=inside, other=0) != 0
        k = plgpu.load(cache_k_ref.at[rows, :], mask=inside[:, None], other=_zero(cache_k_ref.dtype))
        v = plgpu.load(cache_v_ref.at[rows, :], mask=inside[:, None], other=_zero(cache_v_ref.dtype))
        if not quantized:
            return attend(carry, [(k,)], [v], valid)
        # Dequantise: K per channel with its slot's group row, V per slot; packed codes chunk by chunk.
        group = plgpu.load(group_ref.at[rows], mask=inside, other=-1)
        v_scale = plgpu.load(v_scale_ref.at[rows], mask=inside, other=0.0)[:, None]
        if asymmetric:
            v_min = plgpu.load(v_min_ref.at[rows], mask=inside, other=0.0)[:, None]
        k_parts, v_chunks = [], []
        for p in range(parts):
            k_scale = group_rows(k_scale_ref, groups, group, p)
            if asymmetric:
                k_p = quant.unpack_chunk(k, kv_dtype, p).astype(jnp.float32) * k_scale
                k_p += group_rows(k_min_ref, groups, group, p)
                v_p = quant.unpack_chunk(v, kv_dtype, p).astype(jnp.float32) * v_scale + v_min
            else:
                k_p, v_p = k.astype(jnp.float32) * k_scale, v.astype(jnp.float32) * v_scale
            k_parts.append(_split(k_p, dot_dtype))
            v_chunks.append(v_p.astype(v_dtype))
        return attend(carry, k_parts, v_chunks, valid)

    def fresh_block(j, carry):
        valid = j * block_fresh + jnp.arange(block_fresh) < l
        rows = pl.ds(j * block_fresh, block_fresh)
        k = load_chunks(k_ref, rows, valid)
        if l2_norm:
            k = l2_normalize(k)
        v = [c.astype(v_dtype) for c in load_chunks(v_ref, rows, valid)]
        return attend(carry, [_split(c, dot_dtype) for c in k], v, valid)

    carry = (
        tuple(jnp.zeros((block_q, width), jnp.float32) for _ in range(parts)),
        jnp.full((block_q,), -jnp.inf, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    for r, (start, stop) in enumerate(runs):  # static: only blocks with a live slot
        groups = run_groups[r] if quantized else ()
        carry = jax.lax.fori_loop(start, stop, functools.partial(cache_block, groups), carry)
    o, _, s = jax.lax.fori_loop(0, pl.cdiv(l, block_fresh), fresh_block, carry)
    for oc, col in zip(o, cols, strict=True):
        plgpu.store(o_ref.at[pl.ds(qi * block_q, block_q), col], (oc / s[:, None]).astype(o_ref.dtype),
                    mask=q_rows[:, None])


def run_groups(
    runs: tuple[tuple[int, int], ...], static_mask: np.ndarray, k_group: np.ndarray, block_k: int
) -> tuple[tuple[int, ...], ...]:
    """Per run of key blocks, the K-scale groups of the readable slots in it (static; the kernel selects among them)."""
    out = []
    for start, stop in runs:
        slots = slice(start * block_k, stop * block_k)
        out.append(tuple(int(g) for g in np.unique(k_group[slots][static_mask[slots]])))
    return tuple(out)


def cached_attention(
    q, k, v, cache_k, cache_v, cache_mask, scale_mul_H, *,
    static_mask: np.ndarray | tuple[bool, ...] | None = None,
    scales: quant.KVScales | None = None,
    k_group: np.ndarray | tuple[int, ...] | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool = False,
):
    """The kernel; same arguments and result as `cached_attention_reference`, plus the static layout mask.

    static_mask: bool [S] known at trace time (numpy array or tuple); key blocks with no slot set are skipped. It
    must include every slot `cache_mask` may set (the model passes `LayerLayout.read_mask(si)`, which equals it).
    None processes every block. block_q/block_k override `block_sizes(l)` (powers of two >= 16).
    scales, k_group: a quantised cache's `quant.KVScales` and static slot -> group map (see the module docstring);
    the result is then in v's dtype.
    """
    B, l, H, D = q.shape
    capacity = cache_k.shape[1]
    kv_dtype = None if scales is None else scales.kv_dtype
    width = D // quant.chunks(kv_dtype)
    if D & (D - 1) or width < 16:
        raise UserError(f"the Triton kernel needs a power-of-two head dim >= {16 * quant.chunks(kv_dtype)} for "
                         f"kv_dtype {kv_dtype} (column chunks of >= 16 channels), got {D}")
    default_q, default_k = block_sizes(l)
    block_q, block_k = block_q or default_q, block_k or default_k
    static_mask = np.ones(capacity, bool) if static_mask is None else np.asarray(static_mask, bool)
    if static_mask.shape != (capacity,):
        raise ValueError(f"static_mask must have shape ({capacity},) like the cache, got {static_mask.shape}")
    runs = valid_block_runs(static_mask, block_k)
    quantized = scales is not None
    if quantized:
        if k_group is None:
            raise ValueError("a quantised cache needs its scales and k_group together")
        k_group = np.asarray(k_group, np.int32)
        if k_group.shape != (capacity,):
            raise ValueError(f"k_group must have shape ({capacity},) like the cache, got {k_group.shape}")
    if not runs:  # nothing to read (e.g. an empty cache): one dummy slot (group) that the loops never touch
        cache_k = jnp.zeros((B, 1, H, width), cache_k.dtype)
        cache_v = jnp.zeros((B, 1, H, width), cache_v.dtype)
        cache_mask, capacity = jnp.zeros((1,), bool), 1
        if quantized:
            scales = jax.tree.map(lambda x: jnp.zeros((B, 1, *x.shape[2:]), x.dtype), scales)
            k_group, static_mask = np.zeros(1, np.int32), np.zeros(1, bool)

    l2_norm = scale_mul_H is not None
    if l2_norm:
        scale_H = jnp.exp(jnp.minimum(scale_mul_H.astype(jnp.float32), MAX_SCALE_MUL))
    else:
        scale_H = jnp.full((H,), 0.25 / math.sqrt(D), jnp.float32)
    out_dtype = v.dtype if quantized else cache_v.dtype
    f32 = (out_dtype if quantized else cache_k.dtype) == jnp.float32
    kernel = functools.partial(
        _kernel, runs=runs, run_groups=run_groups(runs, static_mask, k_group, block_k) if quantized else None,
        kv_dtype=kv_dtype, l=l, capacity=capacity, block_q=block_q, block_k=block_k,
        block_fresh=min(block_k, max(16, pl.next_power_of_2(l))), l2_norm=l2_norm,
        precision=jax.lax.Precision.HIGHEST if f32 else None,
    )
    seq = lambda n, d=D: pl.BlockSpec((None, n, None, d), lambda b, h, i: (b, 0, h, 0))  # noqa: E731
    whole = lambda n: pl.BlockSpec((n,), lambda b, h, i: (0,))  # noqa: E731
    in_specs = [seq(l), seq(l), seq(l), seq(capacity, width), seq(capacity, width), whole(capacity), whole(H)]
    args = [q, k, v, cache_k, cache_v, cache_mask.astype(jnp.int32), scale_H]
    if quantized:
        per_slot = pl.BlockSpec((None, capacity, None), lambda b, h, i: (b, 0, h))
        groups = scales.k.shape[1]
        in_specs += [seq(groups), per_slot, whole(capacity)]
        args += [scales.k, scales.v, jnp.asarray(k_group)]
        if scales.k_min is not None:
            in_specs += [seq(groups), per_slot]
            args += [scales.k_min, scales.v_min]
    return pl.pallas_call(
        kernel,
        grid=(B, H, pl.cdiv(l, block_q)),
        in_specs=in_specs,
        out_specs=seq(l),
        out_shape=jax.ShapeDtypeStruct((B, l, H, D), out_dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="amskv_cached_attention",
    )(*args)
