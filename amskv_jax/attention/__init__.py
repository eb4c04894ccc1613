"""One dispatch point for attention over the cache: `cached_attention(..., impl=...)`.

`impl` is static; the model never branches on the backend anywhere else.

* "xla": pure JAX over the static live slices of the cache plus the fresh K/V, softmax statistics combined
  (`xla.py`): no copy of the cache, and a layer's cost follows its live slots; any platform, any mesh. The
  concatenating `reference.py` is the truth it and the kernels are tested against.
* "pallas": the Pallas kernel of the platform: on GPU the Triton kernel (`pallas_gpu.py`), on TPU splash attention
  with the layout's mask (`tpu.py`), on CPU the GPU kernel in interpret mode (slow; for tests).
* "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")` over [cache | fresh] with the dynamic mask (no
  block skipping; a baseline for `bench/attention.py`). It needs an NVIDIA GPU and 16-bit inputs; elsewhere it
  raises rather than fall back, so a benchmark can never time the wrong thing.
* "auto": "pallas" on GPU and TPU (the paths that skip dead cache blocks; that they are also the fastest there is
  for `bench/attention.py` to confirm on the hardware), "xla" on CPU (where Pallas only runs interpreted).

"auto" and "pallas" choose the platform where the program is lowered (`jax.lax.platform_dependent`), not while it
is traced: one traced program holds every platform's branch, so `jax.export(..., platforms=["cuda"])` (or "tpu")
from a CPU host carries the Triton (or Mosaic) kernel that hardware runs. "cudnn" exists on NVIDIA GPUs only and is
checked against `jax.default_backend()`.

Quantised caches (`quant.py`) pass `scales` (one `quant.KVScales`) and the static `k_group`: the XLA path, the
reference and the GPU kernel dequantise as they read, the TPU path and cuDNN dequantise first (see each module).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from amskv_jax.attention import pallas_gpu, tpu, xla
from amskv_jax.attention.reference import (
    dequantize_cache, masked_attention, prepare_qk,
)
from amskv_jax.errors import UserError

IMPLS = ("auto", "xla", "pallas", "cudnn")

# The Pallas kernel per platform: "gpu" (CUDA and ROCm: Triton), "tpu" (Mosaic), "cpu" (the GPU kernel interpreted).
PALLAS_KERNELS = {
    "gpu": pallas_gpu.cached_attention,
    "tpu": tpu.cached_attention,
    "cpu": functools.partial(pallas_gpu.cached_attention, interpret=True),
}


def check_impl(impl: str) -> str:
    """Raise for an unknown impl, or for "cudnn" off a GPU; returns impl unchanged."""
    if impl not in IMPLS:
        raise UserError(f"unknown attention impl {impl!r}; allowed: {', '.join(IMPLS)}")
    platform = jax.default_backend()
    if impl == "cudnn" and platform != "gpu":
        raise UserError(
            f"attention impl 'cudnn' needs an NVIDIA GPU, but the platform is {platform!r}; "
            "use 'auto', 'pallas' or 'xla'"
        )
    return impl


def resolve_impl(impl: str) -> str:
    """The concrete implementation ("xla", "pallas" or "cudnn") that `impl` runs on the default backend (for
    reports: the program itself chooses where it is lowered)."""
    if check_impl(impl) != "auto":
        return impl
    return "pallas" if jax.default_backend() in ("gpu", "tpu") else "xla"


def cudnn_attention(q, k, v, cache_k, cache_v, cache_mask, scale_mul_H, *, implementation: str = "cudnn"):
    """cuDNN flash attention on prepared q/k over the concatenated [cache | fresh] keys, masked by cache_mask.

    `implementation="xla"` runs the same preparation through jax's XLA attention (the CPU test of this wrapper).
    """
    if cache_v.dtype not in (jnp.bfloat16, jnp.float16):
        raise UserError(f"cuDNN attention needs bfloat16 or float16 inputs, got {cache_v.dtype}; use 'pallas'/'xla'")
    dtype, l = cache_v.dtype, q.shape[1]
    q, k = prepare_qk(q, k, scale_mul_H)
    keys = jnp.concatenate([cache_k.astype(dtype), k.astype(dtype)], axis=1)
    values = jnp.concatenate([cache_v, v.astype(dtype)], axis=1)
    mask = jnp.concatenate([cache_mask, jnp.ones((l,), bool)])
    mask_11lS = jnp.broadcast_to(mask, (1, 1, l, mask.shape[0]))
    return jax.nn.dot_product_attention(
        q.astype(dtype), keys, values, mask=mask_11lS, scale=1.0, implementation=implementation
    )


def cached_attention(
    q, k, v, cache_k, cache_v, cache_mask, scale_mul_H, *,
    impl: str = "xla",
    static_mask: np.ndarray | tuple[bool, ...] | None = None,
    scales=None,
    k_group: np.ndarray | tuple[int, ...] | None = None,
):
    """Attention of this scale's queries over the cache (masked) plus their own fresh K/V.

    q, k, v: [B, l, H, D] raw projections; cache_k, cache_v: [B, S, H, D]; cache_mask: bool [S] (dynamic);
    scale_mul_H: [H] (None without L2 norm); static_mask: the layout's bool [S] read mask, known at trace time
    (numpy or a tuple, which is hashable), a superset of cache_mask: the kernels skip key blocks it leaves empty;
    None skips nothing. A quantised cache (int8 / float8_e4m3fn / int4 / int2; int4 / int2 codes packed, cache_k/cache_v
    [B, S, H, D / P]) adds its `quant.KVScales` and the static slot -> group map k_group [S]
    (`LayerLayout.slot_groups(si)`). Returns [B, l, H, D] in cache_v's
    dtype (in v's dtype for a quantised cache).
    """
    check_impl(impl)
    args = (q, k, v, cache_k, cache_v, cache_mask, scale_mul_H, scales)

    def run_xla(*args):
        return xla.cached_attention(*args[:7], static_mask=static_mask, scales=args[7], k_group=k_group)

    def run_pallas(platform: str):
        kernel = functools.partial(PALLAS_KERNELS[platform], static_mask=static_mask)
        return lambda *args: _per_shard(kernel, *args[:7], **(
            dict(scales=args[7], k_group=k_group) if args[7] is not None else {}))

    if impl == "xla":
        return run_xla(*args)
    if impl == "cudnn":
        cache_k, cache_v = dequantize_cache(cache_k, cache_v, scales, k_group, v.dtype)
        return cudnn_attention(q, k, v, cache_k, cache_v, cache_mask, scale_mul_H)
    # "auto" and "pallas": the branch of the platform the program is lowered for; "default" is every other (CPU)
    return jax.lax.platform_dependent(
        *args, cuda=run_pallas("gpu"), rocm=run_pallas("gpu"), tpu=run_pallas("tpu"),
        default=run_xla if impl == "auto" else run_pallas("cpu"),
    )


# Where each argument of a kernel is split on a ("data", "model") mesh: rows over "data", heads over "model".
_SHARD_AXES = {
    "q": ("data", None, "model", None), "k": ("data", None, "model", None), "v": ("data", None, "model", None),
    "cache_k": ("data", None, "model", None), "cache_v": ("data", None, "model", None), "cache_mask": (),
    "scale_mul_H": ("model",),
}
# A quantised cache's `quant.KVScales` by rank: k (and k_min) [B, G, H, D], v (and v_min) [B, S, H].
_SCALE_AXES = {4: ("data", None, "model", None), 3: ("data", None, "model")}


def _per_shard(kernel, q, k, v, cache_k, cache_v, cache_mask, scale_mul_H, *, k_group=None, **scales):
    """kernel(...) as is without an ambient mesh; under one (`jax.set_mesh`, as `generate(mesh=...)` sets it), run
    inside `jax.shard_map`, each device on its rows ("data") and heads ("model"): attention is independent per row
    and head, so there are no collectives and each shard runs the same kernel as one device. (A Pallas kernel is an
    opaque custom call that XLA's partitioner cannot split itself.) Mesh axes of other names are left replicated."""
    mesh = jax.sharding.get_abstract_mesh()
    arrays = dict(q=q, k=k, v=v, cache_k=cache_k, cache_v=cache_v, cache_mask=cache_mask, scale_mul_H=scale_mul_H,
                  **scales)
    arrays = {name: x for name, x in arrays.items() if x is not None}
    static = dict(k_group=k_group) if k_group is not None else {}
    if mesh.empty:
        return kernel(**{"scale_mul_H": None, **arrays}, **static)
    spec = lambda axes: P(*(a if a in mesh.axis_names else None for a in axes))  # noqa: E731
    specs = {
        name: jax.tree.map(lambda a: spec(_SCALE_AXES[a.ndim]), x) if name == "scales" else spec(_SHARD_AXES[name])
        for name, x in arrays.items()
    }
    return jax.shard_map(
        lambda kw: kernel(**{"scale_mul_H": None, **kw}, **static), mesh=mesh,
        in_specs=(specs,), out_specs=spec(_SHARD_AXES["q"]),
        check_vma=False,
    )(arrays)


__all__ = [
    "IMPLS", "PALLAS_KERNELS", "cached_attention", "check_impl", "cudnn_attention", "dequantize_cache",
    "masked_attention", "prepare_qk", "resolve_impl",
]
