"""Prove a conversion: reproduce a PyTorch reference dump and report every error.

    python -m convert.verify REF_DIR

REF_DIR holds what the reference saved (the layout of the project's `tests/fixtures/tiny/`): `var.pth`, the VQ-VAE
(`vae.pth`, or `vae.safetensors`), `config.json` and `io.npz`. The checkpoints are converted, then every array of
`io.npz` that we know how to produce is recomputed in float32: teacher-forced logits, greedy generation with and
without guidance (per-scale logits, tokens, images) and the VQ-VAE's indices, f_hat and reconstructions. A table
of max absolute / relative errors and token agreement is printed; the exit status is 1 when any figure is outside
its tolerance. Reference arrays are NCHW; ours NHWC.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from amskv_jax.generate import generate
from amskv_jax.var import VAR
from amskv_jax.vqvae import VQVAE
from convert.from_torch import ConversionError, convert
from convert.mapping import MappingError
from convert.torch_pickle import CheckpointError

# Tolerances for float32 weights (the contract): logits relative 1e-4, images 1e-3 absolute on [0, 1].
TOLERANCES = {"logits": 1e-4, "fhat": 1e-4, "image": 1e-3}


@dataclasses.dataclass
class Row:
    name: str
    kind: str  # "logits" | "fhat" | "image" | "tokens"
    max_abs: float = 0.0
    max_rel: float = 0.0
    agreement: float = 1.0

    def ok(self, tolerances) -> bool:
        if self.kind == "tokens":
            return self.agreement == 1.0
        bound = self.max_abs if self.kind == "image" else self.max_rel
        return bound <= tolerances[self.kind]


def compare(name: str, kind: str, ours, ref) -> Row:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if ours.shape != ref.shape:
        raise ValueError(f"{name}: shape {ours.shape} differs from the reference's {ref.shape}")
    if kind == "tokens":
        return Row(name, kind, agreement=float((ours == ref).mean()))
    err = np.abs(ours - ref).max()
    return Row(name, kind, max_abs=float(err), max_rel=float(err / max(np.abs(ref).max(), 1e-30)))


def _nhwc(x):
    return np.transpose(np.asarray(x), (0, 2, 3, 1))


def find_vae(ref_dir: Path) -> Path:
    for name in ("vae.pth", "vae.safetensors"):
        if (ref_dir / name).exists():
            return ref_dir / name
    raise FileNotFoundError(f"{ref_dir}: no VQ-VAE checkpoint (vae.pth or vae.safetensors)")


def verify(ref_dir: str | Path, *, log=print) -> list[Row]:
    """Convert REF_DIR's checkpoints and compare with its io.npz. Returns one Row per compared array."""
    ref_dir = Path(ref_dir)
    io = np.load(ref_dir / "io.npz")
    config, params = convert(ref_dir / "var.pth", find_vae(ref_dir), log=log)
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    var, vqvae = VAR(config.var), VQVAE(config.vqvae)
    c = config.var
    rows = []

    if "tf_logits" in io:
        logits = jax.jit(var.apply)(params["var"], jnp.asarray(io["tf_label"], jnp.int32), jnp.asarray(io["tf_x_BLCv"]))
        rows.append(compare("teacher-forced logits", "logits", logits, io["tf_logits"]))

    for prefix in ("gen", "gen0"):
        if f"{prefix}_label" not in io:
            continue
        out, scale_logits = greedy_generation(params, config, io[f"{prefix}_label"], float(io[f"{prefix}_cfg"]))
        for si in range(c.num_scales):
            if f"{prefix}_logits_s{si}" in io:
                rows.append(compare(f"{prefix} logits s{si}", "logits", scale_logits[si], io[f"{prefix}_logits_s{si}"]))
            rows.append(compare(f"{prefix} tokens s{si}", "tokens", out.tokens[si], io[f"{prefix}_idx_s{si}"]))
        rows.append(compare(f"{prefix} image", "image", out.images, _nhwc(io[f"{prefix}_img"])))

    if "vae_img_in" in io:
        img = jnp.asarray(_nhwc(io["vae_img_in"]))
        idx = vqvae.apply(params["vqvae"], img, method=VQVAE.img_to_idx)
        for si in range(c.num_scales):
            rows.append(compare(f"vae tokens s{si}", "tokens", idx[si], io[f"vae_idx_s{si}"]))
        ref_idx = [jnp.asarray(io[f"vae_idx_s{si}"], jnp.int32) for si in range(c.num_scales)]
        f_hat = vqvae.apply(params["vqvae"], ref_idx, method=VQVAE.idx_to_fhat)
        rows.append(compare("vae f_hat", "fhat", f_hat, _nhwc(io["vae_fhat"])))
        rec = vqvae.apply(params["vqvae"], jnp.asarray(_nhwc(io["vae_fhat"])), method=VQVAE.decode)
        rows.append(compare("vae reconstruction", "image", (rec + 1) / 2, (_nhwc(io["vae_rec"]) + 1) / 2))
        from_idx = vqvae.apply(params["vqvae"], ref_idx, method=VQVAE.idx_to_img)
        rows.append(compare("vae idx_to_img", "image", (from_idx + 1) / 2, (_nhwc(io["vae_idx_to_img"]) + 1) / 2))
    return rows


def greedy_generation(params, config, labels, cfg):
    """Greedy (top_k=1) generation with the guided logits of every scale."""
    out = generate(params, np.asarray(labels, np.int32), jax.random.key(0), config=config, cfg=cfg, top_k=1,
                   top_p=0.0, return_logits=True)
    return out, out.logits


def print_table(rows: list[Row], tolerances=TOLERANCES) -> bool:
    print(f"{'array':28} {'max abs':>10} {'max rel':>10} {'tokens':>8}  status")
    ok = True
    for row in rows:
        good = row.ok(tolerances)
        ok &= good
        tokens = f"{100 * row.agreement:7.2f}%" if row.kind == "tokens" else ""
        errs = "" if row.kind == "tokens" else f"{row.max_abs:10.2e} {row.max_rel:10.2e}"
        print(f"{row.name:28} {errs:>21} {tokens:>8}  {'ok' if good else 'FAIL'}")
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convert.verify", description=__doc__.split("\n\n")[0])
    parser.add_argument("ref_dir", help="directory with var.pth, vae.pth, config.json, io.npz")
    args = parser.parse_args(argv)
    try:
        rows = verify(args.ref_dir)
    except (CheckpointError, ConversionError, MappingError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    ok = print_table(rows)
    print("all figures within tolerance" if ok else "some figures are OUT OF TOLERANCE")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
