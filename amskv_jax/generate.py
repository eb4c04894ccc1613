"""Class-conditional generation with an explicit, policy-shaped KV cache, and the main command line.

`generate(params, labels, key, config=..., ...)` is a pure function: the scale loop unrolls at trace time (shapes
differ per scale), everything that changes shapes is static (config, layout, top_k, dtype, attention impl), and
labels, PRNG key, guidance and top-p are arrays, so one compiled program serves every call of the same batch size.

    python -m amskv_jax.generate --model tiny --labels 1,2,3 --out grid.png
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from amskv_jax import sampling
from amskv_jax.attention import check_impl
from amskv_jax.cache import CacheLayout, init_cache
from amskv_jax.config import ModelConfig
from amskv_jax.policies import FullCache
from amskv_jax.var import VAR
from amskv_jax.vqvae import VQVAE

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class Generation:
    """tokens: one int32 [B, pn²] array per scale; images: float32 [B, H, W, 3] in [0, 1]; logits: the guided
    float32 logits [B, pn², V] the sampler received at each scale (only with `return_logits=True`, else empty)."""

    tokens: tuple[jax.Array, ...]
    images: jax.Array
    logits: tuple[jax.Array, ...] = ()


jax.tree_util.register_dataclass(Generation, data_fields=["tokens", "images", "logits"], meta_fields=[])


def default_top_k(config: ModelConfig) -> int:
    """The reference's top_k of 900, capped at the vocabulary (small models have fewer codes)."""
    return min(900, config.var.vocab_size)


def validate(config: ModelConfig, labels, *, top_k: int, top_p, dtype: str, impl: str = "xla") -> None:
    """Boundary checks with messages that say what is allowed (labels only when concrete)."""
    if np.ndim(labels) != 1 or np.shape(labels)[0] == 0:
        raise ValueError(f"labels must be a non-empty 1-D array (one class per image), got shape {np.shape(labels)}")
    if not isinstance(labels, jax.core.Tracer):
        bad = [int(x) for x in np.asarray(labels) if not 0 <= x < config.var.num_classes]
        if bad:
            raise ValueError(f"labels {bad} out of range; allowed: 0..{config.var.num_classes - 1}")
    check_impl(impl)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    if not 0 <= top_k <= config.var.vocab_size:
        raise ValueError(f"top_k must be in [0, {config.var.vocab_size}] (0 = off), got {top_k}")
    if isinstance(top_p, (int, float)) and not 0 <= top_p <= 1:
        raise ValueError(f"top_p must be in [0, 1] (0 = off), got {top_p}")


def generate(
    params,
    labels,
    key,
    *,
    config: ModelConfig,
    layout: CacheLayout | None = None,
    cfg=1.5,
    top_k: int | None = None,
    top_p=0.96,
    more_smooth: bool = False,
    dtype: str = "float32",
    impl: str = "xla",
    progress: bool = False,
    return_logits: bool = False,
) -> Generation:
    """Generate len(labels) images. params = {"var": ..., "vqvae": ...}; layout defaults to the full cache.

    `top_k=None` is the reference's 900 capped at the vocabulary; 0 turns top-k off, as top_p=0 turns top-p off.
    Guidance ramps from 0 at the first scale to `cfg` at the last (the reference's `t = cfg·si/(S-1)`).
    `progress` prints a line from the device as each scale's tokens are drawn (a host callback per scale);
    `return_logits` also returns each scale's guided logits (memory: B·L·V floats).
    """
    top_k = default_top_k(config) if top_k is None else top_k
    validate(config, labels, top_k=top_k, top_p=top_p, dtype=dtype, impl=impl)
    layout = layout if layout is not None else FullCache().layout(config.var)
    if len(layout.layers) != config.var.depth or layout.patch_nums != config.var.patch_nums:
        raise ValueError(
            f"layout for {len(layout.layers)} layers and ladder {layout.patch_nums} does not fit a model of depth "
            f"{config.var.depth} with ladder {config.var.patch_nums}"
        )
    return _generate(
        params, jnp.asarray(labels, jnp.int32), key, jnp.float32(cfg), jnp.float32(top_p),
        config=config, layout=layout, top_k=top_k, more_smooth=more_smooth, dtype=dtype, impl=impl,
        progress=progress, return_logits=return_logits,
    )


def _report_scale(si: int, num_scales: int, pn: int, _tokens) -> None:
    print(f"scale {si + 1}/{num_scales}: {pn}x{pn} tokens", flush=True)


