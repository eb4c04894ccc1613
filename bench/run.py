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
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import functools
import gc
import importlib.util
import json
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

from amskv_jax.attention import IMPLS, cached_attention, resolve_impl
from amskv_jax.cache import CacheLayout
from amskv_jax import checkpoint, cli, compile_cache
from amskv_jax.checkpoint import init_params, load_model
from amskv_jax.config import PRESETS, ModelConfig, VARConfig, get_preset
from amskv_jax.generate import default_top_k, first_nonfinite_scale, generate
from amskv_jax.memory import layout_bytes, reference_bytes
from amskv_jax.policies import POLICIES, policy_from_name
from bench.attention import PEAKS, _inputs

SUITES = {
    "cpu": {"models": ("tiny-ladder256",), "batches": (1, 8), "reps": 3, "dtype": "float32", "max_batch": False},
    "gpu": {
        "models": ("d16", "d30"), "batches": (32, 64, 128, 256, 512), "reps": 5, "dtype": "bfloat16",
        "max_batch": True,
    },
}
DEFAULT_POLICIES = ("full", "amskv")
DTYPES = ("float32", "bfloat16")
CFG, TOP_P = 1.5, 0.96  # the reference's sampling defaults (top_k: 900, capped at the vocabulary)
NA_CPU = "n/a (CPU)"
TORCH_NOT_RUN = "not run (--torch-reference not given)"
MAX_BATCH_CAP = 1 << 16  # the doubling stops here
GIB, MIB = 2**30, 2**20


# --- models and parameters ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class Model:
    name: str
    config: ModelConfig
    params: dict  # {"var": ..., "vqvae": ...}: numpy (random presets) or device arrays (checkpoints)
    weights: str


def load(spec: str, seed: int, verify: bool | None = None) -> Model:
    if spec in PRESETS:
        config = get_preset(spec)
        return Model(spec, config, init_params(config, seed), f"random (seed {seed}, fan-in scaled)")
    model = load_model(spec, verify)
    return Model(spec if spec in getattr(checkpoint, "EMBEDDED", {}) else Path(spec).name, model.config,
                 model.params, model.description)


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


def _spread(times: list[float]) -> dict:
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "runs": len(times)}


