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

    python -m amskv_jax.memory --model d30 --batch 128 --dtype bfloat16 [--json] [--calibration layers.json]
        [--kv-dtype default int8 ...]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import jax.numpy as jnp

from amskv_jax import cli, quant
from amskv_jax.cache import CacheLayout, cache_bytes
from amskv_jax.config import PRESETS, ModelConfig, VARConfig, get_preset
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


def itemsize(dtype: str) -> int:
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
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
    kv_dtypes: tuple[str | None, ...] = (None,),
) -> list[MemoryRow]:
    """Every named policy for each storage dtype in `kv_dtypes` (None: the compute dtype), the full cache first,
    then the reference's own figure (policy "reference", in the compute dtype). `reduction_vs_full` is against the
    full cache in the compute dtype."""
    rows = []
    layouts = {}
    stores = []
    for kv_dtype in kv_dtypes:
        store = storage_name(kv_dtype, dtype)
        if store in stores:  # None and the compute dtype's name are the same storage
            continue
        stores.append(store)
        for name in POLICIES:
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


def load_config(spec: str) -> ModelConfig:
    """A preset name or a checkpoint directory (only its config.json is read)."""
    if spec in PRESETS:
        return get_preset(spec)
    config_file = Path(spec) / "config.json"
    if config_file.is_file():
        return ModelConfig.from_json(config_file.read_text())
    raise ValueError(f"--model {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a checkpoint directory")


@cli.command("python -m amskv_jax.memory")
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m amskv_jax.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="d30", help="a preset name or a checkpoint directory")
    parser.add_argument("--batch", type=int, default=128, help="images per batch (the cache holds 2·batch rows)")
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="the compute dtype")
    parser.add_argument(
        "--kv-dtype", nargs="+", default=["default"], choices=("default", *quant.KV_DTYPES), metavar="KV_DTYPE",
        help="how the cache stores K/V, one or more of: default (the compute dtype), " + ", ".join(quant.KV_DTYPES),
    )
    parser.add_argument("--calibration", default=None, help="a calibration JSON choosing the demanding layers")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    args = parser.parse_args(argv)
    try:
        if args.batch < 1:
            raise ValueError(f"--batch must be >= 1, got {args.batch}")
        config = load_config(args.model).var
        calibration = read_calibration(args.calibration) if args.calibration else None
        kv_dtypes = tuple(dict.fromkeys(None if k == "default" else k for k in args.kv_dtype))
        rows = memory_table(config, args.batch, args.dtype, calibration, kv_dtypes)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    if args.json:
        print(json.dumps([row.to_json() for row in rows], indent=1))
    else:
        print(format_table(rows, config, args.batch, args.dtype, f"model {args.model}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
