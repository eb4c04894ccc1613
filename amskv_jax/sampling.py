"""Sampling as the reference does it (`models/helpers.py`, `VAR.autoregressive_infer_cfg`).

* Guidance ramps with the scale: `t = cfg · si/(S-1)`, `logits = (1+t)·cond − t·uncond`. The batch is doubled with
  the rows of each image side by side, `[l0, null, l1, null, ...]` (`guidance_rows`), so that splitting rows over
  devices keeps both rows of an image together (the reference stacks the halves instead; the math is the same).
* top-k keeps the logits ≥ the k-th largest (ties at the boundary kept); top-p sorts ascending and removes the
  tokens whose cumulative softmax is ≤ 1 − top_p, always keeping the largest (ties at its boundary kept too). Both
  are thresholds on one sort of the values, and the largest logit always stays. Removed logits become −inf.
* The draw is by inverse transform, as `torch.multinomial` draws: one uniform per token, all of a generation's
  made at once before the scale loop (`token_uniforms`), each image's from its own key (`image_keys`).
* `more_smooth` replaces the hard code vector by a Gumbel-softmax mixture of code vectors, with temperature
  `max(0.27·(1 − 0.95·ratio), 0.005)` on `logits·(1 + ratio)`.

`top_k` is static (it sets a `lax.top_k` size; 0 = off); `cfg` and `top_p` may be traced (top_p 0 = off).
Shapes: B rows, l tokens of one scale, V vocabulary.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def guidance_ratio(si: int, num_scales: int) -> float:
    """si/(S-1): 0 at the first scale, 1 at the last."""
    return si / (num_scales - 1)


def guidance_rows(labels_B: jax.Array, num_classes: int) -> jax.Array:
    """[B] -> [2B]: each image's class, then the null class (`num_classes`). Inputs follow with `jnp.repeat(x, 2)`."""
    return jnp.stack([labels_B, jnp.full_like(labels_B, num_classes)], axis=1).reshape(-1)


def apply_guidance(logits_2BlV: jax.Array, cfg, ratio: float) -> jax.Array:
    """Combine each image's conditional and unconditional rows (`guidance_rows` order): [2B, l, V] -> [B, l, V]."""
    pairs = logits_2BlV.astype(jnp.float32).reshape(-1, 2, *logits_2BlV.shape[1:])
    cond, uncond = pairs[:, 0], pairs[:, 1]
    t = cfg * ratio
    return (1 + t) * cond - t * uncond


def top_k_top_p_filter(logits_BlV: jax.Array, top_k: int, top_p) -> jax.Array:
    """Set the logits outside the top-k and top-p support to −inf (float32 in, float32 out).

    One sort of the values, no indices: both filters remove a prefix of the ascending order, so each becomes a
    threshold (the k-th largest value; the smallest value top-p keeps) and the vocabulary is compared against it.
    The reference's three sorts (top-k, argsort, and the inverse permutation) give the same support except at exact
    ties straddling the top-p boundary, where this keeps every tied token (as top-k does) and the reference keeps
    those its sort order puts last.

    The largest logit (its argmax) is always kept. XLA may compute the logits once for the sort and again, fused
    into the comparison, rounded differently by an ulp; a threshold a hair above every value then removed the whole
    row, and the draw from an empty support was token 0 (a greedy generation drew it for 5 of a scale's 32 tokens;
    tests/test_generate.py).
    """
    logits = logits_BlV.astype(jnp.float32)
    sorted_logits = jnp.sort(logits, axis=-1)  # ascending, as the reference sorts
    removed = jnp.zeros(logits.shape, bool)
    if top_k > 0:
        kth = sorted_logits[..., -top_k:][..., :1]
        removed = logits < kth
        sorted_logits = jnp.where(sorted_logits < kth, -jnp.inf, sorted_logits)
    top_p = jnp.asarray(top_p, jnp.float32)
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    below = jnp.sum((cumulative <= 1 - top_p).at[..., -1].set(False), axis=-1, keepdims=True)  # a prefix
    smallest_kept = jnp.take_along_axis(sorted_logits, below, axis=-1)
    removed |= (top_p > 0) & (logits < smallest_kept)
    largest = jnp.arange(logits.shape[-1]) == jnp.argmax(logits, axis=-1, keepdims=True)
    return jnp.where(removed & ~largest, -jnp.inf, logits)


def image_keys(key: jax.Array, image_B: jax.Array) -> jax.Array:
    """Each image's two keys, [B, 2]: its draws' (`token_uniforms`) and its `more_smooth` noise's, split from
    `fold_in(key, image index)`, so that an image's draws do not depend on which other images share its batch or
    its chunk (`chunks.map_in_chunks`)."""
    return jax.vmap(lambda i: jax.random.split(jax.random.fold_in(key, i)))(image_B)


def token_uniforms(draw_keys_B: jax.Array, num_tokens: int) -> jax.Array:
    """One uniform in (0, 1] per token of the whole generation, image b's from draw_keys_B[b]: float32 [B, L].

    Drawn once, before the scale loop, and sliced per scale: one random-bit generation for the program instead of
    one per scale (threefry's unrolled rounds were a quarter of `generate`'s compile time, bench/RESULTS.md), and L
    numbers per image instead of the L·V a Gumbel-max draw needs."""
    return jax.vmap(lambda k: 1 - jax.random.uniform(k, (num_tokens,), jnp.float32))(draw_keys_B)


def sample_tokens(uniforms_Bl: jax.Array, logits_BlV: jax.Array) -> jax.Array:
    """One draw per token from softmax(logits) by inverse transform, as `torch.multinomial` draws: the first token
    whose cumulative probability reaches u·total, for u in (0, 1] (`token_uniforms`). A removed (−inf) token has
    an empty interval and is never drawn. int32 [B, l]."""
    cumulative = jnp.cumsum(jax.nn.softmax(logits_BlV.astype(jnp.float32), axis=-1), axis=-1)
    target = uniforms_Bl[..., None] * cumulative[..., -1:]
    return jnp.sum(cumulative < target, axis=-1).astype(jnp.int32)


def gumbel_smooth(keys_B: jax.Array, logits_BlV: jax.Array, ratio: float, codebook_VC: jax.Array) -> jax.Array:
    """The `more_smooth` code vectors: softmax((logits·(1+ratio) + Gumbel)/tau) @ codebook -> [B, l, Cvae], image
    b's noise from keys_B[b] (one key per image and scale: `image_keys`' second, folded with the scale)."""
    tau = max(0.27 * (1 - 0.95 * ratio), 0.005)
    gumbels = jax.vmap(lambda k: jax.random.gumbel(k, logits_BlV.shape[1:], jnp.float32))(keys_B)
    weights = jax.nn.softmax((logits_BlV * (1 + ratio) + gumbels) / tau, axis=-1)
    return weights @ codebook_VC
