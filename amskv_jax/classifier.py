"""A small image classifier for judging samples: class accuracy of generated images, and features for FID.

Trained here on a model's emoji data (`python -m amskv_jax.train classifier`) and shipped beside the model it judges
(`amskv_jax/assets/<model>/classifier/`: `config.json` and `params/`, bfloat16). A plain CNN: three stages of two
3×3 convolutions (GroupNorm, GELU), 2× average pooling between stages, then a global average pool whose output is
the feature vector (`Classifier.features`, used for FID) and one dense layer to the class logits.

Images are float [B, H, W, 3] in [0, 1] (what `amskv_jax.generate` returns), H = W = the config's image size.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from amskv_jax.checkpoint import EMBEDDED, init_once
from amskv_jax.config import _check
from amskv_jax.errors import UserError
from amskv_jax.untrusted import write_atomic


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """The CNN's shape; `classes` names the labels (their count is the number of logits)."""

    image_size: int
    classes: tuple[str, ...]
    widths: tuple[int, ...] = (32, 64, 128)

    def __post_init__(self):
        _check(self.image_size >= 2 ** (len(self.widths) - 1), f"image_size {self.image_size} too small")
        _check(len(self.classes) >= 2, f"need at least 2 classes, got {self.classes}")
        _check(all(w % 8 == 0 for w in self.widths), f"widths must be multiples of 8 (GroupNorm), got {self.widths}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_features(self) -> int:
        return self.widths[-1]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> ClassifierConfig:
        d = json.loads(text)
        return cls(image_size=d["image_size"], classes=tuple(d["classes"]), widths=tuple(d["widths"]))


class CNN(nn.Module):
    """images [B, H, W, 3] in [0, 1] → (logits [B, num_classes], features [B, widths[-1]])."""

    config: ClassifierConfig

    @nn.compact
    def __call__(self, x_BHWC):
        x = x_BHWC.astype(jnp.float32) * 2.0 - 1.0
        for stage, width in enumerate(self.config.widths):
            if stage:
                x = nn.avg_pool(x, (2, 2), strides=(2, 2))
            for _ in range(2):
                x = nn.Conv(width, (3, 3))(x)
                x = nn.gelu(nn.GroupNorm(num_groups=8)(x))
        features_BF = x.mean(axis=(1, 2))
        return nn.Dense(self.config.num_classes)(features_BF), features_BF


@dataclasses.dataclass(frozen=True)
class Classifier:
    """A trained CNN: `predict` gives class probabilities, `features` the penultimate features (for FID)."""

    config: ClassifierConfig
    params: dict

    def _check_images(self, images_BHWC) -> jax.Array:
        images = jnp.asarray(images_BHWC, jnp.float32)
        side = self.config.image_size
        if images.ndim != 4 or images.shape[1:] != (side, side, 3):
            raise UserError(f"images must be [B, {side}, {side}, 3] in [0, 1], got shape {images.shape}")
        return images

    def predict(self, images_BHWC) -> np.ndarray:
        """float32 [B, num_classes]: class probabilities of images in [0, 1]."""
        logits, _ = _apply(self.config, self.params, self._check_images(images_BHWC))
        return np.asarray(jax.nn.softmax(logits, axis=-1))

    def features(self, images_BHWC) -> np.ndarray:
        """float32 [B, num_features]: the pooled features the logits are a linear function of."""
        _, features = _apply(self.config, self.params, self._check_images(images_BHWC))
        return np.asarray(features)


@functools.partial(jax.jit, static_argnums=0)
def _apply(config: ClassifierConfig, params: dict, images_BHWC: jax.Array):
    params = jax.tree.map(lambda p: p.astype(jnp.float32), params)
    return CNN(config).apply({"params": params}, images_BHWC)


def init_classifier(config: ClassifierConfig, seed: int = 0) -> dict:
    """Random params {name: ...} of the CNN, from its own initialisers (`checkpoint.init_once`)."""
    img = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
    return init_once(CNN(config).init, jax.random.key(seed), img)["params"]


def save_classifier(directory: str | Path, classifier: Classifier, metrics: dict | None = None) -> Path:
    """Write config.json, params/ (floats as bfloat16, replacing any) and, when given, metrics.json under `directory`."""
    import shutil

    import ml_dtypes

    directory = Path(directory).absolute()
    if (directory / "params").exists():
        shutil.rmtree(directory / "params")
    directory.mkdir(parents=True, exist_ok=True)
    params = jax.tree.map(lambda p: np.asarray(p).astype(ml_dtypes.bfloat16), classifier.params)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / "params", params)
    write_atomic(directory / "config.json", classifier.config.to_json())
    if metrics is not None:
        write_atomic(directory / "metrics.json", json.dumps(metrics, indent=1))
    return directory


def load_classifier(model: str | Path) -> Classifier:
    """The classifier of an embedded model (its name), of a model directory (its `classifier/`), or a directory
    written by `save_classifier`."""
    directory = EMBEDDED[model] / "classifier" if str(model) in EMBEDDED else Path(model)
    if (directory / "classifier").is_dir():
        directory = directory / "classifier"
    if not (directory / "config.json").is_file() or not (directory / "params").is_dir():
        raise FileNotFoundError(
            f"no classifier for {model!r}: {directory} needs config.json and params/ "
            f"(embedded models: {', '.join(EMBEDDED)}; train one with `python -m amskv_jax.train classifier`)"
        )
    config = ClassifierConfig.from_json((directory / "config.json").read_text())
    with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore(directory.absolute() / "params")
    return Classifier(config, params)
