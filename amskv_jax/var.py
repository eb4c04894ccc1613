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
`per_layer_blocks` turns it into a tuple of per-layer blocks, which both entry points run as a Python loop (for
XLA:CPU, whose matmuls would copy a layer's weights out of the stacks; `generate.LAYER_LOOPS`).

Embeddings, LayerNorms, softmax, the head and its AdaLN run in float32 as the reference does; the blocks' matmuls
run in `dtype` (float32 or bfloat16). Shapes: B rows, l tokens of one scale, L all tokens, C width, V vocabulary.
"""
from __future__ import annotations

import operator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from amskv_jax import quant
from amskv_jax.attention import cached_attention, dequantize_cache, masked_attention, prepare_qk
from amskv_jax.cache import CacheLayout, KindCache, KVCache, low_storage, teacher_low_mask, teacher_mask
from amskv_jax.config import VARConfig


def stacks_as_bits(stacks):
    """Stacked params for a scanned layer loop on XLA:CPU: 16-bit float leaves as their uint16 bits (others as they
    are), with `stacks_from_bits` to undo it on a layer's slice inside the body. XLA:CPU computes bfloat16 ops in
    float32 and so slices a bfloat16 stack by converting the whole stack to float32 first, a conversion the loop
    then hoists: a float32 copy of every layer's weights held for the whole program (2× the bfloat16 weights). The
    bitcast costs one uint16 copy of the stacks instead (1×; bench/RESULTS.md, Issue 24), which only bits given as
    the program's arguments avoid (`stack_bit_views`, what `generate` passes when it can; this is the fallback, e.g.
    `generate` traced under an outer jit). Not used elsewhere: a backend with native bfloat16 slices the stacks
    where they lie. The bits are the values, so the results are the same. Generation only: bits carry no gradient
    (teacher forcing, which training differentiates, scans the params)."""
    return jax.tree.map(lambda a: jax.lax.bitcast_convert_type(a, jnp.uint16) if _is_half(a.dtype) else a, stacks)


def stack_bit_views(stacks):
    """(views, dtype): the stacks' 16-bit float leaves as uint16 arrays that share their memory (a view of each
    concrete single-device array, no copy; `jax.ShapeDtypeStruct`s become uint16 ones) and that float dtype; or
    (stacks, None) when the floating leaves are not all of one 16-bit dtype or not all concrete on one CPU device (a
    traced leaf, a sharded array). `generate` hands XLA:CPU's scanned loop the bits this way, since a bitcast inside
    the program, even of an argument, is a copy there (bench/RESULTS.md, Issue 24)."""
    leaves = [leaf for leaf in jax.tree.leaves(stacks) if jnp.issubdtype(leaf.dtype, jnp.floating)]
    dtypes = {jnp.dtype(leaf.dtype) for leaf in leaves}
    if len(dtypes) != 1 or not _is_half(next(iter(dtypes))):
        return stacks, None

    def viewable(leaf) -> bool:
        if isinstance(leaf, (np.ndarray, jax.ShapeDtypeStruct)):
            return True
        return (isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer) and len(leaf.devices()) == 1
                and next(iter(leaf.devices())).platform == "cpu")

    if not all(viewable(leaf) for leaf in leaves):
        return stacks, None

    def view(leaf):
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            return leaf
        if isinstance(leaf, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(leaf.shape, jnp.uint16)
        return jax.device_put(np.asarray(leaf).view(np.uint16))  # on CPU, device_put of host memory is zero-copy

    return jax.tree.map(view, stacks), next(iter(dtypes))


def stacks_from_bits(bits, like):
    """`stacks_as_bits` undone on (a slice of) the stacks, each leaf back to the dtype of `like`'s."""
    return jax.tree.map(
        lambda b, a: jax.lax.bitcast_convert_type(b, a.dtype) if _is_half(a.dtype) else b, bits, like)


def _is_half(dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.floating) and jnp.dtype(dtype).itemsize == 2


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


