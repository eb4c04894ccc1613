"""What a model still knows under a cache policy: teacher-forced negative log-likelihood of real images' tokens.

Images are encoded to tokens by the model's own VQ-VAE (`encode_images`); each policy's teacher-forced forward
(`VAR.__call__(..., layout=...)`, which equals cached generation under that layout) scores every token given the
true earlier scales. Per scale we report, in nats per token,

* unguided NLL: −log softmax(conditional logits)[true token] (the training loss, per scale);
* guided NLL: the same under the guided logits the sampler sees at that scale (`sampling.apply_guidance`, the
  guidance ramp `cfg·si/(S−1)`; before top-k/top-p, which would make some true tokens impossible).

No sampling, so the figures are deterministic; ΔNLL against the full cache is the cost of the policy. The layout
enters as its per-layer masks (`layer_masks`, an array argument of `masked_logits`), so one compiled program scores
every layout of a model: the budget search (`search.py`) scores hundreds. The command
line is `python -m bench.fidelity --nll`. Image folders are read with the reference's evaluation transform
(`amskv_jax.train.data.load_image_folder`).
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from amskv_jax import sampling
from amskv_jax.cache import CacheLayout, low_storage, memory_share, teacher_low_mask, teacher_mask
from amskv_jax.config import ModelConfig, VARConfig
from amskv_jax.errors import UserError
from amskv_jax.generate import DTYPES
from amskv_jax.policies import FullCache
from amskv_jax.quant import KV_DTYPES, check_kv_dtype, is_quantized
from amskv_jax.train.configs import CONFIGS, TrainConfig
from amskv_jax.train.data import load_emoji_dataset, load_image_folder
from amskv_jax.train.var_trainer import tokenize
from amskv_jax.var import VAR

@dataclasses.dataclass(frozen=True)
class NLL:
    """Per-scale mean NLL (nats per token, over images and the scale's tokens), unguided and guided; the tokens
    per scale, the layout's slots and the full cache's, and its bytes' share of the full bfloat16 cache's
    (`cache.memory_share`: its storage counted)."""

    unguided: tuple[float, ...]
    guided: tuple[float, ...]
    sizes: tuple[int, ...]
    slots: int
    full_slots: int
    share: float

    @property
    def mean_unguided(self) -> float:
        """Per token over all scales (each weighted by its token count): the teacher-forced training loss."""
        return float(np.dot(self.unguided, self.sizes) / sum(self.sizes))

    @property
    def mean_guided(self) -> float:
        return float(np.dot(self.guided, self.sizes) / sum(self.sizes))

    @property
    def memory_fraction(self) -> float:
        return self.share

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out.update(mean_unguided=self.mean_unguided, mean_guided=self.mean_guided, memory_fraction=self.memory_fraction)
        return out


def training_config(model) -> tuple[str, TrainConfig]:
    """(name, config) of the training config here that built this model (its data is the model's training data)."""
    matches = [(name, cfg) for name, cfg in CONFIGS.items() if cfg.model == model.config]
    if not matches:
        raise UserError("this model has no known training data here; pass --images DIR (one subfolder per class)")
    return matches[0]


def split_images(model, split: str) -> tuple[np.ndarray, np.ndarray, str]:
    """(images in [-1, 1], labels, a line saying what they are): one split ("train" or "heldout") of the data of
    the training config that built `model` (`train.data`'s fixed held-out split)."""
    name, cfg = training_config(model)
    images, labels, _ = load_emoji_dataset(cfg.image_size, cfg.max_per_group, cfg.scheme, split)
    seen = "the model trained on every image" if cfg.split == "all" else f"the model trained on the {cfg.split} split"
    return images, labels, f"the {len(images)} {split}-split images of training config {name} ({cfg.scheme}; {seen})"


def model_images(model, directory: Path | None, split: str) -> tuple[np.ndarray, np.ndarray, str]:
    """(images in [-1, 1], labels, a line saying what they are): the images of `directory` (one subfolder per class,
    named by the model's classes), or else `split_images(model, split)`."""
    if directory is None:
        return split_images(model, split)
    c = model.config
    images, labels = load_image_folder(directory, c.vqvae.image_size, c.var.num_classes, model.classes)
    return images, labels, f"the {len(images)} images of {directory}"


def evenly_spaced(images: np.ndarray, labels: np.ndarray, source: str, limit: int | None):
    """(images, labels, source) cut to at most `limit` of them, evenly spaced over the set (None: all)."""
    if limit is None or limit >= len(images):
        return images, labels, source
    keep = np.linspace(0, len(images) - 1, limit).round().astype(int)
    return images[keep], labels[keep], f"{limit} of {source}, evenly spaced"


def encode_images(model, images_NHWC: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Images in [-1, 1] → (ground-truth tokens int32 [N, L], teacher-forcing inputs float32 [N, L − first_l, Cv])
    by the model's VQ-VAE (`model`: a `checkpoint.Model`)."""
    size = model.config.vqvae.image_size
    if images_NHWC.shape[1:] != (size, size, 3):
        raise UserError(f"images must be [N, {size}, {size}, 3] for this model, got {images_NHWC.shape}")
    return tokenize(model.config.vqvae, model.params["vqvae"], images_NHWC)


# --- the likelihood ----------------------------------------------------------------------------------------------

def check_layout(layout: CacheLayout, config: VARConfig) -> None:
    if len(layout.layers) != config.depth or layout.patch_nums != config.patch_nums:
        raise UserError(
            f"layout for {len(layout.layers)} layers and ladder {layout.patch_nums} does not fit a model of depth "
            f"{config.depth} with ladder {config.patch_nums}"
        )


def layer_masks(layout: CacheLayout) -> np.ndarray:
    """bool [D, L, L]: every layer's teacher-forcing mask under `layout` (`cache.teacher_mask` of its kind)."""
    return teacher_mask(layout)[np.asarray(layout.kind_of)]


def layer_low(layout: CacheLayout) -> tuple[str, np.ndarray] | None:
    """(storage, bool [D, L, L]): every layer's pairs read from its low-precision tier (MiKV,
    `cache.teacher_low_mask` of its kind) and their storage; None when the layout has no such tier."""
    low = teacher_low_mask(layout)
    return None if low is None else (low_storage(layout), low[np.asarray(layout.kind_of)])


def storage_codes(per_layer: tuple[str | None, ...], choices: tuple[str | None, ...] | None = None):
    """(choices, code int32 [D]): each layer's storage dtype as an index into `choices` (default: the distinct ones
    in order), the form `VAR.teacher_states(storage=...)` takes, the codes an argument of the compiled program."""
    choices = tuple(dict.fromkeys(per_layer)) if choices is None else tuple(choices)
    missing = sorted({str(s) for s in per_layer if s not in choices})
    if missing:
        raise ValueError(f"storage dtypes {missing} are not among the choices {choices}")
    return choices, np.asarray([choices.index(s) for s in per_layer], np.int32)


def masked_logits(var_params, labels_B, x_BLCv, masks_DLL, *, config: VARConfig, dtype=jnp.float32,
                  storage: tuple | None = None, low: tuple | None = None):
    """Teacher-forced logits [B, L, V] with layer l attending under masks_DLL[l] (bool [D, L, L], traced) and
    reading earlier scales as its storage holds them (`storage` = (choices, code [D], may be traced); None:
    unquantised) and, with `low` = (kv_dtype, low_DLL), its low-precision tier's pairs (`layer_low`): equal to
    `VAR.apply(params, labels, x, layout)` for masks_DLL = `layer_masks(layout)` (and the layout's storage,
    `storage_codes`). `VAR.teacher_states` with these as arguments, so one compiled program serves every layout of
    a model: the search scores hundreds."""
    logits, _ = VAR(config, dtype=dtype).apply(
        var_params, labels_B, x_BLCv, keep=False, masks=(masks_DLL, np.arange(config.depth)), storage=storage,
        low=low, method=VAR.teacher_states,
    )
    return logits


def _scale_sums(logits_BLV, gt_BL, weight_B, begin_ends) -> jax.Array:
    """float32 [S]: per scale, the sum over rows (weighted) of the mean NLL of the true tokens."""
    out = []
    for begin, end in begin_ends:
        log_p = jax.nn.log_softmax(logits_BLV[:, begin:end].astype(jnp.float32), axis=-1)
        nll_Bl = -jnp.take_along_axis(log_p, gt_BL[:, begin:end, None], axis=-1)[..., 0]
        out.append((nll_Bl.mean(-1) * weight_B).sum())
    return jnp.stack(out)


@functools.partial(jax.jit, static_argnames=("config", "dtype", "choices", "low_dtype"))
def _nll_sums(var_params, labels_B, gt_BL, x_BLCv, weight_B, cfg, masks_DLL, codes_D, low_DLL, *, config: VARConfig,
              dtype, choices, low_dtype):
    """Per-scale sums over rows (weighted by weight_B, 0 for padding) of the mean unguided and guided NLL."""
    c = config
    labels_2B = sampling.guidance_rows(labels_B, c.num_classes)
    logits_2BLV = masked_logits(var_params, labels_2B, jnp.repeat(x_BLCv, 2, axis=0), masks_DLL, config=c,
                                dtype=DTYPES[dtype], storage=(choices, codes_D),
                                low=None if low_dtype is None else (low_dtype, low_DLL))
    mixed = [sampling.apply_guidance(logits_2BLV[:, b:e], cfg, sampling.guidance_ratio(si, c.num_scales))
             for si, (b, e) in enumerate(c.begin_ends)]
    return (_scale_sums(logits_2BLV[0::2], gt_BL, weight_B, c.begin_ends),
            _scale_sums(jnp.concatenate(mixed, axis=1), gt_BL, weight_B, c.begin_ends))


@functools.partial(jax.jit, static_argnames=("config", "dtype", "choices", "low_dtype"))
def _unguided_sums(var_params, labels_B, gt_BL, x_BLCv, weight_B, masks_DLL, codes_D, low_DLL, *,
                   config: VARConfig, dtype, choices, low_dtype):
    """`_nll_sums`' unguided half from the conditional rows alone: half the work, for the budget search."""
    logits_BLV = masked_logits(var_params, labels_B, x_BLCv, masks_DLL, config=config, dtype=DTYPES[dtype],
                               storage=(choices, codes_D), low=None if low_dtype is None else (low_dtype, low_DLL))
    return _scale_sums(logits_BLV, gt_BL, weight_B, config.begin_ends)


def check_storages(storages, head_dim: int) -> None:
    """Teacher forcing reproduces quantised caches and unquantised ones (None): raise UserError for another."""
    for kv_dtype in storages:
        if check_kv_dtype(kv_dtype, head_dim) is not None and not is_quantized(kv_dtype):
            raise UserError(f"kv_dtype {kv_dtype!r}: teacher forcing reproduces quantised caches "
                             f"({', '.join(k for k in KV_DTYPES if is_quantized(k))}) or None")


def _padded_batches(n: int, batch: int):
    """(row indices [batch], weights [batch]) covering rows 0..n-1, the last batch padded with row n-1 at weight 0,
    so every call has one shape (one compiled program)."""
    batch = min(batch, n)
    for start in range(0, n, batch):
        rows = np.arange(start, start + batch)
        yield np.minimum(rows, n - 1), (rows < n).astype(np.float32)


def unguided_nll(model, layout: CacheLayout, gt_NL: np.ndarray, x_NLCv: np.ndarray, labels_N: np.ndarray, *,
                 batch: int = 64, dtype: str = "float32", choices: tuple[str | None, ...] | None = None) -> float:
    """The mean unguided NLL per token (scales weighted by their token counts) of these images under `layout`
    (its layers' storage too): `policy_nll(...).mean_unguided` without the unconditional rows (the budget search's
    score). `choices`: the storage dtypes the compiled program can pick per layer (default: the layout's); a
    search passes all it tries, so that every candidate runs one program."""
    c = model.config.var
    check_layout(layout, c)
    choices, codes = storage_codes(layout.storages(None), choices)
    check_storages(choices, c.head_dim)
    masks, n = jnp.asarray(layer_masks(layout)), len(gt_NL)
    low_dtype, low_masks = layer_low(layout) or (None, None)
    sums = np.zeros(c.num_scales)
    for rows, weight in _padded_batches(n, batch):
        sums += np.asarray(_unguided_sums(
            model.params["var"], jnp.asarray(labels_N[rows], jnp.int32), jnp.asarray(gt_NL[rows]),
            jnp.asarray(x_NLCv[rows]), jnp.asarray(weight), masks, jnp.asarray(codes), low_masks, config=c,
            dtype=dtype, choices=choices, low_dtype=low_dtype,
        ), np.float64)
    sizes = np.array([pn * pn for pn in c.patch_nums])
    return float(np.dot(sums / n, sizes) / sizes.sum())


def policy_nll(
    model, layouts: Mapping[str, CacheLayout], gt_NL: np.ndarray, x_NLCv: np.ndarray, labels_N: np.ndarray, *,
    cfg: float = 1.5, batch: int = 64, dtype: str = "float32", kv_dtype: str | None = None, progress: bool = False,
) -> dict[str, NLL]:
    """Teacher-forced NLL of the tokens `gt_NL` (inputs `x_NLCv`, classes `labels_N`) under each layout, `batch`
    images per call (the last call padded; the layouts' masks are an argument, so one program serves them all).
    `model`: a `checkpoint.Model`; `kv_dtype` reproduces a quantised cache (`quant.py`); `progress`: a bar on stderr
    over the layouts' batches."""
    config: ModelConfig = model.config
    c = config.var
    check_storages((kv_dtype,), c.head_dim)
    for layout in layouts.values():
        check_layout(layout, c)
        check_storages(layout.storages(kv_dtype), c.head_dim)
    n = len(gt_NL)
    if not n == len(x_NLCv) == len(labels_N):
        raise UserError(f"tokens, inputs and labels differ in count: {n}, {len(x_NLCv)}, {len(labels_N)}")
    full_slots = sum(FullCache().layout(c).capacities)
    out = {}
    bar = tqdm(total=len(layouts) * -(-n // batch), desc="teacher-forced NLL", unit="batch", disable=not progress)
    for name, layout in layouts.items():
        bar.set_postfix_str(name + ("" if kv_dtype is None else f"+{kv_dtype}"))
        masks = jnp.asarray(layer_masks(layout))
        choices, codes = storage_codes(layout.storages(kv_dtype))
        low_dtype, low_masks = layer_low(layout) or (None, None)
        sums = np.zeros((2, c.num_scales))
        for rows, weight in _padded_batches(n, batch):
            unguided, guided = _nll_sums(
                model.params["var"], jnp.asarray(labels_N[rows], jnp.int32), jnp.asarray(gt_NL[rows]),
                jnp.asarray(x_NLCv[rows]), jnp.asarray(weight), jnp.float32(cfg), masks, jnp.asarray(codes),
                low_masks, config=c, dtype=dtype, choices=choices, low_dtype=low_dtype,
            )
            sums += np.stack([np.asarray(unguided, np.float64), np.asarray(guided, np.float64)])
            bar.update()
        out[name] = NLL(
            unguided=tuple((sums[0] / n).tolist()), guided=tuple((sums[1] / n).tolist()),
            sizes=tuple(pn * pn for pn in c.patch_nums), slots=sum(layout.capacities), full_slots=full_slots,
            share=memory_share(layout, c.num_heads, c.head_dim, kv_dtype),
        )
    bar.close()
    return out


def format_nll_table(results: Mapping[str, NLL], reference: str = "full") -> str:
    """Markdown: per policy the cache against the full cache, mean unguided and guided NLL with ΔNLL against
    `reference` (nats and % of its NLL; n/a without it), and the per-scale NLLs. A row named "<model>/<policy>"
    (e.g. a fine-tuned copy's, `bench.fidelity --finetuned`) is compared with "<model>/<reference>"."""

    def delta(value: float, base: float | None) -> str:
        return "n/a | n/a" if base is None else f"{value - base:+.4f} | {100 * (value - base) / base:+.2f}%"

    lines = [
        "| policy | cache vs full | NLL | ΔNLL | ΔNLL % | guided NLL | guided ΔNLL | guided ΔNLL % "
        "| NLL per scale | guided NLL per scale |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        ref = results.get(name[: name.rfind("/") + 1] + reference)
        unguided = delta(r.mean_unguided, ref and ref.mean_unguided)
        guided = delta(r.mean_guided, ref and ref.mean_guided)
        lines.append(
            f"| {name} | {100 * r.memory_fraction:.1f}% | {r.mean_unguided:.4f} | {unguided} | {r.mean_guided:.4f} | "
            f"{guided} | {' '.join(f'{v:.3f}' for v in r.unguided)} | {' '.join(f'{v:.3f}' for v in r.guided)} |"
        )
    lines.append(f"\n(nats per token; per-scale columns run from the coarsest to the finest scale; Δ against "
                 f"`{reference}` of the same model.)")
    return "\n".join(lines)
