"""Every cache policy against the full cache, in one process: KV bytes, compiled memory, attention, generation.

    python -m bench.run                                              # --suite cpu: tiny-ladder256, batches 1,8
    python -m bench.run --suite cpu --models tiny-ladder256,d16 --batches 1,2
    python -m bench.run --suite gpu                                  # d16,d30 bf16, batches 32..512, max batch
    python -m bench.run --suite gpu --torch-reference ~/VAR          # also the PyTorch reference's time

For every model and batch it measures, per policy (the full cache always first, every ratio is policy ÷ full):

1. the KV cache's exact bytes (`amskv_jax.memory`) beside the compiled `generate` program's own memory figures
   (`jax.jit(...).lower(...).compile().memory_analysis()`: argument, output and temp bytes);
2. attention time per scale: `cached_attention` with each layer's static read mask, summed over the layers
   (median and min–max of synchronised repetitions after a warm-up);
3. end-to-end `generate` time and images/s, compile time reported separately;
4. on a GPU only: the largest batch that fits (doubling, then bisecting; out-of-memory is caught and recorded) and
   MFU (model FLOPs/s over the device's bf16 peak).

Timed runs are interleaved, policy A, B, A, B, ... within each repetition, so slow drift (clocks, other load)
lands on every policy alike. Results go to DIR/results.md, DIR/results.json and two PNG plots (see bench/README.md).
This module is the command line (suites, flags, the files written); the measurements are `bench/measure.py` (plain
records), the tables `bench/report.py`, the plots `bench/plots.py` and the PyTorch reference `bench/torch_reference.py`.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

from amskv_jax import checkpoint, cli, compile_cache
from amskv_jax.attention import IMPLS
from amskv_jax.config import PRESETS
from amskv_jax.errors import UserError
from amskv_jax.policies import POLICIES
from bench.measure import ALL_ROWS, Bench, Options, check_backend, load
from bench.plots import write_plots
from bench.report import format_report
from bench.torch_reference import torch_reference_times

SUITES = {
    "cpu": {"models": ("tiny-ladder256",), "batches": (1, 8), "reps": 3, "dtype": "float32", "max_batch": False},
    "gpu": {
        "models": ("d16", "d30"), "batches": (32, 64, 128, 256, 512), "reps": 5, "dtype": "bfloat16",
        "max_batch": True,
    },
}
DEFAULT_POLICIES = ("full", "amskv")
DTYPES = ("float32", "bfloat16")
TORCH_NOT_RUN = "not run (--torch-reference not given)"


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_args(argv=None) -> Options:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", choices=sorted(SUITES), default="cpu",
                        help="defaults for models, batches, reps, dtype and the max-batch search")
    parser.add_argument("--models", help="comma-separated presets or checkpoint directories "
                                         f"(presets: {', '.join(PRESETS)})")
    parser.add_argument("--policies", default=",".join(DEFAULT_POLICIES),
                        help=f"comma-separated, or 'all' (known: {', '.join(POLICIES)}); full is always included")
    parser.add_argument("--batches", help="comma-separated batch sizes (images; the cache holds 2·batch rows)")
    parser.add_argument("--reps", type=int, help="timed repetitions after the warm-up")
    parser.add_argument("--dtype", choices=DTYPES, help="compute and cache dtype")
    parser.add_argument("--impl", choices=IMPLS, default="auto", help="attention implementation")
    parser.add_argument("--max-batch", action=argparse.BooleanOptionalAction, default=None,
                        help="search the largest batch per policy (GPU only; default: on in --suite gpu)")
    parser.add_argument("--out", default="bench-out", help="directory for results.md, results.json and plots")
    parser.add_argument("--torch-reference", default=None, metavar="PATH",
                        help="a checkout of FoundationVision/VAR to time its autoregressive_infer_cfg (needs torch)")
    parser.add_argument("--all-rows", action="store_true",
                        help="also time the full cache with each scale's blocks on every row at once (row "
                             f"'{ALL_ROWS}'), beside the default chunks of rows: what the chunks cost")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-plots", action="store_true")
    cli.add_verify_flag(parser)
    compile_cache.add_flag(parser)
    args = parser.parse_args(argv)
    suite = SUITES[args.suite]
    try:
        models = _csv(args.models) if args.models is not None else list(suite["models"])
        if not models:
            raise UserError("--models is empty")
        for m in models:
            checkpoint.model_kind(m)  # an unknown name fails here, before any model is measured
        policies = list(POLICIES) if args.policies.strip() == "all" else _csv(args.policies)
        unknown = [p for p in policies if p not in POLICIES]
        if unknown or not policies:
            raise UserError(f"unknown policy {unknown or args.policies!r}; known: {', '.join(POLICIES)}, or 'all'")
        policies = ["full"] + [p for p in dict.fromkeys(policies) if p != "full"]
        batches = suite["batches"] if args.batches is None else _csv(args.batches)
        try:
            batches = [int(b) for b in batches]
        except ValueError:
            raise UserError(f"--batches must be comma-separated integers, got {args.batches!r}") from None
        if not batches or any(b < 1 for b in batches):
            raise UserError(f"--batches must be integers >= 1, got {args.batches!r}")
        batches = sorted(set(batches))
        reps = suite["reps"] if args.reps is None else args.reps
        if reps < 1:
            raise UserError(f"--reps must be >= 1, got {reps}")
        torch_ref = None
        if args.torch_reference is not None:
            torch_ref = Path(args.torch_reference).expanduser()
            if not (torch_ref / "models" / "var.py").is_file():
                raise UserError(f"--torch-reference {torch_ref}: not a FoundationVision/VAR checkout "
                                 "(no models/var.py)")
            if importlib.util.find_spec("torch") is None:
                raise UserError("--torch-reference needs torch, which is not installed (pip install '.[torch]')")
    except UserError as err:
        parser.error(str(err))
    return Options(
        suite=args.suite, models=models, policies=policies, batches=batches, reps=reps,
        dtype=args.dtype or suite["dtype"], impl=args.impl, out=Path(args.out), torch_reference=torch_ref,
        max_batch=suite["max_batch"] if args.max_batch is None else args.max_batch, seed=args.seed,
        plots=not args.no_plots, verify=args.verify, compile_cache=not args.no_compile_cache, all_rows=args.all_rows,
    )


def run(opts: Options, log=print) -> dict:
    """Run the benchmark, print the tables and write DIR/results.{md,json} and the plots. Returns the results."""
    cache_dir = compile_cache.enable(disable=not opts.compile_cache)
    if opts.suite == "gpu" or opts.max_batch:
        # Let XLA use most of the GPU (default 75%) so the max-batch search measures the device, not the pool.
        # Only effective before JAX first touches the device (the command line guarantees that).
        os.environ.setdefault("XLA_CLIENT_MEM_FRACTION", "0.90")
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", os.environ["XLA_CLIENT_MEM_FRACTION"])
    if opts.torch_reference is None:  # with it, the device must stay untouched until the reference has run
        check_backend(opts)
    models = [load(spec, opts.seed, opts.verify) for spec in opts.models]
    torch_times = {}
    if opts.torch_reference is not None:
        torch_times = torch_reference_times(opts.torch_reference, models, opts.batches, opts.dtype, opts.reps,
                                            opts.seed)
    results = Bench(opts).run(models)
    results["meta"]["torch_reference"] = str(opts.torch_reference) if opts.torch_reference else TORCH_NOT_RUN
    results["meta"]["compile_cache"] = compile_cache.describe(cache_dir)
    results["torch_reference"] = list(torch_times.values())
    for row in results["generate"]:
        row["torch_reference"] = torch_times.get((row["model"], row["batch"]),
                                                 TORCH_NOT_RUN if opts.torch_reference is None else "not run")
    report = format_report(results)
    opts.out.mkdir(parents=True, exist_ok=True)
    results["meta"]["plots"] = write_plots(results, opts.out) if opts.plots else []
    (opts.out / "results.md").write_text(report + "\n")
    (opts.out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    log(report)
    log(f"\nwrote {opts.out / 'results.md'}, {opts.out / 'results.json'}"
        + "".join(f", {opts.out / p}" for p in results["meta"]["plots"]))
    return results


@cli.command("python -m bench.run")
def main(argv=None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())

