"""The VAR transformer in Flax Linen (reference `models/var.py`, `models/basic_var.py`).

Module and parameter names follow the reference's state-dict keys (see `convert/mapping.py`), blocks stacked. Two ways to run it:

* `__call__(label_B, x_BLCv, layout=None)`: teacher forcing over all L tokens with the block-causal mask
  (training, parity), or with the attention a cache layout leaves (`cache.teacher_mask`).
* `step(x_BlC, cond_BD, cache, si, layout)`: one scale of generation; reads and writes the explicit `KVCache`
  (cache in, cache out; no module state), returning logits for that scale's tokens. The cache decides its own
  storage (`init_cache(..., kv_dtype=...)`, `quant.py`): a quantised one is dequantised by the attention and
  quantised on write, with the layout's static K-scale groups.

The blocks' params are stacked on a leading depth axis (`blocks`, mat_qkv kernel [D, C, 3, H, Dh]) and both entry
points run the layers as one `jax.lax.scan`, so trace and compile time do not grow with depth. `stack_blocks`
turns the per-block layout (torch's `blocks.{i}`, this package's checkpoints before the scan) into this one.

Embeddings, LayerNorms, softmax, the head and its AdaLN run in float32 as the reference does; the blocks' matmuls
run in `dtype` (float32 or bfloat16). Shapes: B rows, l tokens of one scale, L all tokens, C width, V vocabulary.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from amskv_jax import quant
from amskv_jax.attention import cached_attention, masked_attention, prepare_qk
from amskv_jax.cache import CacheLayout, KindCache, KVCache, LayerLayout, teacher_mask
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


class SelfAttention(nn.Module):
    """Multi-head attention; mat_qkv's kernel is [C, 3, H, Dh], so a "model" mesh axis splitting H is head-aligned."""

    config: VARConfig
    dtype: Any = jnp.float32
    impl: str = "xla"

    def setup(self):
        c = self.config
        self.mat_qkv = nn.DenseGeneral((3, c.num_heads, c.head_dim), use_bias=False, dtype=self.dtype)
        self.q_bias = self.param("q_bias", nn.initializers.zeros, (c.embed_dim,))
        self.v_bias = self.param("v_bias", nn.initializers.zeros, (c.embed_dim,))
        if c.attn_l2_norm:
            init = nn.initializers.constant(np.log(4.0))
            self.scale_mul_1H11 = self.param("scale_mul_1H11", init, (1, c.num_heads, 1, 1))
        self.proj = nn.Dense(c.embed_dim, dtype=self.dtype)

    def _qkv(self, x_BlC):
        """Raw projections q, k, v: [B, l, H, Dh] each (k has no bias, as in the reference)."""
        c = self.config
        bias_3HD = jnp.stack([self.q_bias, jnp.zeros_like(self.q_bias), self.v_bias]).reshape(3, c.num_heads, -1)
        qkv = self.mat_qkv(x_BlC) + bias_3HD.astype(self.dtype)
        return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]

    def _scale_mul_H(self):
        return self.scale_mul_1H11.reshape(-1) if self.config.attn_l2_norm else None

    def _out(self, o_BlHD):
        return self.proj(o_BlHD.reshape(*o_BlHD.shape[:2], -1).astype(self.dtype))

    def __call__(self, x_BLC, mask_LL, kv_dtype: str | None = None):
        """(output [B, L, C], the raw (q, k, v)) under a bool [L, L] mask. A quantised `kv_dtype` reads the K/V of
        earlier scales as a quantised cache would hold them (`quant.fake_quantize_kv`), a scale's own fresh."""
        q, k, v = self._qkv(x_BLC)
        q_n, k_n = prepare_qk(q, k, self._scale_mul_H())
        cached = None
        if kv_dtype is not None:
            level = np.concatenate([np.full(pn * pn, si) for si, pn in enumerate(self.config.patch_nums)])
            k_c, v_c = quant.fake_quantize_kv(k_n, v, self.config.patch_nums, kv_dtype)
            cached = (k_c, v_c, jnp.asarray(level[:, None] == level[None, :]))
        return self._out(masked_attention(q_n, k_n, v, mask_LL, cached)), (q, k, v)

    def step(self, x_BlC, cache: KindCache, index, plan: LayerLayout, si: int):
        """Scale si's queries against layer `index` of its kind's stacked cache, then scale si's write to it."""
        q, k, v = self._qkv(x_BlC)
        layer = cache.layer(index)
        mask = layer.read_mask(plan.reads[si])
        # A quantised cache (its storage dtype is the cache's own; see quant.py) brings its scales.
        scales = (
            dict(scales=layer.scales, k_group=plan.slot_groups(si)) if cache.quantized else {}
        )
        o = cached_attention(
            q, k, v, layer.k, layer.v, mask, self._scale_mul_H(), impl=self.impl, static_mask=plan.read_mask(si),
            **scales,
        )
        if plan.written(si):
            _, k_cached = prepare_qk(q, k, self._scale_mul_H())
            cache = cache.write(index, plan.writes[si], si, k_cached, v, group=plan.group(si))
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

    def __call__(self, x, cond, mask_LL, kv_dtype: str | None = None):
        """(x [B, L, C], the attention's raw (q, k, v)): teacher forcing under a bool [L, L] mask (and the K/V
        storage of a cache, `kv_dtype`)."""
        return self._mix(x, cond, lambda h: self.attn(h, mask_LL, kv_dtype))

    def step(self, x, cond, cache: KindCache, index, plan: LayerLayout, si: int):
        """(x [B, l, C], cache): one scale through layer `index` of the kind whose stacked cache is `cache`."""
        return self._mix(x, cond, lambda h: self.attn.step(h, cache, index, plan, si))


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
        self.blocks = self.param("blocks", self._init_blocks)
        self.head_nm = AdaLNBeforeHead(c)
        self.head = nn.Dense(c.vocab_size)

    def _block(self) -> AdaLNSelfAttn:
        """The block as an unbound module: the layer loops apply it to one layer's slice of `blocks`."""
        return AdaLNSelfAttn(self.config, self.dtype, self.impl, parent=None)

    def _init_blocks(self, key):
        """Every block's params, stacked on a leading depth axis (the layer loops scan over it)."""
        c = self.config
        cond = jnp.zeros((1, 1, 6, c.embed_dim) if c.shared_aln else (1, c.embed_dim))
        x, mask = jnp.zeros((1, 1, c.embed_dim)), jnp.ones((1, 1), bool)
        init = lambda k: self._block().init(k, x, cond, mask)["params"]  # noqa: E731
        return jax.vmap(init)(jax.random.split(key, c.depth))

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
    def __call__(
        self, label_B, x_BLCv_wo_first_l, layout: CacheLayout | None = None, kv_dtype: str | None = None
    ):
        """Teacher forcing: logits [B, L, V] for all scales at once (labels are used as given: no dropout).

        layout None: the block-causal mask. With a cache layout, at layer l a token of scale s attends to the scales
        `layout.layers[l].reads[s]` plus its own: exactly what cached generation under that layout attends to.
        A quantised kv_dtype (int8, float8_e4m3fn, int4, int2): the K/V read from earlier scales are those a cache of
        that storage holds (quantised per written scale as `KindCache.write` does; `quant.fake_quantize_kv`)."""
        return self.teacher_states(label_B, x_BLCv_wo_first_l, layout, keep=False, kv_dtype=kv_dtype)[0]

    def teacher_states(
        self, label_B, x_BLCv_wo_first_l, layout: CacheLayout | None = None, keep: bool = True,
        kv_dtype: str | None = None,
    ):
        """(logits [B, L, V], per-layer states): with `keep`, {"out": every block's output [D, B, L, C], "q", "k",
        "v": its raw projections [D, B, L, H, Dh]} (verification, calibration); else None."""
        c = self.config
        cond_BD = self.condition(label_B)
        sos = cond_BD[:, None] + self.pos_start
        x = jnp.concatenate([sos, self.word_embed(x_BLCv_wo_first_l.astype(jnp.float32))], axis=1)
        level = np.concatenate([np.full(pn * pn, si) for si, pn in enumerate(c.patch_nums)])
        x = x + self.lvl_embed.embedding[level][None] + self.pos_1LC
        if layout is None:
            masks_KLL, kind_of = block_causal_mask(c.patch_nums)[None], np.zeros(c.depth, np.int32)
        else:
            masks_KLL, kind_of = teacher_mask(layout), np.asarray(layout.kind_of, np.int32)
        masks_KLL = jnp.asarray(masks_KLL)
        block, block_cond = self._block(), self._block_cond(cond_BD)

        def layer(x, xs):
            params, kind = xs
            x, (q, k, v) = block.apply({"params": params}, x, block_cond, masks_KLL[kind], kv_dtype)
            return x, (dict(out=x, q=q, k=k, v=v) if keep else None)

        x, states = jax.lax.scan(layer, x, (self.blocks, jnp.asarray(kind_of)))
        return self.logits(x, cond_BD), states

    def step(self, x_BlC, cond_BD, cache: KVCache, si: int, layout: CacheLayout):
        """One scale: every block on this scale's tokens against the cache. Returns (logits [B, l, V], cache).

        One scanned body for all layers. A layer reads and writes only its kind's stacked cache (`layout.kinds`),
        picked with `lax.switch` on the layer's kind; each branch knows its kind's static plan for scale si."""
        block, block_cond = self._block(), self._block_cond(cond_BD)

        def run(j: int):
            plan = layout.kinds[j]

            def branch(x, kinds, params, index):
                x, kind_cache = block.apply(
                    {"params": params}, x, block_cond, kinds[j], index, plan, si, method=AdaLNSelfAttn.step
                )
                return x, kinds[:j] + (kind_cache,) + kinds[j + 1 :]

            return branch

        branches = [run(j) for j in range(len(layout.kinds))]

        def layer(carry, xs):
            params, kind, index = xs
            if len(branches) == 1:
                return branches[0](*carry, params, index), None
            return jax.lax.switch(kind, branches, *carry, params, index), None

        xs = (self.blocks, jnp.asarray(layout.kind_of, jnp.int32), jnp.asarray(layout.kind_index, jnp.int32))
        (x_BlC, kinds), _ = jax.lax.scan(layer, (x_BlC, cache.kinds), xs)
        return self.logits(x_BlC, cond_BD), KVCache(kinds=kinds)


