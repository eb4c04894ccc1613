"""Calibration: which layers are cache-demanding, and each layer's AMS-KV budget (+ CLI).

Images, their tokens fed through the teacher-forced forward pass (which equals the cached generation exactly,
`tests/test_var.py`), conditional and unconditional rows both, as the cache holds both under classifier-free
guidance: N samples drawn with the full cache, or with `--search` N real calibration images. Every block's K, V and
attention are captured and reduced to:

* inter-scale similarity of K and of V per layer and scale s ≥ 1: scale s−1's map brought to scale s's grid
  (bicubic, the VQ-VAE's, or nearest) and compared with scale s per token and head, K as the cache holds it: minus
  the ℓ2 distance (the paper's, the default) or the cosine similarity, averaged over tokens, heads and rows. A
  layer's score averages the scales s ≥ `finer_from` (of K, the paper's, or V, or both); the lowest scores mark the
  cache-demanding layers (the previous scale's K does not resemble the current one, so the current scale cannot
  stand in for it);
* attention density d(i←j), the attention mass scale i's queries put on scale j (j ≤ i), averaged over queries,
  heads and rows; its normalised entropy over j, averaged over query scales, is the layer's *dispersion*
  (ScaleKV's drafters spread their attention over the history, refiners keep it on the current map).

With `--search --budget B`, also every layer's AMS-KV budget, chosen to minimise the teacher-forced NLL of the
calibration images within B × the full cache's slots (`search.py`); with `--precisions int8,int4,int2`, also each
layer's storage dtype (KVTuner's layer-wise precision, judged by the NLL), B then a fraction of the full cache's
bytes. A model with a held-out split here (an embedded one) then has the searched policy's held-out NLL measured
against the full cache's (`held_out` in the file): as the model's layers.json it makes `amskv` the command lines'
default cache when that ΔNLL is at most 5% (`policies.default_policy_name`).

    python -m amskv_jax.calibrate --model d16 --samples 64 --out layers.json [--fraction 0.35 | --threshold T] [--plot]
    python -m amskv_jax.calibrate --model d16 --search --budget 0.25 [--images DIR] [--samples 64] --out search.json
    python -m amskv_jax.calibrate --model d16 --search --budget 0.1 --precisions int8,int4,int2 --out mixed.json

The JSON records the scores, the per-scale statistics, the choice, the search if any and the method;
`AMSKV.from_calibration(path)` and `ScaleBudget.from_calibration(path)` load it.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from amskv_jax import cli, compile_cache, sampling, sharding
from amskv_jax.attention import prepare_qk
from amskv_jax.config import ModelConfig, VARConfig
from amskv_jax.errors import UserError
from amskv_jax.generate import DTYPES
from amskv_jax.policies import (
    CALIBRATION_FORMAT, DEMANDING_FRACTION, default_policy_name, select_layers, storage_label,
)
from amskv_jax.resize import resize_bicubic
from amskv_jax.search import check_budget, check_precisions
from amskv_jax.untrusted import write_atomic
from amskv_jax.var import VAR, block_causal_mask

UPSAMPLES = ("nearest", "bicubic")
MEASURES = ("kv", "k", "v")
SIMILARITIES = ("l2", "cosine")


@dataclasses.dataclass(frozen=True)
class Statistics:
    """Sums over rows (divide by `rows` for means). sim_k, sim_v: cosine similarity [depth, S]; dist_k, dist_v: ℓ2
    distance [depth, S] (scale 0: 0); density: [depth, S, S] (row i: query scale, column j: key scale, zero above
    the diagonal)."""

    sim_k: np.ndarray
    sim_v: np.ndarray
    dist_k: np.ndarray
    dist_v: np.ndarray
    density: np.ndarray
    rows: int

    def __add__(self, other: Statistics) -> Statistics:
        return Statistics(*(getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self)))


def upsample_nearest(x_BhwC: jax.Array, size: int) -> jax.Array:
    """torch `F.interpolate(mode='nearest')`: output pixel i takes input floor(i·n_in/n_out)."""
    index = (np.arange(size) * x_BhwC.shape[1]) // size
    return x_BhwC[:, index][:, :, index]


def _to_grid(x_BlHD: jax.Array, pn_in: int, pn_out: int, upsample: str) -> jax.Array:
    """A scale's per-token map [B, pn_in², H, D] brought to the pn_out grid: [B, pn_out², H, D]."""
    b, _, h, d = x_BlHD.shape
    grid = x_BlHD.reshape(b, pn_in, pn_in, h * d).astype(jnp.float32)
    grid = upsample_nearest(grid, pn_out) if upsample == "nearest" else resize_bicubic(grid, pn_out)
    return grid.reshape(b, pn_out * pn_out, h, d)


