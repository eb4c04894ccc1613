"""Class-conditional generation with an explicit, policy-shaped KV cache, and the main command line.

`generate(params, labels, key, config=..., ...)` is a pure function: the scale loop unrolls at trace time (shapes
differ per scale), everything that changes shapes is static (config, layout, top_k, dtype, attention impl), and
labels, PRNG key, guidance and top-p are arrays, so one compiled program serves every call of the same batch size.

    python -m amskv_jax.generate --model tiny --labels 1,2,3 --out grid.png
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from amskv_jax import cli, compile_cache, sampling, sharding
from amskv_jax.attention import check_impl
from amskv_jax.cache import CacheLayout, KVCache, init_cache
from amskv_jax.checkpoint import MissingVQVAEError
from amskv_jax.chunks import image_chunk, map_in_chunks, sampler_chunk
from amskv_jax.errors import UserError
from amskv_jax.quant import KV_DTYPES, check_kv_dtype
from amskv_jax.config import ModelConfig
from amskv_jax.policies import FullCache
from amskv_jax.var import VAR, mark_scale, per_layer_blocks, stack_bit_views
from amskv_jax.vqvae import VQVAE, decode_chunk, decode_in_chunks

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# How the blocks run (`VAR.step`): "scan", one scanned body over the stacked block params (compile time flat in
# depth; GPU, TPU, meshes); "unrolled", a Python loop over per-layer params (`var.per_layer_blocks`), where XLA:CPU's
# matmuls read each layer's weights in place instead of copying them out of the stacks; "auto", unrolled on one CPU
# device, else the scan.
LAYER_LOOPS = ("auto", "scan", "unrolled")


@dataclasses.dataclass(frozen=True)
class Generation:
    """tokens: one int32 [B, pn²] array per scale; images: float32 [B, H, W, 3] in [0, 1]; finite: bool [B, S],
    whether every guided logit of image b at scale s was finite (computed in the program, row by row so that a
    sharded batch needs no communication: a NaN or inf makes that flag False, and what follows it is garbage); logits: the guided float32 logits [B, pn², V] the sampler
    received at each scale (only with `return_logits=True`, else empty)."""

    tokens: tuple[jax.Array, ...]
    images: jax.Array
    finite: jax.Array
    logits: tuple[jax.Array, ...] = ()


jax.tree_util.register_dataclass(Generation, data_fields=["tokens", "images", "finite", "logits"], meta_fields=[])


def first_nonfinite_scale(finite) -> int | None:
    """The 0-based index of the first scale whose logits were not all finite in some image, or None when every one
    was. finite: bool [S] or [B, S] (`Generation.finite`)."""
    finite_S = np.asarray(finite).reshape(-1, np.shape(finite)[-1]).all(axis=0)
    bad = np.flatnonzero(~finite_S)
    return int(bad[0]) if bad.size else None


def default_top_k(config: ModelConfig) -> int:
    """The reference's top_k of 900, capped at the vocabulary (small models have fewer codes)."""
    return min(900, config.var.vocab_size)


def resolve_layer_loop(layer_loop: str, mesh: jax.sharding.Mesh | None = None) -> str:
    """The loop ("scan" or "unrolled") that `layer_loop` runs on this platform (see `LAYER_LOOPS`)."""
    if layer_loop not in LAYER_LOOPS:
        raise UserError(f"unknown layer_loop {layer_loop!r}; allowed: {', '.join(LAYER_LOOPS)}")
    if layer_loop != "auto":
        return layer_loop
    return "unrolled" if mesh is None and jax.default_backend() == "cpu" else "scan"


