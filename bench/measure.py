"""Every cache policy against the full cache, measured in one process; the results are plain records (lists of dicts).

For every model and batch, per policy (the full cache first; every ratio is policy ÷ full): the KV cache's exact bytes
beside the compiled `generate` program's memory figures, attention time per scale, end-to-end `generate` time and
images/s (compile time apart), and on a GPU the largest batch that fits and MFU. `bench/run.py` is the command line
that runs it; `bench/report.py` and `bench/plots.py` turn the records into tables and figures, and
`bench/torch_reference.py` times the PyTorch reference beside it.
"""
from __future__ import annotations

import collections
import dataclasses
import datetime
import functools
import gc
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from amskv_jax import checkpoint
from amskv_jax.attention import cached_attention, resolve_impl
from amskv_jax.cache import CacheLayout
from amskv_jax.checkpoint import init_params, load_model
from amskv_jax.config import PRESETS, ModelConfig, VARConfig, get_preset
from amskv_jax.errors import UserError
from amskv_jax.generate import first_nonfinite_scale, generate
from amskv_jax.memory import ProgramMemory, layout_bytes, reference_bytes
from amskv_jax.policies import policy_from_name
from bench.attention import PEAKS, _inputs

CFG, TOP_P = 1.5, 0.96  # the reference's sampling defaults (top_k: 900, capped at the vocabulary)
NA_CPU = "n/a (CPU)"
MAX_BATCH_CAP = 1 << 16  # the doubling stops here


# --- models and parameters ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class Model:
    name: str
    config: ModelConfig
    params: dict  # {"var": ..., "vqvae": ...}: numpy (random presets) or device arrays (checkpoints)
    weights: str
    calibration: dict | None = None  # the checkpoint's layers.json: its demanding layers and searched budgets

    def policy(self, name: str):
        """The named policy for this model, from its calibration as `generate --policy` builds it."""
        return policy_from_name(name, self.config.var, self.calibration)


def load(spec: str, seed: int, verify: bool | None = None) -> Model:
    if spec in PRESETS:
        config = get_preset(spec)
        return Model(spec, config, init_params(config, seed), f"random (seed {seed}, fan-in scaled)")
    model = load_model(spec, verify)
    return Model(spec if spec in checkpoint.EMBEDDED else Path(spec).name, model.config,
                 model.params, model.description, model.calibration)


def count_params(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))



# --- figures that need no timing ---------------------------------------------------------------------------------

def _itemsize(dtype: str) -> int:
    return jnp.dtype(dtype).itemsize


def read_bytes_per_scale(layout: CacheLayout, config: VARConfig, batch: int, dtype: str) -> list[int]:
    """Bytes of cached K and V each scale's queries read, over all layers (2·batch rows)."""
    per_slot = 2 * 2 * batch * config.embed_dim * _itemsize(dtype)
    return [
        per_slot * sum(int(layer.read_mask(si).sum()) for layer in layout.layers) for si in range(config.num_scales)
    ]


def flops_per_image(config: VARConfig, layout: CacheLayout) -> int:
    """Model FLOPs of one image under guidance (2 rows): 2·(per-token matmul params)·L per row, the per-row AdaLN
    matmuls once per scale, and attention 4·l·(read cache slots + l)·C per layer and scale (QKᵀ and PV). The VQ-VAE
    decoder and the sampler are not counted."""
    c = config
    per_token = c.depth * (4 * c.embed_dim**2 + 2 * c.embed_dim * c.mlp_hidden) + c.embed_dim * (c.vocab_size + c.cvae)
    per_row_scale = (1 if c.shared_aln else c.depth) * 6 * c.embed_dim**2 + 2 * c.embed_dim**2
    attention = 0
    for layer in layout.layers:
        for si, pn in enumerate(c.patch_nums):
            l = pn * pn
            attention += 4 * l * (int(layer.read_mask(si).sum()) + l) * c.embed_dim
    return 2 * (2 * per_token * c.seq_len + 2 * per_row_scale * c.num_scales + attention)


def device_peak() -> float | str:
    """The device's dense bf16 FLOP/s (bench/attention.py's PEAKS), "unknown", or n/a on CPU."""
    if jax.default_backend() == "cpu":
        return NA_CPU
    kind = jax.devices()[0].device_kind
    return next((p[0] for name, p in PEAKS.items() if kind.startswith(name)), "unknown")


