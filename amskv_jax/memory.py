"""Exact K/V memory of every cache policy for a model, batch and dtype (+ CLI).

Definitions (docs `AMSKV.md` §4b): `cache_bytes` are the static buffers of `init_cache` for the layout: K and V of
every layer's capacity for 2·batch rows (classifier-free guidance doubles the rows), plus each layer's int32
`slot_scale`; they hold past scales only. `peak_kv_bytes` adds the largest transient current-scale K/V: blocks run
one after another, and a scale's fresh K and V exist for one layer at a time while its queries attend, so the
transient is one layer's K and V of the largest scale. The reference (VAR's `models/basic_var.py`) instead
concatenates every scale's K/V, the current one included: L tokens per layer at the last scale, and under
autocast its K are float32 (cached after `F.normalize`), 1.5 times the bfloat16 figure.

`--kv-dtype` (one or more of default, bfloat16, int8, float8_e4m3fn, int4, int2; `quant.py`) sets how the cache
stores K/V: "default" is the compute dtype `--dtype`; the quantised ones count their float32 scales too (K per channel
per written scale, V per slot and head; int4 and int2 a minimum beside each scale, and their codes packed, 2 and 4
per byte). The fresh K/V of the transient stay in the compute dtype. `reduction_vs_full` is always
against the full cache stored in the compute dtype, so a quantised row's cut includes the storage saving.

The cache is not the whole program. `--compile` also compiles the public `generate` for the default backend, on
abstract params (`jax.eval_shape`; weights in the compute dtype, nothing allocated), and prints what XLA's
`memory_analysis()` assigns: arguments (the weights it reads, labels, key; not the VQ-VAE's encoder), outputs (tokens and images) and temporaries (the cache,
activations, the VQ-VAE decode, copies). `--device-memory` finds, for each row, the largest batch whose program
(arguments + outputs + temporaries) fits that many bytes (`largest_batch`): the program's memory is affine in the
batch, so a line through two compiles predicts it, and compiles around the prediction confirm it. The figures are
the backend's own buffer assignment (on CPU, the CPU compiler's): compile on the accelerator for its figures.
`--layer-loop` picks the layer loop compiled (`generate`'s; default the platform's: unrolled on one CPU, scan
elsewhere); `--layer-loop scan` on a CPU compiles the loop a GPU runs, d30 in well under a minute where the
unrolled loop takes minutes.

    python -m amskv_jax.memory --model d30 --batch 128 --dtype bfloat16 [--json] [--calibration layers.json]
        [--kv-dtype default int8 ...] [--policy full amskv ...] [--compile] [--device-memory 80GiB]
        [--layer-loop auto|scan|unrolled]
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from amskv_jax import cli, quant, untrusted
from amskv_jax.cache import CacheLayout, cache_bytes
from amskv_jax.checkpoint import EMBEDDED, model_kind, param_shapes
from amskv_jax.config import ModelConfig, VARConfig, get_preset
from amskv_jax.errors import UserError
from amskv_jax.generate import (LAYER_LOOPS, _generate, default_top_k, generate, resolve_layer_loop,
                                 with_stack_bits)
from amskv_jax.policies import DEFAULT_POLICY, POLICIES, policy_from_name, read_calibration

DTYPES = ("bfloat16", "float32")
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class MemoryRow:
    """One policy's figures. slots: the sum of the layers' capacities (tokens per row); kv_dtype: the storage dtype
    (the compute dtype's name when the cache follows it)."""

    policy: str
    description: str
    default: bool
    slots: int
    cache_bytes: int
    peak_kv_bytes: int
    reduction_vs_full: float  # 1 − cache_bytes / the full cache's cache_bytes in the compute dtype
    kv_dtype: str = "bfloat16"

    def to_json(self) -> dict:
        return {
            "policy": self.policy, "kv_dtype": self.kv_dtype, "default": self.default,
            "cache_bytes": self.cache_bytes, "peak_kv_bytes": self.peak_kv_bytes,
            "reduction_vs_full": self.reduction_vs_full,
        }


@dataclasses.dataclass(frozen=True)
class ProgramMemory:
    """XLA's buffer assignment of one compiled `generate` (`memory_analysis()`, bytes) at `batch` images."""

    batch: int
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    alias_bytes: int

    @property
    def total_bytes(self) -> int:
        """What the program needs resident at once: arguments + outputs + temporaries − the outputs aliasing an
        argument."""
        return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes

    @classmethod
    def from_stats(cls, stats, batch: int) -> ProgramMemory:
        """From `compiled.memory_analysis()`."""
        return cls(batch, int(stats.argument_size_in_bytes), int(stats.output_size_in_bytes),
                   int(stats.temp_size_in_bytes), int(stats.alias_size_in_bytes))

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "total_bytes": self.total_bytes}


