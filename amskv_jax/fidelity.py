"""Fidelity of cache policies against the full cache: per-scale token agreement and logit KL (+ CLI).

Every policy generates from the same labels and PRNG keys as the full cache, independently (so its tokens diverge
after its first different draw). Per scale we report

* agreement: the fraction of the scale's tokens equal to the full cache's (this compounds: one different draw
  changes every later scale's prefix, so even a near-lossless cache scores well below 1 under sampling);
* top-1 agreement: on the *policy's own prefix*, the fraction of tokens whose most likely code is the same under the
  policy's guided logits and the full cache's (no sampling, no compounding: the cache's effect on each decision);
* KL(full ‖ policy): the mean over tokens of the KL divergence between the guided distribution the full cache gives
  on the *policy's own prefix* (its tokens teacher-forced through the model, which equals full-cache generation) and
  the one the policy's sampler received. Both are the guided logits before top-k/top-p filtering;

and per image the PSNR of the policy's final image against the full cache's and, when an `image_distance` (LPIPS)
is given, that distance. Against real data, with a `classifier` (`amskv_jax.classifier`): the class accuracy of the
samples (argmax of the classifier == the label asked for) and, given the real images' features, the FID of the
samples' penultimate features against them (`amskv_jax.fid`). The command line is `python -m bench.fidelity`.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from amskv_jax import sampling
from amskv_jax.cache import memory_share
from amskv_jax.config import ModelConfig, VARConfig
from amskv_jax.fid import fid
from amskv_jax.generate import DTYPES, first_nonfinite_scale, generate
from amskv_jax.policies import (
    AMSKV, DEMANDING_FRACTION, CondensedOnly, FullCache, Ladder, Policy, ScaleBudget, SlidingWindow,
    choose_demanding_layers, choose_drafter_layers, cut_fits,
)
from amskv_jax.var import VAR
from amskv_jax.vqvae import VQVAE


@dataclasses.dataclass(frozen=True)
class Fidelity:
    """Per-scale agreement, top-1 agreement and KL(full ‖ policy) (means over tokens and samples), image PSNR (dB, of
    the mean squared error over all images; inf when all are identical) and LPIPS (None when not measured) against the
    full cache, and the cache's slots and bytes' share; against real data the samples' class accuracy and FID (None when not
    measured). `nonfinite_scale`: None, or the first scale (1-based) where the policy's or the full cache's logits
    were not all finite in some batch: every figure of the row is then meaningless (NaN-derived), and `format_table`
    shows the mark instead. `samples`: float32 [n, H, W, 3] of the first images (for grids; not saved)."""

    agreement: tuple[float, ...]
    top1: tuple[float, ...]
    kl: tuple[float, ...]
    sizes: tuple[int, ...]  # tokens per scale
    slots: int  # sum of the layers' capacities
    full_slots: int
    share: float  # the cache's bytes against the full bfloat16 cache's (`cache.memory_share`)
    psnr: float
    lpips: float | None
    accuracy: float | None = None
    fid: float | None = None
    nonfinite_scale: int | None = None
    samples: np.ndarray = dataclasses.field(repr=False, compare=False, default=None)

    def to_json(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "samples"}
        out.update(token_agreement=self.token_agreement, top1_agreement=self.top1_agreement, mean_kl=self.mean_kl,
                   memory_fraction=self.memory_fraction)
        return out

    @property
    def token_agreement(self) -> float:
        """Over all tokens of an image (scales weighted by their token counts)."""
        return float(np.dot(self.agreement, self.sizes) / sum(self.sizes))

    @property
    def top1_agreement(self) -> float:
        return float(np.dot(self.top1, self.sizes) / sum(self.sizes))

    @property
    def mean_kl(self) -> float:
        return float(np.dot(self.kl, self.sizes) / sum(self.sizes))

    @property
    def memory_fraction(self) -> float:
        return self.share


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def _compare(params, labels_B, cfg, tokens, policy_logits, full_tokens, *, config: ModelConfig, dtype: str):
    """Per-scale sums over rows of (agreement with full_tokens, KL(full-cache guided logits on `tokens` ‖
    policy_logits))."""
    c = config.var
    x = VQVAE(config.vqvae).apply(params["vqvae"], tokens, method=VQVAE.idx_to_var_input)
    labels_2B = sampling.guidance_rows(labels_B, c.num_classes)
    logits_2BLV = VAR(c, dtype=DTYPES[dtype]).apply(params["var"], labels_2B, jnp.repeat(x, 2, axis=0))
    agreement, top1, kl = [], [], []
    for si, (begin, end) in enumerate(c.begin_ends):
        full = sampling.apply_guidance(logits_2BLV[:, begin:end], cfg, sampling.guidance_ratio(si, c.num_scales))
        log_p = jax.nn.log_softmax(full.astype(jnp.float32), axis=-1)
        log_q = jax.nn.log_softmax(policy_logits[si].astype(jnp.float32), axis=-1)
        kl_Bl = jnp.maximum((jnp.exp(log_p) * (log_p - log_q)).sum(-1), 0.0)  # >= 0 up to rounding
        kl.append(kl_Bl.mean(-1).sum())
        agreement.append((tokens[si] == full_tokens[si]).mean(-1).sum())
        top1.append((full.argmax(-1) == policy_logits[si].argmax(-1)).mean(-1).sum())
    return jnp.stack(agreement), jnp.stack(top1), jnp.stack(kl)


def mse(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image mean squared error of images in [0, 1] ([n, H, W, 3] each)."""
    return np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2, axis=(1, 2, 3))


