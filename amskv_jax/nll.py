"""What a model still knows under a cache policy: teacher-forced negative log-likelihood of real images' tokens.

Images are encoded to tokens by the model's own VQ-VAE (`encode_images`); each policy's teacher-forced forward
(`VAR.__call__(..., layout=...)`, which equals cached generation under that layout) scores every token given the
true earlier scales. Per scale we report, in nats per token,

* unguided NLL: −log softmax(conditional logits)[true token] (the training loss, per scale);
* guided NLL: the same under the guided logits the sampler sees at that scale (`sampling.apply_guidance`, the
  guidance ramp `cfg·si/(S−1)`; before top-k/top-p, which would make some true tokens impossible).

No sampling, so the figures are deterministic; ΔNLL against the full cache is the cost of the policy. The command
line is `python -m bench.fidelity --nll`. Image folders are read with the reference's evaluation transform
(`load_image_folder`).
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from amskv_jax import sampling
from amskv_jax.cache import CacheLayout
from amskv_jax.config import ModelConfig, VARConfig
from amskv_jax.generate import DTYPES
from amskv_jax.policies import FullCache
from amskv_jax.quant import KV_DTYPES, check_kv_dtype, is_quantized
from amskv_jax.train.var_trainer import tokenize
from amskv_jax.var import VAR

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclasses.dataclass(frozen=True)
class NLL:
    """Per-scale mean NLL (nats per token, over images and the scale's tokens), unguided and guided; the tokens
    per scale, and the layout's slots against the full cache's."""

    unguided: tuple[float, ...]
    guided: tuple[float, ...]
    sizes: tuple[int, ...]
    slots: int
    full_slots: int

    @property
    def mean_unguided(self) -> float:
        """Per token over all scales (each weighted by its token count): the teacher-forced training loss."""
        return float(np.dot(self.unguided, self.sizes) / sum(self.sizes))

    @property
    def mean_guided(self) -> float:
        return float(np.dot(self.guided, self.sizes) / sum(self.sizes))

    @property
    def memory_fraction(self) -> float:
        return self.slots / self.full_slots

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out.update(mean_unguided=self.mean_unguided, mean_guided=self.mean_guided, memory_fraction=self.memory_fraction)
        return out


# --- images ------------------------------------------------------------------------------------------------------

def reference_transform(image, final: int) -> np.ndarray:
    """VAR's evaluation transform (reference `utils/data.py`): resize the shorter side to round(1.125·final) with
    LANCZOS (the longer side as torchvision computes it), centre-crop final×final, map to [-1, 1].
    `image`: a PIL image. Returns float32 [final, final, 3]."""
    from PIL import Image

    image = image.convert("RGB")
    mid = round(final * 1.125)
    w, h = image.size
    size = (mid, int(mid * h / w)) if w <= h else (int(mid * w / h), mid)
    image = image.resize(size, Image.Resampling.LANCZOS)
    left, top = int(round((size[0] - final) / 2.0)), int(round((size[1] - final) / 2.0))
    image = image.crop((left, top, left + final, top + final))
    return np.asarray(image, np.float32) / 127.5 - 1.0


def folder_classes(directory: Path, classes: tuple[str, ...] | None, num_classes: int) -> dict[Path, int]:
    """The class of each subfolder: its index in the model's class names when it is one of them, else its name when
    that is an integer, else its position in sorted order (torchvision's ImageFolder, so ImageNet's synset
    folders n01440764 ... map to 0..999)."""
    subdirs = sorted(p for p in directory.iterdir() if p.is_dir())
    if not subdirs:
        raise ValueError(
            f"{directory}: no class subfolders; put the images in one subfolder per class "
            f"(named by class index, by the model's class names, or ImageFolder-style in sorted order)"
        )
    out = {}
    for position, sub in enumerate(subdirs):
        if classes is not None and sub.name in classes:
            out[sub] = classes.index(sub.name)
        elif sub.name.isdigit():
            out[sub] = int(sub.name)
        else:
            out[sub] = position
    bad = {p.name: label for p, label in out.items() if not 0 <= label < num_classes}
    if bad:
        raise ValueError(f"{directory}: class folders {bad} are outside the model's classes 0..{num_classes - 1}")
    return out


def load_image_folder(
    directory: str | Path, final: int, num_classes: int, classes: tuple[str, ...] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Every PNG/JPEG under `directory`/<class>/ as (float32 [N, final, final, 3] in [-1, 1], int32 labels [N]),
    resized with `reference_transform`. Raises for a missing folder, no images, or an unreadable file."""
    from PIL import Image, UnidentifiedImageError

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such image folder")
    images, labels = [], []
    for sub, label in folder_classes(directory, classes, num_classes).items():
        for path in sorted(p for p in sub.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
            try:
                with Image.open(path) as image:
                    images.append(reference_transform(image, final))
            except (UnidentifiedImageError, OSError) as err:
                raise ValueError(f"{path}: cannot read the image ({err})") from None
            labels.append(label)
    if not images:
        raise ValueError(f"{directory}: no images ({', '.join(IMAGE_SUFFIXES)}) in its class subfolders")
    return np.stack(images), np.asarray(labels, np.int32)


def encode_images(model, images_NHWC: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Images in [-1, 1] → (ground-truth tokens int32 [N, L], teacher-forcing inputs float32 [N, L − first_l, Cv])
    by the model's VQ-VAE (`model`: a `checkpoint.Model`)."""
    size = model.config.vqvae.image_size
    if images_NHWC.shape[1:] != (size, size, 3):
        raise ValueError(f"images must be [N, {size}, {size}, 3] for this model, got {images_NHWC.shape}")
    return tokenize(model.config.vqvae, model.params["vqvae"], images_NHWC)


# --- the likelihood ----------------------------------------------------------------------------------------------

def check_layout(layout: CacheLayout, config: VARConfig) -> None:
    if len(layout.layers) != config.depth or layout.patch_nums != config.patch_nums:
        raise ValueError(
            f"layout for {len(layout.layers)} layers and ladder {layout.patch_nums} does not fit a model of depth "
            f"{config.depth} with ladder {config.patch_nums}"
        )


@functools.partial(jax.jit, static_argnames=("config", "layout", "dtype", "kv_dtype"))
def _nll_sums(var_params, labels_B, gt_BL, x_BLCv, weight_B, cfg, *, config: VARConfig, layout, dtype, kv_dtype):
    """Per-scale sums over rows (weighted by weight_B, 0 for padding) of the mean unguided and guided NLL."""
    c = config
    labels_2B = sampling.guidance_rows(labels_B, c.num_classes)
    forward = VAR(c, dtype=DTYPES[dtype])
    extra = {} if kv_dtype is None else {"kv_dtype": kv_dtype}
    logits_2BLV = forward.apply(var_params, labels_2B, jnp.repeat(x_BLCv, 2, axis=0), layout=layout, **extra)
    unguided, guided = [], []
    for si, (begin, end) in enumerate(c.begin_ends):
        gt = gt_BL[:, begin:end, None]
        cond = logits_2BLV[0::2, begin:end].astype(jnp.float32)
        mixed = sampling.apply_guidance(logits_2BLV[:, begin:end], cfg, sampling.guidance_ratio(si, c.num_scales))
        for out, logits in ((unguided, cond), (guided, mixed)):
            nll_Bl = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), gt, axis=-1)[..., 0]
            out.append((nll_Bl.mean(-1) * weight_B).sum())
    return jnp.stack(unguided), jnp.stack(guided)


def policy_nll(
    model, layouts: Mapping[str, CacheLayout], gt_NL: np.ndarray, x_NLCv: np.ndarray, labels_N: np.ndarray, *,
    cfg: float = 1.5, batch: int = 64, dtype: str = "float32", kv_dtype: str | None = None,
) -> dict[str, NLL]:
    """Teacher-forced NLL of the tokens `gt_NL` (inputs `x_NLCv`, classes `labels_N`) under each layout, `batch`
    images per call (the last call padded, so one program serves all). `model`: a `checkpoint.Model`; `kv_dtype`
    reproduces a quantised cache (`quant.py`)."""
    config: ModelConfig = model.config
    c = config.var
    if check_kv_dtype(kv_dtype, c.head_dim) is not None and not is_quantized(kv_dtype):
        raise ValueError(f"kv_dtype {kv_dtype!r}: teacher forcing reproduces quantised caches "
                         f"({', '.join(k for k in KV_DTYPES if is_quantized(k))}) or None")
    for layout in layouts.values():
        check_layout(layout, c)
    n = len(gt_NL)
    if not n == len(x_NLCv) == len(labels_N):
        raise ValueError(f"tokens, inputs and labels differ in count: {n}, {len(x_NLCv)}, {len(labels_N)}")
    batch = min(batch, n)
    full_slots = sum(FullCache().layout(c).capacities)
    out = {}
    for name, layout in layouts.items():
        sums = np.zeros((2, c.num_scales))
        for start in range(0, n, batch):
            rows = np.arange(start, start + batch)
            weight = (rows < n).astype(np.float32)
            rows = np.minimum(rows, n - 1)
            unguided, guided = _nll_sums(
                model.params["var"], jnp.asarray(labels_N[rows], jnp.int32), jnp.asarray(gt_NL[rows]),
                jnp.asarray(x_NLCv[rows]), jnp.asarray(weight), jnp.float32(cfg), config=c, layout=layout,
                dtype=dtype, kv_dtype=kv_dtype,
            )
            sums += np.stack([np.asarray(unguided, np.float64), np.asarray(guided, np.float64)])
        out[name] = NLL(
            unguided=tuple((sums[0] / n).tolist()), guided=tuple((sums[1] / n).tolist()),
            sizes=tuple(pn * pn for pn in c.patch_nums), slots=sum(layout.capacities), full_slots=full_slots,
        )
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
