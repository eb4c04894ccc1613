"""Time the attention implementations on the last three scales, full cache against an AMS-KV-shaped cache.

    python -m bench.attention --models d16,d30 --batches 1,32,128          # on a GPU
    python -m bench.attention --models tiny --batches 1                    # CPU smoke test (kernel interpreted)

For every model, batch (2·batch rows under classifier-free guidance), cache policy and scale it times `xla` (the
reference), `cudnn` (`jax.nn.dot_product_attention`, GPU only) and `pallas` through the one dispatch point, and
prints milliseconds (median of `--reps` runs after a warm-up), the useful work (4·rows·H·l·keys·D FLOPs over the keys
actually read: live cache slots plus the scale's own) as TFLOP/s, and the bytes that must move (q, fresh k/v, the
live cache slots, the output) as GB/s, each against the device's peak when the device is known. On CPU there are no
peaks and the "pallas" row is the interpreter: it checks that the script runs, not how fast anything is.

The AMS-KV cache is the default setting (`policies.DEFAULT_POLICY`) without calibration: its cache-demanding layers
are the first ones, which changes which layers are timed, not the per-layer sizes.
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from amskv_jax import cli, compile_cache
from amskv_jax.attention import cached_attention, pallas_gpu, resolve_impl
from amskv_jax.cache import CacheLayout
from amskv_jax.config import VARConfig, get_preset
from amskv_jax.errors import UserError
from amskv_jax.policies import DEFAULT_POLICY, policy_from_name

# Dense bf16 tensor-core FLOP/s and memory bytes/s from the vendors' data sheets, by `device_kind` prefix.
PEAKS = {
    "NVIDIA H100 80GB HBM3": (989e12, 3.35e12),  # SXM
    "NVIDIA H100 PCIe": (756e12, 2.0e12),
    "NVIDIA H100 NVL": (835e12, 3.9e12),
    "NVIDIA H200": (989e12, 4.8e12),
    "NVIDIA A100-SXM4-80GB": (312e12, 2.04e12),
}
IMPLS = ("xla", "cudnn", "pallas")


def layouts(config: VARConfig) -> dict[str, CacheLayout]:
    """The full cache and the default AMS-KV setting, whose cache-demanding layers keep condensed + local scales."""
    return {name: policy_from_name(name, config).layout(config) for name in ("full", DEFAULT_POLICY)}


def _distinct_plans(name: str, layout: CacheLayout) -> list[tuple[str, object]]:
    """One (label, plan) per distinct layer plan: "amskv:11L" is the plan 11 layers share."""
    groups: dict[object, int] = {}
    for plan in layout.layers:
        groups[plan] = groups.get(plan, 0) + 1
    return [(f"{name}:{count}L" if len(groups) > 1 else name, plan) for plan, count in groups.items()]


def _time(fn, args, reps: int) -> float:
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _inputs(rows: int, l: int, heads: int, capacity: int, dtype, static_mask: np.ndarray):
    keys = jax.random.split(jax.random.key(0), 5)
    q, k, v = (jax.random.normal(keys[i], (rows, l, heads, 64), dtype) for i in range(3))
    cache_k = jax.random.normal(keys[3], (rows, capacity, heads, 64), jnp.float32)
    cache_k = (cache_k / jnp.linalg.norm(cache_k, axis=-1, keepdims=True)).astype(dtype)
    cache_v = jax.random.normal(keys[4], (rows, capacity, heads, 64), dtype)
    return q, k, v, cache_k, cache_v, jnp.asarray(static_mask), jnp.full((heads,), np.log(4.0), jnp.float32)


def _implementations(sweep: bool) -> list[tuple[str, object]]:
    """(label, function of (args, static_mask)) for every row of the table."""
    out = []
    for impl in IMPLS:
        try:
            resolve_impl(impl)
        except UserError as err:
            print(f"# skipping {impl}: {err}")
            continue
        out.append((impl, lambda mask, impl=impl: lambda *a: cached_attention(*a, impl=impl, static_mask=mask)))
    if sweep and jax.default_backend() == "gpu":
        for bq in (16, 32, 64, 128):
            for bk in (32, 64, 128):
                label = f"pallas q{bq} k{bk}"
                out.append((label, lambda mask, bq=bq, bk=bk: lambda *a: pallas_gpu.cached_attention(
                    *a, static_mask=mask, block_q=bq, block_k=bk)))
    return out


def run(models: list[str], batches: list[int], dtype, reps: int, sweep: bool) -> None:
    device = jax.devices()[0]
    peaks = next((p for name, p in PEAKS.items() if device.device_kind.startswith(name)), None)
    print(f"# device: {device.device_kind} ({jax.default_backend()}); peaks: "
          + (f"{peaks[0] / 1e12:.0f} TFLOP/s bf16, {peaks[1] / 1e12:.2f} TB/s" if peaks else "unknown"))
    impls = _implementations(sweep)
    header = f"{'model':6} {'cache':12} {'batch':>5} {'l':>5} {'keys/cap':>9} {'impl':18} {'ms':>9} " \
             f"{'TFLOP/s':>8} {'%peak':>6} {'GB/s':>8} {'%peak':>6}"
    print(header)
    print("-" * len(header))
    itemsize = jnp.dtype(dtype).itemsize
    for name in models:
        config = get_preset(name).var
        for policy_name, layout in layouts(config).items():
            for policy, plan in _distinct_plans(policy_name, layout):
                for si in range(config.num_scales - 3, config.num_scales):
                    l, static_mask = config.patch_nums[si] ** 2, plan.read_mask(si)
                    live = int(static_mask.sum())
                    for batch in batches:
                        rows, heads = 2 * batch, config.num_heads
                        args = _inputs(rows, l, heads, plan.capacity, dtype, static_mask)
                        flops = 4 * rows * heads * l * (live + l) * 64
                        moved = rows * heads * 64 * itemsize * (4 * l + 2 * live)
                        for label, make in impls:
                            seconds = _time(jax.jit(make(static_mask)), args, reps)
                            tflops, gbps = flops / seconds / 1e12, moved / seconds / 1e9
                            pct = (f"{100 * tflops * 1e12 / peaks[0]:6.1f} ", f"{100 * gbps * 1e9 / peaks[1]:6.1f}") \
                                if peaks else ("     - ", "     -")
                            print(f"{name:6} {policy:12} {batch:5d} {l:5d} {f'{live}/{plan.capacity}':>9} {label:18} "
                                  f"{seconds * 1e3:9.3f} {tflops:8.3f} {pct[0]}{gbps:8.1f} {pct[1]}", flush=True)


@cli.command("python -m bench.attention")
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.attention", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="d16,d30", help="comma-separated presets")
    parser.add_argument("--batches", default="1,32,128", help="comma-separated batch sizes (rows = 2·batch)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--sweep", action="store_true", help="also time the kernel at every block_q × block_k (GPU)")
    compile_cache.add_flag(parser)
    args = parser.parse_args(argv)
    compile_cache.enable(args.no_compile_cache)
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        parser.error(f"--batches must be comma-separated integers, got {args.batches!r}")
    run(args.models.split(","), batches, jnp.dtype(args.dtype), args.reps, args.sweep)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
