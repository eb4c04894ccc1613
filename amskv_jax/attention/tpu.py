"""TPU path: jax's block-sparse splash attention with a mask built from the static cache layout.

Same contract as `reference.cached_attention_reference`, plus `static_mask` (`LayerLayout.read_mask(si)`).
Splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`) takes one key sequence per head and a static
mask, which it reduces at trace time to per-block metadata: key blocks the mask leaves empty are never fetched or
computed, fully valid blocks skip the mask, partial ones apply it. So the wrapper

* prepares q and k as the reference does (L2 norm and clamped per-head scale; splash applies no softmax scale of its
  own) and keeps them in f32: q carries the per-head scale (up to 100), and bf16 q·k then misses the reference by
  up to 2.8e-2 (measured with the GPU kernel before it split q into hi + lo parts, which splash cannot do);
* lays the keys out as [cache (S slots) | fresh keys (l) | padding] and the queries as [l | padding], both padded to
  the block sizes splash requires;
* gives splash, per head, the same `NumpyMask` [lq, nk]: cache columns from `static_mask`, fresh columns valid,
  padding columns invalid (padded query rows read like real ones so no row is empty; their output is dropped);
* applies the dynamic `cache_mask` exactly through splash's segment ids (query segment 0; key segment 0 where
  readable, 1 where not): the static mask decides which blocks are visited (it must cover every readable slot),
  the dynamic one which slots inside them count, as in the reference;
* vmaps the per-example kernel over rows (classifier-free-guidance rows included).

Where it falls short of a kernel of our own: the concatenation copies the cache once per call (splash reads a
single key sequence), the keys it reads are f32 (twice the bytes of a bf16 cache), and the L2 norm is an XLA op
before the kernel rather than fused. Without a TPU in reach neither cost has been measured, so no TPU kernel of our
own is written.

Quantised caches (int8 / float8_e4m3fn / int4 / int2, `quant.py`) are dequantised *before* splash attention, which
takes no scales (int4 / int2 codes unpacked): K to float32 (the dtype the keys enter splash in anyway), V to the compute dtype, as the reference does. The
cache is then read in its quantised form once, but the kernel reads a dequantised copy; dequantising in a kernel of
our own would save that copy (see above for why there is none).

Block sizes: block_kv = 128, the smallest splash allows (a multiple of the 128 TPU lanes), because it is the
skipping granularity and the caches are a few hundred slots; block_q = l rounded up to 8 sublanes, at most 128.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from amskv_jax import quant
from amskv_jax.attention.reference import dequantize_cache, prepare_qk

BLOCK_KV = 128


def block_sizes(l: int) -> tuple[int, int]:
    """(block_q, block_kv) for a scale of l queries."""
    return min(128, -(-l // 8) * 8), BLOCK_KV


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@functools.lru_cache(maxsize=256)
def _kernel(mask_bytes: bytes, lq: int, nk: int, num_heads: int, block_q: int, block_kv: int, interpret: bool,
            mesh: jax.sharding.AbstractMesh):
    """A splash kernel for one [lq, nk] mask shared by all heads (cached: building the block metadata is numpy).

    Built eagerly even when first asked for inside a trace (`ensure_compile_time_eval`): its metadata arrays are
    cached with it and must be concrete, not a trace's values (the dispatch traces this kernel inside the
    `platform_dependent` branch for TPU whatever the host). mesh, the ambient abstract mesh (`shard_map`'s, under a
    mesh), is only part of the cache key: the metadata arrays made under one mesh belong to it, and reused under
    another (the same per-shard heads and mask, another data axis) they failed to trace."""
    mask = splash.NumpyMask(np.frombuffer(mask_bytes, bool).reshape(lq, nk))
    with jax.ensure_compile_time_eval():
        return splash.make_splash_mha_single_device(
            splash.MultiHeadMask([mask] * num_heads),
            block_sizes=splash.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv),
            interpret=interpret,
        )


def cached_attention(
    q, k, v, cache_k, cache_v, cache_mask, scale_mul_H, *,
    static_mask: np.ndarray | tuple[bool, ...] | None = None,
    scales: quant.KVScales | None = None,
    k_group: np.ndarray | tuple[int, ...] | None = None,
    interpret: bool = False,
):
    """Splash attention over [cache | fresh]; same arguments and result as `cached_attention_reference`.

    static_mask: bool [S] known at trace time (numpy array or tuple), a superset of the slots `cache_mask` may set;
    key blocks with no slot set are skipped. None reads every block. scales, k_group: a quantised cache's scales and
    static slot -> group map (dequantised before the kernel).
    """
    cache_k, cache_v = dequantize_cache(cache_k, cache_v, scales, k_group, v.dtype)
    B, l, H, D = q.shape
    capacity = cache_k.shape[1]
    static_mask = np.ones(capacity, bool) if static_mask is None else np.asarray(static_mask, bool)
    if static_mask.shape != (capacity,):
        raise ValueError(f"static_mask must have shape ({capacity},) like the cache, got {static_mask.shape}")
    block_q, block_kv = block_sizes(l)
    lq, nk = _round_up(l, block_q), _round_up(capacity + l, block_kv)

    mask_row = np.zeros(nk, bool)
    mask_row[:capacity] = static_mask
    mask_row[capacity : capacity + l] = True
    kernel = _kernel(np.broadcast_to(mask_row, (lq, nk)).tobytes(), lq, nk, H, block_q, block_kv, interpret,
                     jax.sharding.get_abstract_mesh())
    readable = jnp.concatenate([cache_mask, jnp.ones((nk - capacity,), bool)])
    segment_ids = splash.SegmentIds(q=jnp.zeros((lq,), jnp.int32), kv=jnp.where(readable, 0, 1).astype(jnp.int32))

    q, k = prepare_qk(q, k, scale_mul_H)

    def heads_first(x_BnHD, n):
        """[B, m, H, D] -> [B, H, n, D], zero-padded along the sequence."""
        x = jnp.pad(x_BnHD, ((0, 0), (0, n - x_BnHD.shape[1]), (0, 0), (0, 0)))
        return x.transpose(0, 2, 1, 3)

    q_BHqD = heads_first(q, lq)
    k_BHkD = heads_first(jnp.concatenate([cache_k.astype(jnp.float32), k], axis=1), nk)
    v_BHkD = heads_first(jnp.concatenate([cache_v, v.astype(cache_v.dtype)], axis=1), nk)
    o_BHqD = jax.vmap(kernel, in_axes=(0, 0, 0, None))(q_BHqD, k_BHkD, v_BHkD, segment_ids)
    return o_BHqD[:, :, :l].transpose(0, 2, 1, 3).astype(cache_v.dtype)