@dataclasses.dataclass(frozen=True)
class BatchFit:
    """The largest batch whose program fits `memory_bytes` (0: not even one image), its program (None for 0), and
    every batch compiled to find it, in order."""

    memory_bytes: int
    batch: int
    program: ProgramMemory | None
    compiled: tuple[int, ...]

    def to_json(self) -> dict:
        return {"device_memory_bytes": self.memory_bytes, "batch": self.batch, "compiled_batches": list(self.compiled),
                "program": None if self.program is None else self.program.to_json()}


def itemsize(dtype: str) -> int:
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    return jnp.dtype(dtype).itemsize


def storage_name(kv_dtype: str | None, dtype: str) -> str:
    """The cache's storage dtype by name: `kv_dtype`, or the compute dtype `dtype` for None."""
    itemsize(dtype)  # validates dtype
    return quant.check_kv_dtype(kv_dtype) or dtype


def transient_kv_bytes(config: VARConfig, rows: int, dtype: str) -> int:
    """One layer's fresh K and V of the largest scale: 2 · rows · max pn² · C · itemsize."""
    return 2 * rows * max(pn * pn for pn in config.patch_nums) * config.embed_dim * itemsize(dtype)


def layout_bytes(
    layout: CacheLayout, config: VARConfig, batch: int, dtype: str, kv_dtype: str | None = None
) -> tuple[int, int]:
    """(cache_bytes, peak_kv_bytes) of a layout for `batch` images (2·batch rows), the cache stored in `kv_dtype`
    (None: `dtype`; quantised with their scales, int4 / int2 packed); the transient stays in the compute dtype
    `dtype`."""
    rows = 2 * batch
    static = cache_bytes(layout, rows, config.num_heads, config.head_dim, storage_name(None, dtype), kv_dtype)
    return static, static + transient_kv_bytes(config, rows, dtype)


def full_cache_bytes(config: VARConfig, batch: int, dtype: str) -> tuple[int, int]:
    """(cache_bytes, peak_kv_bytes) of the full cache stored in the compute dtype: what the cuts are against."""
    return layout_bytes(policy_from_name("full", config).layout(config), config, batch, dtype)


def reference_bytes(config: VARConfig, batch: int, dtype: str, fp32_k: bool = False) -> int:
    """The reference's concatenated cache at the last scale: all L tokens per layer (K in float32 if fp32_k)."""
    per_token = config.embed_dim * (itemsize(dtype) + (4 if fp32_k else itemsize(dtype)))
    return 2 * batch * config.depth * config.seq_len * per_token


def memory_table(
    config: VARConfig, batch: int, dtype: str, calibration: dict | None = None,
    kv_dtypes: tuple[str | None, ...] = (None,), policies: tuple[str, ...] = tuple(POLICIES),
) -> list[MemoryRow]:
    """Each policy named in `policies` (default: all, the full cache first) for each storage dtype in `kv_dtypes`
    (None: the compute dtype), then the reference's own figure (policy "reference", in the compute dtype).
    `reduction_vs_full` is against the full cache in the compute dtype."""
    rows = []
    layouts = {}
    stores = []
    for kv_dtype in kv_dtypes:
        store = storage_name(kv_dtype, dtype)
        if store in stores:  # None and the compute dtype's name are the same storage
            continue
        stores.append(store)
        for name in policies:
            if name not in layouts:
                policy = policy_from_name(name, config, calibration)
                layouts[name] = policy, policy.layout(config)
            policy, layout = layouts[name]
            static, peak = layout_bytes(layout, config, batch, dtype, kv_dtype)
            slots = sum(layout.capacities)
            rows.append(MemoryRow(name, policy.describe(), name == DEFAULT_POLICY, slots, static, peak, 0.0, store))
    reference = reference_bytes(config, batch, dtype)
    rows.append(MemoryRow(
        "reference", "VAR reference: every scale concatenated, the current one included", False,
        config.depth * config.seq_len, reference, reference, 0.0, dtype,
    ))
    full = full_cache_bytes(config, batch, dtype)[0]
    return [dataclasses.replace(row, reduction_vs_full=1 - row.cache_bytes / full) for row in rows]


