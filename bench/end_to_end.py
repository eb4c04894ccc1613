"""A converted published-size checkpoint end to end on this machine: it loads, and `generate` compiles for its ladder.

    python -m bench.end_to_end DIR [--batch 1] [--policy full] [--dtype bfloat16] [--json]
    python -m bench.end_to_end DIR --no-load                      # the stored shapes and dtypes, no array read
    python -m bench.end_to_end d36 --no-load                      # a preset's shapes

DIR is a directory written by `convert.from_torch` (for example from `bench.make_checkpoint --preset d36 --vae`'s
random weights). Loading reads every array and checks it against the manifest (`load_checkpoint`); its peak RSS and
time are reported, and the loaded tree must be a whole model (the gate checked every array's shape). Then
`generate` is traced, lowered and compiled on abstract params of the loaded tree's shapes and dtypes (no values: the
program does not depend on them), and the record carries XLA's memory figures for that program
(`compile().memory_analysis()`), the output shapes and the time each step took. `--no-load`, for a machine that
cannot hold the params, reads no array: the files are checked against the manifest's sizes and the abstract params are
the shapes and dtypes orbax stored (checked against the model's); with a preset name instead of DIR, they are
`jax.eval_shape` of the model's initialisation in float32.
"""
from __future__ import annotations

import argparse
import functools
import json
import resource
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from amskv_jax import cli, untrusted
from amskv_jax.checkpoint import load_checkpoint, param_shapes
from amskv_jax.config import ModelConfig
from amskv_jax.errors import UserError
from amskv_jax.generate import DTYPES, generate
from amskv_jax.memory import ProgramMemory, load_model_files
from amskv_jax.policies import POLICIES, policy_from_name


def _check_whole_model(directory: str, names: set[str], config: ModelConfig) -> None:
    """Refuse params whose leaf names are not the whole model's (VAR and VQ-VAE, stacked blocks): the gate also
    admits a VAR without VQ-VAE, a training stage and the per-block layout of earlier versions, and checks every
    array's shape, so the names are all that is left to check."""
    if names != {untrusted.leaf_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(param_shapes(config))[0]}:
        raise UserError(f"{directory}: not a whole model's params (a VAR without VQ-VAE, a training stage, or an "
                        "earlier layout)")


def load(directory: str) -> tuple[ModelConfig, dict, dict]:
    """(config, abstract params of the loaded tree, record of the load: seconds, peak RSS, bytes, dtypes)."""
    start = time.perf_counter()
    config, params = load_checkpoint(directory)
    seconds = time.perf_counter() - start
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    _check_whole_model(directory, {untrusted.leaf_name(p) for p, _ in leaves}, config)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    record = {
        "load_s": seconds, "load_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "param_bytes": sum(x.nbytes for _, x in leaves),
        "param_dtypes": sorted({str(x.dtype) for _, x in leaves}), "arrays": len(leaves),
    }
    return config, abstract, record


def stored_shapes(directory: str) -> tuple[ModelConfig, dict, dict]:
    """(config, abstract params as stored, record): the directory through the untrusted gate with its manifest
    required (files, sizes, every array's stored shape and dtype against the config), no array read."""
    checked = untrusted.open_checkpoint(directory, manifest="required")
    config = checked.config
    _check_whole_model(directory, set(checked.arrays), config)
    abstract = jax.tree_util.tree_map_with_path(
        lambda p, s: jax.ShapeDtypeStruct(s.shape, checked.arrays[untrusted.leaf_name(p)][0]), param_shapes(config))
    record = {"stored_bytes": sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract)),
              "param_dtypes": sorted({str(x.dtype) for x in jax.tree.leaves(abstract)}),
              "arrays": len(jax.tree.leaves(abstract)), "files_checked": len(checked.manifest["files"])}
    return config, abstract, record


def compile_generate(config: ModelConfig, abstract: dict, batch: int, policy: str, dtype: str) -> dict:
    """Trace, lower and compile `generate` for `batch` images on abstract params; a plain record."""
    layout = policy_from_name(policy, config.var).layout(config.var)
    fn = jax.jit(functools.partial(generate, config=config, layout=layout, dtype=dtype))
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
    key = jax.eval_shape(lambda: jax.random.key(0))
    start = time.perf_counter()
    lowered = fn.lower(abstract, labels, key)
    traced = time.perf_counter() - start
    compiled = lowered.compile()
    stats = compiled.memory_analysis()
    out = jax.eval_shape(fn, abstract, labels, key)
    return {
        "policy": policy, "dtype": dtype, "batch": batch, "trace_lower_s": traced,
        "compile_s": time.perf_counter() - start - traced,
        "images_shape": list(out.images.shape), "tokens_shapes": [list(t.shape) for t in out.tokens],
        **ProgramMemory.from_stats(stats, batch).to_json(),
    }


def report(record: dict) -> str:
    gb = 1e9
    lines = [f"{record['directory']}: {record['model']}"]
    if "stored_bytes" in record:
        lines.append(f"  stored   {record['arrays']} arrays, {record['stored_bytes'] / gb:.2f} GB "
                     f"{'/'.join(record['param_dtypes'])} (not read); {record['files_checked']} files match the "
                     f"manifest's sizes; shapes match the model's")
    if "load_s" in record:
        lines.append(f"  load     {record['arrays']} arrays, {record['param_bytes'] / gb:.2f} GB "
                     f"{'/'.join(record['param_dtypes'])}, checked against the manifest, in {record['load_s']:.1f} s; "
                     f"peak RSS {record['load_peak_rss_bytes'] / gb:.2f} GB")
    lines.append(f"  compile  generate batch {record['batch']}, {record['policy']}, {record['dtype']}: trace + lower "
                 f"{record['trace_lower_s']:.1f} s, compile {record['compile_s']:.1f} s; images "
                 f"{record['images_shape']}, {len(record['tokens_shapes'])} scales up to {record['tokens_shapes'][-1]}")
    lines.append(f"  memory   arguments {record['argument_bytes'] / gb:.2f} GB, outputs "
                 f"{record['output_bytes'] / gb:.4f} GB, temporaries {record['temp_bytes'] / gb:.2f} GB "
                 "(XLA's memory_analysis)")
    return "\n".join(lines)


@cli.command("python -m bench.end_to_end")
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.end_to_end", description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", help="a checkpoint directory written by convert.from_torch (a preset name with "
                        "--no-load)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--policy", choices=POLICIES, default="full")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="the compute dtype")
    parser.add_argument("--no-load", action="store_true",
                        help="read no array: compile on the stored shapes and dtypes (a preset: its float32 shapes)")
    parser.add_argument("--json", action="store_true", help="print the record as JSON")
    args = parser.parse_args(argv)
    if args.batch < 1:
        parser.error(f"--batch must be >= 1, got {args.batch}")
    record = {"directory": args.directory}
    if args.no_load and not Path(args.directory).is_dir():
        config = load_model_files(args.directory)[0]
        abstract = param_shapes(config)
    elif args.no_load:
        config, abstract, stored = stored_shapes(args.directory)
        record.update(stored)
    else:
        config, abstract, loaded = load(args.directory)
        record.update(loaded)
    record["model"] = (f"depth {config.var.depth}, width {config.var.embed_dim}, ladder {config.var.patch_nums}, "
                       f"{config.vqvae.image_size}px")
    record.update(compile_generate(config, abstract, args.batch, args.policy, args.dtype))
    print(json.dumps(record) if args.json else report(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
