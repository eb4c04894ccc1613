"""Convert PyTorch VAR / VQ-VAE checkpoints into an amskv_jax checkpoint directory (no torch needed).

    python -m convert.from_torch var_d30.pth [--vae vae_ch160v4096z32.pth] [--out var_d30_flax]

The configuration is inferred from tensor shapes (VAR_SPEC.md, "Checkpoint keys"): depth = number of blocks,
C and Cvae from `word_embed.weight`, V from `head.weight`, the ladder from `pos_1LC`'s length, shared AdaLN from
`ada_gss`, L2-normalised attention and the head count from `scale_mul_1H11`. Every key is mapped onto the Flax
params tree; leftovers, missing keys and wrong shapes are errors naming the file and the key.

Without `--vae` the VQ-VAE is looked for beside the VAR file (VAE_NAMES: the reference publishes
`vae_ch160v4096z32.pth` with every VAR); without one the VAR alone is converted, with a warning that the result cannot
generate images. Conversion streams: the files are memory-mapped and each array is read, laid out, cast and written
on its own (`amskv_jax.lazy`), so memory stays near the input file's size plus its largest array.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from amskv_jax import cli
from amskv_jax.checkpoint import save_checkpoint
from amskv_jax.config import PATCH_NUMS_256, PATCH_NUMS_512, PRESETS, ModelConfig, VARConfig, VQVAEConfig
from amskv_jax.errors import UserError
from amskv_jax.var import VAR
from amskv_jax.vqvae import VQVAE
from convert.mapping import lazy_params
from convert.torch_pickle import open_state_dict

KNOWN_LADDERS = (PATCH_NUMS_256, PATCH_NUMS_512, (1, 2, 3, 4))
OUT_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
# VQ-VAE files looked for beside the VAR checkpoint when --vae is not given, in this order: the one the reference
# publishes with every VAR (https://huggingface.co/FoundationVision/var), then the names of a reference dump.
VAE_NAMES = ("vae_ch160v4096z32.pth", "vae.pth", "vae.safetensors", "vae_f16.safetensors")


class ConversionError(UserError):
    """A checkpoint that cannot be converted; the message names the file and the problem."""


def _shape(sd, key, source):
    if key not in sd:
        raise ConversionError(f"{source}: missing key {key!r}; is this a VAR checkpoint?")
    return tuple(sd[key].shape)


def infer_var_config(sd, source: str, *, heads: int | None = None, patch_nums=None) -> VARConfig:
    """The VAR configuration implied by a state dict's shapes (see module docstring)."""
    embed_dim, cvae = _shape(sd, "word_embed.weight", source)
    vocab_size = _shape(sd, "head.weight", source)[0]
    seq_len = _shape(sd, "pos_1LC", source)[1]
    num_scales = _shape(sd, "lvl_embed.weight", source)[0]
    depth = len({m.group(1) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})
    if patch_nums is None:
        matches = [p for p in KNOWN_LADDERS if sum(n * n for n in p) == seq_len and len(p) == num_scales]
        if not matches:
            raise ConversionError(
                f"{source}: pos_1LC has {seq_len} tokens over {num_scales} scales, which matches no known ladder "
                f"{KNOWN_LADDERS}; pass --patch-nums"
            )
        patch_nums = matches[0]
    l2_norm = "blocks.0.attn.scale_mul_1H11" in sd
    if heads is not None and heads < 1:
        raise ConversionError(f"{source}: --heads must be >= 1, got {heads}")
    if l2_norm:
        stored = _shape(sd, "blocks.0.attn.scale_mul_1H11", source)[1]
        if heads is not None and heads != stored:
            raise ConversionError(
                f"{source}: --heads {heads} disagrees with key 'blocks.0.attn.scale_mul_1H11', which holds one scale "
                f"per head for {stored} heads; leave --heads out"
            )
        heads = stored
    elif heads is None:
        heads = embed_dim // 64
    try:
        return VARConfig(
            depth=depth, embed_dim=embed_dim, num_heads=heads,
            num_classes=_shape(sd, "class_emb.weight", source)[0] - 1, patch_nums=tuple(patch_nums),
            vocab_size=vocab_size, cvae=cvae, mlp_ratio=_shape(sd, "blocks.0.ffn.fc1.weight", source)[0] / embed_dim,
            shared_aln="blocks.0.ada_gss" in sd, attn_l2_norm=l2_norm,
        )
    except UserError as err:
        raise ConversionError(f"{source}: {err}") from None


