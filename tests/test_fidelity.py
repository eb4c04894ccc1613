"""Fidelity against the full cache: exact for the full cache itself, bounded and non-trivial for a lossy policy."""
from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from amskv_jax.fidelity import format_table, mse, policy_fidelity, psnr
from amskv_jax.policies import CondensedOnly, FullCache
from test_policies import random_model


def test_psnr_is_infinite_only_for_identical_images_and_follows_the_mean_squared_error():
    a = np.zeros((2, 4, 4, 3))
    assert psnr(mse(a, a)) == math.inf
    b = a.copy()
    b[0] += 0.1  # mse 0.01 on one image, 0 on the other: mean 0.005
    np.testing.assert_allclose(psnr(mse(a, b)), 10 * np.log10(1 / 0.005))


def test_full_cache_scores_itself_perfectly_and_a_lossy_policy_does_not():
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

    real = np.random.default_rng(0).uniform(size=(16, 3))
    results = policy_fidelity(model, policies, np.arange(4) % 10, jax.random.key(0), batch=2, top_k=1, top_p=0.0,
                              image_distance=distance, classifier=FirstClass(), real_features=real)
    assert calls == [2, 2, 2, 2]  # two chunks, two policies
    full, lossy = results["full"], results["condensed"]
    assert full.agreement == full.top1 == (1.0,) * 4 and max(full.kl) < 1e-6
    assert full.psnr == math.inf and full.lpips == 0.0 and full.memory_fraction == 1.0
    # scale 0 reads nothing from the cache under either policy: identical there
    assert lossy.agreement[0] == lossy.top1[0] == 1.0 and lossy.kl[0] < 1e-6
    assert all(0.0 <= x <= 1.0 for x in lossy.agreement + lossy.top1) and min(lossy.kl) >= 0.0
    assert max(lossy.kl) > 1e-4 and lossy.memory_fraction < 0.2
    assert lossy.samples.shape == (2, 64, 64, 3)
    assert full.accuracy == lossy.accuracy == 0.25  # labels 0, 1, 2, 3: one is class 0
    assert full.fid > 0 and lossy.fid > 0
    table = format_table(results, policies)
    assert f"| {full.fid:.3f} | 0.250 |" in table
    assert "\n| full | " in table and "\n| condensed | " in table and "top-1 agreement" in table
    assert set(lossy.to_json()) >= {"agreement", "top1", "kl", "psnr", "lpips", "token_agreement", "top1_agreement"}
    assert full.nonfinite_scale is None and lossy.nonfinite_scale is None
    marked = format_table({"condensed": dataclasses.replace(lossy, nonfinite_scale=2)}, policies)
    row = next(line for line in marked.splitlines() if line.startswith("| condensed |"))
    assert row.count("non-finite logits from scale 2") == 10 and f"{lossy.mean_kl:.4f}" not in row
