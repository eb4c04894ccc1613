"""Train the class-conditional VAR on a trained VQ-VAE's tokens (reference `trainer.py`).

The dataset is tokenised once (`img_to_idx` → ground-truth tokens `gt_NL`, `idx_to_var_input` → teacher-forcing
inputs `x_NLCv`, cached in the run directory: `cached_tokens`). Each step: labels are replaced by the null class with
probability `cond_drop_rate` (what classifier-free guidance needs), one teacher-forced pass gives logits for all L
tokens under the block-causal mask, and the loss is the cross-entropy averaged over every token of every scale.
"""
from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from amskv_jax.cache import CacheLayout
from amskv_jax.checkpoint import init_once
from amskv_jax.config import ModelConfig, VARConfig, VQVAEConfig
from amskv_jax.errors import UserError
from amskv_jax.train import loop
from amskv_jax.train.configs import OptimConfig
from amskv_jax.var import VAR
from amskv_jax.vqvae import VQVAE


def init_var(config: VARConfig, seed: int) -> dict:
    """VAR variables initialised as the reference's `init_weights` (init_std = √(1/3C), head ×0.02, AdaLN
    ×0.5 with its gammas ×1e-5 so every block starts near the identity, residual projections ÷√(2·depth))."""
    return init_once(functools.partial(_init_var, config, seed))


def _init_var(config: VARConfig, seed: int) -> dict:
    c = config
    key, init_key = jax.random.split(jax.random.key(seed))
    labels = jnp.zeros((1,), jnp.int32)
    params = VAR(c).init(init_key, labels, jnp.zeros((1, c.seq_len - c.first_l, c.cvae)))["params"]
    std = float(np.sqrt(1 / c.embed_dim / 3))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(key, len(leaves))

    def fresh(path, leaf, k):
        names = [p.key for p in path]
        if names[-1] in ("kernel", "embedding"):
            return std * jax.random.truncated_normal(k, -2 / std, 2 / std, leaf.shape, leaf.dtype)
        if names[-1] == "bias":
            return jnp.zeros_like(leaf)
        return leaf  # pos_start, pos_1LC (already trunc-normal std), q/v bias (zeros), scale_mul_1H11 (log 4)

    params = treedef.unflatten([fresh(p, x, k) for (p, x), k in zip(leaves, keys, strict=True)])
    params["head"]["kernel"] = params["head"]["kernel"] * 0.02
    params["head_nm"]["ada_lin_1"]["kernel"] = params["head_nm"]["ada_lin_1"]["kernel"] * 0.5
    residual = 1 / np.sqrt(2 * c.depth)
    block = params["blocks"]  # every leaf stacked [D, ...]
    block["attn"]["proj"]["kernel"] = block["attn"]["proj"]["kernel"] * residual
    block["ffn"]["fc2"]["kernel"] = block["ffn"]["fc2"]["kernel"] * residual
    ada = block["ada_lin_1"]["kernel"]  # [D, C, 6C]; columns: gamma1, gamma2, scale1, scale2, shift1, shift2
    gammas = 2 * c.embed_dim
    block["ada_lin_1"]["kernel"] = jnp.concatenate([ada[..., :gammas] * 1e-5, ada[..., gammas:] * 0.5], axis=-1)
    return {"params": params}


def tokenize(config: VQVAEConfig, vqvae_vars: dict, images_NHWC: np.ndarray, chunk: int = 64):
    """Ground-truth tokens gt_NL int32 and teacher-forcing inputs x_NLCv float32 (L − first_l rows)."""
    vqvae = VQVAE(config)

    @jax.jit
    def one(img):
        idx = vqvae.apply(vqvae_vars, img, method=VQVAE.img_to_idx)
        return jnp.concatenate(idx, axis=1), vqvae.apply(vqvae_vars, idx, method=VQVAE.idx_to_var_input)

    gts, xs = [], []
    for i in range(0, len(images_NHWC), chunk):
        batch = images_NHWC[i:i + chunk]
        pad = chunk - len(batch)  # one compiled shape for every chunk
        gt, x = one(np.concatenate([batch, np.repeat(batch[-1:], pad, 0)]) if pad else batch)
        gts.append(np.asarray(gt)[:len(batch)])
        xs.append(np.asarray(x)[:len(batch)])
    return np.concatenate(gts), np.concatenate(xs)


def load_vqvae(run: str | Path, config: VQVAEConfig) -> dict:
    """The variables of the finished VQ-VAE run in `run`, refused unless it is a VQ-VAE `config`."""
    trained_on, variables = loop.load_params(run)
    if trained_on.vqvae != config:
        raise UserError(f"{run} holds a VQ-VAE {trained_on.vqvae}, but this config needs {config}")
    return variables