def infer_vqvae_config(sd, source: str, patch_nums) -> VQVAEConfig:
    vocab_size, z_channels = _shape(sd, "quantize.embedding.weight", source)
    ch = _shape(sd, "encoder.conv_in.weight", source)[0]
    levels = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    ch_mult = tuple(_shape(sd, f"encoder.down.{i}.block.0.conv1.weight", source)[0] // ch for i in levels)
    res_blocks = len({m.group(1) for k in sd if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))})
    shares = len({m.group(1) for k in sd if (m := re.match(r"quantize\.quant_resi\.qresi_ls\.(\d+)\.", k))})
    return VQVAEConfig(
        vocab_size=vocab_size, z_channels=z_channels, ch=ch, ch_mult=ch_mult, num_res_blocks=res_blocks,
        using_sa=any(k.startswith(f"encoder.down.{levels[-1]}.attn.") for k in sd),
        using_mid_sa="encoder.mid.attn_1.qkv.weight" in sd,
        share_quant_resi=max(shares, 1), patch_nums=tuple(patch_nums),
    )


def var_params(sd, config: VARConfig, source: str) -> dict:
    target = jax.eval_shape(
        lambda: VAR(config).init(
            jax.random.key(0), jnp.zeros((1,), jnp.int32), jnp.zeros((1, config.seq_len - config.first_l, config.cvae))
        )
    )
    return {"params": lazy_params(sd, target["params"], source=source)}


def vqvae_params(sd, config: VQVAEConfig, source: str) -> dict:
    img = jnp.zeros((1, config.image_size, config.image_size, 3))
    target = jax.eval_shape(lambda: VQVAE(config).init(jax.random.key(0), img))
    return {"params": lazy_params(sd, target["params"], source=source)}


def convert(var_path, vae_path=None, *, heads=None, patch_nums=None, log=print):
    """Read and map the checkpoints. Returns (ModelConfig, params) with params in the files' dtypes."""
    config, params = open_checkpoints(var_path, vae_path, heads=heads, patch_nums=patch_nums, log=log)
    return config, jax.tree.map(np.asarray, params)


def open_checkpoints(var_path, vae_path=None, *, heads=None, patch_nums=None, log=print):
    """Open and map the checkpoints without reading their values: (ModelConfig, params) whose leaves are LazyArrays
    over the memory-mapped files, in the files' dtypes (`amskv_jax.lazy`)."""
    var_sd = open_state_dict(var_path, log=log, which="var")
    var_config = infer_var_config(var_sd, str(var_path), heads=heads, patch_nums=patch_nums)
    params = {"var": var_params(var_sd, var_config, str(var_path))}
    if vae_path is None:
        vae_config = VQVAEConfig(vocab_size=var_config.vocab_size, z_channels=var_config.cvae,
                                 patch_nums=var_config.patch_nums)
    else:
        vae_sd = open_state_dict(vae_path, log=log, which="vae")
        vae_config = infer_vqvae_config(vae_sd, str(vae_path), var_config.patch_nums)
        params["vqvae"] = vqvae_params(vae_sd, vae_config, str(vae_path))
    try:
        config = ModelConfig(var=var_config, vqvae=vae_config)
    except UserError as err:
        raise ConversionError(f"{var_path} and {vae_path} do not belong together: {err}") from None
    return config, params


