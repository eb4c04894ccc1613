"""Prove a conversion: reproduce a PyTorch reference dump and report every error.

    python -m convert.verify REF_DIR [--vae VAE] [--parts teacher,steps,generation,vqvae]

REF_DIR holds what the reference saved (the layout of the project's `tests/fixtures/tiny/`): `var.pth`, the VQ-VAE
(one of `convert.from_torch.VAE_NAMES` there, or any file given with `--vae`), `config.json` and
`io.npz`. The checkpoints are converted, then every array of `io.npz` that we know how to produce is recomputed in
float32: teacher-forced logits and block outputs; the same teacher-forced input run scale by scale through the
cached generation step (`VAR.step`, full cache), which must give the same logits; greedy generation with and
without guidance (per-scale logits, tokens, images); the VQ-VAE's tokens, f_hat and reconstructions. A table of
max absolute / relative errors, token agreement and the bound applied is printed; the exit status is 1 when any
figure is outside its bound, 2 when the inputs cannot be read or do not fit together. Reference arrays are NCHW,
ours NHWC. A reduced dump (scalars `vocab_stride` / `pixel_stride`, as in `tests/fixtures/ladder256/`) is
compared on the same vocabulary columns / pixels. `--parts` limits the checks (see PARTS; generation compiles the
longest, minutes for a large model on CPU); without generation and vqvae no VQ-VAE is needed.

Bounds for float32 weights (the converter's contract): logits and activations 1e-4 relative (max abs error over
the reference's max abs value), f_hat 1e-4 relative, images 1e-3 absolute on [0, 1], tokens identical. When the
VQ-VAE's weights are stored in float16 / bfloat16 (e.g. the fixtures' `vae_f16.safetensors`) while the reference
ran them in float32, the figures that pass through the VQ-VAE use `LOW_PRECISION_VAE_TOLERANCES` (see there); the
teacher-forced and cached-step logits, the block outputs and the first scale's generation logits do not touch the
VQ-VAE and keep the float32 bounds, and greedy generation's tokens must still be identical.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from amskv_jax import cli
from amskv_jax.cache import init_cache
from amskv_jax.config import VARConfig, VQVAEConfig
from amskv_jax.errors import UserError
from amskv_jax.generate import generate
from amskv_jax.policies import FullCache
from amskv_jax.resize import resize_area, resize_bicubic
from amskv_jax.var import VAR
from amskv_jax.vqvae import VQVAE
from convert.from_torch import VAE_NAMES, convert, find_vae

# Bounds for float32 weights: logits relative 1e-4, f_hat relative 1e-4, images 1e-3 absolute on [0, 1];
# "tie": tokens must be identical (no near-tie allowance).
TOLERANCES = {"logits": 1e-4, "fhat": 1e-4, "image": 1e-3, "tie": 0.0}
# For figures that pass through a VQ-VAE whose weights were rounded to float16 (relative error up to 2^-11 ≈ 4.9e-4
# per weight) while the reference ran its float32 weights. Measured on the three fixtures with
# `vae_f16.safetensors`: generation logits after scale 0 (they see the codebook and the Φ convs through the next
# scale's input) up to 2.0e-4 relative (ladder256; 1.3e-4 tiny); f_hat 3.2e-4 relative; images (some 30 convs deep
# in the decoder) up to 6.4e-3 absolute on [0, 1] (the bound is tests/test_vqvae.py's 3e-2 on [-1, 1]). With
# float32 weights the same comparisons agree to ~1e-6 (f_hat) and 1.2e-5 (images). A mapping error is orders of
# magnitude larger (1e-1 and more).
# "tie": the VQ-VAE's encoder tokens may then flip where two codes are nearly equidistant. They are checked scale by
# scale on the reference's residual (the tokens of earlier scales are the reference's, so one flip does not
# cascade), and a disagreement is allowed only when the reference's code is within this relative squared distance
# of ours. Measured: 4 of 1,360 ladder256 tokens flip (gaps 1.8e-4 .. 3.6e-3), none on tiny.
LOW_PRECISION_VAE_TOLERANCES = {"logits": 5e-4, "fhat": 1e-3, "image": 1.5e-2, "tie": 1e-2}
LOW_PRECISION = (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))
# What can be checked: teacher forcing (logits, block outputs), the cached step on the teacher-forced input, greedy
# generation, the VQ-VAE on its own. Generation compiles the longest (a big model on CPU: minutes).
PARTS = ("teacher", "steps", "generation", "vqvae")


@dataclasses.dataclass
class Row:
    """One compared array. Tokens: `agreement` is the fraction equal, `max_rel` the largest relative distance gap
    of a disagreement (0 when none was measured); the row passes when all agree or every gap is within bound."""

    name: str
    kind: str  # "logits" | "fhat" | "image" | "tokens"
    max_abs: float = 0.0
    max_rel: float = 0.0
    agreement: float = 1.0
    tolerance: float | None = None  # None: TOLERANCES[kind] ("tie" for tokens)

    def bound(self, tolerances=TOLERANCES) -> float:
        if self.tolerance is not None:
            return self.tolerance
        return tolerances["tie" if self.kind == "tokens" else self.kind]

    def ok(self, tolerances=TOLERANCES) -> bool:
        if self.kind == "tokens":
            return self.agreement == 1.0 or (self.bound(tolerances) > 0 and self.max_rel <= self.bound(tolerances))
        error = self.max_abs if self.kind == "image" else self.max_rel
        return bool(error <= self.bound(tolerances))  # NaN fails


def compare(name: str, kind: str, ours, ref, tolerance: float | None = None) -> Row:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if ours.shape != ref.shape:
        raise UserError(f"{name}: shape {ours.shape} differs from the reference's {ref.shape}")
    if kind == "tokens":
        return Row(name, kind, agreement=float((ours == ref).mean()), tolerance=tolerance)
    err = float(np.abs(ours - ref).max())
    err = err if np.isfinite(err) else np.inf
    return Row(name, kind, max_abs=err, max_rel=err / max(float(np.abs(ref).max()), 1e-30), tolerance=tolerance)


def compare_tokens_near_ties(name: str, distances, ref_idx, tolerance: float) -> Row:
    """Our nearest codes (argmin of `distances` [N, V]) against the reference's; `max_rel` is the largest
    (d[ref] − d[ours]) / d[ours] over disagreements: how far from a tie the reference's choice is, for us."""
    d = np.asarray(distances, np.float64)
    ref = np.asarray(ref_idx).reshape(-1)
    ours = d.argmin(1)
    rows = np.arange(len(ref))
    gaps = (d[rows, ref] - d[rows, ours]) / np.maximum(d[rows, ours], 1e-30)
    bad = ours != ref
    return Row(name, "tokens", agreement=float(1 - bad.mean()), max_rel=float(gaps[bad].max(initial=0.0)),
               tolerance=tolerance)