def _generate_fn(model: Model, layout: CacheLayout, dtype: str, impl: str):
    return jax.jit(functools.partial(
        generate, config=model.config, layout=layout, cfg=CFG, top_p=TOP_P, dtype=dtype, impl=impl,
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
    out = {
        "argument_bytes": int(stats.argument_size_in_bytes),
        "output_bytes": int(stats.output_size_in_bytes),
        "temp_bytes": int(stats.temp_size_in_bytes),
        "alias_bytes": int(stats.alias_size_in_bytes),
    }
    out["total_bytes"] = out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"] - out["alias_bytes"]
    return out


def _xla_flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost["flops"]) if cost and "flops" in cost else None
    except Exception:  # noqa: BLE001 - informational only
        return None


# --- the benchmark -----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Options:
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


class Bench:
    def __init__(self, opts: Options):
        self.opts = opts
        self.results: dict = {"meta": {}, "memory": [], "kv_per_scale": [], "attention": [], "generate": [],
                              "max_batch": [], "torch_reference": []}
        self.bar: tqdm | None = None

    # -- progress --
    def _units(self, model: Model) -> int:
        o, s = self.opts, model.config.var.num_scales
        p = len(o.policies)
        return len(o.batches) * (p * (2 + o.reps) + p * s * (1 + o.reps))

    def _tick(self, text: str, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(n)

    # -- the whole run --
    def run(self, models: list[Model], torch_times: dict | None) -> dict:
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
            "policy_settings": {m.name: {p: policy_from_name(p, m.config.var).describe() for p in o.policies}
                                for m in models},
            "torch_reference": str(o.torch_reference) if o.torch_reference else TORCH_NOT_RUN,
            "mem_fraction": os.environ.get("XLA_CLIENT_MEM_FRACTION", os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")),
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
        }
        self.results["torch_reference"] = list((torch_times or {}).values())
        self.bar = tqdm(total=sum(self._units(m) for m in models), desc="bench", unit="step", file=sys.stderr,
                        dynamic_ncols=True, mininterval=0.5)
        try:
            for model in models:
                params = jax.device_put(model.params)
                layouts = {p: policy_from_name(p, model.config.var).layout(model.config.var) for p in o.policies}
                for batch in o.batches:
                    self._memory_and_generate(model, params, layouts, batch, impl, peak, torch_times)
                    self._attention(model, layouts, batch, impl)
                if o.max_batch and jax.default_backend() == "gpu":
                    self._max_batch(model, params, layouts, impl)
                else:
                    for p in o.policies:
                        self.results["max_batch"].append({"model": model.name, "policy": p, "max_batch": NA_CPU
                                                          if jax.default_backend() != "gpu" else "not run",
                                                          "tried": [], "ratio_vs_full": None})
                del params
                gc.collect()
        finally:
            self.bar.close()
            self.bar = None
        self.results["meta"]["wall_s"] = time.perf_counter() - start
        return self.results

    # -- 1 and 3: memory figures and end-to-end generation --
    def _memory_and_generate(self, model, params, layouts, batch, impl, peak, torch_times) -> None:
        o, c = self.opts, model.config.var
        labels = _labels(batch, c.num_classes)
        keys = [jax.random.fold_in(jax.random.key(o.seed), rep) for rep in range(o.reps + 1)]
        compiled, rows = {}, {}
        for p, layout in layouts.items():
            cache, peak_kv = layout_bytes(layout, c, batch, o.dtype)
            self.results["memory"].append({
                "model": model.name, "batch": batch, "policy": p, "slots": sum(layout.capacities),
                "cache_bytes": cache, "peak_kv_bytes": peak_kv, "compiled": "not compiled",
            })
            if batch == o.batches[0]:
                self.results["kv_per_scale"].append({
                    "model": model.name, "policy": p, "batch": batch, "dtype": o.dtype,
                    "patch_nums": list(c.patch_nums), "read_bytes": read_bytes_per_scale(layout, c, batch, o.dtype), "allocated_bytes": cache,
                })
            row = {"model": model.name, "batch": batch, "policy": p, "status": "ok",
                   "flops_per_image": flops_per_image(c, layout)}
            rows[p] = row
            self._tick(f"{model.name} b{batch} compile {p}")
            try:
                exe, row["compile_s"] = _compile(_generate_fn(model, layout, o.dtype, impl), params, labels, keys[0])
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
                row.update({f"{k}_s" if k != "runs" else k: v for k, v in _spread(times[p]).items()})
                row["images_per_s"] = batch / row["median_s"]
                if isinstance(peak, float):
                    row["mfu"] = row["flops_per_image"] * row["images_per_s"] / peak
                else:
                    row["mfu"] = peak
            else:
                row["mfu"] = "OOM"
            ref = (torch_times or {}).get((model.name, batch))
            row["torch_reference"] = ref if ref is not None else (
                TORCH_NOT_RUN if self.opts.torch_reference is None else "not run")
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
                    spread = _spread(totals[p])
                    row.update({"median_ms": 1e3 * spread["median"], "min_ms": 1e3 * spread["min"],
                                "max_ms": 1e3 * spread["max"], "runs": spread["runs"]})
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


# --- the PyTorch reference (optional) ----------------------------------------------------------------------------

def params_to_state_dict(params: dict, torch_shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Our Flax params as a torch state dict with the given keys (the inverse of `convert.mapping`): every key of
    `torch_shapes` that is not a recomputed buffer is looked up through `torch_key_to_path`, its layout undone
    (stacked VAR blocks are first split into the per-block layout, `unstack_blocks`)."""
    from amskv_jax.var import unstack_blocks
    from convert.mapping import _flatten, is_buffer, torch_key_to_path

    flat = _flatten(unstack_blocks(params) if "blocks" in params else params)
    out, problems = {}, []
    for key, shape in torch_shapes.items():
        if is_buffer(key):
            continue
        path = torch_key_to_path(key)
        candidates = [path[:-1] + (leaf,) for leaf in (("kernel", "embedding", "scale") if path[-1] == "weight"
                                                       else (path[-1],))]
        found = [p for p in candidates if p in flat]
        if not found:
            problems.append(f"no parameter for torch key {key!r}")
            continue
        array = np.asarray(flat[found[0]], np.float32)
        if found[0][-1] == "kernel" and array.ndim == 2:
            array = array.T
        elif found[0][-1] == "kernel" and array.ndim == 4:
            array = array.transpose(3, 2, 0, 1)
        if tuple(array.shape) != tuple(shape):
            problems.append(f"{key!r}: ours maps to {array.shape}, torch expects {tuple(shape)}")
            continue
        out[key] = np.ascontiguousarray(array)
    if problems:
        raise ValueError("params do not fit the torch model: " + "; ".join(problems[:10]))
    return out


def torch_reference_times(path: Path, models: list[Model], batches: list[int], dtype: str, reps: int,
                          seed: int) -> dict:
    """Time the reference's `VAR.autoregressive_infer_cfg` with our weights loaded into it, per model and batch.
    Runs before JAX touches the accelerator, so the two never share its memory."""
    import types

    import torch  # optional extra: only imported with --torch-reference

    sys.path.insert(0, str(path))
    if importlib.util.find_spec("huggingface_hub") is None:  # models/var.py imports it for a mixin only
        hub = types.ModuleType("huggingface_hub")
        hub.PyTorchModelHubMixin = type("PyTorchModelHubMixin", (), {})
        sys.modules["huggingface_hub"] = hub
    from models.var import VAR as TorchVAR
    from models.vqvae import VQVAE as TorchVQVAE

    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    out = {}
    bar = tqdm(total=len(models) * len(batches) * (reps + 1), desc="torch reference", unit="run", file=sys.stderr)
    for model in models:
        v, q = model.config.var, model.config.vqvae
        if (q.ch_mult, q.num_res_blocks, q.using_sa, q.using_mid_sa) != ((1, 1, 2, 2, 4), 2, True, True):
            raise ValueError(f"{model.name}: the reference's VQ-VAE hard-codes ch_mult (1,1,2,2,4); ours differs")
        vae = TorchVQVAE(vocab_size=q.vocab_size, z_channels=q.z_channels, ch=q.ch, test_mode=True,
                         quant_resi=q.quant_resi, share_quant_resi=q.share_quant_resi, v_patch_nums=q.patch_nums)
        var = TorchVAR(vae, num_classes=v.num_classes, depth=v.depth, embed_dim=v.embed_dim, num_heads=v.num_heads,
                       mlp_ratio=v.mlp_ratio, norm_eps=v.norm_eps, shared_aln=v.shared_aln,
                       cond_drop_rate=v.cond_drop_rate, attn_l2_norm=v.attn_l2_norm, patch_nums=v.patch_nums)
        for module, ours in ((vae, model.params["vqvae"]["params"]), (var, model.params["var"]["params"])):
            shapes = {k: tuple(t.shape) for k, t in module.state_dict().items()}
            sd = {k: torch.from_numpy(a) for k, a in params_to_state_dict(jax.device_get(ours), shapes).items()}
            missing, unexpected = module.load_state_dict(sd, strict=False)
            from convert.mapping import is_buffer
            if unexpected or [k for k in missing if not is_buffer(k)]:
                raise ValueError(f"torch load: missing {missing[:5]}, unexpected {unexpected[:5]}")
        vae, var = vae.to(device).eval(), var.to(device).eval()
        top_k = default_top_k(model.config)
        for batch in batches:
            labels = torch.as_tensor(np.arange(batch) % v.num_classes, device=device)
            autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=(dtype == "bfloat16"))
            times, status = [], "ok"
            try:
                for rep in range(reps + 1):  # the first is the warm-up
                    bar.set_postfix_str(f"{model.name} b{batch}")
                    with torch.inference_mode(), autocast:
                        sync()
                        start = time.perf_counter()
                        var.autoregressive_infer_cfg(B=batch, label_B=labels, g_seed=seed + rep, cfg=CFG,
                                                     top_k=top_k, top_p=TOP_P, more_smooth=False)
                        sync()
                    if rep:
                        times.append(time.perf_counter() - start)
                    bar.update(1)
            except torch.cuda.OutOfMemoryError:
                status = "OOM"
                torch.cuda.empty_cache()
            row = {"model": model.name, "batch": batch, "status": status, "device": device,
                   "weights": f"ours ({model.weights}), loaded into the reference", "dtype": dtype}
            if times:
                row.update({f"{k}_s" if k != "runs" else k: val for k, val in _spread(times).items()})
                row["images_per_s"] = batch / row["median_s"]
            out[(model.name, batch)] = row
        del vae, var
        if device == "cuda":
            torch.cuda.empty_cache()
    bar.close()
    return out


# --- reporting ---------------------------------------------------------------------------------------------------

def _table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def _mib(x: int) -> str:
    return f"{x / MIB:,.3f}"


def _ratio(x) -> str:
    return "–" if x is None else f"{x:.3f}"


def _num(x, fmt: str) -> str:
    return format(x, fmt) if isinstance(x, (int, float)) else str(x)


def _finite(row: dict) -> str:
    if row["status"] != "ok":
        return "–"
    return "yes" if row.get("nonfinite_scale") is None else f"NO, from scale {row['nonfinite_scale']}"


def format_report(results: dict) -> str:
    meta = results["meta"]
    peak = meta["peak_flops"]
    out = [
        "# bench.run results",
        "",
        f"suite {meta['suite']}; device {meta['device_kind']} ({meta['backend']}), jax {meta['jax_version']}; "
        f"dtype {meta['dtype']}; attention impl {meta['impl']} → {meta['impl_resolved']}; {meta['reps']} timed "
        f"repetitions after a warm-up, policies interleaved; peak "
        f"{_num(peak / 1e12, '.0f') + ' TFLOP/s bf16' if isinstance(peak, float) else peak}; "
        f"wall {meta.get('wall_s', 0):.1f} s.",
        "",
        f"Compile times: {meta.get('compile_cache', 'persistent compilation cache off')} (a program loaded from the "
        "cache times its loading, not its compilation; `--no-compile-cache` measures compilation).",
        "",
        "Weights: " + "; ".join(f"{k}: {v}" for k, v in meta["weights"].items()) + ".",
        "",
        "Policies: " + "; ".join(f"{m}/{p}: {d}" for m, s in meta["policy_settings"].items() for p, d in s.items())
        + ".",
        "",
        "Every ratio is policy ÷ full cache at the same model and batch.",
        "",
        "## 1. KV-cache bytes and compiled memory",
        "",
        "cache: the exact K/V buffers (`amskv_jax.memory`); peak KV: plus one layer's fresh K/V of the largest scale; "
        "argument / output / temp: `compile().memory_analysis()` of the whole `generate` program (temp holds the "
        "cache and every intermediate); MiB.",
        "",
    ]
    rows = []
    for r in results["memory"]:
        comp = r["compiled"]
        cells = [_mib(comp[k]) for k in ("argument_bytes", "output_bytes", "temp_bytes")] if isinstance(comp, dict) \
            else [comp, "", ""]
        rows.append([r["model"], r["batch"], r["policy"], f"{r['slots']:,}", _mib(r["cache_bytes"]),
                     _ratio(r["cache_ratio"]), _mib(r["peak_kv_bytes"]), _ratio(r["peak_kv_ratio"]), *cells,
                     _ratio(r["temp_ratio"])])
    out += [_table(["model", "batch", "policy", "slots", "cache MiB", "÷ full", "peak KV MiB", "÷ full",
                    "argument MiB", "output MiB", "temp MiB", "temp ÷ full"], rows), ""]

    out += ["## 2. Attention time per scale", "",
            "`cached_attention` over each layer's cache with its read mask, summed over the layers; ms, median "
            "[min–max] of the repetitions. read: cache slots the scale's queries read, over all layers; cache: the "
            "slots allocated. Every path reads only the live slots, so the time follows read, not cache.", ""]
    rows = []
    for r in results["attention"]:
        t = (f"{r['median_ms']:.3f} [{r['min_ms']:.3f}–{r['max_ms']:.3f}]" if r["status"] == "ok" else r["status"])
        rows.append([r["model"], r["batch"], f"{r['scale']} ({r['pn']}×{r['pn']})", r["policy"],
                     f"{r['read_slots']:,}", f"{r['capacity_slots']:,}", t, _ratio(r["ratio_vs_full"])])
    out += [_table(["model", "batch", "scale", "policy", "read slots", "cache slots", "ms", "÷ full"], rows), ""]

    out += ["## 3. End-to-end generation", "",
            f"`generate` (cfg {meta['cfg']}, top-p {meta['top_p']}, top-k 900 capped at the vocabulary, VQ-VAE "
            "decode included); s, median [min–max]; compile time separate. speed ÷ full is images/s ÷ the full "
            "cache's (above 1 is faster). MFU: model FLOPs (2·params·L per row, 2 rows for guidance, plus "
            "attention) per second ÷ the device's bf16 peak. finite: whether every scale's logits were finite in the "
            "warm-up run; otherwise the first scale that was not (1-based): the weights are untrained or damaged, "
            "the images garbage and only the times mean anything.", ""]
    rows = []
    for r in results["generate"]:
        t = f"{r['median_s']:.4f} [{r['min_s']:.4f}–{r['max_s']:.4f}]" if r["status"] == "ok" else r["status"]
        ref = r["torch_reference"]
        if isinstance(ref, dict):
            ref = f"{ref['median_s']:.4f} ({ref['device']})" if ref["status"] == "ok" else ref["status"]
        mfu = r["mfu"]
        rows.append([r["model"], r["batch"], r["policy"], _num(r.get("compile_s", "–"), ".2f"), t,
                     _num(r.get("images_per_s", "–"), ".2f"), _ratio(r["speedup_vs_full"]),
                     f"{100 * mfu:.2f}%" if isinstance(mfu, float) else mfu, ref, _finite(r)])
    out += [_table(["model", "batch", "policy", "compile s", "s / batch", "images/s", "speed ÷ full", "MFU",
                    "torch reference s", "finite"], rows), ""]

    out += ["## 4. Largest batch that fits", "",
            "Real allocations: the program is compiled and run at doubling batch sizes until out-of-memory, then "
            "bisected to within 1/16.", ""]
    rows = [[r["model"], r["policy"], r["max_batch"], _ratio(r.get("ratio_vs_full")),
             ", ".join(f"{b}{'' if ok else ' OOM'}" for b, ok in r["tried"]) or "–"] for r in results["max_batch"]]
    out += [_table(["model", "policy", "max batch", "÷ full", "tried"], rows), ""]
    return "\n".join(out)


def write_plots(results: dict, out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    models = results["meta"]["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, name in zip(axes[0], models, strict=True):
        rows = [r for r in results["kv_per_scale"] if r["model"] == name]
        top = max(r["allocated_bytes"] for r in rows)
        unit, div = next(((u, d) for u, d in (("GiB", GIB), ("MiB", MIB), ("KiB", 1024)) if top >= d), ("B", 1))
        for r in rows:
            line, = ax.plot(range(len(r["patch_nums"])), np.asarray(r["read_bytes"]) / div, marker="o",
                            label=f"{r['policy']} (allocated {r['allocated_bytes'] / div:,.1f} {unit}, dotted)")
            ax.axhline(r["allocated_bytes"] / div, color=line.get_color(), linestyle=":", linewidth=1)
            ax.set_xticks(range(len(r["patch_nums"])), [f"{pn}²" for pn in r["patch_nums"]])
            ax.set_title(f"{name}, batch {r['batch']}, {r['dtype']}")
        ax.set_xlabel("scale (tokens)")
        ax.set_ylabel(f"K/V read from the cache, all layers ({unit})")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "kv_bytes_per_scale.png", dpi=120)
    plt.close(fig)
    written.append("kv_bytes_per_scale.png")

    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, name in zip(axes[0], models, strict=True):
        rows = [r for r in results["generate"] if r["model"] == name and r["status"] == "ok"]
        for policy in results["meta"]["policies"]:
            pts = sorted((r["batch"], r["images_per_s"]) for r in rows if r["policy"] == policy)
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=policy)
        refs = sorted((r["batch"], r["images_per_s"]) for r in results["torch_reference"]
                      if r["model"] == name and r["status"] == "ok")
        if refs:
            ax.plot(*zip(*refs, strict=True), marker="x", linestyle="--", label="torch reference")
        ax.set_xscale("log", base=2)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("batch")
        ax.set_ylabel("images/s")
        ax.set_title(name)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "images_per_s.png", dpi=120)
    plt.close(fig)
    written.append("images_per_s.png")
    return written


# --- command line ------------------------------------------------------------------------------------------------

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
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-plots", action="store_true")
    cli.add_verify_flag(parser)
    compile_cache.add_flag(parser)
    args = parser.parse_args(argv)
    suite = SUITES[args.suite]
    try:
        models = _csv(args.models) if args.models is not None else list(suite["models"])
        if not models:
            raise ValueError("--models is empty")
        for m in models:
            embedded = getattr(checkpoint, "EMBEDDED", {})
            if m not in PRESETS and m not in embedded and not (Path(m) / "config.json").is_file():
                raise ValueError(f"unknown model {m!r}: neither a preset ({', '.join(PRESETS)}), an embedded model "
                                 f"({', '.join(embedded) or 'none'}) nor a checkpoint directory with config.json")
        policies = list(POLICIES) if args.policies.strip() == "all" else _csv(args.policies)
        unknown = [p for p in policies if p not in POLICIES]
        if unknown or not policies:
            raise ValueError(f"unknown policy {unknown or args.policies!r}; known: {', '.join(POLICIES)}, or 'all'")
        policies = ["full"] + [p for p in dict.fromkeys(policies) if p != "full"]
        batches = suite["batches"] if args.batches is None else _csv(args.batches)
        try:
            batches = [int(b) for b in batches]
        except ValueError:
            raise ValueError(f"--batches must be comma-separated integers, got {args.batches!r}") from None
        if not batches or any(b < 1 for b in batches):
            raise ValueError(f"--batches must be integers >= 1, got {args.batches!r}")
        batches = sorted(set(batches))
        reps = suite["reps"] if args.reps is None else args.reps
        if reps < 1:
            raise ValueError(f"--reps must be >= 1, got {reps}")
        torch_ref = None
        if args.torch_reference is not None:
            torch_ref = Path(args.torch_reference).expanduser()
            if not (torch_ref / "models" / "var.py").is_file():
                raise ValueError(f"--torch-reference {torch_ref}: not a FoundationVision/VAR checkout "
                                 "(no models/var.py)")
            if importlib.util.find_spec("torch") is None:
                raise ValueError("--torch-reference needs torch, which is not installed (pip install '.[torch]')")
    except ValueError as err:
        parser.error(str(err))
    return Options(
        suite=args.suite, models=models, policies=policies, batches=batches, reps=reps,
        dtype=args.dtype or suite["dtype"], impl=args.impl, out=Path(args.out), torch_reference=torch_ref,
        max_batch=suite["max_batch"] if args.max_batch is None else args.max_batch, seed=args.seed,
        plots=not args.no_plots, verify=args.verify, compile_cache=not args.no_compile_cache,
    )


def check_backend(opts: Options) -> None:
    """--suite gpu on a CPU would run d30 at batch 512 for hours: refuse it."""
    if opts.suite == "gpu" and jax.default_backend() == "cpu":
        raise ValueError("--suite gpu needs an accelerator, but jax.default_backend() is 'cpu'; use --suite cpu "
                         "(with --models/--batches as you like)")


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
    torch_times = None
    if opts.torch_reference is not None:
        torch_times = torch_reference_times(opts.torch_reference, models, opts.batches, opts.dtype, opts.reps,
                                            opts.seed)
    results = Bench(opts).run(models, torch_times)
    results["meta"]["compile_cache"] = compile_cache.describe(cache_dir)
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