# --- timing helpers ----------------------------------------------------------------------------------------------
def is_oom(err: BaseException) -> bool:
    text = str(err)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower() or "OutOfMemory" in type(err).__name__


def _seconds(fn) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def spread(times: list[float]) -> dict:
    """Median, min, max and count of repeated timings (s)."""
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "runs": len(times)}


# The row of `--all-rows`: the full cache, each scale's blocks on every row at once (`generate(row_chunk=2·batch)`)
# instead of the default chunks (`amskv_jax.chunks`), so the tables show what the chunks cost in time and save in
# memory.
ALL_ROWS = "full, all rows"


def _generate_fn(model: Model, layout: CacheLayout, dtype: str, impl: str, row_chunk: int | None = None):
    return jax.jit(functools.partial(
        generate, config=model.config, layout=layout, cfg=CFG, top_p=TOP_P, dtype=dtype, impl=impl,
        row_chunk=row_chunk,
    ))


def _labels(batch: int, num_classes: int) -> jax.Array:
    return jnp.asarray(np.arange(batch) % num_classes, jnp.int32)


def _compile(fn, *args):
    start = time.perf_counter()
    compiled = fn.lower(*args).compile()
    return compiled, time.perf_counter() - start


def _memory_figures(compiled) -> dict | str:
    try:
        stats = compiled.memory_analysis()
    except Exception as err:  # noqa: BLE001 - a backend without the analysis
        return f"unavailable ({type(err).__name__})"
    if stats is None:
        return "unavailable"
    figures = ProgramMemory.from_stats(stats, batch=0).to_json()
    del figures["batch"]  # the record carries it
    return figures


def _xla_flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost["flops"]) if cost and "flops" in cost else None
    except Exception:  # noqa: BLE001 - informational only
        return None





@dataclasses.dataclass
class Options:
    """One run: what to measure and where the results go (`bench.run.parse_args` builds it from the flags)."""

    suite: str
    models: list[str]
    policies: list[str]
    batches: list[int]
    reps: int
    dtype: str
    impl: str
    out: Path
    torch_reference: Path | None
    max_batch: bool
    seed: int = 0
    plots: bool = True
    verify: bool | None = None  # the checkpoints' array checksums (None: unless AMSKV_SKIP_VERIFY is set)
    compile_cache: bool = True  # JAX's persistent compilation cache (amskv_jax.compile_cache)
    all_rows: bool = False  # also the full cache with every row at once (`ALL_ROWS`): what the chunks cost


def check_backend(opts: Options) -> None:
    """--suite gpu on a CPU would run d30 at batch 512 for hours: refuse it."""
    if opts.suite == "gpu" and jax.default_backend() == "cpu":
        raise UserError("--suite gpu needs an accelerator, but jax.default_backend() is 'cpu'; use --suite cpu "
                         "(with --models/--batches as you like)")


