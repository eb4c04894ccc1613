"""Generation time per layer loop on this machine, beside the PyTorch reference's, in one run.

    python -m bench.layer_loop --model d16 --policies full,amskv --batch 1 --reps 2 [--loops scan,unrolled,per-layer] \
        [--torch-reference VAR]

For every policy, `generate` (jitted, float32 by default, the reference's sampling settings) is timed with each
layer loop (`generate.LAYER_LOOPS`; `--loops`, all three by default): `scan` (stacked block params), `unrolled` fed
the stacked params (split into per-layer weights inside the program, as `bench.run` feeds them) and `per-layer`, the
unrolled loop fed per-layer params made once (`var.per_layer_blocks`). Each figure is the median of `--reps`
synchronised calls after a warm-up, the loops interleaved within every repetition. With `--torch-reference` (a FoundationVision/VAR checkout; needs torch) the
reference's own generation is timed first, with the same weights (`bench.torch_reference.torch_reference_times`), and every row
gets its speed ratio (reference seconds ÷ ours). One JSON record per line, then a markdown table; the 1-minute load
average is recorded, since only ratios from one run on one machine compare.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from amskv_jax import cli
from amskv_jax.generate import DTYPES, generate
from amskv_jax.policies import POLICIES
from amskv_jax.var import per_layer_blocks
from bench.measure import CFG, TOP_P, load
from bench.torch_reference import torch_reference_times

LOOPS = {"scan": "scan", "unrolled": "unrolled", "per-layer": "unrolled"}  # name -> generate's layer_loop


@dataclasses.dataclass(frozen=True)
class Record:
    model: str
    policy: str
    loop: str
    batch: int
    dtype: str
    compile_s: float
    seconds: float  # median over the repetitions
    reference_s: float | None
    load_average: float

    @property
    def speed_ratio(self) -> float | None:
        """The reference's time ÷ ours: above 1, ours is faster."""
        return None if self.reference_s is None else self.reference_s / self.seconds


def run(model_name: str, policies: list[str], loops: list[str], batch: int, dtype: str, reps: int,
        torch_reference: Path | None, seed: int = 0) -> list[Record]:
    model = load(model_name, seed)
    reference = None
    if torch_reference is not None:
        row = torch_reference_times(torch_reference, [model], [batch], dtype, reps, seed)[(model.name, batch)]
        reference = row.get("median_s")
    params = jax.device_put(model.params)
    per_layer = {**params, "var": per_layer_blocks(params["var"])}
    labels = jnp.asarray(np.arange(batch) % model.config.var.num_classes, jnp.int32)
    fns = {}
    for policy in policies:
        layout = model.policy(policy).layout(model.config.var)
        for loop in loops:
            loop_params = per_layer if loop == "per-layer" else params
            fn = jax.jit(functools.partial(generate, config=model.config, layout=layout, cfg=CFG, top_p=TOP_P,
                                           dtype=dtype, layer_loop=LOOPS[loop]))
            start = time.perf_counter()
            compiled = fn.lower(loop_params, labels, jax.random.key(seed)).compile()
            compile_s = time.perf_counter() - start
            jax.block_until_ready(compiled(loop_params, labels, jax.random.key(seed)))  # warm-up
            fns[policy, loop] = (compiled, loop_params, compile_s)
    times = {key: [] for key in fns}
    load_average = os.getloadavg()[0]
    for rep in range(reps):
        for key, (compiled, loop_params, _) in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(compiled(loop_params, labels, jax.random.key(seed + rep + 1)))
            times[key].append(time.perf_counter() - start)
    return [Record(model.name, policy, loop, batch, dtype, fns[policy, loop][2], statistics.median(times[policy, loop]),
                   reference, load_average) for policy, loop in fns]


def markdown(records: list[Record]) -> str:
    lines = ["| model | policy | layer loop | compile s | s / batch | reference s / batch | speed ÷ reference's |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in records:
        ref = "not run" if r.reference_s is None else f"{r.reference_s:.2f}"
        ratio = "" if r.speed_ratio is None else f"{r.speed_ratio:.2f}"
        lines.append(f"| {r.model} | {r.policy} | {r.loop} | {r.compile_s:.1f} | {r.seconds:.2f} | {ref} | {ratio} |")
    return "\n".join(lines) + f"\n\nload average (1 min) before the timed runs: {records[0].load_average:.1f}"


@cli.command("python -m bench.layer_loop")
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.layer_loop", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="d16")
    parser.add_argument("--policies", default="full,amskv")
    parser.add_argument("--loops", default=",".join(LOOPS))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    parser.add_argument("--torch-reference", default=None, metavar="PATH")
    args = parser.parse_args(argv)
    policies = [p for p in args.policies.split(",") if p]
    loops = [x for x in args.loops.split(",") if x]
    if not set(policies) <= set(POLICIES) or not policies or not set(loops) <= set(LOOPS) or not loops:
        parser.error(f"--policies: some of {', '.join(POLICIES)} (got {args.policies!r}); --loops: some of "
                     f"{', '.join(LOOPS)} (got {args.loops!r})")
    if args.batch < 1 or args.reps < 1:
        parser.error(f"--batch and --reps must be >= 1, got {args.batch}, {args.reps}")
    jax.config.update("jax_enable_compilation_cache", False)
    torch_reference = Path(args.torch_reference).expanduser() if args.torch_reference else None
    records = run(args.model, policies, loops, args.batch, args.dtype, args.reps, torch_reference)
    for record in records:
        print(json.dumps({**dataclasses.asdict(record), "speed_ratio": record.speed_ratio}), flush=True)
    print(markdown(records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
