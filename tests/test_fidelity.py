"""Fidelity against the full cache: exact for the full cache itself, bounded and non-trivial for a lossy policy."""
from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
import pytest

from amskv_jax.fid import fid
from amskv_jax.fidelity import format_table, mse, policy_fidelity, psnr
from amskv_jax.generate import generate
from amskv_jax.policies import CondensedOnly, FullCache
from conftest import random_model


def test_psnr_is_infinite_only_for_identical_images_and_follows_the_mean_squared_error():
    a = np.zeros((2, 4, 4, 3))
    assert psnr(mse(a, a)) == math.inf
    b = a.copy()
    b[0] += 0.1  # mse 0.01 on one image, 0 on the other: mean 0.005
    np.testing.assert_allclose(psnr(mse(a, b)), 10 * np.log10(1 / 0.005))


def test_full_cache_scores_itself_perfectly_and_a_lossy_policy_does_not():
    """policy_fidelity against the same generations run here, chunk by chunk with the same keys: token agreement,
    PSNR, class accuracy and FID recomputed from them, and the table's cells read back."""
    model = random_model("tiny")
    policies = {"full": FullCache(), "condensed": CondensedOnly(condensed_scales=1)}
    calls = []

    def distance(a, b):
        calls.append(len(a))
        return np.abs(a - b).mean(axis=(1, 2, 3))

    class FirstClass:
        """Says every image is class 0; its features are the images' mean colours."""

        def predict(self, images):
            return np.eye(10)[np.zeros(len(images), int)]

        def features(self, images):
            return images.mean(axis=(1, 2))

    labels, key = np.arange(4) % 10, jax.random.key(0)
    real = np.random.default_rng(0).uniform(size=(16, 3))
    results = policy_fidelity(model, policies, labels, key, batch=2, top_k=1, top_p=0.0,
                              image_distance=distance, classifier=FirstClass(), real_features=real)
    assert calls == [2, 2, 2, 2]  # two chunks, two policies
    full, lossy = results["full"], results["condensed"]

    # the same generations, here: chunks of 2 labels, the key folded with the chunk's start
    runs = {name: [generate(model.params, labels[start:start + 2], jax.random.fold_in(key, start), config=model.config,
                            layout=policy.layout(model.config.var), top_k=1, top_p=0.0, return_logits=True)
                   for start in (0, 2)] for name, policy in policies.items()}
    tokens = {name: [np.concatenate([np.asarray(r.tokens[si]) for r in rs]) for si in range(4)]
              for name, rs in runs.items()}
    images = {name: np.concatenate([np.asarray(r.images) for r in rs]) for name, rs in runs.items()}
    agreement = tuple(float((a == b).mean()) for a, b in zip(tokens["condensed"], tokens["full"], strict=True))
    np.testing.assert_allclose(lossy.agreement, agreement, rtol=1e-6)
    assert agreement[0] == 1.0 and min(agreement) < 1.0  # scale 0 reads no cache; later ones drift
    assert lossy.psnr == pytest.approx(10 * np.log10(1 / np.mean((images["condensed"] - images["full"]) ** 2)))
    assert math.isfinite(lossy.psnr) and full.psnr == math.inf and full.lpips == 0.0
    assert lossy.lpips == pytest.approx(np.abs(images["condensed"] - images["full"]).mean())
    for name, result in results.items():
        assert result.fid == pytest.approx(fid(images[name].mean(axis=(1, 2)), real), rel=1e-9), name
    assert full.fid != pytest.approx(lossy.fid)
    np.testing.assert_array_equal(lossy.samples, images["condensed"][:2])

    assert full.agreement == full.top1 == (1.0,) * 4 and max(full.kl) < 1e-6 and full.memory_fraction == 1.0
    # scale 0 reads nothing from the cache under either policy: identical there
    assert lossy.top1[0] == 1.0 and lossy.kl[0] < 1e-6
    assert all(0.0 <= x <= 1.0 for x in lossy.top1) and min(lossy.kl) >= 0.0 and max(lossy.kl) > 1e-4
    slots = [sum(policy.layout(model.config.var).capacities) for policy in policies.values()]
    assert lossy.memory_fraction == pytest.approx(slots[1] / slots[0], rel=1e-12) and lossy.memory_fraction < 0.2
    assert full.accuracy == lossy.accuracy == 0.25  # labels 0, 1, 2, 3: one is class 0

    table = format_table(results, policies)
    header = next(line for line in table.splitlines() if line.startswith("| policy |"))
    columns = [cell.strip() for cell in header.strip("|").split("|")]
    for name, result in results.items():
        line = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
        cells = dict(zip(columns, (cell.strip() for cell in line.strip("|").split("|")), strict=True))
        assert cells["setting"] == policies[name].describe()
        assert cells["cache vs full"] == f"{100 * result.memory_fraction:.1f}%"
        assert float(cells["FID"]) == pytest.approx(fid(images[name].mean(axis=(1, 2)), real), abs=5e-4)
        assert cells["class accuracy"] == "0.250"
        weights = np.array([1, 4, 9, 16]) / 30
        assert float(cells["token agreement"]) == pytest.approx(np.dot(result.agreement, weights), abs=5e-4)
        assert cells["agreement per scale"].split() == [f"{a:.2f}" for a in result.agreement]
    assert "top-1 agreement" in table
    assert set(lossy.to_json()) >= {"agreement", "top1", "kl", "psnr", "lpips", "token_agreement", "top1_agreement"}
    assert full.nonfinite_scale is None and lossy.nonfinite_scale is None
    marked = format_table({"condensed": dataclasses.replace(lossy, nonfinite_scale=2)}, policies)
    row = next(line for line in marked.splitlines() if line.startswith("| condensed |"))
    assert row.count("non-finite logits from scale 2") == 10 and f"{lossy.mean_kl:.4f}" not in row