def validate(
    config: ModelConfig, labels, *, top_k: int, top_p, dtype: str, impl: str = "xla", kv_dtype: str | None = None,
    layer_loop: str = "auto",
) -> None:
    """Boundary checks with messages that say what is allowed (labels only when concrete)."""
    if np.ndim(labels) != 1 or np.shape(labels)[0] == 0:
        raise UserError(f"labels must be a non-empty 1-D array (one class per image), got shape {np.shape(labels)}")
    if not isinstance(labels, jax.core.Tracer):
        bad = [int(x) for x in np.asarray(labels) if not 0 <= x < config.var.num_classes]
        if bad:
            raise UserError(f"labels {bad} out of range; allowed: 0..{config.var.num_classes - 1}")
    check_impl(impl)
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    check_kv_dtype(kv_dtype, config.var.head_dim)
    resolve_layer_loop(layer_loop)
    if not 0 <= top_k <= config.var.vocab_size:
        raise UserError(f"top_k must be in [0, {config.var.vocab_size}] (0 = off), got {top_k}")
    if isinstance(top_p, (int, float)) and not 0 <= top_p <= 1:
        raise UserError(f"top_p must be in [0, 1] (0 = off), got {top_p}")


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
    kv_dtype: str | None = None,
    progress: bool = False,
    return_logits: bool = False,
    mesh: jax.sharding.Mesh | None = None,
    layer_loop: str = "auto",
    row_chunk: int | None = None,
) -> Generation:
    """Generate len(labels) images. params = {"var": ..., "vqvae": ...}; layout defaults to the full cache.

    `top_k=None` is the reference's 900 capped at the vocabulary; 0 turns top-k off, as top_p=0 turns top-p off.
    Guidance ramps from 0 at the first scale to `cfg` at the last (the reference's `t = cfg·si/(S-1)`).
    `progress` prints a line from the device as each scale's tokens are drawn (a host callback per scale, which
    keeps the program out of the persistent compilation cache: `compile_cache`);
    `return_logits` also returns each scale's guided logits (memory: B·L·V floats).
    `kv_dtype` is how the cache stores K/V (`quant.py`): None follows `dtype`; "bfloat16", "int8" (K per channel,
    V per token, float32 scales), "float8_e4m3fn", "int4" / "int2" (packed, scale and minimum); the model still
    computes in `dtype`.
    `mesh` (`sharding.make_mesh`): run SPMD over its devices, batch over "data", heads and MLP over "model"
    (params are placed with `sharding.shard_params`; results equal the single-device run's). It is the ambient mesh
    (`jax.set_mesh`) while tracing, so every attention impl runs sharded: the Pallas kernels inside a shard_map.
    `layer_loop` (`LAYER_LOOPS`): "auto" runs the blocks as a Python loop over per-layer weights on one CPU device
    and as one scanned body elsewhere; both give the same tokens. Unrolled, stacked block params are split into
    per-layer ones here (a copy of the block weights per call; pass `var.per_layer_blocks` params to skip it) and
    compile time grows with depth.
    Per-image work runs in bounded chunks (`chunks`), so that the program's temporaries stop growing with the
    batch: each scale runs over chunks of images one after the other (`chunks.image_chunk`), each chunk's token
    inputs, blocks (against its rows of the whole cache, `VAR.step_rows`), head and sampler together, so that only
    one chunk's activations exist at once; between scales only the VQ-VAE's small inputs to the next scale are kept
    for the whole batch. The VQ-VAE decode runs in chunks too. Every image draws from numbers of its own, one
    uniform per token drawn once for the whole generation (`sampling.image_keys`, `sampling.token_uniforms`), so
    the tokens do not depend on the chunks. `row_chunk` (a divisor of 2·len(labels), the rows under guidance) fixes
    the blocks' chunk of rows for every scale (2·len(labels): all rows at once); None picks it per scale
    (`chunks.block_row_chunk`). Not with a mesh (a device's rows are already a share of the batch; each scale then
    runs on the whole batch).
    """
    top_k = default_top_k(config) if top_k is None else top_k
    validate(config, labels, top_k=top_k, top_p=top_p, dtype=dtype, impl=impl, kv_dtype=kv_dtype,
             layer_loop=layer_loop)
    if "vqvae" not in params:
        raise MissingVQVAEError(
            f"params hold {', '.join(map(repr, params))} but no 'vqvae': a checkpoint converted without --vae cannot "
            f"generate images ({MissingVQVAEError.FIX})"
        )
    layout = layout if layout is not None else FullCache().layout(config.var)
    if len(layout.layers) != config.var.depth or layout.patch_nums != config.var.patch_nums:
        raise UserError(
            f"layout for {len(layout.layers)} layers and ladder {layout.patch_nums} does not fit a model of depth "
            f"{config.var.depth} with ladder {config.var.patch_nums}"
        )
    rows = 2 * np.shape(labels)[0]
    if row_chunk is not None and (mesh is not None or isinstance(row_chunk, bool) or not isinstance(row_chunk, int)
                                  or row_chunk < 1 or rows % row_chunk):
        raise UserError(f"row_chunk must be None (automatic) or a divisor of the {rows} rows (2 per image), without a "
                        f"mesh; got {row_chunk!r}" + (" with a mesh" if mesh is not None else ""))
    unrolled = resolve_layer_loop(layer_loop, mesh) == "unrolled"
    if not unrolled and isinstance(params["var"]["params"]["blocks"], tuple):
        raise UserError(f"layer_loop {layer_loop!r} runs the scan over stacked block params, but these are per-layer "
                         "(var.per_layer_blocks); pass the stacked params or layer_loop='unrolled'")
    if mesh is not None:
        sharding.check_mesh(config, np.shape(labels)[0], mesh)
        params = sharding.shard_params(params, mesh)
        labels, key = sharding.place_rows(jnp.asarray(labels, jnp.int32), mesh), sharding.replicate(key, mesh)
    if unrolled:
        params = {**params, "var": per_layer_blocks(params["var"])}
    params, stack_bits = with_stack_bits(params, unrolled, mesh)
    with contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh):  # the Pallas kernels shard over it
        return _generate(
            params, jnp.asarray(labels, jnp.int32), key, jnp.float32(cfg), jnp.float32(top_p),
            config=config, layout=layout, top_k=top_k, more_smooth=more_smooth, dtype=dtype, impl=impl,
            kv_dtype=kv_dtype, progress=progress, return_logits=return_logits, mesh=mesh, row_chunk=row_chunk,
            stack_bits=stack_bits,
        )


