"""The VAR transformer in Flax Linen (reference `models/var.py`, `models/basic_var.py`).

Module and parameter names follow the reference's state-dict keys (see `convert/mapping.py`), so a converted
checkpoint is the params tree. Two ways to run it:

* `__call__(label_B, x_BLCv)`: teacher forcing over all L tokens with the block-causal mask (training, parity).
* `step(x_BlC, cond_BD, cache, si, layout)`: one scale of generation; reads and writes the explicit `KVCache`
  (cache in, cache out; no module state), returning logits for that scale's tokens. The cache decides its own
  storage (`init_cache(..., kv_dtype=...)`, `quant.py`): a quantised one is dequantised by the attention and
  quantised on write, with the layout's static K-scale groups.

Embeddings, LayerNorms, softmax, the head and its AdaLN run in float32 as the reference does; the blocks' matmuls
run in `dtype` (float32 or bfloat16). Shapes: B rows, l tokens of one scale, L all tokens, C width, V vocabulary.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from amskv_jax.attention import cached_attention, masked_attention, prepare_qk
from amskv_jax.cache import CacheLayout, KVCache, LayerCache, LayerLayout
from amskv_jax.config import VARConfig


def layer_norm(x: jax.Array, eps: float) -> jax.Array:
    """LayerNorm without affine parameters, in float32."""
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


def block_causal_mask(patch_nums: tuple[int, ...]) -> np.ndarray:
    """bool [L, L]: token t may attend token u iff level[u] <= level[t]."""
    level = np.concatenate([np.full(pn * pn, si) for si, pn in enumerate(patch_nums)])
    return level[None, :] <= level[:, None]


def layout_masks(layout: CacheLayout) -> list[np.ndarray]:
    """bool [L, L] per layer: token t (scale s) may attend token u iff u's scale is s or in the layer's reads[s]."""
    level = np.concatenate([np.full(pn * pn, si) for si, pn in enumerate(layout.patch_nums)])
    out = []
    for plan in layout.layers:
        allowed = np.eye(len(layout.patch_nums), dtype=bool)
        for si, reads in enumerate(plan.reads):
            allowed[si, list(reads)] = True
        out.append(allowed[level[:, None], level[None, :]])
    return out


class SelfAttention(nn.Module):
    config: VARConfig
    dtype: Any = jnp.float32
    impl: str = "xla"

    def setup(self):
        c = self.config
        self.mat_qkv = nn.Dense(3 * c.embed_dim, use_bias=False, dtype=self.dtype)
        self.q_bias = self.param("q_bias", nn.initializers.zeros, (c.embed_dim,))
        self.v_bias = self.param("v_bias", nn.initializers.zeros, (c.embed_dim,))
        if c.attn_l2_norm:
            init = nn.initializers.constant(np.log(4.0))
            self.scale_mul_1H11 = self.param("scale_mul_1H11", init, (1, c.num_heads, 1, 1))
        self.proj = nn.Dense(c.embed_dim, dtype=self.dtype)

    def _qkv(self, x_BlC):
        c = self.config
        bias = jnp.concatenate([self.q_bias, jnp.zeros_like(self.q_bias), self.v_bias])
        qkv = self.mat_qkv(x_BlC) + bias.astype(self.dtype)
        q, k, v = jnp.split(qkv.reshape(*x_BlC.shape[:2], 3, c.num_heads, c.head_dim), 3, axis=2)
        return q[:, :, 0], k[:, :, 0], v[:, :, 0]

    def _scale_mul_H(self):
        return self.scale_mul_1H11.reshape(-1) if self.config.attn_l2_norm else None

    def _out(self, o_BlHD):
        return self.proj(o_BlHD.reshape(*o_BlHD.shape[:2], -1).astype(self.dtype))

    def __call__(self, x_BLC, mask_LL):
        q, k, v = self._qkv(x_BLC)
        q, k = prepare_qk(q, k, self._scale_mul_H())
        return self._out(masked_attention(q, k, v, mask_LL))

    def step(self, x_BlC, cache: LayerCache, plan: LayerLayout, si: int):
        q, k, v = self._qkv(x_BlC)
        mask = cache.read_mask(plan.reads[si])
        # A quantised cache (its storage dtype is the cache's own; see quant.py) brings its scales.
        scales = (
            dict(k_scale=cache.k_scale, v_scale=cache.v_scale, k_group=plan.slot_groups(si)) if cache.quantized else {}
        )
        o = cached_attention(
            q, k, v, cache.k, cache.v, mask, self._scale_mul_H(), impl=self.impl, static_mask=plan.read_mask(si),
            **scales,
        )
        if plan.written(si):
            _, k_cached = prepare_qk(q, k, self._scale_mul_H())
            cache = cache.write(plan.writes[si], si, k_cached, v, group=plan.group(si))
        return self._out(o), cache


class FFN(nn.Module):
    config: VARConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.config.mlp_hidden, dtype=self.dtype, name="fc1")(x)
        return nn.Dense(self.config.embed_dim, dtype=self.dtype, name="fc2")(nn.gelu(x, approximate=True))


class AdaLNSelfAttn(nn.Module):
    """x += γ1·Attn(LN(x)(1+s1)+b1); x += γ2·FFN(LN(x)(1+s2)+b2), the six vectors from the class condition."""

    config: VARConfig
    dtype: Any = jnp.float32
    impl: str = "xla"

    def setup(self):
        c = self.config
        self.attn = SelfAttention(c, self.dtype, self.impl)
        self.ffn = FFN(c, self.dtype)
        if c.shared_aln:
            init = nn.initializers.normal(1.0 / np.sqrt(c.embed_dim))
            self.ada_gss = self.param("ada_gss", init, (1, 1, 6, c.embed_dim))
        else:
            self.ada_lin_1 = nn.Dense(6 * c.embed_dim)

    def _modulation(self, cond):
        """cond: [B, D] (per-block AdaLN) or [B, 1, 6, C] (shared AdaLN) -> six [B, 1, C] float32 vectors."""
        if self.config.shared_aln:
            gss = self.ada_gss + cond
        else:
            gss = self.ada_lin_1(nn.silu(cond)).reshape(-1, 1, 6, self.config.embed_dim)
        return [gss[:, :, i].astype(jnp.float32) for i in range(6)]

    def _mix(self, x, cond, attend):
        g1, g2, s1, s2, b1, b2 = self._modulation(cond)
        eps = self.config.norm_eps
        h, out = attend((layer_norm(x, eps) * (1 + s1) + b1).astype(self.dtype))
        x = x + h * g1.astype(x.dtype)
        x = x + self.ffn((layer_norm(x, eps) * (1 + s2) + b2).astype(self.dtype)) * g2.astype(x.dtype)
        return x, out

    def __call__(self, x, cond, mask_LL):
        return self._mix(x, cond, lambda h: (self.attn(h, mask_LL), None))[0]

    def step(self, x, cond, cache: LayerCache, plan: LayerLayout, si: int):
        return self._mix(x, cond, lambda h: self.attn.step(h, cache, plan, si))


class AdaLNBeforeHead(nn.Module):
    config: VARConfig

    def setup(self):
        self.ada_lin_1 = nn.Dense(2 * self.config.embed_dim)

    def __call__(self, x, cond_BD):
        scale, shift = jnp.split(self.ada_lin_1(nn.silu(cond_BD))[:, None], 2, axis=-1)
        return layer_norm(x, self.config.norm_eps) * (1 + scale) + shift


class VAR(nn.Module):
    """The class-conditional next-scale transformer. `dtype` is the blocks' compute dtype; `impl` the attention."""

    config: VARConfig
    dtype: Any = jnp.float32
    impl: str = "xla"

    def setup(self):
        c = self.config
        std = float(np.sqrt(1 / c.embed_dim / 3))
        init = nn.initializers.truncated_normal(std)
        self.word_embed = nn.Dense(c.embed_dim)
        self.class_emb = nn.Embed(c.num_classes + 1, c.embed_dim, embedding_init=init)
        self.pos_start = self.param("pos_start", init, (1, c.first_l, c.embed_dim))
        self.pos_1LC = self.param("pos_1LC", init, (1, c.seq_len, c.embed_dim))
        self.lvl_embed = nn.Embed(c.num_scales, c.embed_dim, embedding_init=init)
        if c.shared_aln:
            self.shared_ada_lin_1 = nn.Dense(6 * c.embed_dim)
        self.blocks = [AdaLNSelfAttn(c, self.dtype, self.impl) for _ in range(c.depth)]
        self.head_nm = AdaLNBeforeHead(c)
        self.head = nn.Dense(c.vocab_size)

    # --- embeddings -------------------------------------------------------------------------------------------
    def condition(self, label_B):
        """cond_BD = class_emb[label] (label == num_classes is the null class used for guidance)."""
        return self.class_emb(label_B).astype(jnp.float32)

    def _lvl_pos(self, si: int):
        begin, end = self.config.begin_ends[si]
        return self.lvl_embed.embedding[si][None, None] + self.pos_1LC[:, begin:end]

    def first_input(self, cond_BD):
        """Scale 0's tokens: [B, first_l, C]."""
        return cond_BD[:, None] + self.pos_start + self._lvl_pos(0)

    def next_input(self, si: int, x_BlCv):
        """Scale si's tokens from the VQ-VAE's downsampled running reconstruction [B, pn², Cvae]."""
        return self.word_embed(x_BlCv.astype(jnp.float32)) + self._lvl_pos(si)

    def _block_cond(self, cond_BD):
        if self.config.shared_aln:
            return self.shared_ada_lin_1(nn.silu(cond_BD)).reshape(-1, 1, 6, self.config.embed_dim)
        return cond_BD

    def logits(self, x_BlC, cond_BD):
        """float32 logits [B, l, V]."""
        return self.head(self.head_nm(x_BlC.astype(jnp.float32), cond_BD))

    # --- entry points -----------------------------------------------------------------------------------------
    def __call__(self, label_B, x_BLCv_wo_first_l, layout: CacheLayout | None = None):
        """Teacher forcing: logits [B, L, V] for all scales at once (labels are used as given: no dropout).

        With a `layout`, at layer l a token of scale s attends to the scales `layout.layers[l].reads[s]` plus its
        own: what cached generation under that layout attends to."""
        c = self.config
        cond_BD = self.condition(label_B)
        sos = cond_BD[:, None] + self.pos_start
        x = jnp.concatenate([sos, self.word_embed(x_BLCv_wo_first_l.astype(jnp.float32))], axis=1)
        level = np.concatenate([np.full(pn * pn, si) for si, pn in enumerate(c.patch_nums)])
        x = x + self.lvl_embed.embedding[level][None] + self.pos_1LC
        masks = [block_causal_mask(c.patch_nums)] * c.depth if layout is None else layout_masks(layout)
        block_cond = self._block_cond(cond_BD)
        for block, mask in zip(self.blocks, masks, strict=True):
            x = block(x, block_cond, jnp.asarray(mask))
        return self.logits(x, cond_BD)

    def step(self, x_BlC, cond_BD, cache: KVCache, si: int, layout: CacheLayout):
        """One scale: every block on this scale's tokens against the cache. Returns (logits [B, l, V], cache)."""
        block_cond = self._block_cond(cond_BD)
        layers = []
        for block, layer_cache, plan in zip(self.blocks, cache.layers, layout.layers, strict=True):
            x_BlC, layer_cache = block.step(x_BlC, block_cond, layer_cache, plan, si)
            layers.append(layer_cache)
        return self.logits(x_BlC, cond_BD), KVCache(layers=tuple(layers))
