"""Sampling: guidance ramp, the exact top-k / top-p support on hand-made logits, draws and Gumbel smoothing."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amskv_jax import sampling


def _support(logits) -> list[int]:
    return np.flatnonzero(np.isfinite(np.asarray(logits))).tolist()


def test_guidance_ramps_from_none_at_the_first_scale_to_cfg_at_the_last():
    cond = jnp.full((1, 2, 3), 2.0)
    uncond = jnp.full((1, 2, 3), 1.0)
    both = jnp.concatenate([cond, uncond])
    assert sampling.guidance_ratio(0, 5) == 0 and sampling.guidance_ratio(4, 5) == 1
    np.testing.assert_allclose(sampling.apply_guidance(both, 4.0, 0.0), cond)
    # (1 + t)·2 − t·1 with t = 4·0.5 = 2  ->  4
    np.testing.assert_allclose(sampling.apply_guidance(both, 4.0, 0.5), 4.0)


@pytest.mark.parametrize(
    "top_k, expected",
    [(1, [3]), (2, [3, 1]), (3, [3, 1, 4]), (5, [0, 1, 2, 3, 4]), (0, [0, 1, 2, 3, 4])],
)
def test_top_k_keeps_exactly_the_k_largest(top_k, expected):
    logits = jnp.asarray([[[0.5, 2.0, -1.0, 3.0, 1.0]]])
    kept = sampling.top_k_top_p_filter(logits, top_k, 0.0)[0, 0]
    assert sorted(_support(kept)) == sorted(expected)
    np.testing.assert_array_equal(np.asarray(kept)[expected], np.asarray(logits)[0, 0, expected])


def test_top_k_keeps_ties_at_the_boundary_like_the_reference():
    logits = jnp.asarray([[[1.0, 2.0, 2.0, 0.0]]])
    assert _support(sampling.top_k_top_p_filter(logits, 2, 0.0)[0, 0]) == [1, 2]
    assert _support(sampling.top_k_top_p_filter(logits, 1, 0.0)[0, 0]) == [1, 2]


@pytest.mark.parametrize(
    "top_p, expected",
    [
        # probabilities 0.5, 0.3, 0.15, 0.05 (already sorted descending by index)
        (0.5, [0]),  # ascending cumsum 0.05, 0.2, 0.5, 1.0: remove those <= 0.5 -> keep only the largest
        (0.51, [0, 1]),  # remove cumsum <= 0.49: 0.05, 0.2
        (0.79, [0, 1]),  # remove <= 0.21
        (0.81, [0, 1, 2]),  # remove <= 0.19: only 0.05
        (0.96, [0, 1, 2, 3]),  # remove <= 0.04: nothing
        (0.01, [0]),  # the largest is always kept
    ],
)
def test_top_p_keeps_exactly_the_nucleus(top_p, expected):
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.asarray(np.log(probs)[None, None], jnp.float32)
    assert _support(sampling.top_k_top_p_filter(logits, 0, top_p)[0, 0]) == expected


def test_top_p_zero_is_off_and_top_k_composes_with_top_p():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.asarray(np.log(probs)[None, None], jnp.float32)
    assert _support(sampling.top_k_top_p_filter(logits, 0, 0.0)[0, 0]) == [0, 1, 2, 3]
    # top-k 3 first renormalises to 0.526, 0.316, 0.158; then top-p 0.8 removes cumsum <= 0.2: the 0.158
    assert _support(sampling.top_k_top_p_filter(logits, 3, 0.8)[0, 0]) == [0, 1]


def test_filter_works_per_row_under_jit_with_a_traced_top_p():
    logits = jnp.asarray([[[3.0, 0.0, 0.0], [0.0, 0.0, 3.0]]])
    out = jax.jit(sampling.top_k_top_p_filter, static_argnums=1)(logits, 0, jnp.float32(0.5))
    assert _support(out[0, 0]) == [0] and _support(out[0, 1]) == [2]


def test_draws_follow_the_softmax_and_never_leave_the_support():
    logits = jnp.log(jnp.asarray([0.7, 0.2, 0.1, 0.0]))
    keys = sampling.image_keys(jax.random.key(0), jnp.arange(20000))
    draws = sampling.sample_tokens(sampling.token_uniforms(keys[:, 0], 1), jnp.broadcast_to(logits, (20000, 1, 4)))
    counts = np.bincount(np.asarray(draws).ravel(), minlength=4) / 20000
    np.testing.assert_allclose(counts, [0.7, 0.2, 0.1, 0.0], atol=0.015)
    assert draws.dtype == jnp.int32


def test_gumbel_smoothing_mixes_code_vectors_and_sharpens_with_the_scale():
    codebook = jnp.eye(3)
    logits = jnp.broadcast_to(jnp.asarray([2.0, 1.0, 0.0]), (4000, 1, 3))
    keys = sampling.image_keys(jax.random.key(1), jnp.arange(4000))[:, 1]
    early = sampling.gumbel_smooth(keys, logits, 0.0, codebook)
    late = sampling.gumbel_smooth(keys, logits, 1.0, codebook)
    np.testing.assert_allclose(early.sum(-1), 1.0, rtol=1e-5)  # convex mixtures of code vectors
    # tau 0.27 -> 0.0135 and logits doubled: the late mixtures are nearly one-hot
    assert float(late.max(-1).mean()) > 0.99 > float(early.max(-1).mean())
    # the mixture weights favour the larger logits
    assert float(early[..., 0].mean()) > float(early[..., 1].mean()) > float(early[..., 2].mean())


def test_an_images_draws_depend_on_its_index_only():
    """Image b's numbers come from fold_in(key, b): the same image index gives the same tokens whatever else is in
    the batch (what lets generation sample in chunks of images); other indices give other tokens."""
    logits = jnp.zeros((6, 16, 32))
    draw = lambda images: sampling.sample_tokens(  # noqa: E731
        sampling.token_uniforms(sampling.image_keys(jax.random.key(3), images)[:, 0], 16), logits[: len(images)])
    whole, part = draw(jnp.arange(6)), draw(jnp.asarray([4, 1]))
    np.testing.assert_array_equal(np.asarray(part), np.asarray(whole)[[4, 1]])
    assert len({tuple(np.asarray(row)) for row in whole}) == 6


def test_inverse_transform_draws_never_pick_a_removed_token_even_at_the_interval_ends():
    """u = 1 (the largest uniform) and u just above 0 pick the last and first kept tokens, never a removed one on
    either side; a lone kept token is drawn whatever u is (greedy decoding)."""
    logits = jnp.asarray([-jnp.inf, 1.0, -jnp.inf, 1.0, -jnp.inf])
    u = jnp.asarray([[1e-30, 0.25, 0.5, 0.75, 1.0]])
    draws = sampling.sample_tokens(u, jnp.broadcast_to(logits, (1, 5, 5)))
    assert np.asarray(draws).tolist() == [[1, 1, 1, 3, 3]]
    lone = sampling.sample_tokens(u, jnp.broadcast_to(logits.at[1].set(-jnp.inf), (1, 5, 5)))
    assert np.asarray(lone).tolist() == [[3] * 5]
    uniforms = sampling.token_uniforms(sampling.image_keys(jax.random.key(0), jnp.arange(64))[:, 0], 4096)
    assert float(uniforms.min()) > 0 and float(uniforms.max()) <= 1


def _filter_by_sorting(logits, top_k: int, top_p: float):
    """The reference's filter step by step (top-k, argsort, inverse permutation): the slow truth."""
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    order = jnp.argsort(logits, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1), axis=-1)
    remove_sorted = (cumulative <= 1 - top_p).at[..., -1].set(False)
    remove = jnp.take_along_axis(remove_sorted, jnp.argsort(order, axis=-1), axis=-1)
    return jnp.where((top_p > 0) & remove, -jnp.inf, logits)


@pytest.mark.parametrize("top_k, top_p", [(0, 0.96), (900, 0.96), (900, 0.0), (50, 0.5), (4096, 0.99)])
def test_threshold_filter_equals_the_reference_sorting_filter(top_k, top_p):
    # distinct values: no ties
    logits = jnp.asarray(3 * np.random.default_rng(top_k).standard_normal((2, 37, 4096), np.float32))
    np.testing.assert_array_equal(sampling.top_k_top_p_filter(logits, top_k, top_p),
                                  _filter_by_sorting(logits, top_k, top_p))