class Bench:
    """Measures `opts` on loaded models; `run` returns the records: {"meta": {...}, "memory": [...],
    "kv_per_scale": [...], "attention": [...], "generate": [...], "max_batch": [...]}, one dict per row."""

    def __init__(self, opts: Options):
        self.opts = opts
        self.results: dict = {"meta": {}, "memory": [], "kv_per_scale": [], "attention": [], "generate": [],
                              "max_batch": []}
        self.bar: tqdm | None = None

    # -- progress --
    def _units(self, model: Model) -> int:
        o, s = self.opts, model.config.var.num_scales
        p = len(o.policies)
        return len(o.batches) * ((p + o.all_rows) * (2 + o.reps) + p * s * (1 + o.reps))

    def _tick(self, text: str, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(n)

    # -- the whole run --
    def run(self, models: list[Model]) -> dict:
        o = self.opts
        start = time.perf_counter()
        check_backend(o)
        impl = resolve_impl(o.impl)
        peak = device_peak()
        device = jax.devices()[0]
        self.results["meta"] = {
            "suite": o.suite, "models": [m.name for m in models], "policies": o.policies, "batches": o.batches,
            "reps": o.reps, "dtype": o.dtype, "impl": o.impl, "impl_resolved": impl, "backend": jax.default_backend(),
            "device_kind": device.device_kind, "jax_version": jax.__version__, "python": platform.python_version(),
            "peak_flops": peak, "cfg": CFG, "top_p": TOP_P,
            "weights": {m.name: m.weights for m in models},
            "params": {m.name: {"var": count_params(m.params["var"]), "vqvae": count_params(m.params["vqvae"])}
                       for m in models},
            "policy_settings": {m.name: {p: m.policy(p).describe() for p in o.policies}
                                for m in models},
            "mem_fraction": os.environ.get("XLA_CLIENT_MEM_FRACTION", os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")),
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
        }
        self.bar = tqdm(total=sum(self._units(m) for m in models), desc="bench", unit="step", file=sys.stderr,
                        dynamic_ncols=True, mininterval=0.5)
        try:
            for model in models:
                params = jax.device_put(model.params)
                layouts = {p: model.policy(p).layout(model.config.var) for p in o.policies}
                for batch in o.batches:
                    self._memory_and_generate(model, params, layouts, batch, impl, peak)
                    self._attention(model, layouts, batch, impl)
                backend = jax.default_backend()
                if o.max_batch and backend == "gpu":
                    self._max_batch(model, params, layouts, impl)
                else:  # the search is GPU-only: "n/a (CPU)" (NA_CPU), "n/a (TPU)"; on a GPU, not asked for
                    for p in o.policies:
                        self.results["max_batch"].append({"model": model.name, "policy": p, "max_batch": "not run"
                                                          if backend == "gpu" else f"n/a ({backend.upper()})",
                                                          "tried": [], "ratio_vs_full": None})
                del params
                gc.collect()
        finally:
            self.bar.close()
            self.bar = None
        self.results["meta"]["wall_s"] = time.perf_counter() - start
        return self.results

    # -- 1 and 3: memory figures and end-to-end generation --
    def _memory_and_generate(self, model, params, layouts, batch, impl, peak) -> None:
        o, c = self.opts, model.config.var
        labels = _labels(batch, c.num_classes)
        keys = [jax.random.fold_in(jax.random.key(o.seed), rep) for rep in range(o.reps + 1)]
        compiled, rows = {}, {}
        variants = [(p, layout, None) for p, layout in layouts.items()]
        if o.all_rows:
            variants.append((ALL_ROWS, layouts["full"], 2 * batch))
        for p, layout, row_chunk in variants:
            cache, peak_kv = layout_bytes(layout, c, batch, o.dtype)
            self.results["memory"].append({
                "model": model.name, "batch": batch, "policy": p, "slots": sum(layout.capacities),
                "cache_bytes": cache, "peak_kv_bytes": peak_kv, "compiled": "not compiled",
            })
            if batch == o.batches[0] and row_chunk is None:
                self.results["kv_per_scale"].append({
                    "model": model.name, "policy": p, "batch": batch, "dtype": o.dtype,
                    "patch_nums": list(c.patch_nums), "read_bytes": read_bytes_per_scale(layout, c, batch, o.dtype),
                    "allocated_bytes": cache,
                })
            row = {"model": model.name, "batch": batch, "policy": p, "status": "ok",
                   "flops_per_image": flops_per_image(c, layout)}
            rows[p] = row
            self._tick(f"{model.name} b{batch} compile {p}")
            try:
                fn = _generate_fn(model, layout, o.dtype, impl, row_chunk)
                exe, row["compile_s"] = _compile(fn, params, labels, keys[0])
                self.results["memory"][-1]["compiled"] = _memory_figures(exe)
                row["xla_flops"] = _xla_flops(exe)
                self._tick(f"{model.name} b{batch} warm-up {p}")
                warm = jax.block_until_ready(exe(params, labels, keys[0]))  # first run: allocation, warm-up
                bad = first_nonfinite_scale(warm.finite)
                row["nonfinite_scale"] = None if bad is None else bad + 1  # 1-based; the images are garbage
                compiled[p] = exe
            except Exception as err:  # noqa: BLE001 - out of memory is a result, anything else is not
                if not is_oom(err):
                    raise
                row["status"] = "OOM"
                if not isinstance(self.results["memory"][-1]["compiled"], dict):
                    self.results["memory"][-1]["compiled"] = "OOM"
                self._tick("OOM", o.reps + (0 if "compile_s" in row else 1))  # the steps it will not run
                gc.collect()
        times = {p: [] for p in compiled}
        for rep in range(o.reps):
            for p, exe in compiled.items():  # interleaved: A, B, A, B, ...
                self._tick(f"{model.name} b{batch} generate {p} {rep + 1}/{o.reps}")
                times[p].append(_seconds(lambda exe=exe: exe(params, labels, keys[rep + 1]).images))
        for p, row in rows.items():
            if p in times:
                row.update({f"{k}_s" if k != "runs" else k: v for k, v in spread(times[p]).items()})
                row["images_per_s"] = batch / row["median_s"]
                if isinstance(peak, float):
                    row["mfu"] = row["flops_per_image"] * row["images_per_s"] / peak
                else:
                    row["mfu"] = peak
            else:
                row["mfu"] = "OOM"
        full = rows["full"]
        for p, row in rows.items():
            ok = row["status"] == "ok" and full["status"] == "ok"
            row["time_ratio_vs_full"] = row["median_s"] / full["median_s"] if ok else None
            row["speedup_vs_full"] = row["images_per_s"] / full["images_per_s"] if ok else None
            self.results["generate"].append(row)
        mem = [r for r in self.results["memory"] if r["model"] == model.name and r["batch"] == batch]
        full_mem = mem[0]
        for r in mem:
            r["cache_ratio"] = r["cache_bytes"] / full_mem["cache_bytes"]
            r["peak_kv_ratio"] = r["peak_kv_bytes"] / full_mem["peak_kv_bytes"]
            both = isinstance(r["compiled"], dict) and isinstance(full_mem["compiled"], dict)
            r["temp_ratio"] = r["compiled"]["temp_bytes"] / full_mem["compiled"]["temp_bytes"] if both and \
                full_mem["compiled"]["temp_bytes"] else None
        ref = reference_bytes(c, batch, o.dtype)
        self.results["memory"].append({
            "model": model.name, "batch": batch, "policy": "reference", "slots": c.depth * c.seq_len,
            "cache_bytes": ref, "peak_kv_bytes": ref, "compiled": "n/a (the PyTorch reference's concatenated cache)",
            "cache_ratio": ref / full_mem["cache_bytes"], "peak_kv_ratio": ref / full_mem["peak_kv_bytes"],
            "temp_ratio": None,
        })
        del compiled
        gc.collect()

    # -- 2: attention per scale --
    def _attention(self, model, layouts, batch, impl) -> None:
        o, c = self.opts, model.config.var
        if c.head_dim != 64:  # bench/attention.py's _inputs make 64-wide heads (every preset has them)
            for p, layout in layouts.items():
                for si, pn in enumerate(c.patch_nums):
                    self.results["attention"].append({
                        "model": model.name, "batch": batch, "policy": p, "scale": si, "pn": pn, "tokens": pn * pn,
                        "layers": c.depth, "read_slots": sum(int(x.read_mask(si).sum()) for x in layout.layers),
                        "capacity_slots": sum(layout.capacities), "status": f"skipped (head_dim {c.head_dim} != 64)",
                        "ratio_vs_full": None,
                    })
            self._tick("attention skipped", len(layouts) * c.num_scales * (1 + o.reps))
            return
        dtype, rows = jnp.dtype(o.dtype), 2 * batch
        for si, pn in enumerate(c.patch_nums):
            l = pn * pn
            # Layers with the same capacity and read mask run the same attention: compile and hold inputs for each
            # such plan once, and call it once per layer that has it.
            plans = {p: collections.Counter((layer.capacity, tuple(bool(x) for x in layer.read_mask(si)))
                                            for layer in layout.layers) for p, layout in layouts.items()}
            jobs, status = {}, {}
            for p, counter in plans.items():
                self._tick(f"{model.name} b{batch} attention s{si} {p} warm-up")
                try:
                    jobs[p] = []
                    for (capacity, mask), count in counter.items():
                        static_mask = np.asarray(mask, bool)
                        args = _inputs(rows, l, c.num_heads, capacity, dtype, static_mask)
                        fn = jax.jit(functools.partial(_attend, impl=impl, static_mask=mask))
                        jax.block_until_ready(fn(*args))
                        jobs[p].append((fn, args, count))
                    status[p] = "ok"
                except Exception as err:  # noqa: BLE001
                    if not is_oom(err):
                        raise
                    jobs.pop(p, None)
                    status[p] = "OOM"
                    gc.collect()
            totals = {p: [] for p in jobs}
            for rep in range(o.reps):
                for p, plan_jobs in jobs.items():  # interleaved
                    self._tick(f"{model.name} b{batch} attention s{si} {p} {rep + 1}/{o.reps}")
                    # every layer's call, each synchronised (not one call scaled by the layer count)
                    totals[p].append(sum(_seconds(lambda fn=fn, args=args: fn(*args))
                                         for fn, args, count in plan_jobs for _ in range(count)))
            for p in status:
                if status[p] != "ok":
                    self._tick("", o.reps)
            for p, layout in layouts.items():
                row = {
                    "model": model.name, "batch": batch, "policy": p, "scale": si, "pn": pn, "tokens": l,
                    "layers": c.depth, "read_slots": sum(int(layer.read_mask(si).sum()) for layer in layout.layers),
                    "capacity_slots": sum(layout.capacities), "distinct_plans": len(plans[p]), "status": status[p],
                }
                if status[p] == "ok":
                    ms = spread(totals[p])
                    row.update({"median_ms": 1e3 * ms["median"], "min_ms": 1e3 * ms["min"], "max_ms": 1e3 * ms["max"],
                                "runs": ms["runs"]})
                self.results["attention"].append(row)
            full = self.results["attention"][-len(layouts)]
            for row in self.results["attention"][-len(layouts):]:
                ok = row["status"] == "ok" and full["status"] == "ok"
                row["ratio_vs_full"] = row["median_ms"] / full["median_ms"] if ok else None
            del jobs
            gc.collect()

    # -- 4: the largest batch that fits (GPU) --
    def _max_batch(self, model, params, layouts, impl) -> None:
        o = self.opts
        bar = tqdm(desc=f"max batch {model.name}", unit="try", file=sys.stderr, dynamic_ncols=True)
        found = {}
        for p, layout in layouts.items():
            fn = _generate_fn(model, layout, o.dtype, impl)
            tried: list[tuple[int, bool]] = []

            def fits(batch: int) -> bool:
                bar.set_postfix_str(f"{p} batch {batch}")
                labels = _labels(batch, model.config.var.num_classes)
                try:
                    exe, _ = _compile(fn, params, labels, jax.random.key(o.seed))
                    jax.block_until_ready(exe(params, labels, jax.random.key(o.seed)).images)
                    ok = True
                except Exception as err:  # noqa: BLE001
                    if not is_oom(err):
                        raise
                    ok = False
                exe = None
                gc.collect()
                tried.append((batch, ok))
                bar.update(1)
                return ok

            ran = [r for r in self.results["generate"] if r["model"] == model.name and r["policy"] == p]
            lo = max((r["batch"] for r in ran if r["status"] == "ok"), default=0)
            hi = min((r["batch"] for r in ran if r["status"] == "OOM" and r["batch"] > lo), default=None)
            if lo == 0 and hi is None:
                lo, hi = (1, None) if fits(1) else (0, 1)
            while hi is None and lo < MAX_BATCH_CAP:
                nxt = min(2 * lo, MAX_BATCH_CAP)
                if fits(nxt):
                    lo = nxt
                else:
                    hi = nxt
            while hi is not None and hi - lo > max(1, lo // 16):  # bisect to within 1/16
                mid = (lo + hi) // 2
                if fits(mid):
                    lo = mid
                else:
                    hi = mid
            value = lo if hi is not None else f">= {lo} (cap)"
            found[p] = lo
            self.results["max_batch"].append({"model": model.name, "policy": p, "max_batch": value,
                                              "first_oom": hi, "tried": tried})
        bar.close()
        for row in self.results["max_batch"][-len(layouts):]:
            row["ratio_vs_full"] = found[row["policy"]] / found["full"] if found.get("full") else None


def _attend(q, k, v, cache_k, cache_v, cache_mask, scale_mul_H, *, impl, static_mask):
    return cached_attention(q, k, v, cache_k, cache_v, cache_mask, scale_mul_H, impl=impl,
                            static_mask=np.asarray(static_mask, bool))