def _cosine(a: jax.Array, b: jax.Array) -> jax.Array:
    """Cosine similarity over the last axis (float32), zero-norm vectors counted as 0."""
    dot = (a * b).sum(-1)
    norms = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
    return dot / jnp.maximum(norms, 1e-12)


def _layer_statistics(q, k, v, scale_mul_H, config: VARConfig, upsample: str):
    """One layer's sums over rows: cosine similarity and ℓ2 distance of K (as cached: L2-normalised when the model
    normalises it) and V per scale [S] each, density [S, S]."""
    begin_ends, patch_nums = config.begin_ends, config.patch_nums
    q, k = prepare_qk(q, k, scale_mul_H)
    sims = {"k": [jnp.zeros(())], "v": [jnp.zeros(())]}
    dists = {"k": [jnp.zeros(())], "v": [jnp.zeros(())]}
    for si in range(1, config.num_scales):
        (b0, e0), (b1, e1) = begin_ends[si - 1], begin_ends[si]
        for name, x in (("k", k), ("v", v)):
            prev = _to_grid(x[:, b0:e0], patch_nums[si - 1], patch_nums[si], upsample)
            cur = x[:, b1:e1].astype(jnp.float32)
            sims[name].append(_cosine(prev, cur).mean((1, 2)).sum())
            dists[name].append(jnp.linalg.norm(prev - cur, axis=-1).mean((1, 2)).sum())
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    scores = jnp.where(jnp.asarray(block_causal_mask(patch_nums))[None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    level = np.concatenate([np.full(pn * pn, si) for si, pn in enumerate(patch_nums)])
    member_LS = (level[:, None] == np.arange(config.num_scales)[None, :]).astype(np.float32)
    mass_BHLS = probs @ member_LS  # attention each query puts on each key scale
    density = jnp.einsum("bhqs,qi->is", mass_BHLS, member_LS / member_LS.sum(0)) / q.shape[2]
    return (jnp.stack(sims["k"]), jnp.stack(sims["v"]), jnp.stack(dists["k"]), jnp.stack(dists["v"]), density)


@functools.partial(jax.jit, static_argnames=("config", "upsample", "dtype"))
def _statistics(var_params, labels_B, x_BLCv, *, config: VARConfig, upsample: str, dtype):
    _, states = VAR(config, dtype=dtype).apply(var_params, labels_B, x_BLCv, method=VAR.teacher_states)
    attn = var_params["params"]["blocks"]["attn"]
    scale_mul_DH = attn["scale_mul_1H11"].reshape(config.depth, -1) if config.attn_l2_norm else None
    # one layer at a time (lax.map): a compiled body per layer would grow with depth, vmap would hold D of them
    return jax.lax.map(
        lambda xs: _layer_statistics(*xs, config, upsample), (states["q"], states["k"], states["v"], scale_mul_DH)
    )


def layer_statistics(
    var_params, config: VARConfig, labels_B, x_BLCv, *, upsample: str = "bicubic", dtype=jnp.float32
) -> Statistics:
    """Statistics of the teacher-forced pass on `labels_B` [B] and inputs x_BLCv [B, L − first_l, Cvae]."""
    if upsample not in UPSAMPLES:
        raise UserError(f"unknown upsample {upsample!r}; allowed: {', '.join(UPSAMPLES)}")
    sums = _statistics(
        var_params, jnp.asarray(labels_B, jnp.int32), x_BLCv, config=config, upsample=upsample, dtype=dtype
    )
    return Statistics(*(np.asarray(x) for x in sums), rows=int(np.shape(labels_B)[0]))


def dispersion(density_SS: np.ndarray, first: int) -> float:
    """Normalised entropy of d(i←·) over scales j ≤ i, averaged over query scales i ≥ max(first, 1): 0 when every
    scale attends only to itself, 1 when its attention is spread evenly over itself and all earlier scales."""
    values = []
    for i in range(max(first, 1), density_SS.shape[0]):
        p = np.clip(density_SS[i, : i + 1], 1e-30, None)
        p = p / p.sum()
        values.append(float(-(p * np.log(p)).sum() / math.log(i + 1)))
    return float(np.mean(values))


def summarise(
    stats: Statistics, *, finer_from: int = 2, measure: str = "k", similarity: str = "l2",
    fraction: float | None = None, threshold: float | None = None,
) -> dict:
    """Per-layer scores, per-scale statistics and the demanding layers (lowest similarity) from summed statistics:
    `fraction` of the layers or those below `threshold` (neither: DEMANDING_FRACTION). `similarity`: "l2" (the
    paper's: minus the ℓ2 distance) or "cosine"."""
    if fraction is None and threshold is None:
        fraction = DEMANDING_FRACTION
    depth, num_scales = stats.sim_k.shape
    if measure not in MEASURES:
        raise UserError(f"unknown measure {measure!r}; allowed: {', '.join(MEASURES)}")
    if similarity not in SIMILARITIES:
        raise UserError(f"unknown similarity {similarity!r}; allowed: {', '.join(SIMILARITIES)}")
    if not 1 <= finer_from < num_scales:
        raise UserError(f"finer_from must be in [1, {num_scales - 1}], got {finer_from}")
    if similarity == "l2":
        sim_k, sim_v = -stats.dist_k / stats.rows, -stats.dist_v / stats.rows
    else:
        sim_k, sim_v = stats.sim_k / stats.rows, stats.sim_v / stats.rows
    density = stats.density / stats.rows
    score_k = sim_k[:, finer_from:].mean(1)
    score_v = sim_v[:, finer_from:].mean(1)
    scores = {"kv": (score_k + score_v) / 2, "k": score_k, "v": score_v}[measure]
    spread = [dispersion(density[layer], finer_from) for layer in range(depth)]
    chosen = select_layers(scores.tolist(), fraction=fraction, threshold=threshold, lowest=True)

    def per_scale(x):
        return [[None] + [float(val) for val in row[1:]] for row in x]

    return {
        "scores": {
            "similarity": scores.tolist(), "similarity_k": score_k.tolist(), "similarity_v": score_v.tolist(),
            "dispersion": spread,
        },
        "per_scale": {
            "similarity_k": per_scale(sim_k), "similarity_v": per_scale(sim_v), "density": density.tolist(),
        },
        "demanding_layers": chosen,
        "selection": {"fraction": fraction} if threshold is None else {"threshold": threshold},
    }


def similarity_method(similarity: str, upsample: str, measure: str, finer_from: int) -> str:
    """The calibration record's words for how the similarity scores were made."""
    what = "K and V" if measure == "kv" else measure.upper()
    per_token = ("minus the l2 distance (the paper's)" if similarity == "l2" else "cosine similarity")
    return (f"{per_token} per token and head between scale s's K (as cached) or V and scale s-1's map upsampled "
            f"({upsample}) to s's grid; mean over tokens, heads, rows; layer score = mean over scales s >= "
            f"{finer_from} of {what}")


def calibrate(
    model, samples: int, *, batch: int = 8, seed: int = 0, cfg: float = 1.5, top_k: int = 900, top_p: float = 0.96,
    dtype: str = "float32", upsample: str = "bicubic", measure: str = "k", similarity: str = "l2",
    finer_from: int = 2, fraction: float | None = None, threshold: float | None = None, model_name: str = "",
    mesh=None,
) -> dict:
    """Generate `samples` images with the full cache (random classes from `seed`), measure, and return the
    calibration record (the JSON that `write` saves). `model`: a `checkpoint.Model`. `mesh`
    (`sharding.make_mesh`): generate and measure sharded over it (every batch, the last included, must divide by
    its data axis)."""
    from amskv_jax.generate import generate
    from amskv_jax.vqvae import VQVAE

    config: ModelConfig = model.config
    c = config.var
    if samples < 1 or batch < 1:
        raise UserError(f"samples and batch must be >= 1, got {samples} and {batch}")
    params = model.params
    if mesh is not None:
        for size in sorted({min(batch, samples - start) for start in range(0, samples, batch)}):
            sharding.check_mesh(config, size, mesh)
        params = sharding.shard_params(params, mesh)
    label_key, key = jax.random.split(jax.random.key(seed))
    all_labels = np.asarray(jax.random.randint(label_key, (samples,), 0, c.num_classes))
    to_input = jax.jit(lambda p, idx: VQVAE(config.vqvae).apply(p, idx, method=VQVAE.idx_to_var_input))
    total = None
    for start in range(0, samples, batch):
        labels = all_labels[start : start + batch]
        key, sample_key = jax.random.split(key)
        out = generate(
            params, labels, sample_key, config=config, cfg=cfg, top_k=min(top_k, c.vocab_size), top_p=top_p,
            dtype=dtype, mesh=mesh,
        )
        x = to_input(params["vqvae"], out.tokens)
        labels_2B = sampling.guidance_rows(jnp.asarray(labels), c.num_classes)
        if mesh is not None:
            labels_2B = sharding.place_rows(labels_2B, mesh)
        stats = layer_statistics(
            params["var"], c, labels_2B, jnp.repeat(x, 2, axis=0), upsample=upsample, dtype=DTYPES[dtype]
        )
        total = stats if total is None else total + stats
    summary = summarise(total, finer_from=finer_from, measure=measure, similarity=similarity, fraction=fraction,
                        threshold=threshold)
    selection = summary.pop("selection")
    return {
        "format": CALIBRATION_FORMAT,
        "model": model_name,
        "depth": c.depth,
        "patch_nums": list(c.patch_nums),
        "samples": samples,
        "demanding_layers": summary.pop("demanding_layers"),
        "method": {
            "generation": {"policy": "full", "cfg": cfg, "top_k": top_k, "top_p": top_p, "seed": seed,
                           "batch": batch, "dtype": dtype},
            "rows": "conditional and unconditional (classifier-free guidance) rows, teacher-forced on the tokens",
            "similarity": similarity_method(similarity, upsample, measure, finer_from),
            "metric": similarity,
            "upsample": upsample,
            "measure": measure,
            "finer_from": finer_from,
            "density": "d(i<-j) = attention mass scale i's queries put on scale j, mean over queries, heads, rows",
            "dispersion": f"normalised entropy of d(i<-.) over j <= i, mean over query scales i >= {finer_from}",
            "selection": {**selection, "rule": "demanding = lowest similarity"},
        },
        **summary,
    }


def search_calibrations(
    model, images_NHWC: np.ndarray, labels_N: np.ndarray, budgets: Sequence[float], *, samples: int = 64,
    batch: int = 64, dtype: str = "float32", upsample: str = "bicubic", measure: str = "k", similarity: str = "l2",
    finer_from: int = 2, fraction: float | None = None, threshold: float | None = None, model_name: str = "",
    source: str = "", progress: bool = True, precisions: Sequence[str] = (),
    on_record: Callable[[dict], None] | None = None,
) -> list[dict]:
    """One calibration record per budget (a fraction of the full cache's slots; with `precisions`, of its bytes)
    from real images: `samples` of them, evenly spaced (all when fewer), teacher-forced with both guidance rows for
    the similarity scores, and the per-layer AMS-KV budgets (and storage dtypes, among the compute dtype and
    `precisions`) searched on their NLL (`search.search_budgets`, the scores shared between budgets). `on_record`
    is called with each record as soon as its budget is searched (to save it before the next budget's search)."""
    from amskv_jax.nll import encode_images
    from amskv_jax.search import nll_score, search_budgets

    budgets = [check_budget(b) for b in budgets]
    precisions = tuple(precisions)
    check_precisions(precisions, model.config.var.head_dim)
    if samples < 1 or batch < 1:
        raise UserError(f"samples and batch must be >= 1, got {samples} and {batch}")
    c = model.config.var
    pick = np.unique(np.linspace(0, len(images_NHWC) - 1, min(samples, len(images_NHWC))).round().astype(int))
    labels = np.asarray(labels_N)[pick]
    gt, x = encode_images(model, images_NHWC[pick])
    total = None
    for start in range(0, len(pick), batch):
        chunk = jnp.asarray(labels[start : start + batch], jnp.int32)
        stats = layer_statistics(
            model.params["var"], c, sampling.guidance_rows(chunk, c.num_classes),
            jnp.repeat(jnp.asarray(x[start : start + batch]), 2, axis=0), upsample=upsample, dtype=DTYPES[dtype],
        )
        total = stats if total is None else total + stats
    summary = summarise(total, finer_from=finer_from, measure=measure, similarity=similarity, fraction=fraction,
                        threshold=threshold)
    selection = summary.pop("selection")
    score, memo, out = nll_score(model, gt, x, labels, batch=batch, dtype=dtype, precisions=precisions), {}, []
    for budget in budgets:
        result = search_budgets(c, score, budget, progress=progress, memo=memo, precisions=precisions)
        mixed = {} if result.kv_dtypes is None else {
            "kv_dtypes": list(result.kv_dtypes), "precisions": [None, *precisions], "bytes": result.bytes,
            "byte_bound": result.byte_bound, "full_bytes": result.full_bytes,
            "cost": "bytes per image row of a bfloat16-compute cache, float32 scales included (cache.layer_bytes)",
        }
        out.append({
            "format": CALIBRATION_FORMAT,
            "model": model_name,
            "depth": c.depth,
            "patch_nums": list(c.patch_nums),
            "samples": len(pick),
            "demanding_layers": summary["demanding_layers"],
            "method": {
                "images": f"{len(pick)} real images, evenly spaced, of {source or 'the given images'}",
                "rows": "conditional and unconditional (classifier-free guidance) rows, teacher-forced",
                "similarity": similarity_method(similarity, upsample, measure, finer_from),
                "metric": similarity, "upsample": upsample, "measure": measure, "finer_from": finer_from,
                "selection": {**selection, "rule": "demanding = lowest similarity"},
                "search": "per-layer AMS-KV budgets" + (" and storage dtypes" if precisions else "")
                          + " minimising the mean unguided teacher-forced NLL of the images (conditional rows) "
                          "within the bound; amskv_jax/search.py",
            },
            **{k: v for k, v in summary.items() if k != "demanding_layers"},
            "search": {
                "budget": budget, "budgets": list(result.budgets), "condensed_scales": result.condensed_scales,
                "slots": result.slots, "bound": result.bound, "full_slots": result.full_slots, "nll": result.nll,
                "full_nll": result.full_nll, "levels": list(result.levels), "evaluations": result.evaluations,
                "steps": list(result.steps), "dtype": dtype, **mixed,
            },
        })
        if on_record is not None:
            on_record(out[-1])
    return out


def plot(data: dict, prefix: str | Path) -> list[Path]:
    """Heat maps: `{prefix}_similarity.png` (K and V similarity, layers × scales) and `{prefix}_density.png`
    (d(i←j) per layer). Returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prefix = Path(prefix)
    depth, scales = data["depth"], len(data["patch_nums"])
    demanding = set(data["demanding_layers"])
    paths = [prefix.with_name(prefix.name + "_similarity.png"), prefix.with_name(prefix.name + "_density.png")]

    fig, axes = plt.subplots(1, 2, figsize=(10, 1.5 + 0.25 * depth), squeeze=False)
    for ax, name in zip(axes[0], ("similarity_k", "similarity_v")):
        values = np.array([[np.nan if x is None else x for x in row] for row in data["per_scale"][name]])
        cosine = data["method"].get("metric") == "cosine"
        limits = dict(vmin=-1, vmax=1) if cosine else {}
        image = ax.imshow(values, aspect="auto", cmap="viridis", **limits)
        what = "cos" if cosine else "-l2"
        ax.set_title(f"{name[-1].upper()}: {what}(scale s, scale s-1 upsampled)")
        ax.set_xlabel("scale s")
        ax.set_xticks(range(scales))
        ax.set_ylabel("layer (* demanding)")
        ax.set_yticks(range(depth), [f"{i}{' *' if i in demanding else ''}" for i in range(depth)], fontsize=6)
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    write_atomic(paths[0], _png(fig))
    plt.close(fig)

    columns = min(depth, 6)
    rows = -(-depth // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.2 * rows), squeeze=False)
    for layer, ax in enumerate(axes.flat):
        if layer >= depth:
            ax.axis("off")
            continue
        density = np.array(data["per_scale"]["density"][layer])
        ax.imshow(np.where(np.tri(scales, dtype=bool), density, np.nan), cmap="magma", vmin=0, vmax=1)
        ax.set_title(f"layer {layer}{' *' if layer in demanding else ''}", fontsize=8)
        ax.set_xticks(range(scales), [str(j) if scales <= 10 else "" for j in range(scales)], fontsize=5)
        ax.set_yticks(range(scales), [str(i) if scales <= 10 else "" for i in range(scales)], fontsize=5)
    fig.suptitle("attention density d(i<-j): query scale i (rows) on key scale j (columns)", fontsize=9)
    fig.tight_layout()
    write_atomic(paths[1], _png(fig))
    plt.close(fig)
    return paths


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=120, format="png")
    return buffer.getvalue()


def held_out_record(model, calibration: dict, images_NHWC: np.ndarray, labels_N: np.ndarray, source: str, *,
                    batch: int = 64, dtype: str = "float32", progress: bool = True) -> dict:
    """The searched policy of `calibration` judged on images it was not searched on (`images_NHWC` in [-1, 1]):
    teacher-forced NLL per token against the full cache's, unguided (`delta_nll`, a fraction of the full cache's
    NLL: what `policies.default_policy_name` reads) and guided, and the cache's share of the full bfloat16 cache."""
    from amskv_jax.nll import encode_images, policy_nll
    from amskv_jax.policies import AMSKV, FullCache

    c = model.config.var
    gt, x = encode_images(model, images_NHWC)
    layouts = {"full": FullCache().layout(c), "searched": AMSKV.from_calibration(calibration).layout(c)}
    result = policy_nll(model, layouts, gt, x, np.asarray(labels_N), batch=batch, dtype=dtype, progress=progress)
    full, searched = result["full"], result["searched"]
    return {
        "images": len(gt), "source": source,
        "nll": searched.mean_unguided, "full_nll": full.mean_unguided,
        "delta_nll": (searched.mean_unguided - full.mean_unguided) / full.mean_unguided,
        "guided_nll": searched.mean_guided, "full_guided_nll": full.mean_guided,
        "guided_delta_nll": (searched.mean_guided - full.mean_guided) / full.mean_guided,
        "share": searched.share, "dtype": dtype,
    }


@cli.command("python -m amskv_jax.calibrate")
def main(argv=None) -> int:
    from amskv_jax.checkpoint import load_model

    parser = argparse.ArgumentParser(prog="python -m amskv_jax.calibrate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a preset name (random weights) or a checkpoint dir")
    parser.add_argument("--samples", type=int, default=None,
                        help="images generated with the full cache (required); with --search: calibration images "
                        "used (default 64)")
    parser.add_argument("--out", required=True, help="the calibration JSON to write")
    parser.add_argument("--batch", type=int, default=8, help="images per generation (with --search: scoring) call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cfg", type=float, default=1.5)
    parser.add_argument("--top-k", type=int, default=900)
    parser.add_argument("--top-p", type=float, default=0.96)
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--similarity", default="l2", choices=SIMILARITIES,
                        help="l2: the paper's interpolated-l2 similarity (default); cosine: cosine similarity")
    parser.add_argument("--upsample", default="bicubic", choices=UPSAMPLES, help="coarse map to the finer grid")
    parser.add_argument("--measure", default="k", choices=MEASURES,
                        help="whose similarity ranks the layers: k (the paper's), v, or kv (their mean)")
    parser.add_argument("--finer-from", type=int, default=2, help="first scale s whose similarity counts")
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--fraction", type=float, default=None,
                        help=f"demanding = this fraction of layers, lowest similarity (default {DEMANDING_FRACTION})")
    choice.add_argument("--threshold", type=float, default=None, help="demanding = layers with similarity below")
    parser.add_argument("--search", action="store_true",
                        help="also choose every layer's AMS-KV budget by teacher-forced NLL of real images")
    parser.add_argument("--budget", type=budget_arg, default=None,
                        help="--search: the cache's bound, a fraction of the full cache's slots in (0, 1]")
    parser.add_argument("--precisions", default="",
                        help="--search: also choose each layer's storage dtype, the compute dtype or one of these "
                        "(comma-separated quantised dtypes, finest first, e.g. int8,int4,int2); the budget is then "
                        "a fraction of the full cache's bytes (bfloat16)")
    parser.add_argument("--images", type=Path, default=None,
                        help="--search: calibration images, one subfolder per class (default: the train split of "
                        "the model's training data; never its held-out split)")
    parser.add_argument("--plot", action="store_true", help="also write OUT_similarity.png and OUT_density.png")
    parser.add_argument("--mesh", default=None, help="shard over the devices, e.g. data=8 or data=4,model=2")
    cli.add_verify_flag(parser)
    compile_cache.add_flag(parser)
    args = parser.parse_args(argv)
    compile_cache.enable(args.no_compile_cache)

    try:
        if args.search:
            if args.budget is None:
                raise UserError("--search needs --budget, a fraction of the full cache in (0, 1]")
            if args.mesh:
                raise UserError("--search runs on one device; drop --mesh")
            args.samples = 64 if args.samples is None else args.samples
            args.precisions = [p for p in args.precisions.split(",") if p]
            check_precisions(args.precisions)
        elif args.budget is not None or args.images is not None or args.precisions:
            raise UserError("--budget, --precisions and --images go with --search")
        if args.samples is None:
            raise UserError("--samples is required (images generated with the full cache)")
        if args.samples < 1 or args.batch < 1:
            raise UserError(f"--samples and --batch must be >= 1, got {args.samples} and {args.batch}")
        if args.fraction is not None and not 0 <= args.fraction <= 1:
            raise UserError(f"--fraction must be in [0, 1], got {args.fraction}")
    except UserError as err:
        parser.error(str(err))
    model = load_model(args.model, verify=args.verify)
    try:
        if not 1 <= args.finer_from < model.config.var.num_scales:
            raise UserError(f"--finer-from must be in [1, {model.config.var.num_scales - 1}], got {args.finer_from}")
        mesh = None
        if args.mesh:
            mesh = sharding.mesh_from_text(args.mesh)
            for size in sorted({min(args.batch, args.samples - s) for s in range(0, args.samples, args.batch)}):
                sharding.check_mesh(model.config, size, mesh)
    except UserError as err:
        parser.error(str(err))
    selection = dict(similarity=args.similarity, upsample=args.upsample, measure=args.measure,
                     finer_from=args.finer_from, fraction=args.fraction, threshold=args.threshold)
    if args.search:
        from amskv_jax.nll import model_images, split_images

        images, labels, source = model_images(model, args.images, "train")  # never the held-out split
        print(f"model {args.model}: {model.description}; search at {args.budget} of the full cache on "
              f"{min(args.samples, len(images))} of {source}", flush=True)
        (data,) = search_calibrations(
            model, images, labels, [args.budget], samples=args.samples, batch=args.batch, dtype=args.dtype,
            model_name=args.model, source=source, precisions=args.precisions, **selection,
        )
        try:
            held, held_labels, held_source = split_images(model, "heldout")
        except UserError:  # no training config here built the model: nothing is held out of what it saw
            print("no held-out split for this model: its held-out NLL is not recorded, so the command lines keep the "
                  "full cache as their default", flush=True)
        else:
            print(f"held-out NLL of the searched policy on {held_source}", flush=True)
            data["held_out"] = held_out_record(model, data, held, held_labels, held_source, batch=args.batch,
                                               dtype=args.dtype)
    else:
        print(f"model {args.model}: {model.description}; {args.samples} samples", flush=True)
        data = calibrate(
            model, args.samples, batch=args.batch, seed=args.seed, cfg=args.cfg, top_k=args.top_k, top_p=args.top_p,
            dtype=args.dtype, model_name=args.model, mesh=mesh, **selection,
        )
    out = Path(args.out)
    write_atomic(out, json.dumps(data, indent=1))
    scores = data["scores"]
    for layer in range(data["depth"]):
        mark = "  demanding" if layer in data["demanding_layers"] else ""
        k, v, spread = (scores[name][layer] for name in ("similarity_k", "similarity_v", "dispersion"))
        budget = f"  budget {data['search']['budgets'][layer]} slots" if args.search else ""
        if args.search and "kv_dtypes" in data["search"]:
            budget += f" in {storage_label(data['search']['kv_dtypes'][layer])}"
        print(f"layer {layer:3d}: similarity ({args.similarity}) K {k:.3f} V {v:.3f}  dispersion {spread:.3f}"
              f"{mark}{budget}")
    print(f"wrote {out}: demanding layers {data['demanding_layers']}")
    if args.search:
        found = data["search"]
        print(f"searched budgets: {found['slots']} of {found['full_slots']} slots "
              f"({found['slots'] / found['full_slots']:.1%}; bound {found['bound']}), calibration NLL "
              f"{found['nll']:.4f} against the full cache's {found['full_nll']:.4f}; {found['evaluations']} "
              f"candidates scored. Load it with --policy amskv --calibration {out}")
        if "held_out" in data:
            held = data["held_out"]
            name, reason = default_policy_name(data)
            print(f"held-out NLL {held['nll']:.4f} against the full cache's {held['full_nll']:.4f} "
                  f"({held['delta_nll']:+.2%}; guided {held['guided_delta_nll']:+.2%}); as a model's layers.json this "
                  f"file makes the command lines' default {name}: {reason}")
        if "kv_dtypes" in found:
            print(f"with per-layer storage: {found['bytes']:,} of {found['full_bytes']:,} bytes per row "
                  f"({found['bytes'] / found['full_bytes']:.1%} of the full bfloat16 cache; bound {found['byte_bound']:,})")
    if args.plot:
        for path in plot(data, out.with_suffix("")):
            print(f"wrote {path}")
    return 0


def budget_arg(text: str) -> float:
    """argparse `type` of a budget: a fraction of the full cache that `search.check_budget` accepts, so that the
    command line refuses exactly what the search would."""
    try:
        return check_budget(float(text))
    except ValueError as err:  # not a number, or outside (0, 1]
        raise argparse.ArgumentTypeError(str(err)) from None


if __name__ == "__main__":
    sys.exit(main())