def stack_blocks(var_params: dict, num_heads: int) -> dict:
    """A VAR params dict in the per-block layout (`blocks_0` … `blocks_{D-1}`, mat_qkv kernel [C, 3C], as torch
    names them) -> this model's layout (`blocks`, every leaf stacked on a leading depth axis, mat_qkv kernel
    [D, C, 3, H, Dh]). Numpy in, numpy out (jax arrays too); other entries are kept as they are."""
    depth = len([k for k in var_params if k.startswith("blocks_")])
    xp = np if all(isinstance(x, np.ndarray) for x in jax.tree.leaves(var_params)) else jnp
    blocks = jax.tree.map(lambda *xs: xp.stack(xs), *[var_params[f"blocks_{i}"] for i in range(depth)])
    qkv = blocks["attn"]["mat_qkv"]
    qkv["kernel"] = qkv["kernel"].reshape(*qkv["kernel"].shape[:2], 3, num_heads, -1)
    rest = {k: v for k, v in var_params.items() if not k.startswith("blocks_")}
    return {**rest, "blocks": blocks}


def unstack_blocks(var_params: dict) -> dict:
    """The inverse of `stack_blocks`: `blocks` -> `blocks_0` … `blocks_{D-1}`, mat_qkv kernel [C, 3C]."""
    blocks = var_params["blocks"]
    depth = jax.tree.leaves(blocks)[0].shape[0]
    rest = {k: v for k, v in var_params.items() if k != "blocks"}
    for i in range(depth):
        block = jax.tree.map(lambda x: x[i], blocks)
        kernel = block["attn"]["mat_qkv"]["kernel"]
        block["attn"]["mat_qkv"]["kernel"] = kernel.reshape(kernel.shape[0], -1)
        rest[f"blocks_{i}"] = block
    return rest
