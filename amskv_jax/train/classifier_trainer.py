"""Train the sample classifier (`amskv_jax.classifier`) on a scheme's training split; report held-out accuracy.

The classifier always trains on the "train" split and is scored on the "heldout" split, whatever split the
generative model saw (the embedded emoji32 VAR saw every image; its classifier still needs unseen ones to be scored
on). Light augmentation, so that it transfers to generated samples: shifts of up to 3 pixels (white fill),
horizontal flips, brightness/contrast/saturation jitter and a random partial blur (the VQ-VAE's decoder softens
edges). Loss: cross-entropy with label smoothing 0.1.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from amskv_jax.classifier import CNN, Classifier, ClassifierConfig, init_classifier, save_classifier
from amskv_jax.train import loop
from amskv_jax.train.configs import OptimConfig

_SHIFT = 3
_LABEL_SMOOTHING = 0.1


def augment(images_BHWC: jax.Array, key: jax.Array) -> jax.Array:
    """Randomly shifted, flipped, colour-jittered and blurred copies of images [B, H, W, 3] in [0, 1]."""
    b, h, w, _ = images_BHWC.shape
    k_shift, k_flip, k_bright, k_contrast, k_sat, k_blur = jax.random.split(key, 6)
    padded = jnp.pad(images_BHWC, ((0, 0), (_SHIFT, _SHIFT), (_SHIFT, _SHIFT), (0, 0)), constant_values=1.0)
    offsets = jax.random.randint(k_shift, (b, 2), 0, 2 * _SHIFT + 1)
    x = jax.vmap(lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, 3)))(padded, offsets)
    x = jnp.where(jax.random.bernoulli(k_flip, 0.5, (b, 1, 1, 1)), x[:, :, ::-1], x)
    x = x + jax.random.uniform(k_bright, (b, 1, 1, 1), minval=-0.1, maxval=0.1)
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    x = mean + (x - mean) * jax.random.uniform(k_contrast, (b, 1, 1, 1), minval=0.8, maxval=1.2)
    grey = x.mean(axis=-1, keepdims=True)
    x = grey + (x - grey) * jax.random.uniform(k_sat, (b, 1, 1, 1), minval=0.7, maxval=1.3)
    blurred = jax.lax.reduce_window(
        jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge"), 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), "VALID"
    ) / 9.0
    mix = jax.random.uniform(k_blur, (b, 1, 1, 1), maxval=0.6)
    return jnp.clip(x + mix * (blurred - x), 0.0, 1.0)


def make_train_step(config: ClassifierConfig, tx: optax.GradientTransformation):
    def loss_fn(params, images, labels, key):
        logits, _ = CNN(config).apply({"params": params}, augment(images, key))
        targets = optax.smooth_labels(jax.nn.one_hot(labels, config.num_classes), _LABEL_SMOOTHING)
        loss = optax.softmax_cross_entropy(logits, targets).mean()
        return loss, {"acc": (logits.argmax(-1) == labels).mean()}

    def train_step(state, batch, key):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], batch["images"], batch["labels"], key
        )
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {"params": params, "opt_state": opt_state}, {"loss": loss, **aux}

    return train_step


def accuracy(classifier: Classifier, images_BHWC: np.ndarray, labels: np.ndarray, batch: int = 256) -> float:
    """Top-1 accuracy of `classifier` on images in [0, 1]."""
    hits = [
        classifier.predict(images_BHWC[i:i + batch]).argmax(-1) == labels[i:i + batch]
        for i in range(0, len(images_BHWC), batch)
    ]
    return float(np.concatenate(hits).mean())


def train(
    config: ClassifierConfig, opt: OptimConfig, train_set: tuple[np.ndarray, np.ndarray],
    heldout_set: tuple[np.ndarray, np.ndarray], out: str | Path,
) -> tuple[Classifier, dict]:
    """Train (or resume) in `out` on (images [N, H, W, 3] in [0, 1], labels [N]); write the classifier and its
    train and held-out accuracy (`save_classifier`) to `out`. Returns (classifier, metrics)."""
    images, labels = train_set
    tx = loop.optimizer(opt)
    params = init_classifier(config, opt.seed)
    state = {"params": params, "opt_state": tx.init(params)}

    def get_batch(step):
        rows = loop.batch_indices(len(images), opt.batch_size, opt.seed, step)
        return {"images": images[rows], "labels": labels[rows]}

    identity = {"stage": "classifier", "model": dataclasses.asdict(config), "images": len(images)}
    state, steps = loop.run(out, state, make_train_step(config, tx), get_batch, opt, "classifier", identity)
    classifier = Classifier(config, state["params"])
    metrics = {
        "steps": steps,
        "train_accuracy": accuracy(classifier, *train_set),
        "heldout_accuracy": accuracy(classifier, *heldout_set),
        "train_images": len(train_set[0]),
        "heldout_images": len(heldout_set[0]),
    }
    save_classifier(out, classifier, metrics)
    return classifier, metrics
