"""Calibration: the statistics on inputs with known answers, the layer choice, and the CLI's JSON loaded back."""
from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amskv_jax import checkpoint
from amskv_jax.calibrate import Statistics, _layer_statistics, dispersion, main, summarise, upsample_nearest
from amskv_jax.config import get_preset
from amskv_jax.policies import (
    AMSKV, DEMANDING_FRACTION, ScaleBudget, choose_demanding_layers, policy_from_name, select_layers,
)
from conftest import random_model

CONFIG = dataclasses.replace(get_preset("tiny").var, patch_nums=(1, 2, 3, 4))


def test_nearest_upsampling_follows_torch():
    x = jnp.arange(4.0).reshape(1, 2, 2, 1)
    np.testing.assert_array_equal(upsample_nearest(x, 3)[0, :, :, 0], [[0, 0, 1], [0, 0, 1], [2, 2, 3]])


def _pyramid(key, sign: float):
    """Per-scale maps where every scale is `sign` times the previous one upsampled: [B, L, H, D]."""
    maps = [jax.random.normal(key, (2, 1, 1, 2 * 8))]
    for pn in CONFIG.patch_nums[1:]:
        maps.append(sign * upsample_nearest(maps[-1], pn))
    return jnp.concatenate([m.reshape(2, -1, 2, 8) for m in maps], axis=1)


def test_similarity_is_one_for_copied_maps_and_minus_one_for_negated_ones_and_density_is_uniform_for_flat_queries():
    v, k = _pyramid(jax.random.key(0), 1.0), _pyramid(jax.random.key(1), -1.0)
    q = jnp.zeros_like(v)  # normalised to zero: every allowed key gets the same score
    sim_k, sim_v, dist_k, dist_v, density = _layer_statistics(q, k, v, jnp.zeros(2), CONFIG, "nearest")
    np.testing.assert_allclose(sim_v, [0, 2, 2, 2], atol=1e-5)  # sums over the 2 rows
    np.testing.assert_allclose(sim_k, [0, -2, -2, -2], atol=1e-5)
    np.testing.assert_allclose(dist_v, 0, atol=1e-5)  # copies: no distance
    np.testing.assert_allclose(dist_k, [0, 4, 4, 4], atol=1e-5)  # K as cached is unit-norm: |k - (-k)| = 2, 2 rows
    sizes = np.array([1, 4, 9, 16])
    want = np.tril(np.broadcast_to(sizes, (4, 4))) / np.cumsum(sizes)[:, None]
    np.testing.assert_allclose(density / 2, want, atol=1e-6)


def test_dispersion_is_zero_when_scales_attend_to_themselves_and_one_when_spread_evenly():
    assert dispersion(np.eye(4), first=1) == pytest.approx(0, abs=1e-12)
    assert dispersion(np.tril(np.ones((4, 4))) / np.arange(1, 5)[:, None], first=1) == pytest.approx(1)


def test_demanding_layers_are_the_lowest_similarity_by_fraction_or_threshold():
    depth, scales = 4, 4
    sim = np.tile(np.array([0.9, 0.1, 0.5, 0.3])[:, None], (1, scales))
    dist = np.tile(np.array([0.2, 0.3, 0.1, 0.9])[:, None], (1, scales))  # another order than the cosine's
    stats = Statistics(sim * 3, sim * 3, dist * 3, dist * 3, np.tile(np.eye(scales), (depth, 1, 1)) * 3, rows=3)
    cosine = functools.partial(summarise, stats, similarity="cosine")
    assert cosine(fraction=0.5)["demanding_layers"] == [1, 3]
    assert cosine(threshold=0.4)["demanding_layers"] == [1, 3]
    assert cosine(fraction=0.35)["demanding_layers"] == [1]  # round(1.4) layers
    assert summarise(stats, fraction=0.5)["demanding_layers"] == [1, 3]  # l2, the default: the farthest layers
    assert summarise(stats, fraction=0.25)["demanding_layers"] == [3]
    assert summarise(stats, fraction=0.25)["scores"]["similarity"] == pytest.approx([-0.2, -0.3, -0.1, -0.9])
    assert select_layers([0.2, 0.9, 0.5], fraction=0.34, lowest=False) == [1]
    with pytest.raises(ValueError, match="exactly one of fraction and threshold"):
        select_layers([0.1], fraction=0.5, threshold=0.2)


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    out = tmp_path_factory.mktemp("calibration") / "layers.json"
    with pytest.MonkeyPatch.context() as patch:  # fast random weights instead of running the initialisers
        patch.setattr(checkpoint, "load_model", lambda spec, verify=None: random_model(spec))
        argv = ["--model", "tiny", "--samples", "2", "--batch", "2", "--top-k", "20", "--fraction", "0.5",
                "--out", str(out), "--plot"]
        assert main(argv) == 0
    return out


def test_cli_writes_scores_choice_method_and_heat_maps(calibration):
    data = json.loads(calibration.read_text())
    assert data["depth"] == 2 and data["patch_nums"] == [1, 2, 3, 4] and data["samples"] == 2
    assert len(data["demanding_layers"]) == 1  # round(0.5 * 2)
    scores = data["scores"]
    assert data["demanding_layers"] == [int(np.argmin(scores["similarity"]))]
    assert all(len(scores[name]) == 2 for name in ("similarity", "similarity_k", "similarity_v", "dispersion"))
    np.testing.assert_allclose(np.array(data["per_scale"]["density"]).sum(-1), 1, atol=1e-5)
    assert {"similarity", "density", "selection", "upsample"} <= set(data["method"])
    for suffix in ("_similarity.png", "_density.png"):
        assert calibration.with_name("layers" + suffix).stat().st_size > 1000


def test_policies_load_the_calibration_and_refuse_another_depth(calibration):
    data = json.loads(calibration.read_text())
    tiny = get_preset("tiny").var
    demanding = data["demanding_layers"][0]
    policy = AMSKV.from_calibration(calibration, cut=0.3)  # 19 of 28 slots: C_min 5, C_max 14 for the demanding one
    assert policy.budgets[demanding] == 14 and policy.budgets[1 - demanding] == 5
    assert policy.layout(tiny).layers[demanding].reads[3] == (0, 1, 2)
    drafters = ScaleBudget.from_calibration(calibration).drafter_layers
    assert drafters == (int(np.argmax(data["scores"]["dispersion"])),)
    lowest = select_layers(data["scores"]["similarity"], fraction=DEMANDING_FRACTION)  # the named settings' count
    assert choose_demanding_layers(DEMANDING_FRACTION, 2, data) == tuple(lowest)
    assert data["method"]["metric"] == "l2" and data["method"]["measure"] == "k"
    with pytest.raises(ValueError, match="made for a model of depth 2, not 16"):
        policy.layout(get_preset("d16").var)
    with pytest.raises(ValueError, match="calibration is for a model of depth 2, not 16"):
        policy_from_name("amskv", get_preset("d16").var, calibration)