def format_table(rows: list[MemoryRow], config: VARConfig, batch: int, dtype: str, title: str) -> str:
    """A markdown table of the rows, with the reference's float32-K caveat underneath."""
    full_peak = full_cache_bytes(config, batch, dtype)[1]
    lines = [
        f"{title}: depth {config.depth}, {config.num_scales} scales up to {config.patch_nums[-1]}x"
        f"{config.patch_nums[-1]} (L = {config.seq_len}), batch {batch} ({2 * batch} rows with guidance), "
        f"compute {dtype}; cuts against the full cache in {dtype}",
        "",
        "| policy | kv_dtype | setting | slots/layer | cache_bytes | GiB | peak_kv_bytes | GiB | cut (cache) | "
        "cut (peak) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        name = f"**{row.policy}** (default)" if row.default else row.policy
        lines.append(
            f"| {name} | {row.kv_dtype} | {row.description} | {row.slots / config.depth:.1f} | {row.cache_bytes:,} | "
            f"{row.cache_bytes / GIB:.3f} | {row.peak_kv_bytes:,} | {row.peak_kv_bytes / GIB:.3f} | "
            f"{100 * row.reduction_vs_full:.1f}% | {100 * (1 - row.peak_kv_bytes / full_peak):.1f}% |"
        )
    fp32 = reference_bytes(config, batch, dtype, fp32_k=True)
    lines += [
        "",
        f"The reference row counts the L = {config.seq_len} tokens its per-layer concatenation holds at the last "
        f"scale, in {dtype}; under autocast its cached K is float32 (normalised after the cast), which makes it "
        f"{fp32:,} bytes ({fp32 / GIB:.3f} GiB)." if dtype != "float32" else
        f"The reference row counts the L = {config.seq_len} tokens its per-layer concatenation holds at the last "
        "scale.",
    ]
    return "\n".join(lines)


def abstract_params(config: ModelConfig, dtype: str) -> dict:
    """The params of `config` as `jax.ShapeDtypeStruct`s, floating leaves in `dtype` (weights cast to the compute
    dtype), so a program compiles on them without any weight in memory."""
    itemsize(dtype)  # validates dtype

    def cast(leaf):
        floating = jnp.issubdtype(leaf.dtype, jnp.floating)
        return jax.ShapeDtypeStruct(leaf.shape, jnp.dtype(dtype) if floating else leaf.dtype)

    return jax.tree.map(cast, param_shapes(config))


def program_memory(
    config: ModelConfig, layout: CacheLayout, batch: int, dtype: str, kv_dtype: str | None = None, impl: str = "auto",
    layer_loop: str = "auto",
) -> ProgramMemory:
    """Compile the public `generate` for `batch` images on abstract params (weights in `dtype`) for the default
    backend and return XLA's buffer assignment. Nothing is allocated or run. `layer_loop` as `generate`'s ("auto":
    the platform's; "scan" compiles on a CPU the loop a GPU or TPU runs, in a fraction of the unrolled loop's time).
    On one CPU device with the scan and 16-bit weights, `generate` hands the program its stacks' bits
    (`generate.with_stack_bits`); this compiles that program (`_generate` on uint16 stacks) too."""
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
    key = jax.eval_shape(jax.random.key, 0)
    params, stack_bits = with_stack_bits(abstract_params(config, dtype), resolve_layer_loop(layer_loop) == "unrolled",
                                         None)
    if stack_bits is None:
        fn = jax.jit(functools.partial(generate, config=config, layout=layout, dtype=dtype, kv_dtype=kv_dtype,
                                       impl=impl, layer_loop=layer_loop))
        lowered = fn.lower(params, labels, key)
    else:  # the call `generate` makes, defaults included
        scalar = jax.ShapeDtypeStruct((), jnp.float32)
        lowered = _generate.lower(
            params, labels, key, scalar, scalar, config=config, layout=layout, top_k=default_top_k(config),
            more_smooth=False, dtype=dtype, impl=impl, progress=False, return_logits=False, kv_dtype=kv_dtype,
            row_chunk=None, stack_bits=stack_bits)
    return ProgramMemory.from_stats(lowered.compile().memory_analysis(), batch)


SECOND_PROBE = 16  # the batch of the second compile: with batch 1, the line that predicts the answer
MAX_BATCH = 2**20  # the search stops here, should a program not grow with the batch


def largest_batch(measure, memory_bytes: int, max_compiles: int = 16) -> BatchFit:
    """The largest batch b with measure(b).total_bytes <= memory_bytes, `measure(b) -> ProgramMemory` being a compile
    (e.g. `functools.partial(program_memory, config, layout, dtype=...)` with batch left free).

    The program's memory is affine in the batch plus small steps (the padding of the decode and the sampler to whole
    chunks of images; the blocks' chunk of rows, a divisor of the rows: `amskv_jax.chunks`), so
    the line through batch 1 and `SECOND_PROBE` predicts the answer b; compiling b and b + 1 confirms it, in four
    compiles. Until a batch that does not fit is found, the next guess is on the line through the two largest that
    do; then the bracket [fits, does not fit] narrows by the Illinois variant of regula falsi, so the answer is exact
    either way. Raises if `max_compiles` do not settle it."""
    seen: dict[int, ProgramMemory] = {}

    def excess(b: int) -> int:
        if b not in seen:
            seen[b] = measure(b)
        return seen[b].total_bytes - memory_bytes

    def result(b: int) -> BatchFit:
        return BatchFit(memory_bytes, b, seen.get(b), tuple(seen))

    if excess(1) > 0:
        return result(0)
    lo, lo_excess, hi, hi_excess, kept = 1, excess(1), None, 0, 0  # kept: which end stayed last time (-1 lo, +1 hi)
    guess, previous = SECOND_PROBE, 1
    for _ in range(max_compiles):
        if excess(guess) <= 0:
            previous, lo, lo_excess = lo, guess, excess(guess)
            hi_excess, kept = (hi_excess / 2 if kept == 1 else hi_excess), 1
        else:
            hi, hi_excess = guess, excess(guess)
            lo_excess, kept = (lo_excess / 2 if kept == -1 else lo_excess), -1
        if hi == lo + 1 or lo >= MAX_BATCH:
            return result(lo)
        if hi is None:  # extrapolate the line through the two largest batches that fit
            slope = (excess(lo) - excess(previous)) / (lo - previous)
            guess = lo + int(-lo_excess // slope) if slope > 0 else MAX_BATCH
            guess = min(max(guess, lo + 1), MAX_BATCH)
        else:
            guess = lo + int((hi - lo) * -lo_excess / (hi_excess - lo_excess))
            guess = min(max(guess, lo + 1), hi - 1)
    raise RuntimeError(f"no answer in {max_compiles} compiles: batch {lo} fits, {hi} does not; compiled {sorted(seen)}")


BYTE_UNITS = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9,
              "TB": 10**12}


def parse_bytes(text: str) -> int:
    """A memory size: `80GiB` (KiB, MiB, GiB, TiB: powers of 2), `80GB` (KB, MB, GB, TB: powers of 10), or a plain
    byte count `85899345920`. Numbers with units may have decimals (`79.5GiB`)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(" + "|".join(BYTE_UNITS) + ")?", text.strip())
    if match is None or (match[2] is None and "." in match[1]) or float(match[1]) <= 0:
        raise UserError(
            f"{text!r} is not a memory size; accepted forms: 80GiB (KiB, MiB, GiB, TiB: powers of 2), 80GB (KB, MB, "
            "GB, TB: powers of 10) or a positive byte count such as 85899345920"
        )
    return int(match[1]) if match[2] is None else int(float(match[1]) * BYTE_UNITS[match[2]])


def load_model_files(spec: str) -> tuple[ModelConfig, dict | None]:
    """(config, calibration) of what `--model` names everywhere: an embedded model, a preset or a checkpoint
    directory. Only config.json (and layers.json, the directory's default calibration, when present) is read."""
    kind = model_kind(spec)
    if kind == "preset":
        return get_preset(spec), None
    directory = EMBEDDED[spec] if kind == "embedded" else Path(spec)
    config, _, calibration = untrusted.read_model_files(directory)  # a directory is untrusted input
    return config, calibration


def format_programs(entries: list[tuple[MemoryRow, ProgramMemory]], title: str) -> str:
    """A markdown table: each row's analytic cache beside its compiled program's buffers, at the program's batch."""
    lines = [
        title, "",
        "| policy | kv_dtype | batch | cache GiB | arguments GiB | outputs GiB | temporaries GiB | temporaries − cache "
        "GiB | total GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row, program in entries:
        lines.append(
            f"| {row.policy} | {row.kv_dtype} | {program.batch} | {row.cache_bytes / GIB:.2f} | "
            f"{program.argument_bytes / GIB:.2f} | {program.output_bytes / GIB:.2f} | {program.temp_bytes / GIB:.2f} | "
            f"{(program.temp_bytes - row.cache_bytes) / GIB:.2f} | {program.total_bytes / GIB:.2f} |"
        )
    return "\n".join(lines)


def backend_name() -> str:
    """The default backend and its first device's kind, e.g. "cpu (cpu)", "gpu (NVIDIA H200)"."""
    return f"{jax.default_backend()} ({jax.devices()[0].device_kind})"


@cli.command("python -m amskv_jax.memory")
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m amskv_jax.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="d30",
                        help=f"an embedded model ({', '.join(EMBEDDED)}), a preset name or a checkpoint directory "
                        "(only its config is read)")
    parser.add_argument("--batch", type=int, default=128, help="images per batch (the cache holds 2·batch rows)")
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="the compute dtype (and the weights')")
    parser.add_argument(
        "--kv-dtype", nargs="+", default=["default"], choices=("default", *quant.KV_DTYPES), metavar="KV_DTYPE",
        help="how the cache stores K/V, one or more of: default (the compute dtype), " + ", ".join(quant.KV_DTYPES),
    )
    parser.add_argument("--policy", nargs="+", default=list(POLICIES), choices=list(POLICIES), metavar="POLICY",
                        help="the policies to show, one or more of: " + ", ".join(POLICIES) + " (default: all)")
    parser.add_argument("--calibration", default=None,
                        help="a calibration JSON choosing the demanding layers (default: the model's layers.json)")
    parser.add_argument("--compile", action="store_true",
                        help="also compile generate at --batch for the default backend and show its buffers")
    parser.add_argument("--device-memory", default=None, metavar="SIZE",
                        help="also find each policy's largest batch whose compiled program fits SIZE: 80GiB, 80GB or "
                        "a byte count (give what the runtime leaves to programs)")
    parser.add_argument("--layer-loop", default="auto", choices=LAYER_LOOPS,
                        help="the layer loop compiled (default: this platform's; scan is a GPU's or TPU's)")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of tables")
    args = parser.parse_args(argv)
    try:
        if args.batch < 1:
            raise UserError(f"--batch must be >= 1, got {args.batch}")
        device_memory = None
        if args.device_memory is not None:
            try:
                device_memory = parse_bytes(args.device_memory)
            except UserError as err:
                raise UserError(f"--device-memory: {err}") from None
        model_config, calibration = load_model_files(args.model)
        config = model_config.var
        calibration = read_calibration(args.calibration, config) if args.calibration else calibration
        kv_dtypes = tuple(dict.fromkeys(None if k == "default" else k for k in args.kv_dtype))
        policies = tuple(dict.fromkeys(args.policy))
        rows = memory_table(config, args.batch, args.dtype, calibration, kv_dtypes, policies)
    except (UserError, FileNotFoundError) as err:
        parser.error(str(err))
    programs, fits = {}, {}
    for row in rows[:-1] if args.compile or device_memory else ():  # the reference's row has no program
        layout = policy_from_name(row.policy, config, calibration).layout(config)
        kv_dtype = None if row.kv_dtype == args.dtype else row.kv_dtype
        measure = functools.cache(functools.partial(program_memory, model_config, layout, dtype=args.dtype,
                                                    kv_dtype=kv_dtype, layer_loop=args.layer_loop))
        if args.compile:
            programs[row] = measure(args.batch)
        if device_memory:
            fit = largest_batch(measure, device_memory)
            fits[row] = fit, layout_bytes(layout, config, fit.batch, args.dtype, kv_dtype)[0] if fit.batch else 0
    layer_loop = resolve_layer_loop(args.layer_loop)
    if args.json:
        out = []
        for row in rows:
            entry = row.to_json()
            if row in programs:
                entry["program"] = programs[row].to_json()
            if row in fits:
                entry["largest_batch"] = {**fits[row][0].to_json(), "cache_bytes": fits[row][1]}
            if programs or fits:
                entry["backend"] = backend_name()
                entry["layer_loop"] = layer_loop
            out.append(entry)
        print(json.dumps(out, indent=1))
        return 0
    print(format_table(rows, config, args.batch, args.dtype, f"model {args.model}"))
    compiled_for = (f"`generate` compiled for {backend_name()} ({layer_loop} layer loop), jax {jax.__version__}, "
                    f"weights and compute in {args.dtype}")
    if programs:
        print()
        print(format_programs(list(programs.items()), f"{compiled_for}, batch {args.batch}:"))
    if fits:
        found = [(dataclasses.replace(row, cache_bytes=cache), fit.program) for row, (fit, cache) in fits.items()
                 if fit.program is not None]
        print()
        print(format_programs(found, f"{compiled_for}: the largest batch whose program fits {args.device_memory} "
                              f"({device_memory:,} bytes):"))
        for row, (fit, _) in fits.items():
            if fit.program is None:
                print(f"{row.policy} ({row.kv_dtype}): not even one image fits")
    return 0


if __name__ == "__main__":
    sys.exit(main())
