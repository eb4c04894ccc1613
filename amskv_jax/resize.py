"""Torch-compatible image resizing as precomputed matrices.

VAR moves between token scales with torch's `F.interpolate`: bicubic (`align_corners=False`) to bring a scale's
code map up to the latent grid, area (adaptive average pooling) to bring the running reconstruction down to the next
scale. `jax.image.resize` does not reproduce either: its cubic kernel uses a = −0.5 (torch: −0.75) and it
antialiases when shrinking, so tokens chosen after a resize would drift from the reference.

Both resizes are fixed linear maps per (n_in, n_out) pair and separable over height and width, so each is built
once in float64 as an (n_out, n_in) matrix and applied with one einsum: `out = M_h · x · M_wᵀ` per channel. The
matrices are tiny (at most 32×32 on the published ladders) and the einsum runs at full precision.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

CUBIC_A = -0.75  # torch's cubic convolution coefficient


def _cubic_weights(t: float) -> tuple[float, float, float, float]:
    """Weights of taps floor(src)-1 .. floor(src)+2 for fractional offset t (Keys' kernel with a = CUBIC_A)."""
    a = CUBIC_A

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return far(t + 1), near(t), near(1 - t), far(2 - t)


@functools.lru_cache(maxsize=None)
def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float64: torch `F.interpolate(mode='bicubic', align_corners=False)` along one axis.

    Source coordinate (dst + 0.5)·n_in/n_out − 0.5 (not clamped), four taps, tap indices clamped to
    [0, n_in − 1] (a clamped tap adds its weight to the border row), no antialiasing.
    """
    m = np.zeros((n_out, n_in))
    for dst in range(n_out):
        src = (dst + 0.5) * n_in / n_out - 0.5
        base = int(np.floor(src))
        for offset, weight in zip(range(-1, 3), _cubic_weights(src - base)):
            m[dst, min(max(base + offset, 0), n_in - 1)] += weight
    m.flags.writeable = False
    return m


@functools.lru_cache(maxsize=None)
def area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float64: torch `F.interpolate(mode='area')` (adaptive average pooling) along one axis.

    Output cell i averages input rows floor(i·n_in/n_out) .. ceil((i+1)·n_in/n_out) − 1; windows overlap when
    the sizes do not divide (16 → 13).
    """
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        start, end = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
        m[i, start:end] = 1.0 / (end - start)
    m.flags.writeable = False
    return m


def _apply(matrix_fn, x_BHWC: jax.Array, size: int | tuple[int, int]) -> jax.Array:
    out_h, out_w = (size, size) if isinstance(size, int) else size
    _, in_h, in_w, _ = x_BHWC.shape
    if (in_h, in_w) == (out_h, out_w):
        return x_BHWC
    dtype = x_BHWC.dtype if jnp.issubdtype(x_BHWC.dtype, jnp.floating) else jnp.float32
    m_h = jnp.asarray(matrix_fn(in_h, out_h), dtype)
    m_w = jnp.asarray(matrix_fn(in_w, out_w), dtype)
    return jnp.einsum("ph,bhwc,qw->bpqc", m_h, x_BHWC.astype(dtype), m_w, precision=jax.lax.Precision.HIGHEST)


def resize_bicubic(x_BHWC: jax.Array, size: int | tuple[int, int]) -> jax.Array:
    """Torch bicubic resize (align_corners=False, no antialias) of an NHWC array to `size` (side or (H, W))."""
    return _apply(bicubic_matrix, x_BHWC, size)


def resize_area(x_BHWC: jax.Array, size: int | tuple[int, int]) -> jax.Array:
    """Torch area resize (adaptive average pooling) of an NHWC array to `size` (side or (H, W))."""
    return _apply(area_matrix, x_BHWC, size)