@functools.partial(
    jax.jit,
    static_argnames=("config", "layout", "top_k", "more_smooth", "dtype", "impl", "progress", "return_logits"),
)
def _generate(
    params, labels_B, key, cfg, top_p, *, config, layout, top_k, more_smooth, dtype, impl, progress, return_logits
):
    c = config.var
    var = VAR(c, dtype=DTYPES[dtype], impl=impl)
    vqvae = VQVAE(config.vqvae)
    batch = labels_B.shape[0]
    label_2B = jnp.concatenate([labels_B, jnp.full_like(labels_B, c.num_classes)])
    cond_BD = var.apply(params["var"], label_2B, method=VAR.condition)
    x = var.apply(params["var"], cond_BD, method=VAR.first_input)
    cache = init_cache(layout, 2 * batch, c.num_heads, c.head_dim, DTYPES[dtype])
    codebook = params["vqvae"]["params"]["quantize"]["embedding"]["embedding"]
    pn_last = c.patch_nums[-1]
    f_hat = jnp.zeros((batch, pn_last, pn_last, c.cvae), jnp.float32)
    tokens, guided = [], []
    for si, pn in enumerate(c.patch_nums):
        logits, cache = var.apply(params["var"], x, cond_BD, cache, si, layout, method=VAR.step)
        ratio = sampling.guidance_ratio(si, c.num_scales)
        logits = sampling.apply_guidance(logits, cfg, ratio)
        if return_logits:
            guided.append(logits)
        key, draw_key, smooth_key = jax.random.split(key, 3)
        logits = sampling.top_k_top_p_filter(logits, top_k, top_p)
        idx_Bl = sampling.sample_tokens(draw_key, logits)
        tokens.append(idx_Bl)
        if progress:
            jax.debug.callback(functools.partial(_report_scale, si, c.num_scales, pn), idx_Bl, ordered=True)
        if more_smooth:
            h_BlC = sampling.gumbel_smooth(smooth_key, logits, ratio, codebook.astype(jnp.float32))
        else:
            h_BlC = codebook[idx_Bl].astype(jnp.float32)
        f_hat, next_BlCv = vqvae.apply(
            params["vqvae"], si, f_hat, h_BlC.reshape(batch, pn, pn, c.cvae), method=VQVAE.next_input
        )
        if next_BlCv is not None:
            x = var.apply(params["var"], si + 1, next_BlCv, method=VAR.next_input)
            x = jnp.concatenate([x, x])
    images = vqvae.apply(params["vqvae"], f_hat, method=VQVAE.decode)
    return Generation(tokens=tuple(tokens), images=(images.astype(jnp.float32) + 1) * 0.5, logits=tuple(guided))


def image_grid(images_BHWC: np.ndarray, columns: int) -> np.ndarray:
    """Tile images [B, H, W, 3] in [0, 1] into one uint8 grid of `columns` columns, 2-pixel white gutters."""
    b, h, w, _ = images_BHWC.shape
    rows = -(-b // columns)
    grid = np.full((rows * (h + 2) + 2, columns * (w + 2) + 2, 3), 255, np.uint8)
    pixels = np.clip(np.asarray(images_BHWC) * 255 + 0.5, 0, 255).astype(np.uint8)
    for i, img in enumerate(pixels):
        r, col = divmod(i, columns)
        grid[2 + r * (h + 2) : 2 + r * (h + 2) + h, 2 + col * (w + 2) : 2 + col * (w + 2) + w] = img
    return grid


def main(argv=None) -> int:
    from PIL import Image

    from amskv_jax.checkpoint import load_model

    parser = argparse.ArgumentParser(prog="python -m amskv_jax.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="a preset name (random weights) or a converted checkpoint dir")
    parser.add_argument("--labels", default=None, help="comma-separated class indices (default: 0..batch-1)")
    parser.add_argument("--batch", type=int, default=None, help="images per label list repeat (default: 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cfg", type=float, default=1.5, help="classifier-free guidance at the last scale")
    parser.add_argument("--top-k", type=int, default=None, help="default: 900, capped at the vocabulary; 0 = off")
    parser.add_argument("--top-p", type=float, default=0.96)
    parser.add_argument("--more-smooth", action="store_true", help="Gumbel-softmax code mixtures (visualisation)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--out", default="grid.png")
    args = parser.parse_args(argv)

    try:
        model = load_model(args.model)
        labels = _labels(args.labels, args.batch, model.config.var.num_classes)
        top_k = default_top_k(model.config) if args.top_k is None else args.top_k
        validate(model.config, labels, top_k=top_k, top_p=args.top_p, dtype=args.dtype)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    print(f"model {args.model}: {model.description}; {len(labels)} images, labels {labels.tolist()}", flush=True)

    start = time.perf_counter()
    out = generate(
        model.params, labels, jax.random.key(args.seed), config=model.config, cfg=args.cfg, top_k=top_k,
        top_p=args.top_p, more_smooth=args.more_smooth, dtype=args.dtype, progress=True,
    )
    images = np.asarray(jax.block_until_ready(out.images))
    seconds = time.perf_counter() - start
    Image.fromarray(image_grid(images, columns=min(len(labels), 8))).save(args.out)
    print(f"wrote {args.out}: {len(labels)} images in {seconds:.2f} s ({len(labels) / seconds:.2f} images/s, "
          "compilation included)")
    return 0


def _labels(text: str | None, batch: int | None, num_classes: int) -> np.ndarray:
    if batch is not None and batch < 1:
        raise ValueError(f"--batch must be >= 1, got {batch}")
    if text is None:
        return np.arange(batch or 8, dtype=np.int32) % num_classes
    try:
        labels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--labels must be comma-separated integers, got {text!r}") from None
    return np.asarray(labels * (batch or 1), np.int32)


if __name__ == "__main__":
    sys.exit(main())