def cache_reader(
    kinds: tuple[KindCache, ...], layout: CacheLayout, si: int, kind, indices, impl: str, rows: tuple | None = None,
):
    """attend(q, k, v, scale_mul_H) -> (o [B, l, H, Dh], (k_cached, v)): one layer's attention over its kind's
    stacked cache at scale si, and the K/V it leaves to write (`cache_write`; k L2-normalised, as cached).

    kind: the layer's kind, a Python int (its stack is known at trace time) or a traced int32 (a scanned layer loop:
    `lax.switch` picks the kind's read; each branch returns the attention output only, never a stack, which XLA
    would copy). indices[j]: the layer's index in kind j's stack (only its own kind's is read). rows: (start, count),
    the cache rows the B query rows are (None: all)."""

    def read(j: int):
        plan = layout.kinds[j]

        def attention(q, k, v, scale_mul_H, kinds, indices):
            layer = kinds[j].layer(indices[j], rows)
            if plan.low is not None:  # two tiers (MiKV): both read as values, one cache of both tiers' slots
                tiers = ((layer, plan), (layer.low, plan.low))
                keys, values = zip(*(
                    dequantize_cache(t.k, t.v, t.scales, p.slot_groups(si) if t.scales is not None else None, v.dtype)
                    for t, p in tiers
                ), strict=True)
                return cached_attention(
                    q, k, v, jnp.concatenate([x.astype(jnp.float32) for x in keys], axis=1),
                    jnp.concatenate([x.astype(v.dtype) for x in values], axis=1),
                    jnp.concatenate([t.read_mask(p.reads[si]) for t, p in tiers]), scale_mul_H, impl=impl,
                    static_mask=np.concatenate([p.read_mask(si) for _, p in tiers]),
                )
            # A quantised cache (its storage dtype is the cache's own; see quant.py) brings its scales.
            scales = (
                dict(scales=layer.scales, k_group=plan.slot_groups(si))
                if kinds[j].quantized else {}
            )
            return cached_attention(
                q, k, v, layer.k, layer.v, layer.read_mask(plan.reads[si]), scale_mul_H, impl=impl,
                static_mask=plan.read_mask(si), **scales,
            )

        return attention

    def attend(q, k, v, scale_mul_H):
        operands = (q, k, v, scale_mul_H, kinds, indices)
        if isinstance(kind, int):
            o = read(kind)(*operands)
        else:
            o = jax.lax.switch(kind, [read(j) for j in range(len(layout.kinds))], *operands)
        return o, (prepare_qk(q, k, scale_mul_H)[1], v)

    return attend