def with_stack_bits(params: dict, unrolled: bool, mesh) -> tuple[dict, str | None]:
    """(params, None), or on one CPU device with the scanned loop and 16-bit block stacks, (params with the stacks
    as uint16 views of the same memory, their dtype's name) (`var.stack_bit_views`): XLA:CPU would otherwise hold a
    copy of the stacks (their bits, or float32) for the whole program. Exact: the scan bitcasts each layer's slice
    back. `amskv_jax.memory` compiles the program this way too."""
    if unrolled or mesh is not None or jax.default_backend() != "cpu":
        return params, None
    blocks, bits = stack_bit_views(params["var"]["params"]["blocks"])
    if bits is None:
        return params, None
    var = {**params["var"], "params": {**params["var"]["params"], "blocks": blocks}}
    return {**params, "var": var}, jnp.dtype(bits).name


def _report_scale(si: int, num_scales: int, pn: int, _tokens) -> None:
    print(f"scale {si + 1}/{num_scales}: {pn}x{pn} tokens", flush=True)


@functools.partial(
    jax.jit,
    static_argnames=(
        "config", "layout", "top_k", "more_smooth", "dtype", "impl", "progress", "return_logits", "mesh", "kv_dtype",
        "row_chunk", "stack_bits",
    ),
)
def _generate(
    params, labels_B, key, cfg, top_p, *, config, layout, top_k, more_smooth, dtype, impl, progress, return_logits,
    mesh=None, kv_dtype=None, row_chunk=None, stack_bits=None,
):
    c = config.var
    var = VAR(c, dtype=DTYPES[dtype], impl=impl, stack_bits=None if stack_bits is None else jnp.dtype(stack_bits))
    vqvae = VQVAE(config.vqvae)
    batch = labels_B.shape[0]
    label_2B = sampling.guidance_rows(labels_B, c.num_classes)  # a data shard holds both rows of its images
    cond_BD = sharding.constrain(var.apply(params["var"], label_2B, method=VAR.condition), mesh)
    cond_B2D = cond_BD.reshape(batch, 2, -1)  # both rows of each image
    cache = init_cache(layout, 2 * batch, c.num_heads, c.head_dim, DTYPES[dtype], kv_dtype=kv_dtype)
    cache = sharding.constrain_cache(cache, mesh)
    codebook = params["vqvae"]["params"]["quantize"]["embedding"]["embedding"]
    pn_last = c.patch_nums[-1]
    f_hat = jnp.zeros((batch, pn_last, pn_last, c.cvae), jnp.float32)
    tokens, guided, finite = [], [], []
    devices = 1 if mesh is None else mesh.shape.get("data", 1)
    next_BlCv = None  # the VQ-VAE's input to the next scale, [B, l, Cvae]: the state between scales
    keys_B2 = sampling.image_keys(key, jnp.arange(batch, dtype=jnp.int32))
    uniforms_BL = sampling.token_uniforms(keys_B2[:, 0], c.seq_len)
    for si, pn in enumerate(c.patch_nums):
        ratio = sampling.guidance_ratio(si, c.num_scales)

        def sample(h_b2lC, cond_b2D, uniforms_bl, noise_keys_b, si=si, ratio=ratio):
            """The head, guidance and one draw per token for a chunk of b images (both rows of each)."""
            flat = lambda a: a.reshape(-1, *a.shape[2:])  # noqa: E731
            logits = var.apply(params["var"], flat(h_b2lC), flat(cond_b2D), method=VAR.logits)
            logits = sampling.apply_guidance(logits, cfg, ratio)
            ok = jnp.isfinite(logits).all(axis=(1, 2))
            # row-local, but XLA does not partition lax.top_k by rows: run the filter shard by shard
            kept = sharding.per_row(lambda lg, p: sampling.top_k_top_p_filter(lg, top_k, p), mesh)(logits, top_p)
            idx_bl = sampling.sample_tokens(uniforms_bl, kept)
            if more_smooth:
                keys = jax.vmap(lambda k: jax.random.fold_in(k, si))(noise_keys_b)
                h_blC = sampling.gumbel_smooth(keys, kept, ratio, codebook.astype(jnp.float32))
            else:
                h_blC = codebook[idx_bl].astype(jnp.float32)
            return idx_bl, h_blC, ok, logits if return_logits else None

        def scale_for_images(kinds, xs, si=si, sample=sample):
            """Scale si for a chunk of m images (rows [2·m·j, 2·m·(j + 1)) of the cache): their tokens' inputs,
            the blocks, the head and the draw; only the chunk's activations exist at once."""
            j, cond_m2D, next_mlCv, uniforms_ml, noise_keys_m = xs
            cond_2mD = cond_m2D.reshape(-1, cond_m2D.shape[-1])
            if next_mlCv is None:
                x = var.apply(params["var"], cond_2mD, method=VAR.first_input)
            else:
                x = jnp.repeat(var.apply(params["var"], si, next_mlCv, method=VAR.next_input), 2, axis=0)
            x = sharding.constrain(x, mesh)
            h_2mlC, kinds = var.apply(params["var"], x, cond_2mD, kinds, si, layout, inner_rows,
                                      2 * images * j, method=VAR.step_rows)
            h_2mlC = sharding.constrain(h_2mlC, mesh)
            pairs = lambda a: a.reshape(-1, 2, *a.shape[1:])  # noqa: E731
            return kinds, map_in_chunks(sample, sampler_chunk(c, si) * devices, pairs(h_2mlC), cond_m2D,
                                         uniforms_ml, noise_keys_m)

        images, inner_rows = (batch, None) if mesh is not None else image_chunk(c, batch, si, row_chunk)
        per_chunk = lambda a: None if a is None else a.reshape(batch // images, images, *a.shape[1:])  # noqa: E731
        xs = (jnp.arange(batch // images, dtype=jnp.int32), per_chunk(cond_B2D), per_chunk(next_BlCv),
              per_chunk(uniforms_BL[:, slice(*c.begin_ends[si])]), per_chunk(keys_B2[:, 1]))
        if images == batch:
            kinds, (idx_Bl, h_BlC, ok, logits) = scale_for_images(cache.kinds, jax.tree.map(lambda a: a[0], xs))
        else:
            kinds, out = jax.lax.scan(scale_for_images, cache.kinds, xs)
            idx_Bl, h_BlC, ok, logits = jax.tree.map(lambda a: a.reshape(batch, *a.shape[2:]), out)
        cache = sharding.constrain_cache(mark_scale(KVCache(kinds=kinds), layout, si), mesh)
        tokens.append(idx_Bl)
        finite.append(ok)
        if return_logits:
            guided.append(logits)
        if progress:
            # ordered effects need a single device; sharded, one (replicated) token sequences the print after
            # the draw, and each scale's draw depends on the previous one's
            jax.debug.callback(
                functools.partial(_report_scale, si, c.num_scales, pn),
                idx_Bl if mesh is None else sharding.constrain(idx_Bl[:1, :1], mesh, sharding.REPLICATED),
                ordered=mesh is None,
            )
        f_hat, next_BlCv = vqvae.apply(
            params["vqvae"], si, f_hat, h_BlC.reshape(batch, pn, pn, c.cvae), method=VQVAE.next_input
        )
        if next_BlCv is not None:
            next_BlCv = sharding.constrain(next_BlCv, mesh)
    chunk = decode_chunk(config.vqvae) * devices  # images per device
    images = sharding.constrain(decode_in_chunks(vqvae, params["vqvae"], f_hat, chunk), mesh)
    return Generation(tokens=tuple(tokens), images=(images.astype(jnp.float32) + 1) * 0.5, finite=jnp.stack(finite, axis=1),
                      logits=tuple(guided))


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


@cli.command("python -m amskv_jax.generate")
def main(argv=None) -> int:
    from PIL import Image

    from amskv_jax.checkpoint import DEFAULT_MODEL, EMBEDDED, load_model
    from amskv_jax.policies import (
        DEFAULT_MAX_DELTA_NLL, DEFAULT_POLICY, POLICIES, default_policy_name, policy_from_name, read_calibration,
    )

    parser = argparse.ArgumentParser(prog="python -m amskv_jax.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"an embedded trained model ({', '.join(EMBEDDED)}), a preset name (random weights) or a "
                        "converted checkpoint dir")
    parser.add_argument("--labels", default=None,
                        help="comma-separated class indices, one grid row each (default: the first 10 classes)")
    parser.add_argument("--batch", type=int, default=None,
                        help="images per label, one grid column each (default: 8 without --labels, else 1)")
    parser.add_argument("--policy", default=None, choices=list(POLICIES),
                        help=f"KV-cache policy (default: {DEFAULT_POLICY} where the model's calibration records its "
                        f"searched policy's held-out ΔNLL at most {DEFAULT_MAX_DELTA_NLL:.0%}, as emoji32's does; "
                        "else full)")
    parser.add_argument("--calibration", default=None,
                        help="a calibration JSON choosing AMS-KV's demanding layers (default: the model's layers.json)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cfg", type=float, default=1.5, help="classifier-free guidance at the last scale")
    parser.add_argument("--top-k", type=int, default=None, help="default: 900, capped at the vocabulary; 0 = off")
    parser.add_argument("--top-p", type=float, default=0.96)
    parser.add_argument("--more-smooth", action="store_true", help="Gumbel-softmax code mixtures (visualisation)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--kv-dtype", default=None, choices=KV_DTYPES,
                        help="how the KV cache stores K/V (default: the compute dtype --dtype)")
    parser.add_argument("--out", default="grid.png")
    parser.add_argument("--compare", action="store_true",
                        help="also run the full cache on the same labels and seeds and write one grid with both: for "
                        "every label, the full cache's row above the chosen policy's")
    parser.add_argument("--mesh", default=None, help="shard over the devices, e.g. data=4,model=2 (batch over data, "
                        "heads and MLP over model; default: one device)")
    cli.add_verify_flag(parser)
    compile_cache.add_flag(parser)
    args = parser.parse_args(argv)
    cache_dir = compile_cache.enable(args.no_compile_cache)

    model = load_model(args.model, verify=args.verify)
    try:
        labels = _labels(args.labels, args.batch, model.config.var.num_classes)
        top_k = default_top_k(model.config) if args.top_k is None else args.top_k
        validate(model.config, labels, top_k=top_k, top_p=args.top_p, dtype=args.dtype, kv_dtype=args.kv_dtype)
        calibration = read_calibration(args.calibration, model.config.var) if args.calibration else model.calibration
        name, why = (args.policy, None) if args.policy else default_policy_name(calibration)
        policy = policy_from_name(name, model.config.var, calibration)
        mesh = sharding.mesh_from_text(args.mesh) if args.mesh else None
        if mesh is not None:
            sharding.check_mesh(model.config, len(labels), mesh)
    except (UserError, FileNotFoundError) as err:
        parser.error(str(err))
    layout = policy.layout(model.config.var)
    full_layout = FullCache().layout(model.config.var)
    rows = [int(x) for x in dict.fromkeys(labels.tolist())]
    names = [f"{x} {model.classes[x]}" if model.classes else str(x) for x in rows]
    print(f"model {args.model}: {model.description}; {len(labels)} images, one row per label: {', '.join(names)}",
          flush=True)
    if why is not None:
        print(f"policy {name} (no --policy given: {why})", flush=True)
    print(describe_cache(policy.describe(), layout, full_layout, model.config, len(labels), args.dtype, args.kv_dtype),
          flush=True)

    if mesh is not None:
        print(f"mesh: {sharding.describe(mesh)}", flush=True)
    runs = [(policy.describe(), layout)] + ([("full cache", full_layout)] if args.compare else [])
    grids = []
    for name, run_layout in runs:
        start = time.perf_counter()
        # Returns once the program is compiled (or loaded from the persistent cache) and dispatched; it runs meanwhile.
        # No per-scale progress lines: a program with host callbacks cannot be written to the persistent cache.
        out = generate(
            model.params, labels, jax.random.key(args.seed), config=model.config, layout=run_layout, cfg=args.cfg,
            top_k=top_k, top_p=args.top_p, more_smooth=args.more_smooth, dtype=args.dtype, kv_dtype=args.kv_dtype,
            mesh=mesh,
        )
        dispatched = time.perf_counter()
        print(f"{name}: compiled in {dispatched - start:.2f} s ({compile_cache.describe(cache_dir)}); generating "
              f"{model.config.var.num_scales} scales ...", flush=True)
        images = np.asarray(jax.block_until_ready(out.images))
        seconds = time.perf_counter() - dispatched
        bad = first_nonfinite_scale(out.finite)
        if bad is not None:
            raise UserError(
                f"{args.model}: the logits of scale {bad + 1}/{model.config.var.num_scales} (1-based)"
                f" are not finite, so no image was written to {args.out}; the weights are probably untrained or "
                "damaged"
            )
        print(f"{name}: {len(labels)} images in {seconds:.2f} s ({len(labels) / seconds:.2f} images/s, compilation "
              "excluded)", flush=True)
        grids.append(images.reshape(len(rows), -1, *images.shape[1:]))
    # --compare: each label's full-cache row directly above the policy's row (same seeds, so same column = same draw)
    images = np.stack(grids[::-1], axis=1).reshape(-1, *grids[0].shape[2:])
    Image.fromarray(image_grid(images, columns=len(labels) // len(rows))).save(args.out)
    layout_text = "rows alternate: full cache, then " + policy.describe() if args.compare else "one row per label"
    print(f"wrote {args.out} ({layout_text})")
    return 0


def describe_cache(name: str, layout: CacheLayout, full_layout: CacheLayout, config: ModelConfig, batch: int,
                   dtype: str, kv_dtype: str | None) -> str:
    """One line: the cache this run allocates beside the full cache's (slots, bytes, the share saved)."""
    from amskv_jax.memory import layout_bytes

    used, _ = layout_bytes(layout, config.var, batch, dtype, kv_dtype)
    full, _ = layout_bytes(full_layout, config.var, batch, dtype)
    slots, full_slots = sum(layout.capacities), sum(full_layout.capacities)
    return (f"cache: {name}: {slots} slots, {used / 2**20:.2f} MiB for {batch} images; full cache ({dtype}): "
            f"{full_slots} slots, {full / 2**20:.2f} MiB; saved {100 * (1 - used / full):.1f}%")


def _labels(text: str | None, batch: int | None, num_classes: int) -> np.ndarray:
    """Each label repeated `batch` times in a row: the grid then has one row per label."""
    if batch is not None and batch < 1:
        raise UserError(f"--batch must be >= 1, got {batch}")
    if text is None:
        labels, batch = list(range(min(num_classes, 10))), batch or 8
    else:
        try:
            labels = [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise UserError(f"--labels must be comma-separated integers, got {text!r}") from None
        if len(set(labels)) != len(labels):
            raise UserError(f"--labels repeats a class ({text!r}); use --batch for more images per class")
    return np.repeat(np.asarray(labels, np.int32), batch or 1)


if __name__ == "__main__":
    sys.exit(main())
