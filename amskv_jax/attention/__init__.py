"""One dispatch point for attention over the cache: `cached_attention(..., impl=...)`.

`impl` is static: "xla" is the pure-JAX reference (`reference.py`). The model never branches on the backend
anywhere else.
"""
from __future__ import annotations

from amskv_jax.attention.reference import cached_attention_reference, masked_attention, prepare_qk

IMPLS = ("xla",)


def check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; allowed: {', '.join(IMPLS)}")
    return impl


def cached_attention(q, k, v, cache_k, cache_v, cache_mask, scale_mul_H, *, impl: str = "xla"):
    """Attention of this scale's queries over the cache (masked) plus their own fresh K/V.

    q, k, v: [B, l, H, D] raw projections; cache_k, cache_v: [B, S, H, D]; cache_mask: bool [S];
    scale_mul_H: [H] (None without L2 norm). Returns [B, l, H, D].
    """
    return cached_attention_reference(q, k, v, cache_k, cache_v, cache_mask, scale_mul_H)


__all__ = ["IMPLS", "cached_attention", "check_impl", "masked_attention", "prepare_qk"]
