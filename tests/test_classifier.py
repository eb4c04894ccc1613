"""The sample classifier: the shipped one recognises held-out emoji, features feed its logits, training works."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from amskv_jax.classifier import load_classifier
from amskv_jax.train.__main__ import main
from amskv_jax.train.data import load_emoji_set


@pytest.fixture(scope="module")
def shipped():
    return load_classifier("emoji32")


@pytest.fixture(scope="module")
def heldout():
    data = load_emoji_set(32, "ranges", "heldout")
    return (data.images + 1.0) * 0.5, data.labels


def test_shipped_classifier_recognises_heldout_emoji32_images(shipped, heldout):
    images, labels = heldout
    probs = shipped.predict(images)
    assert probs.shape == (len(labels), 10)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    accuracy = (probs.argmax(-1) == labels).mean()
    majority = np.bincount(labels).max() / len(labels)  # 0.33: always answering "flags"
    assert accuracy >= 0.75 > majority, accuracy


def test_logits_are_a_linear_function_of_the_features(shipped, heldout):
    images, _ = heldout
    features = shipped.features(images[:8])
    assert features.shape == (8, shipped.config.num_features)
    dense = jax.tree.map(lambda p: np.asarray(p, np.float32), shipped.params["Dense_0"])
    logits = features @ dense["kernel"] + dense["bias"]
    np.testing.assert_allclose(jax.nn.softmax(logits), shipped.predict(images[:8]), atol=1e-5)


def test_images_of_the_wrong_size_are_refused_with_the_size_needed(shipped):
    with pytest.raises(ValueError, match=r"\[B, 32, 32, 3\]"):
        shipped.predict(np.zeros((2, 64, 64, 3), np.float32))


def test_unknown_classifier_is_refused():
    with pytest.raises(FileNotFoundError, match="emoji32"):
        load_classifier("no-such-model")


def test_classifier_trains_from_the_command_line_and_loads(tmp_path):
    assert main(["classifier", "--config", "tiny16", "--out", str(tmp_path)]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["train_accuracy"] > 0.2  # 10 classes: chance is 0.1
    classifier = load_classifier(tmp_path)
    assert classifier.predict(np.full((3, 16, 16, 3), 0.5, np.float32)).shape == (3, 10)