def psnr(mse_values) -> float:
    """PSNR in dB (peak 1) of the mean squared error over all images; inf when every image is identical."""
    with np.errstate(divide="ignore"):
        return float(10 * np.log10(1.0 / np.mean(mse_values)))


def policy_fidelity(
    model, policies: Mapping[str, Policy], labels, key, *, batch: int | None = None, cfg: float = 1.5,
    top_k: int = 900, top_p: float = 0.96, dtype: str = "float32",
    image_distance: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None, kv_dtype: str | None = None,
    classifier=None, real_features: np.ndarray | None = None, progress: bool = False,
) -> dict[str, Fidelity]:
    """Fidelity of each policy against the full cache on `labels`, `batch` images per call (default: all), the
    same PRNG key per batch for every policy. `model`: a `checkpoint.Model`. `image_distance(a, b)` maps two image
    batches in [0, 1] to one distance per image (e.g. LPIPS). The full cache itself is reported as "full" when it is
    among `policies` (agreement 1, KL 0: a check of determinism). `kv_dtype` is the policies' cache storage
    (`quant.py`); the full cache it is compared with always stores the compute dtype. `classifier` (an
    `amskv_jax.classifier.Classifier`) adds class accuracy, and with `real_features` ([N, F], its features of real
    images) the FID of every policy's samples against them. `progress`: a bar on stderr over the generation calls."""
    config: ModelConfig = model.config
    c = config.var
    labels = np.asarray(labels, np.int32)
    batch = batch or len(labels)
    top_k = min(top_k, c.vocab_size)
    layouts = {name: policy.layout(c) for name, policy in policies.items()}
    full_layout = FullCache().layout(c)
    sums = {name: np.zeros((3, c.num_scales)) for name in policies}
    errors = {name: [] for name in policies}
    distances = {name: [] for name in policies}
    hits = {name: [] for name in policies}
    features = {name: [] for name in policies}
    nonfinite = {name: None for name in policies}
    samples = {}
    bar = tqdm(total=-(-len(labels) // batch) * (1 + len(policies)), desc="samples", unit="call", disable=not progress)
    for start in range(0, len(labels), batch):
        chunk = labels[start : start + batch]
        chunk_key = jax.random.fold_in(key, start)
        run = functools.partial(
            generate, model.params, chunk, chunk_key, config=config, cfg=cfg, top_k=top_k, top_p=top_p, dtype=dtype,
            return_logits=True,
        )
        bar.set_postfix_str("full")
        full = run(layout=full_layout)
        bar.update()
        for name, layout in layouts.items():
            bar.set_postfix_str(name)
            out = run(layout=layout, kv_dtype=kv_dtype)
            bar.update()
            agreement, top1, kl = _compare(
                model.params, jnp.asarray(chunk), jnp.float32(cfg), out.tokens, out.logits, full.tokens,
                config=config, dtype=dtype,
            )
            sums[name] += np.stack([np.asarray(agreement), np.asarray(top1), np.asarray(kl)])
            bad = first_nonfinite_scale(np.asarray(out.finite) & np.asarray(full.finite))
            if bad is not None:
                nonfinite[name] = min(bad + 1, nonfinite[name] or bad + 1)
            images, full_images = np.asarray(out.images), np.asarray(full.images)
            errors[name].extend(mse(images, full_images).tolist())
            if image_distance is not None:
                distances[name].extend(np.asarray(image_distance(images, full_images)).ravel().tolist())
            if classifier is not None:
                hits[name].extend((classifier.predict(images).argmax(-1) == chunk).tolist())
                features[name].append(classifier.features(images))
            samples.setdefault(name, images)
    bar.close()
    sizes = tuple(pn * pn for pn in c.patch_nums)
    full_slots = sum(full_layout.capacities)
    return {
        name: Fidelity(
            agreement=tuple((total[0] / len(labels)).tolist()), top1=tuple((total[1] / len(labels)).tolist()),
            kl=tuple((total[2] / len(labels)).tolist()),
            sizes=sizes, slots=sum(layouts[name].capacities), full_slots=full_slots,
            share=memory_share(layouts[name], c.num_heads, c.head_dim, kv_dtype),
            psnr=psnr(errors[name]), lpips=float(np.mean(distances[name])) if distances[name] else None,
            accuracy=float(np.mean(hits[name])) if hits[name] else None,
            fid=fid(np.concatenate(features[name]), real_features) if features[name] and real_features is not None
            else None,
            nonfinite_scale=nonfinite[name], samples=samples[name],
        )
        for name, total in sums.items()
    }


# The frontier's settings: each family at several budgets (`frontier_families`); the searched family comes from
# `calibrate.search_calibrations` at FRONTIER_SEARCH_BUDGETS.
FRONTIER_CUTS = (0.2, 0.35, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)  # 20%, 35%: beside the wider windows
FRONTIER_SEARCH_BUDGETS = (0.1, 0.25, 0.5)


def frontier_families(config: VARConfig, calibration: dict | None = None) -> dict[str, dict[str, Policy]]:
    """{family: {setting: policy}} for the memory–fidelity frontier: the paper's AMS-KV at FRONTIER_CUTS (demanding
    layers from `calibration`'s similarity, the first layers without), sliding windows and condensed-only caches of
    1–4 scales, ScaleKV-like budgets with 1 to depth/2 drafters (by dispersion), and ladders of span 1–3. Settings
    that do not fit the model (too few scales, a cut below the condensed scales) are left out, as are settings
    whose reads repeat an earlier one of the family."""
    depth, scales = config.depth, config.num_scales
    demanding = choose_demanding_layers(DEMANDING_FRACTION, depth, calibration)
    paper = {f"amskv-{round(100 * cut)}": AMSKV.two_level(config.patch_nums, depth, cut, demanding)
             for cut in FRONTIER_CUTS if cut_fits(config.patch_nums, cut)}

    families = {
        "amskv (paper)": paper,
        "sliding": {f"sliding-w{w}": SlidingWindow(w) for w in range(1, min(4, scales - 2) + 1)},
        "condensed": {f"condensed-c{n}": CondensedOnly(n) for n in range(1, min(4, scales - 1) + 1)},
        "scalebudget": {
            f"scalebudget-d{k}": ScaleBudget(drafter_layers=choose_drafter_layers(k, depth, calibration), depth=depth)
            for k in range(1, max(1, depth // 2) + 1)
        },
        "ladder": {f"ladder-s{span}": Ladder(span=span) for span in range(1, min(3, scales - 3) + 1)},
    }
    return {family: distinct(settings, config) for family, settings in families.items()}


def reference_share(slots: int, config: VARConfig) -> float:
    """`slots` against the reference's concatenated cache (every layer holding every scale, the current one
    included: 680 tokens per layer at 256px), the convention the paper's memory figures compare with."""
    return slots / (config.depth * sum(pn * pn for pn in config.patch_nums))


def distinct(policies: Mapping[str, Policy], config: VARConfig) -> dict[str, Policy]:
    """Drop policies whose reads equal an earlier one's on this model (shallow models collapse fractions)."""
    out, seen = {}, set()
    for name, policy in policies.items():
        reads = tuple(plan.reads for plan in policy.layout(config).layers)
        if reads not in seen:
            seen.add(reads)
            out[name] = policy
    return out


def format_table(results: Mapping[str, Fidelity], policies: Mapping[str, Policy]) -> str:
    """A markdown table: memory (the cache's bytes vs the full bfloat16 cache's), FID and class accuracy against real data,
    agreement, KL, PSNR and LPIPS against the full cache, per policy."""
    any_result = next(iter(results.values()))
    scales = len(any_result.sizes)
    lines = [
        "| policy | setting | cache vs full | FID | class accuracy | token agreement | top-1 agreement | mean KL "
        "| PSNR dB | LPIPS | agreement per scale | top-1 per scale | KL per scale |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        if r.nonfinite_scale is not None:
            mark = f"non-finite logits from scale {r.nonfinite_scale}"
            lines.append(f"| {name} | {policies[name].describe()} | {100 * r.memory_fraction:.1f}% | "
                         + " | ".join([mark] * 10) + " |")
            continue
        per_scale = " ".join(f"{a:.2f}" for a in r.agreement)
        top1 = " ".join(f"{a:.2f}" for a in r.top1)
        kl = " ".join(f"{k:.3f}" for k in r.kl)
        lpips = "n/a" if r.lpips is None else f"{r.lpips:.4f}"
        fid_text = "n/a" if r.fid is None else f"{r.fid:.3f}"
        accuracy = "n/a" if r.accuracy is None else f"{r.accuracy:.3f}"
        lines.append(
            f"| {name} | {policies[name].describe()} | {100 * r.memory_fraction:.1f}% | {fid_text} | {accuracy} | "
            f"{r.token_agreement:.3f} | "
            f"{r.top1_agreement:.3f} | {r.mean_kl:.4f} | {r.psnr:.1f} | {lpips} | {per_scale} | {top1} | {kl} |"
        )
    lines.append(f"\n({scales} scales, counted from 1; per-scale columns run from the coarsest to the finest scale.)")
    return "\n".join(lines)