def find_vae(directory: str | Path) -> Path | None:
    """The VQ-VAE checkpoint in `directory` under one of VAE_NAMES (the first that exists), else None."""
    return next((Path(directory) / name for name in VAE_NAMES if (Path(directory) / name).is_file()), None)


def cast_params(params, dtype) -> dict:
    """Floating leaves to `dtype` (numpy / ml_dtypes); integer leaves untouched. LazyArrays stay lazy."""
    def cast(x):
        floating = np.issubdtype(x.dtype, np.floating) or x.dtype == ml_dtypes.bfloat16
        return x.astype(dtype) if floating else x

    return jax.tree.map(cast, params)


def count_params(params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def matching_preset(config: ModelConfig, *, with_vqvae: bool = True) -> str | None:
    """The name of the preset with this architecture (training-only settings such as cond_drop_rate aside); the
    VQ-VAE is compared only `with_vqvae` (without a VQ-VAE checkpoint its config is a placeholder)."""
    def arch(c: ModelConfig):
        return dataclasses.replace(c.var, cond_drop_rate=0.0), c.vqvae if with_vqvae else None

    return next((name for name, preset in PRESETS.items() if arch(preset) == arch(config)), None)


@cli.command("python -m convert.from_torch")
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convert.from_torch", description=__doc__.split("\n\n")[0])
    parser.add_argument("var", help="VAR checkpoint (.pth zip or legacy, training checkpoint, or .safetensors)")
    parser.add_argument("--vae", help="VQ-VAE checkpoint, needed to generate images (default: the first of "
                        f"{', '.join(VAE_NAMES)} beside VAR)")
    parser.add_argument("--out", help="output directory (default: next to the input, <name>_flax)")
    parser.add_argument("--dtype", choices=sorted(OUT_DTYPES), default="float32")
    parser.add_argument("--heads", type=int, help="attention heads (default: from scale_mul_1H11, else C/64)")
    parser.add_argument("--patch-nums", help="comma-separated token ladder, when it is not a published one")
    args = parser.parse_args(argv)

    var_path = Path(args.var)
    out = Path(args.out) if args.out else var_path.with_name(var_path.stem + "_flax")
    if (out / "params").exists():
        parser.error(f"{out} already holds a checkpoint; choose another --out")
    patch_nums = tuple(int(x) for x in args.patch_nums.split(",")) if args.patch_nums else None
    vae_path = Path(args.vae) if args.vae else find_vae(var_path.parent)
    if vae_path is not None:
        print(f"VQ-VAE: {vae_path}" + ("" if args.vae else f" (found beside {var_path.name}; --vae chooses another)"))
    start = time.perf_counter()
    config, params = open_checkpoints(var_path, vae_path, heads=args.heads, patch_nums=patch_nums)
    save_checkpoint(out, config, cast_params(params, OUT_DTYPES[args.dtype]))
    v = config.var
    preset = matching_preset(config, with_vqvae=vae_path is not None) or "none (custom architecture)"
    print(f"preset: {preset}; depth {v.depth}, width {v.embed_dim}, {v.num_heads} heads, ladder {v.patch_nums}, "
          f"{config.vqvae.image_size}px, shared AdaLN {v.shared_aln}")
    print(f"parameters: VAR {count_params(params['var']):,}"
          + (f", VQ-VAE {count_params(params['vqvae']):,}" if "vqvae" in params else ", no VQ-VAE"))
    print(f"dtype {args.dtype}; wrote {out} in {time.perf_counter() - start:.1f} s")
    if vae_path is None:
        again = shlex.join(["python", "-m", "convert.from_torch", str(var_path), "--vae", VAE_NAMES[0], "--out",
                            str(out)])
        print(f"warning: no VQ-VAE: --vae was not given and {var_path.parent} holds none of {', '.join(VAE_NAMES)}. "
              f"{out} holds the VAR only and cannot generate images until a VQ-VAE is added; convert again with "
              f"one (the reference publishes {VAE_NAMES[0]} beside its VAR checkpoints): rm -r {shlex.quote(str(out))} "
              f"&& {again}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