def _nhwc(x):
    return np.transpose(np.asarray(x), (0, 2, 3, 1))


def is_low_precision(params) -> bool:
    """True when any leaf is float16 / bfloat16 (`convert` keeps the files' dtypes)."""
    return any(np.dtype(x.dtype) in LOW_PRECISION for x in jax.tree.leaves(params))


def _reference_config(ref_dir: Path) -> dict:
    path = ref_dir / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _check_config(config, ref: dict, ref_dir: Path, has_vae: bool):
    """The inferred config against the reference's config.json (when present); norm_eps and quant_resi, which no
    shape reveals, are taken from it."""
    v, q = config.var, config.vqvae
    inferred = {"depth": v.depth, "embed_dim": v.embed_dim, "num_heads": v.num_heads, "num_classes": v.num_classes,
                "patch_nums": list(v.patch_nums), "V": v.vocab_size, "Cvae": v.cvae, "shared_aln": v.shared_aln,
                "attn_l2_norm": v.attn_l2_norm, "mlp_ratio": v.mlp_ratio}
    if has_vae:
        inferred.update(ch=q.ch, share_quant_resi=q.share_quant_resi)
    bad = [f"{k} {ref[k]!r} (checkpoints: {val!r})" for k, val in inferred.items() if k in ref and ref[k] != val]
    if bad:
        raise UserError(f"{ref_dir / 'config.json'} disagrees with the checkpoints: {', '.join(bad)}")
    var = dataclasses.replace(v, **{k: ref[k] for k in ("norm_eps",) if k in ref})
    vqvae = dataclasses.replace(q, **{k: ref[k] for k in ("quant_resi",) if k in ref})
    return dataclasses.replace(config, var=var, vqvae=vqvae)


# ---- compiled programs, one set per configuration (repeated verifications reuse them)

@functools.lru_cache(maxsize=8)
def _var_programs(c: VARConfig):
    var = VAR(c)
    layout = FullCache().layout(c)

    @jax.jit
    def teacher(params, label_B, x_BLCv):
        """Logits [B, L, V] and each block's output [D, B, L, C]."""
        logits, states = var.apply(params, label_B, x_BLCv, method=VAR.teacher_states)
        return logits, states["out"]

    @jax.jit
    def cached_steps(params, label_B, x_BLCv):
        """The teacher-forced input through the generation path: one `VAR.step` per scale on a full cache."""
        cond_BD = var.apply(params, label_B, method=VAR.condition)
        x = var.apply(params, cond_BD, method=VAR.first_input)
        cache = init_cache(layout, label_B.shape[0], c.num_heads, c.head_dim, jnp.float32)
        out = []
        for si, (begin, end) in enumerate(c.begin_ends):
            if si:
                x = var.apply(params, si, x_BLCv[:, begin - c.first_l : end - c.first_l], method=VAR.next_input)
            logits, cache = var.apply(params, x, cond_BD, cache, si, layout, method=VAR.step)
            out.append(logits)
        return out

    return teacher, cached_steps


