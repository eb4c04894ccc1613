"""Train the multi-scale VQ-VAE (the reference never released its VQ-VAE trainer; this follows its quantiser).

Loss = l1·|x − x̂| + l2·(x − x̂)² (pixel means) + the quantiser's vq loss, the mean over scales of
β·mse(sg(f̂), f) (commitment, trains the encoder) + mse(f̂, sg(f)) (trains the codebook and the Φ convs); the
decoder sees f̂ through the straight-through estimator (`VQVAE.__call__`). No perceptual or adversarial term.
"""
from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from amskv_jax.checkpoint import init_once
from amskv_jax.config import VQVAEConfig
from amskv_jax.train import loop
from amskv_jax.train.configs import OptimConfig, TrainConfig
from amskv_jax.vqvae import VQVAE


def init_vqvae(config: VQVAEConfig, seed: int) -> dict:
    img = jnp.zeros((1, config.image_size, config.image_size, config.in_channels), jnp.float32)
    return init_once(VQVAE(config).init, jax.random.key(seed), img)


def loss_fn(params, img_BHWC, config: VQVAEConfig, rec_l1: float, rec_l2: float):
    """(loss, metrics): l1, mse, vq loss and the fraction of the codebook the batch's tokens use."""
    rec_BHWC, vq_loss, idx = VQVAE(config).apply({"params": params}, img_BHWC)
    err = rec_BHWC - img_BHWC
    l1, mse = jnp.abs(err).mean(), jnp.square(err).mean()
    hits = jnp.zeros(config.vocab_size).at[jnp.concatenate(idx, axis=1).reshape(-1)].add(1.0)
    usage = (hits > 0).mean()
    return rec_l1 * l1 + rec_l2 * mse + vq_loss, {"l1": l1, "mse": mse, "vq": vq_loss, "usage": usage}


def make_train_step(cfg: TrainConfig, opt: optax.GradientTransformation):
    loss = functools.partial(loss_fn, config=cfg.model.vqvae, rec_l1=cfg.rec_l1, rec_l2=cfg.rec_l2)

    def train_step(state, batch, key):
        del key  # deterministic
        (value, aux), grads = jax.value_and_grad(loss, has_aux=True)(state["params"], batch["images"])
        updates, opt_state = opt.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {"params": params, "opt_state": opt_state}, {"loss": value, **aux, "grad_norm": optax.tree.norm(grads)}

    return train_step


def train(
    cfg: TrainConfig, opt: OptimConfig, images: np.ndarray, out: str | Path, identity: dict
) -> tuple[dict, int]:
    """Train (or resume) the VQ-VAE in `out` on `images` (N, H, W, 3) in [−1, 1]; `identity`: what the run is
    (`loop.check_identity`: stage, model, data). Returns (variables, steps)."""
    tx = loop.optimizer(opt)
    params = init_vqvae(cfg.model.vqvae, opt.seed)["params"]
    state = {"params": params, "opt_state": tx.init(params)}

    def get_batch(step):
        return {"images": images[loop.batch_indices(len(images), opt.batch_size, opt.seed, step)]}

    state, steps = loop.run(out, state, make_train_step(cfg, tx), get_batch, opt, "vqvae", identity)
    return {"params": state["params"]}, steps
