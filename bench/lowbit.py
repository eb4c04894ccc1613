"""Held-out NLL cost of low-bit KV storage: teacher-forced NLL of a model's training data and of its held-out split
under each storage dtype, per policy, against the full cache in the compute dtype.

    python -m bench.lowbit [--model emoji32] [--kv-dtypes int8,int4,int2] [--policies full,amskv] [--batch 64]
        [--splits all,heldout]

Teacher forcing under a quantised `kv_dtype` reads earlier scales' K/V as that cache stores them (`quant.py`), so
the figures are those of cached generation under that storage (`tests/test_quant.py` checks the match). Prints one
markdown table per split (`amskv_jax.nll.format_nll_table`; row "<policy>+<kv_dtype>", Δ against "full").
"""
from __future__ import annotations

import argparse
import sys

from amskv_jax import cli
from amskv_jax.checkpoint import DEFAULT_MODEL, load_model
from amskv_jax.errors import UserError
from amskv_jax.nll import encode_images, format_nll_table, policy_nll
from amskv_jax.policies import FullCache, policy_from_name
from amskv_jax.quant import KV_DTYPES, check_kv_dtype
from amskv_jax.train.data import SPLITS, load_emoji_dataset
from bench.fidelity import training_config


@cli.command("python -m bench.lowbit")
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.lowbit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="an embedded model trained by a config here")
    parser.add_argument("--kv-dtypes", default="int8,int4,int2", help=f"comma-separated of: {', '.join(KV_DTYPES)}")
    parser.add_argument("--policies", default="full", help="comma-separated policy names")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--cfg", type=float, default=1.5)
    parser.add_argument("--splits", default="all,heldout", help=f"comma-separated data splits: {', '.join(SPLITS)}")
    args = parser.parse_args(argv)
    model = load_model(args.model)
    c = model.config.var
    kv_dtypes = [check_kv_dtype(k, c.head_dim) for k in args.kv_dtypes.split(",") if k]
    layouts = {name: policy_from_name(name, c, model.calibration).layout(c) for name in args.policies.split(",") if name}
    name, cfg = training_config(model)
    splits = [s for s in args.splits.split(",") if s]
    if not splits or set(splits) - set(SPLITS):
        raise UserError(f"--splits: {args.splits!r}; allowed: comma-separated of {', '.join(SPLITS)}")
    layouts = {"full": FullCache().layout(c), **layouts}
    for split in splits:
        images, labels, _ = load_emoji_dataset(cfg.image_size, cfg.max_per_group, cfg.scheme, split)
        gt, x = encode_images(model, images)
        results = dict(policy_nll(model, layouts, gt, x, labels, cfg=args.cfg, batch=args.batch, progress=True))
        for kv_dtype in kv_dtypes:
            measured = policy_nll(model, layouts, gt, x, labels, cfg=args.cfg, batch=args.batch, kv_dtype=kv_dtype,
                                  progress=True)
            results.update({f"{policy}+{kv_dtype}": r for policy, r in measured.items()})
        print(f"\n### {args.model}, training config {name} ({cfg.scheme}), split {split}: {len(images)} images\n")
        print(format_nll_table(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