@functools.lru_cache(maxsize=8)
def _vqvae_programs(c: VQVAEConfig):
    vqvae = VQVAE(c)

    def apply(method):
        return jax.jit(lambda params, *args: vqvae.apply(params, *args, method=method))

    def quantize_on_reference_residual(m: VQVAE, img_BHWC, ref_idx):
        """Squared distances [B·pn², V] to every code at every scale, the residual built from the reference's
        tokens of the earlier scales (`VQVAE.quantize_f`'s steps, teacher-forced)."""
        f_BhwC = m.encode(img_BHWC).astype(jnp.float32)
        side = f_BhwC.shape[1:3]
        e_VC = m.quantize.embedding.embedding.astype(jnp.float32)
        f_rest, out = f_BhwC, []
        for si, pn in enumerate(c.patch_nums):
            z_NC = resize_area(f_rest, pn).reshape(-1, c.z_channels)
            dot_NV = jnp.einsum("nc,vc->nv", z_NC, e_VC, precision=jax.lax.Precision.HIGHEST)
            out.append(jnp.sum(z_NC**2, 1, keepdims=True) + jnp.sum(e_VC**2, 1) - 2 * dot_NV)
            f_rest = f_rest - m.phi(si, resize_bicubic(m.quantize.lookup(ref_idx[si]), side))
        return out

    return {"img_to_idx": apply(VQVAE.img_to_idx), "idx_to_fhat": apply(VQVAE.idx_to_fhat),
            "decode": apply(VQVAE.decode), "distances": apply(quantize_on_reference_residual)}


def verify(ref_dir: str | Path, *, vae: str | Path | None = None, parts=PARTS, log=print) -> list[Row]:
    """Convert REF_DIR's checkpoints (the VQ-VAE from `vae`, else found in REF_DIR) and compare with its io.npz
    (only the `parts` named, see PARTS). Returns one Row per compared array, each with the bound that applies."""
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise UserError(f"unknown parts {unknown}; allowed: {', '.join(PARTS)}")
    ref_dir = Path(ref_dir)
    needs_vae = bool({"generation", "vqvae"} & set(parts))
    vae_path = Path(vae) if vae is not None else find_vae(ref_dir) if needs_vae else None
    if needs_vae and vae_path is None:
        raise FileNotFoundError(f"{ref_dir}: no VQ-VAE checkpoint ({', '.join(VAE_NAMES)}); pass --vae PATH")
    ref_config = _reference_config(ref_dir)
    io = np.load(ref_dir / "io.npz")
    config, params = convert(ref_dir / "var.pth", vae_path, heads=ref_config.get("num_heads"),
                             patch_nums=ref_config.get("patch_nums"), log=log)
    config = _check_config(config, ref_config, ref_dir, vae_path is not None)
    low_vae = vae_path is not None and is_low_precision(params["vqvae"])
    vae_tol = LOW_PRECISION_VAE_TOLERANCES if low_vae else TOLERANCES
    if low_vae:
        log(f"{vae_path}: float16/bfloat16 VQ-VAE weights; figures that pass through the VQ-VAE use the bounds "
            f"{LOW_PRECISION_VAE_TOLERANCES}")
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    c = config.var
    vs = int(io["vocab_stride"]) if "vocab_stride" in io else 1
    ps = int(io["pixel_stride"]) if "pixel_stride" in io else 1
    vocab = lambda x: np.asarray(x)[..., ::vs]  # noqa: E731
    pixels = lambda x_NHWC: np.asarray(x_NHWC)[:, ::ps, ::ps]  # noqa: E731
    rows = []

    if "tf_logits" in io:
        teacher, cached_steps = _var_programs(c)
        label, x_BLCv = jnp.asarray(io["tf_label"], jnp.int32), jnp.asarray(io["tf_x_BLCv"], jnp.float32)
        if "teacher" in parts:
            logits, blocks = teacher(params["var"], label, x_BLCv)
            rows.append(compare("teacher-forced logits", "logits", vocab(logits), io["tf_logits"]))
            for i, out in enumerate(blocks):
                if f"tf_block{i}_out" in io:
                    rows.append(compare(f"teacher-forced block {i}", "logits", out, io[f"tf_block{i}_out"]))
        if "steps" in parts:
            for si, (step_logits, (begin, end)) in enumerate(zip(cached_steps(params["var"], label, x_BLCv),
                                                                  c.begin_ends)):
                rows.append(compare(f"cached step logits s{si}", "logits", vocab(step_logits),
                                    io["tf_logits"][:, begin:end]))

    for prefix in ("gen", "gen0"):
        if f"{prefix}_label" not in io or "generation" not in parts:
            continue
        out, scale_logits = greedy_generation(params, config, io[f"{prefix}_label"], float(io[f"{prefix}_cfg"]))
        for si in range(c.num_scales):
            if f"{prefix}_logits_s{si}" in io:
                # Scale 0 sees only the class embedding; later scales see the VQ-VAE's codebook and Φ convs.
                rows.append(compare(f"{prefix} logits s{si}", "logits", vocab(scale_logits[si]),
                                    io[f"{prefix}_logits_s{si}"], None if si == 0 else vae_tol["logits"]))
            rows.append(compare(f"{prefix} tokens s{si}", "tokens", out.tokens[si], io[f"{prefix}_idx_s{si}"], 0.0))
        rows.append(compare(f"{prefix} image", "image", pixels(out.images), _nhwc(io[f"{prefix}_img"]),
                            vae_tol["image"]))

    if "vae_img_in" in io and "vqvae" in parts:
        programs = _vqvae_programs(config.vqvae)
        img = jnp.asarray(_nhwc(io["vae_img_in"]), jnp.float32)
        ref_idx = [jnp.asarray(io[f"vae_idx_s{si}"], jnp.int32) for si in range(c.num_scales)]
        if low_vae:
            distances = programs["distances"](params["vqvae"], img, ref_idx)
            for si, d in enumerate(distances):
                rows.append(compare_tokens_near_ties(f"vae tokens s{si} (ref. residual)", d, ref_idx[si],
                                                     vae_tol["tie"]))
        else:
            for si, idx in enumerate(programs["img_to_idx"](params["vqvae"], img)):
                rows.append(compare(f"vae tokens s{si}", "tokens", idx, ref_idx[si]))
        f_hat = programs["idx_to_fhat"](params["vqvae"], ref_idx)
        rows.append(compare("vae f_hat", "fhat", f_hat, _nhwc(io["vae_fhat"]), vae_tol["fhat"]))
        rec = programs["decode"](params["vqvae"], jnp.asarray(_nhwc(io["vae_fhat"]), jnp.float32))
        rows.append(compare("vae reconstruction", "image", pixels((rec + 1) / 2), (_nhwc(io["vae_rec"]) + 1) / 2,
                            vae_tol["image"]))
        # VQVAE.idx_to_img is decode(idx_to_fhat(idx)); composed here from the programs above (one decoder compile)
        from_idx = programs["decode"](params["vqvae"], f_hat)
        rows.append(compare("vae idx_to_img", "image", pixels((from_idx + 1) / 2),
                            (_nhwc(io["vae_idx_to_img"]) + 1) / 2, vae_tol["image"]))
    return rows


