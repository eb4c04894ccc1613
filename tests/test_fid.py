"""Fréchet distance: zero for a set against itself, the squared mean shift for a shifted copy."""
from __future__ import annotations

import numpy as np
import pytest

from amskv_jax.fid import fid


MIX = np.random.default_rng(100).normal(size=(16, 16))


def _features(n=500, seed=0, mix=MIX):
    return np.random.default_rng(seed).normal(size=(n, len(mix))) @ mix  # correlated features


def test_fid_of_a_set_with_itself_is_zero():
    x = _features()
    assert fid(x, x) == pytest.approx(0.0, abs=1e-6)


def test_fid_of_a_shifted_copy_is_the_squared_shift_and_grows_with_it():
    x = _features()
    shifts = [0.25, 0.5, 1.0]
    values = [fid(x, x + s) for s in shifts]
    for s, v in zip(shifts, values):
        assert v == pytest.approx(x.shape[1] * s**2, rel=1e-6)
    assert values == sorted(values)


def test_fid_between_two_samples_of_one_distribution_is_small_against_another():
    same = fid(_features(seed=0), _features(seed=1))
    other = fid(_features(seed=0), _features(seed=1, mix=2 * MIX))
    assert 0 < same < 0.1 * other


def test_fid_rejects_mismatched_features():
    with pytest.raises(ValueError, match="same F"):
        fid(np.zeros((4, 3)), np.zeros((4, 5)))