def cache_write(
    kinds: tuple[KindCache, ...], layout: CacheLayout, si: int, kind, indices, k_BlHD, v_BlHD, after: jax.Array,
    row=0,
) -> tuple[KindCache, ...]:
    """Scale si's K/V [B, l, H, Dh] written to the layer's kind (`kind`, `indices` as in `cache_reader`) at cache
    rows [row, row + B). With a traced kind every kind written at si takes a masked write
    (`KindCache.write(active=...)`). The slots' `slot_scale` is left to `VAR.step`, which marks it once every layer
    and row is written.

    `after`, the layer's output, orders the writes after the layer's reads: XLA copies a buffer that is updated in
    place while a read of it may still be pending, and nothing else orders the two (XLA:CPU drops
    `optimization_barrier` before it places copies). Row b's written values take `0 · after[b, 0, 0]`, exact (a
    NaN there means the layer already failed), which makes every write wait for the layer's output and so for its
    reads of the cache. Each row depends on its own row only, so under a "data" mesh axis nothing crosses shards."""
    zero_B111 = (after[:, :1, :1, None] * 0).astype(k_BlHD.dtype)
    k_BlHD, v_BlHD = k_BlHD + zero_B111, v_BlHD + zero_B111.astype(v_BlHD.dtype)
    written = []
    for j, (plan, cache) in enumerate(zip(layout.kinds, kinds, strict=True)):
        if isinstance(kind, int) and kind != j:
            written.append(cache)
            continue
        active = None if isinstance(kind, int) else kind == j

        def write(tier: KindCache, tier_plan) -> KindCache:
            if not tier_plan.written(si):
                return tier
            return tier.write(indices[j], tier_plan.writes[si], si, k_BlHD, v_BlHD, group=tier_plan.group(si),
                              active=active, row=row, mark=False)

        cache = write(cache, plan)
        if plan.low is not None:  # a low-precision tier (MiKV) keeps the scales the layer's plan does not
            cache = cache.replace(low=write(cache.low, plan.low))
        written.append(cache)
    return tuple(written)


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

    def __call__(self, x_BLC, mask_LL, storage=None, low=None):
        """(output [B, L, C], the raw (q, k, v)) under a bool [L, L] mask. `storage` says how the K/V of earlier
        scales are read (a scale's own are fresh): None as computed, a quantised kv_dtype as such a cache holds them
        (`quant.fake_quantize_kv`), or (choices, code): as storage choices[code] holds them, code an int32 that may
        be traced (layers with their own precision under a scanned layer loop; `quant.read_as_stored`).
        `low` = (kv_dtype, low_LL bool [L, L], may be traced): the pairs read from a low-precision tier (MiKV), as
        that storage holds them."""
        q, k, v = self._qkv(x_BLC)
        q_n, k_n = prepare_qk(q, k, self._scale_mul_H())
        patch_nums = self.config.patch_nums
        level = np.concatenate([np.full(pn * pn, si) for si, pn in enumerate(patch_nums)])
        own_LL = jnp.asarray(level[:, None] == level[None, :])
        cached = low_read = None
        if storage is not None or low is not None:
            choices, code = ((storage,), 0) if storage is None or isinstance(storage, str) else storage
            k_c, v_c = quant.read_as_stored(k_n, v, patch_nums, tuple(choices), code)
            cached = (k_c, v_c, own_LL)
        if low is not None:
            low_dtype, low_LL = low
            low_read = (*quant.fake_quantize_kv(k_n, v, patch_nums, low_dtype), low_LL)
        return self._out(masked_attention(q_n, k_n, v, mask_LL, cached, low_read)), (q, k, v)

    def step(self, x_BlC, attend):
        """(output [B, l, C], aux): scale si's queries through `attend(q, k, v, scale_mul_H) -> (o [B, l, H, Dh],
        aux)`, which reads the cache (`cache_reader`; its aux is what the layer then writes)."""
        o, aux = attend(*self._qkv(x_BlC), self._scale_mul_H())
        return self._out(o), aux


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

    def __call__(self, x, cond, mask_LL, storage=None, low=None):
        """(x [B, L, C], the attention's raw (q, k, v)): teacher forcing under a bool [L, L] mask (and the K/V
        storage of a cache, `storage`, and its low-precision tier, `low`: see `SelfAttention.__call__`)."""
        return self._mix(x, cond, lambda h: self.attn(h, mask_LL, storage, low))

    def step(self, x, cond, attend):
        """(x [B, l, C], aux): one scale through the block, its attention over the cache by `attend` (see
        `SelfAttention.step`)."""
        return self._mix(x, cond, lambda h: self.attn.step(h, attend))


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
    stack_bits: Any = None  # generation only: the stacked blocks are uint16 bits of this dtype (`stack_bit_views`)

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
        blocks = self.get_variable("params", "blocks")
        # per-layer params (`per_layer_blocks`) as they are: `param` would check them against the stacked shapes
        self.blocks = blocks if isinstance(blocks, tuple) else self.param("blocks", self._init_blocks)
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

    def teacher_input(self, label_B, x_BLCv_wo_first_l):
        """(every scale's input tokens [B, L, C], cond_BD): what teacher forcing feeds the first block."""
        c = self.config
        cond_BD = self.condition(label_B)
        sos = cond_BD[:, None] + self.pos_start
        x = jnp.concatenate([sos, self.word_embed(x_BLCv_wo_first_l.astype(jnp.float32))], axis=1)
        level = np.concatenate([np.full(pn * pn, si) for si, pn in enumerate(c.patch_nums)])
        return x + self.lvl_embed.embedding[level][None] + self.pos_1LC, cond_BD

    def teacher_states(
        self, label_B, x_BLCv_wo_first_l, layout: CacheLayout | None = None, keep: bool = True,
        kv_dtype: str | None = None, masks: tuple | None = None, storage: tuple | None = None,
        low: tuple | None = None,
    ):
        """(logits [B, L, V], per-layer states): with `keep`, {"out": every block's output [D, B, L, C], "q", "k",
        "v": its raw projections [D, B, L, H, Dh]} (verification, calibration); else None.

        The attention masks come from `layout` (`cache.teacher_mask`; None: block-causal) or, instead of a layout,
        from `masks` = (masks_KLL bool [K, L, L], may be traced; kind_of int [D], numpy): layer l attends under
        masks_KLL[kind_of[l]]. Masks as an argument let one compiled program serve every layout of a model
        (`nll.masked_logits`: K = D, kind_of = 0..D-1).

        Earlier scales' K/V are read as each layer's cache stores them: `kv_dtype` for every layer, a layout's
        layers with their own precision (`LayerLayout.kv_dtype`) in theirs; or, given, `storage` = (choices, the
        layer's code int32 [D], may be traced): layer l's storage is choices[code[l]] (one program for every
        per-layer precision: the search's). Low-precision tiers (MiKV, `LayerLayout.low`) come from the layout or,
        with `masks`, as `low` = (kv_dtype, low_KLL bool [K, L, L], may be traced): the pairs of masks_KLL[k] read
        from the tier, in that storage."""
        c = self.config
        if self.stack_bits is not None:
            raise ValueError("teacher forcing scans the stacked params themselves, not their bits (stack_bits)")
        x, cond_BD = self.teacher_input(label_B, x_BLCv_wo_first_l)
        if masks is not None:
            if layout is not None:
                raise ValueError("give a layout or masks, not both")
            masks_KLL, kind_of = masks[0], np.asarray(masks[1], np.int32)
        elif layout is None:
            masks_KLL, kind_of = block_causal_mask(c.patch_nums)[None], np.zeros(c.depth, np.int32)
        else:
            masks_KLL, kind_of = teacher_mask(layout), np.asarray(layout.kind_of, np.int32)
            low_KLL = teacher_low_mask(layout)
            low = None if low_KLL is None else (low_storage(layout), low_KLL)
        if storage is None:
            per_layer = (kv_dtype,) * c.depth if layout is None else layout.storages(kv_dtype)
            choices = tuple(dict.fromkeys(per_layer))
            storage = (choices, np.asarray([choices.index(s) for s in per_layer], np.int32))
        choices, codes = tuple(storage[0]), storage[1]
        masks_KLL = jnp.asarray(masks_KLL)
        low_KLL = None if low is None else jnp.asarray(low[1])
        block, block_cond = self._block(), self._block_cond(cond_BD)

        def layer(x, xs):
            params, kind, code = xs
            if len(choices) == 1:
                read = choices[0]
            else:
                read = choices[int(code)] if isinstance(code, (int, np.integer)) else (choices, code)
            tier = None if low is None else (low[0], low_KLL[kind])
            x, (q, k, v) = block.apply({"params": params}, x, block_cond, masks_KLL[kind], read, tier)
            return x, (dict(out=x, q=q, k=k, v=v) if keep else None)

        if isinstance(self.blocks, tuple):  # per-layer params (`per_layer_blocks`): a Python loop
            per_layer_states = []
            for l, (params, kind) in enumerate(zip(self.blocks, kind_of, strict=True)):
                x, state = layer(x, (params, int(kind), codes[l]))
                per_layer_states.append(state)
            states = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer_states) if keep else None
        else:
            xs = (self.blocks, jnp.asarray(kind_of), jnp.asarray(codes, jnp.int32))
            x, states = jax.lax.scan(layer, x, xs)
        return self.logits(x, cond_BD), states

    def step(self, x_BlC, cond_BD, cache: KVCache, si: int, layout: CacheLayout, row_chunk: int | None = None):
        """One scale: `step_states`, then the head on every row. Returns (logits float32 [B, l, V], cache)."""
        x_BlC, cache = self.step_states(x_BlC, cond_BD, cache, si, layout, row_chunk)
        return self.logits(x_BlC, cond_BD), cache

    def step_states(
        self, x_BlC, cond_BD, cache: KVCache, si: int, layout: CacheLayout, row_chunk: int | None = None
    ):
        """One scale: every block on this scale's tokens against the cache (`step_rows` over all rows, then
        `mark_scale`). Returns (the last block's output [B, l, C], cache); `logits` makes them the scale's logits."""
        x_BlC, kinds = self.step_rows(x_BlC, cond_BD, cache.kinds, si, layout, row_chunk)
        return x_BlC, mark_scale(KVCache(kinds=kinds), layout, si)

    def step_rows(
        self, x_BlC, cond_BD, kinds: tuple[KindCache, ...], si: int, layout: CacheLayout,
        row_chunk: int | None = None, row=0,
    ):
        """Scale si's blocks for B rows of the batch, cache rows [row, row + B) (row may be traced: generation runs
        the images in chunks, `generate`), reading and writing only those rows. Returns (the last block's output
        [B, l, C], the kinds' stacks); the written slots are left for `mark_scale`, once every row is written (a
        later chunk still reads the slots by what they held before the scale).

        A layer reads and writes only its kind's stacked cache (`layout.kinds`, `cache_reader`, `cache_write`).
        Stacked block params (leaves [D, ...]) run as one scanned body (compile time flat in depth), the kind picked
        by `lax.switch` when there are several; per-layer params (`per_layer_blocks`: a tuple of D blocks) run as a
        Python loop with every kind static, each matmul reading its weights where they lie (on XLA:CPU a scanned
        body copies each layer's weights out of the stacks first).

        row_chunk (static, a divisor of B; None: B): the blocks run over chunks of that many rows, one after the
        other (`lax.scan`), each against its rows of the whole cache, so the blocks' activations and attention
        scores are those of row_chunk rows whatever B is; rows are independent in every op, so the result is the
        same."""
        rows = x_BlC.shape[0]
        chunk = rows if row_chunk is None else row_chunk
        assert 0 < chunk <= rows and rows % chunk == 0, f"row_chunk must divide the {rows} rows, got {row_chunk}"
        block, block_cond, stacks = self._block(), self._block_cond(cond_BD), self.blocks
        per_layer = isinstance(stacks, tuple)
        kind_of = np.asarray(layout.kind_of, np.int32)
        # indices[l, j]: layer l's index in kind j's stack (0 where l is of another kind: a masked write there)
        indices = np.where(kind_of[:, None] == np.arange(len(layout.kinds)), np.asarray(layout.kind_index)[:, None], 0)
        single = len(layout.kinds) == 1

        def layer(x, kinds, block_cond, params, kind, indices, row):
            attend = cache_reader(kinds, layout, si, kind, indices, self.impl, rows=(row, chunk))
            x, (k, v) = block.apply({"params": params}, x, block_cond, attend, method=AdaLNSelfAttn.step)
            return x, cache_write(kinds, layout, si, kind, indices, k, v, after=x, row=row)

        def blocks(kinds, x, block_cond, row):
            if per_layer:
                for params, kind, l_indices in zip(stacks, layout.kind_of, indices, strict=True):
                    x, kinds = layer(x, kinds, block_cond, params, kind, tuple(l_indices), row)
                return kinds, x

            if self.stack_bits is not None:  # the stacks are already their bits (`stack_bit_views`)
                as_bits, bits = True, stacks
                like = jax.tree.map(lambda a: jax.ShapeDtypeStruct(
                    a.shape, self.stack_bits if a.dtype == jnp.uint16 else a.dtype), stacks)
            else:  # XLA:CPU's float32 copies (`stacks_as_bits`)
                as_bits, like = jax.default_backend() == "cpu", stacks
                bits = stacks_as_bits(stacks) if as_bits else stacks

            def body(carry, xs):
                params, kind, l_indices = xs
                params = stacks_from_bits(params, like) if as_bits else params
                return layer(*carry, block_cond, params, 0 if single else kind, l_indices, row), None

            xs = (bits, jnp.asarray(kind_of), jnp.asarray(indices, jnp.int32))
            (x, kinds), _ = jax.lax.scan(body, (x, kinds), xs)
            return kinds, x

        if chunk == rows:
            kinds, x_BlC = blocks(kinds, x_BlC, block_cond, row)
        else:
            split = lambda a: a.reshape(rows // chunk, chunk, *a.shape[1:])  # noqa: E731

            def one_chunk(kinds, xs):
                i, x, block_cond = xs
                return blocks(kinds, x, block_cond, row + i * chunk)

            xs = (jnp.arange(rows // chunk, dtype=jnp.int32), split(x_BlC), split(block_cond))
            kinds, x_BlC = jax.lax.scan(one_chunk, kinds, xs)
            x_BlC = x_BlC.reshape(rows, *x_BlC.shape[2:])
        return x_BlC, kinds


def mark_scale(cache: KVCache, layout: CacheLayout, si: int) -> KVCache:
    """The cache with scale si's written slots marked as holding it (`slot_scale`), in every layer and tier: after
    `VAR.step_rows` has written every row."""

    def mark(plan, kind: KindCache) -> KindCache:
        kind = kind.mark(plan.writes[si], si)
        return kind if plan.low is None else kind.replace(low=mark(plan.low, kind.low))

    return KVCache(kinds=tuple(mark(plan, kind) for plan, kind in zip(layout.kinds, cache.kinds, strict=True)))


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


def per_layer_blocks(var_params: dict) -> dict:
    """A VAR params dict ({"params": {...}}) with the stacked `blocks` (leaves [D, ...]) as a tuple of D per-layer
    blocks: the model then runs its layers as a Python loop (`VAR.step`), each matmul reading its own weight buffer
    (XLA:CPU's scanned body copies every layer's weights out of the stacks before each matmul). Made outside the
    compiled program (each leaf's slices are copied once here); params already per-layer are returned as they are."""
    blocks = var_params["params"]["blocks"]
    if isinstance(blocks, tuple):
        return var_params
    depth = jax.tree.leaves(blocks)[0].shape[0]
    layers = tuple(jax.tree.map(operator.itemgetter(i), blocks) for i in range(depth))
    return {**var_params, "params": {**var_params["params"], "blocks": layers}}