def greedy_generation(params, config, labels, cfg):
    """Greedy (top_k=1) generation with the guided logits of every scale."""
    out = generate(params, np.asarray(labels, np.int32), jax.random.key(0), config=config, cfg=cfg, top_k=1,
                   top_p=0.0, return_logits=True)
    return out, out.logits


def print_table(rows: list[Row], tolerances=TOLERANCES) -> bool:
    print(f"{'array':32} {'max abs':>10} {'max rel':>10} {'tokens':>8} {'bound':>11}  status")
    ok = True
    for row in rows:
        good = row.ok(tolerances)
        ok &= good
        if row.kind == "tokens":
            errs = f"{'':10} {row.max_rel:10.2e}" if row.agreement < 1 else ""
            tokens = f"{100 * row.agreement:7.2f}%"
            bound = f"tie {row.bound(tolerances):.0e}" if row.bound(tolerances) else "equal"
        else:
            errs, tokens = f"{row.max_abs:10.2e} {row.max_rel:10.2e}", ""
            bound = f"{'abs' if row.kind == 'image' else 'rel'} {row.bound(tolerances):.1e}"
        print(f"{row.name:32} {errs:>21} {tokens:>8} {bound:>11}  {'ok' if good else 'FAIL'}")
    return ok


@cli.command("python -m convert.verify")
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convert.verify", description=__doc__.split("\n\n")[0])
    parser.add_argument("ref_dir", help="directory with var.pth, the VQ-VAE, config.json, io.npz")
    parser.add_argument("--vae", help=f"VQ-VAE checkpoint (default: {' / '.join(VAE_NAMES)} in REF_DIR)")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated subset of {','.join(PARTS)} (default: all)")
    args = parser.parse_args(argv)
    try:
        rows = verify(args.ref_dir, vae=args.vae, parts=[p.strip() for p in args.parts.split(",") if p.strip()])
    except KeyError as err:
        raise UserError(f"{args.ref_dir}: the reference dump lacks {err}") from None
    ok = print_table(rows)
    print("all figures within tolerance" if ok else "some figures are OUT OF TOLERANCE")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
