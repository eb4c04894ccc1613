"""Policy-aware fine-tuning: continue training a model's VAR under a cache policy's teacher-forcing mask.

Generation under a cache policy attends to fewer earlier scales than the model was trained with; teacher forcing
under the same layout (`VAR.__call__(..., layout=...)`) is exactly what that generation computes, so training on it
teaches the model to predict well from what the policy keeps. The VQ-VAE is frozen (the tokens do not move); the
VAR starts from the full-cache model's weights, trains in float32 with the usual loss (label dropout included, so
guidance keeps working) and is stored back in the source's storage dtype. The run's checkpoints and loss log live in
`out/run/` (a rerun resumes there); the finished model directory is `out/` itself.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np

from amskv_jax.cache import CacheLayout
from amskv_jax.checkpoint import Model, save_checkpoint
from amskv_jax.errors import UserError
from amskv_jax.train import loop
from amskv_jax.train.configs import OptimConfig
from amskv_jax.train.var_trainer import make_train_step, tokenize
from amskv_jax.untrusted import write_atomic


def finetune(
    model: Model, layout: CacheLayout, images: np.ndarray, labels: np.ndarray, opt: OptimConfig, out: str | Path
) -> dict:
    """Fine-tune `model`'s VAR under `layout` on `images` (float32 [N, H, W, 3] in [-1, 1]) with class `labels`
    for `opt.steps` steps. Returns params {"var": ..., "vqvae": ...} (VQ-VAE unchanged) in the source's dtypes."""
    c = model.config.var
    if len(layout.layers) != c.depth or layout.patch_nums != c.patch_nums:
        raise UserError(f"the layout ({len(layout.layers)} layers, ladder {layout.patch_nums}) does not fit the "
                         f"model (depth {c.depth}, ladder {c.patch_nums})")
    gt, x = tokenize(model.config.vqvae, model.params["vqvae"], images)
    source = model.params["var"]["params"]
    params = jax.tree.map(lambda a: np.asarray(a, np.float32), source)
    tx = loop.optimizer(opt)
    state = {"params": params, "opt_state": tx.init(params)}

    def get_batch(step):
        rows = loop.batch_indices(len(gt), opt.batch_size, opt.seed, step)
        return {"labels": labels[rows], "gt": gt[rows], "x": x[rows]}

    identity = {"stage": "finetune", "model": dataclasses.asdict(c), "policy": layout.policy, "images": len(images)}
    state, _ = loop.run(Path(out) / "run", state, make_train_step(c, tx, layout), get_batch, opt, "finetune", identity)
    tuned = jax.tree.map(lambda new, old: np.asarray(new).astype(np.asarray(old).dtype), state["params"], source)
    return {"var": {"params": tuned}, "vqvae": model.params["vqvae"]}


def save_finetuned(out: str | Path, model: Model, params: dict, provenance: dict) -> Path:
    """A model directory `generate --model DIR` loads: config.json, params/, the source's classes.json and
    layers.json (calibration), and finetune.json (how it was made)."""
    out = Path(out)
    if (out / "params").exists():
        raise FileExistsError(f"{out}/params exists; remove it or pick another --out")
    save_checkpoint(out, model.config, params)
    if model.classes is not None:
        write_atomic(out / "classes.json", json.dumps(list(model.classes)))
    if model.calibration is not None:
        write_atomic(out / "layers.json", json.dumps(model.calibration, indent=1))
    write_atomic(out / "finetune.json", json.dumps(provenance, indent=1))
    return out
