"""Map a PyTorch state dict onto a Flax params tree.

Our Flax modules are named after the reference's module paths, with list indices joined to the preceding name:
torch `encoder.down.0.block.1.conv1.weight` is Flax `encoder/down_0/block_1/conv1/kernel`, torch
`blocks.3.ada_lin.1.weight` is `blocks_3/ada_lin_1/kernel` in the per-block layout. The VAR stacks its blocks
(`blocks/ada_lin_1/kernel` [D, ...], mat_qkv's kernel [D, C, 3, H, Dh]): a target with stacked blocks is mapped in
the per-block layout and stacked afterwards (`amskv_jax.var.stack_blocks`). Leaves change layout only:

| torch leaf | Flax leaf | layout |
|---|---|---|
| Linear `weight` (out, in) | `kernel` (in, out) | transposed |
| Conv2d `weight` (out, in, kh, kw) | `kernel` (kh, kw, in, out) | NHWC convolution |
| Embedding / GroupNorm `weight` | `embedding` / `scale` | unchanged |
| `bias` and bare parameters (`pos_1LC`, `q_bias`, ...) | same name | unchanged |

The target tree (from `model.init`, or `jax.eval_shape` of it) decides which Flax leaf a torch `weight` becomes, so
one rule serves the VAR and the VQ-VAE. Buffers the reference recomputes are dropped; anything else left over,
missing or of the wrong shape is an error naming the key.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import jax
import numpy as np

from amskv_jax.errors import UserError
from amskv_jax.lazy import LazyArray
from amskv_jax.var import unstack_blocks

# Buffers of the reference that are recomputed here (masks, level indices, zero biases, training statistics).
BUFFER_PATTERNS = (
    r"lvl_1L",
    r"attn_bias_for_masking",
    r"blocks\.\d+\.attn\.zero_k_bias",
    r"quantize\.ema_vocab_hit_SV",
)
_BUFFER_RE = re.compile("|".join(f"(?:{p})" for p in BUFFER_PATTERNS))


class MappingError(UserError):
    """A state dict that does not fit the model; the message names the key and the problem."""


def is_buffer(key: str) -> bool:
    return _BUFFER_RE.fullmatch(key) is not None


def torch_key_to_path(key: str) -> tuple[str, ...]:
    """'blocks.3.ada_lin.1.weight' -> ('blocks_3', 'ada_lin_1', 'weight') (leaf name still torch's)."""
    path: list[str] = []
    for part in key.split("."):
        if part.isdigit() and path:
            path[-1] = f"{path[-1]}_{part}"
        else:
            path.append(part)
    return tuple(path)


def _flax_axes(ndim: int, flax_leaf: str) -> tuple[int, ...]:
    """The transpose that takes a torch leaf to the Flax leaf `flax_leaf` (see the module docstring's table)."""
    if flax_leaf == "kernel" and ndim == 2:
        return (1, 0)
    if flax_leaf == "kernel" and ndim == 4:
        return (2, 3, 1, 0)
    return tuple(range(ndim))


def _flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], object]:
    out = {}
    for name, sub in tree.items():
        if isinstance(sub, Mapping):
            out.update(_flatten(sub, prefix + (name,)))
        else:
            out[prefix + (name,)] = sub
    return out


def _unflatten(flat: Mapping[tuple[str, ...], object]) -> dict:
    tree: dict = {}
    for path, leaf in flat.items():
        node = tree
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = leaf
    return tree


def state_dict_to_params(
    state_dict: Mapping[str, np.ndarray], target: Mapping, *, prefix: str = "", source: str = "state dict"
) -> dict:
    """`lazy_params`, materialised: a nested dict of numpy arrays in the state dict's dtype."""
    return jax.tree.map(np.asarray, lazy_params(state_dict, target, prefix=prefix, source=source))


def lazy_params(
    state_dict: Mapping[str, np.ndarray | LazyArray], target: Mapping, *, prefix: str = "", source: str = "state dict"
) -> dict:
    """Map `state_dict` (torch keys, numpy arrays or LazyArrays) onto the structure and shapes of `target` (a Flax
    params tree) without reading any values.

    `prefix` selects the keys under one torch module (e.g. `"quantize."`) and is stripped. Returns a nested dict of
    LazyArrays in the state dict's dtype, each laid out for Flax when materialised (conversion streams them into
    the checkpoint one at a time). Raises MappingError naming `source` and the key for every mismatch.
    """
    if "blocks" in target:
        heads = target["blocks"]["attn"]["mat_qkv"]["kernel"].shape[3]
        per_block = jax.eval_shape(unstack_blocks, target)
        return _stack_lazy(lazy_params(state_dict, per_block, prefix=prefix, source=source), heads)
    flat_target = _flatten(target)
    by_torch_path = {}
    for path in flat_target:
        leaf = path[-1]
        torch_leaf = "weight" if leaf in ("kernel", "embedding", "scale") else leaf
        by_torch_path[path[:-1] + (torch_leaf,)] = path

    params, problems = {}, []
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        short = key[len(prefix):]
        if is_buffer(short):
            continue
        flax_path = by_torch_path.get(torch_key_to_path(short))
        if flax_path is None:
            problems.append(f"unexpected key {key!r} {tuple(value.shape)}: the model has no such parameter")
            continue
        lazy = value if isinstance(value, LazyArray) else LazyArray.of(value)
        axes = _flax_axes(lazy.ndim, flax_path[-1])
        shape = tuple(lazy.shape[i] for i in axes)
        want = tuple(flat_target[flax_path].shape)
        if shape != want:
            problems.append(f"key {key!r}: shape {lazy.shape} maps to {shape}, the model expects {want}")
            continue
        params[flax_path] = lazy.map(lambda x, axes=axes: x.transpose(axes), shape)
    missing = [prefix + ".".join(_torch_name(p)) for p in flat_target if p not in params]
    problems += [f"missing key {k!r}" for k in missing]
    if problems:
        raise MappingError(f"{source}: " + "; ".join(problems[:20]) + (" ..." if len(problems) > 20 else ""))
    return _unflatten(params)


def _stack_lazy(var_params: dict, num_heads: int) -> dict:
    """`var.stack_blocks` over LazyArrays: a stacked leaf [D, ...] reads its D per-block sources only when it is
    materialised, each straight into its row (`LazyArray.stack`), so conversion holds one stack at a time."""
    depth = len([k for k in var_params if k.startswith("blocks_")])
    per_block = [var_params[f"blocks_{i}"] for i in range(depth)]
    for block in per_block:  # mat_qkv's kernel [C, 3C] -> [C, 3, H, Dh], as stack_blocks lays it out
        kernel = block["attn"]["mat_qkv"]["kernel"]
        shape = (kernel.shape[0], 3, num_heads, kernel.shape[1] // (3 * num_heads))
        block["attn"]["mat_qkv"]["kernel"] = kernel.map(lambda x, shape=shape: x.reshape(shape), shape)
    blocks = jax.tree.map(lambda *leaves: LazyArray.stack(leaves), *per_block)
    return {**{k: v for k, v in var_params.items() if not k.startswith("blocks_")}, "blocks": blocks}


def _torch_name(path: Iterable[str]) -> list[str]:
    """Inverse of `torch_key_to_path` for messages: ('blocks_3', 'kernel') -> ['blocks', '3', 'weight']."""
    parts = []
    for name in path:
        match = re.fullmatch(r"(.+?)_(\d+)", name)
        parts += [match.group(1), match.group(2)] if match else [name]
    if parts[-1] in ("kernel", "embedding", "scale"):
        parts[-1] = "weight"
    return parts
