"""Trace and compile time of `generate` per model depth and cache policy, on abstract params (no weights).

    python -m bench.compile_time --models d16,d20,d24,d30 --policies full,amskv --batch 8 --dtype bfloat16 \
        [--layer-loop scan|unrolled]

For every (model, policy) it builds `jax.jit` of `generate` on the params' shapes (`param_shapes`: nothing is
initialised or run), times `.trace(...)` (Python tracing and jaxpr building, plus lowering to StableHLO) and
`.compile()` separately, wall-clock and this process's CPU seconds (all its threads; on a shared machine CPU time
is the steadier figure), and prints one plain record per line (with the load average when it started and the
number of copies of a cache stack in the optimised HLO), then a markdown table. The persistent compilation cache is
turned off for the measurement, so every figure is a cold compile. Compile time is what depth must not drive: the
scanned layer loop (`--layer-loop scan`, the default; what GPU and TPU run) is one body (`amskv_jax/var.py`), so
the compiler sees one block per scale; `unrolled` (what one CPU device runs, `generate.LAYER_LOOPS`) grows with
depth.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from amskv_jax.cache import KVCache, init_cache
from amskv_jax.checkpoint import param_shapes
from amskv_jax.config import PRESETS, get_preset
from amskv_jax.generate import DTYPES, LAYER_LOOPS, generate
from amskv_jax.policies import POLICIES, policy_from_name


@dataclasses.dataclass(frozen=True)
class Record:
    model: str
    policy: str
    batch: int
    dtype: str
    layer_loop: str
    load_average: float
    trace_s: float
    compile_s: float
    trace_cpu_s: float
    compile_cpu_s: float
    cache_copies: int  # copies of a cache stack in the optimised HLO (`cache_stack_copies`)

    @property
    def total_s(self) -> float:
        return self.trace_s + self.compile_s


def hlo_type(dtype) -> str:
    """HLO's name of a numpy/ml_dtypes dtype: f32, bf16, s8, u8, s4, f8e4m3fn, pred."""
    name = np.dtype(dtype).name
    special = {"bfloat16": "bf16", "bool": "pred"}
    if name in special:
        return special[name]
    kind, bits, variant = re.fullmatch(r"(float|int|uint)(\d+)(?:_(\w+))?", name).groups()
    return {"float": "f", "int": "s", "uint": "u"}[kind] + bits + (variant or "")


def cache_stack_copies(hlo_text: str, cache: KVCache) -> list[str]:
    """The result types (e.g. "bf16[16,16,424,16,64]") of the `copy` instructions of an optimised HLO text
    (`compiled.as_text()`) that have the shape and dtype of one of the cache's stacks: every buffer with a layer axis
    (K, V and, quantised, their scales; `cache` may be abstract, `jax.eval_shape` of `init_cache`).

    Copies of a broadcast are not counted: they make initial values, not copies of a written cache (XLA merges
    equal initial stacks, e.g. the zero K scales and K minima of an int4 cache, into one broadcast and copies it into
    the second buffer once, before any write)."""
    stacks = {f"{hlo_type(x.dtype)}[{','.join(map(str, x.shape))}]" for x in jax.tree.leaves(cache) if x.ndim >= 4}
    copies = re.findall(r"= (\w+\[[\d,]*\])\{[\d,]*\} copy\(([^)]*)\)", hlo_text)
    return [t for t, operand in copies if t in stacks and "broadcast" not in operand]


def measure(model: str, policy: str, batch: int, dtype: str, layer_loop: str = "scan") -> Record:
    """Trace (and lower) then compile `generate` for one model and policy; params are abstract."""
    config = get_preset(model)
    params = param_shapes(config)
    layout = policy_from_name(policy, config.var).layout(config.var)
    fn = jax.jit(functools.partial(generate, config=config, layout=layout, dtype=dtype, layer_loop=layer_loop))
    load = os.getloadavg()[0]
    labels = jnp.asarray(np.arange(batch) % config.var.num_classes, jnp.int32)
    start, start_cpu = time.perf_counter(), time.process_time()
    lowered = fn.trace(params, labels, jax.random.key(0)).lower()
    traced, traced_cpu = time.perf_counter(), time.process_time()
    text = lowered.compile().as_text()
    compiled, compiled_cpu = time.perf_counter(), time.process_time()
    c = config.var
    cache = jax.eval_shape(lambda: init_cache(layout, 2 * batch, c.num_heads, c.head_dim, DTYPES[dtype]))
    return Record(model, policy, batch, dtype, layer_loop, load, traced - start, compiled - traced,
                  traced_cpu - start_cpu, compiled_cpu - traced_cpu, len(cache_stack_copies(text, cache)))


def markdown(records: list[Record]) -> str:
    lines = ["| model | policy | layer loop | trace + lower s | compile s | total s | CPU s (trace + compile) | load "
             "| cache copies |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r.model} | {r.policy} | {r.layer_loop} | {r.trace_s:.1f} | {r.compile_s:.1f} | {r.total_s:.1f} "
              f"| {r.trace_cpu_s + r.compile_cpu_s:.1f} | {r.load_average:.1f} | {r.cache_copies} |" for r in records]
    return "\n".join(lines)


def _names(text: str, known, what: str) -> list[str]:
    names = [x for x in text.split(",") if x]
    bad = [x for x in names if x not in known]
    if bad or not names:
        raise SystemExit(f"unknown {what} {bad or text!r}; allowed: {', '.join(known)}")
    return names


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compile_time", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="d16,d20,d24,d30")
    parser.add_argument("--policies", default="full,amskv")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", default="bfloat16", choices=tuple(DTYPES))
    parser.add_argument("--layer-loop", default="scan", choices=[x for x in LAYER_LOOPS if x != "auto"])
    args = parser.parse_args(argv)
    models = _names(args.models, PRESETS, "models")
    policies = _names(args.policies, POLICIES, "policies")
    if args.batch < 1:
        raise SystemExit(f"--batch must be >= 1, got {args.batch}")
    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    records = []
    try:
        for model in models:
            for policy in policies:
                record = measure(model, policy, args.batch, args.dtype, args.layer_loop)
                print(json.dumps(dataclasses.asdict(record)), flush=True)
                records.append(record)
    finally:
        jax.config.update("jax_enable_compilation_cache", enabled)
    print(markdown(records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
