"""Torch-compatible resizing: the matrices against values derived by hand and printed by torch, and the NHWC
application. End-to-end parity through every resize of the tiny ladder is in test_vqvae (`vae_fhat`,
`tf_x_BLCv`)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amskv_jax.resize import area_matrix, bicubic_matrix, resize_area, resize_bicubic

# Ladder pairs: every scale to the latent grid and back, plus sizes that do not divide.
PAIRS = [(pn, 16) for pn in (1, 2, 3, 4, 5, 6, 8, 10, 13)] + [(16, pn) for pn in (1, 2, 3, 5, 6, 10, 13)] + [
    (32, 9), (32, 24), (18, 32), (7, 3), (3, 7),
]


@pytest.mark.parametrize("n_in, n_out", PAIRS)
def test_area_rows_are_averages(n_in, n_out):
    m = area_matrix(n_in, n_out)
    np.testing.assert_allclose(m.sum(axis=1), 1.0, rtol=0, atol=1e-15)
    for row in m:
        support = np.flatnonzero(row)
        assert np.array_equal(support, np.arange(support[0], support[-1] + 1))  # one contiguous window
        np.testing.assert_array_equal(row[support], 1.0 / len(support))


def test_area_16_to_13_windows_overlap_as_adaptive_pooling():
    windows = [(0, 2), (1, 3), (2, 4), (3, 5), (4, 7), (6, 8), (7, 9), (8, 10), (9, 12), (11, 13), (12, 14),
               (13, 15), (14, 16)]  # floor(16i/13) .. ceil(16(i+1)/13), worked out by hand
    expected = np.zeros((13, 16))
    for i, (start, end) in enumerate(windows):
        expected[i, start:end] = 1.0 / (end - start)
    np.testing.assert_array_equal(area_matrix(16, 13), expected)


@pytest.mark.parametrize("n_in, n_out", [(16, 8), (16, 4), (32, 16), (16, 1)])
def test_area_divisible_sizes_average_disjoint_blocks(n_in, n_out):
    k = n_in // n_out
    np.testing.assert_array_equal(area_matrix(n_in, n_out), np.kron(np.eye(n_out), np.full((1, k), 1.0 / k)))


@pytest.mark.parametrize("n_in, n_out", PAIRS)
def test_bicubic_keeps_constants(n_in, n_out):
    np.testing.assert_allclose(bicubic_matrix(n_in, n_out).sum(axis=1), 1.0, rtol=0, atol=1e-14)


@pytest.mark.parametrize("n_out", [2, 4, 13, 16, 32])
def test_bicubic_from_one_pixel_copies_it(n_out):
    np.testing.assert_allclose(bicubic_matrix(1, n_out), np.ones((n_out, 1)), rtol=0, atol=1e-14)


def test_bicubic_2_to_4_by_hand():
    # src = (dst + 0.5)/2 − 0.5 = −0.25, 0.25, 0.75, 1.25. For t = 0.25 (and mirrored t = 0.75) Keys' kernel with
    # a = −0.75 gives tap weights −0.10546875, 0.87890625, 0.26171875, −0.03515625; clamped taps fold onto the border.
    expected = np.array([
        [1.10546875, -0.10546875],
        [0.7734375, 0.2265625],
        [0.2265625, 0.7734375],
        [-0.10546875, 1.10546875],
    ])
    np.testing.assert_array_equal(bicubic_matrix(2, 4), expected)


def test_matrices_match_values_printed_by_torch():
    # torch 2.13 F.interpolate in float64 on a 1×n row (the other axis unchanged).
    np.testing.assert_allclose(
        bicubic_matrix(3, 5) @ np.array([0.0, 1.0, 4.0]), [-0.096, 0.172, 1.0, 2.908, 4.288], rtol=0, atol=1e-12
    )
    np.testing.assert_allclose(
        area_matrix(16, 13) @ np.arange(16.0) ** 2,
        [0.5, 2.5, 6.5, 12.5, 77 / 3, 42.5, 56.5, 72.5, 302 / 3, 132.5, 156.5, 182.5, 210.5], rtol=0, atol=1e-12,
    )


@pytest.mark.parametrize("resize, matrix", [(resize_bicubic, bicubic_matrix), (resize_area, area_matrix)])
def test_resize_applies_the_matrix_to_height_and_width(resize, matrix):
    x_BHWC = jnp.asarray(np.random.default_rng(0).standard_normal((2, 6, 5, 3), np.float32))
    out = resize(x_BHWC, (4, 9))
    expected = np.einsum("ph,bhwc,qw->bpqc", matrix(6, 4), np.asarray(x_BHWC, np.float64), matrix(5, 9))
    assert out.shape == (2, 4, 9, 3) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("resize", [resize_bicubic, resize_area])
def test_resize_to_the_same_size_is_the_identity_and_keeps_dtype(resize):
    x_BHWC = jnp.asarray(np.random.default_rng(1).standard_normal((1, 4, 4, 2), np.float32), jnp.bfloat16)
    assert resize(x_BHWC, 4) is x_BHWC
    assert resize(x_BHWC, 2).dtype == jnp.bfloat16