def cached_tokens(out: Path, config: VQVAEConfig, vqvae_vars: dict, images: np.ndarray, key: str):
    """`tokenize`, cached in out/tokens.npz under `key` (which VQ-VAE weights, which images: `loop.cached_arrays`)."""
    tokens = loop.cached_arrays(Path(out) / "tokens.npz", key,
                                lambda: dict(zip(("gt", "x"), tokenize(config, vqvae_vars, images), strict=True)))
    return tokens["gt"], tokens["x"]


def loss_fn(params, labels_B, gt_BL, x_BLCv, key, config: VARConfig, layout: CacheLayout | None = None):
    """Cross-entropy over all L tokens (mean) with label dropout; also token accuracy, overall and last scale.
    With a cache `layout`, the teacher forcing attends as generation under that layout does (policy-aware
    fine-tuning)."""
    drop = jax.random.uniform(key, labels_B.shape) < config.cond_drop_rate
    labels_B = jnp.where(drop, config.num_classes, labels_B)
    logits_BLV = VAR(config).apply({"params": params}, labels_B, x_BLCv, layout=layout)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits_BLV, gt_BL).mean()
    hit = logits_BLV.argmax(-1) == gt_BL
    last = config.begin_ends[-1][0]
    return loss, {"acc": hit.mean(), "acc_last": hit[:, last:].mean()}


def make_train_step(config: VARConfig, opt: optax.GradientTransformation, layout: CacheLayout | None = None):
    def train_step(state, batch, key):
        grad_fn = jax.value_and_grad(functools.partial(loss_fn, config=config, layout=layout), has_aux=True)
        (loss, aux), grads = grad_fn(state["params"], batch["labels"], batch["gt"], batch["x"], key)
        updates, opt_state = opt.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {"params": params, "opt_state": opt_state}, {"loss": loss, **aux, "grad_norm": optax.tree.norm(grads)}

    return train_step


def mirrored(images_NHWC: np.ndarray, labels_N: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The images followed by their left-right mirror images [2N, H, W, C], and their labels [2N]."""
    return np.concatenate([images_NHWC, images_NHWC[:, :, ::-1]]), np.concatenate([labels_N, labels_N])


def token_nll(config: VARConfig, sets: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], batch: int = 32):
    """`nll(state) -> {name: mean cross-entropy per token}` of fixed tokenised image sets {name: (gt_NL, x_NLCv,
    labels_N)}: teacher forcing with the true labels, no label dropout, full attention (the full cache). Each set is
    cut to a multiple of `batch` images, so one program serves them all."""

    @jax.jit
    def summed(params, labels_B, gt_BL, x_BLCv):
        logits_BLV = VAR(config).apply({"params": params}, labels_B, x_BLCv)
        return optax.softmax_cross_entropy_with_integer_labels(logits_BLV, gt_BL).sum()

    for name, (gt, _, _) in sets.items():
        if len(gt) < batch:
            raise UserError(f"the {name} set has {len(gt)} images; the NLL needs at least {batch}")

    def nll(state: dict) -> dict[str, float]:
        scores = {}
        for name, (gt, x, labels) in sets.items():
            n = len(gt) - len(gt) % batch
            total = sum(float(summed(state["params"], labels[i:i + batch], gt[i:i + batch], x[i:i + batch]))
                        for i in range(0, n, batch))
            scores[f"{name}_nll"] = total / (n * gt.shape[1])
        return scores

    return nll


def train(
    model: ModelConfig, opt: OptimConfig, gt: np.ndarray, x: np.ndarray, labels: np.ndarray, out: str | Path,
    identity: dict, evaluate=None,
) -> tuple[dict, int]:
    """Train (or resume) the VAR in `out` on tokenised images (`tokenize`: gt, x) with class `labels`; `identity`:
    what the run is (`loop.check_identity`: stage, model, data, VQ-VAE); `evaluate`: `loop.run`'s hook (e.g.
    `token_nll`). Returns ({"params": ...}, steps done)."""
    tx = loop.optimizer(opt)
    params = init_var(model.var, opt.seed)["params"]
    state = {"params": params, "opt_state": tx.init(params)}

    def get_batch(step):
        rows = loop.batch_indices(len(gt), opt.batch_size, opt.seed, step)
        return {"labels": labels[rows], "gt": gt[rows], "x": x[rows]}

    state, steps = loop.run(out, state, make_train_step(model.var, tx), get_batch, opt, "var", identity,
                            evaluate=evaluate)
    return {"params": state["params"]}, steps
