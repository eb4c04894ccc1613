"""Sharded generation with JAX's own SPMD: a ("data", "model") device mesh and where every array lives on it.

No communication is written by hand. Arrays are placed with `jax.device_put(x, NamedSharding(mesh, spec))` and the
jitted program pins its intermediates with `jax.lax.with_sharding_constraint`; XLA's SPMD partitioner derives the
collectives (the all-reduces of the model axis, the final gather of the images when the caller reads them).

* "data": the batch. Under classifier-free guidance the model runs 2·B rows; `generate` interleaves them
  (row 2i: image i's class, row 2i+1: the null class), so a contiguous block of rows holds whole images with both
  of their halves and guidance combines rows that sit on the same device. The KV cache's rows follow the batch.
* "model": Megatron-style tensor parallelism inside every block. mat_qkv (kernel [C, 3, H, Dh]) is split along
  its heads and fc1 column-split, proj and fc2 row-split (partial sums that XLA all-reduces: two all-reduces per
  block and scale), q_bias / v_bias / scale_mul and fc1's bias follow the heads / hidden units; attention and the
  KV cache are split by heads, so q, k and v never leave their device. Everything else (embeddings, AdaLN, head,
  the VQ-VAE) is replicated. Block params are stacked on a leading depth axis (`blocks`), never split.

    mesh = make_mesh(data=4, model=2)                 # or make_mesh() = every device on "data"
    out = generate(params, labels, key, config=config, mesh=mesh)

`check_mesh` rejects, before anything compiles, a batch the data axis does not divide and a head count or MLP
width the model axis does not divide. On several hosts call `jax.distributed.initialize()` first; the mesh then
spans every process's devices and the same code runs on each (README, "Many devices").
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from amskv_jax.cache import CacheLayout, KVCache, init_cache
from amskv_jax.config import ModelConfig, VARConfig
from amskv_jax.errors import UserError

AXES = ("data", "model")
ROWS = P("data")  # anything whose leading axis is the batch (or the 2·B guidance rows)
REPLICATED = P()
CACHE_KV = P(None, "data", None, "model", None)  # a kind's k, v (and k_scale): [n, rows, slots, H, Dh]

# (module, parameter) -> spec, for the parameters of a transformer block's attention and MLP, each stacked on a
# leading depth axis [D, ...] that stays whole (the layer scan slices it).
BLOCK_SPECS = {
    ("mat_qkv", "kernel"): P(None, None, None, "model", None),  # [D, C, 3, H, Dh] split by heads
    ("attn", "q_bias"): P(None, "model"),  # [D, C] = [D, H·Dh]
    ("attn", "v_bias"): P(None, "model"),
    ("attn", "scale_mul_1H11"): P(None, None, "model", None, None),  # [D, 1, H, 1, 1]
    ("proj", "kernel"): P(None, "model", None),  # [D, C, C] row-split
    ("fc1", "kernel"): P(None, None, "model"),  # [D, C, hidden] column-split
    ("fc1", "bias"): P(None, "model"),  # [D, hidden]
    ("fc2", "kernel"): P(None, "model", None),  # [D, hidden, C] row-split
}


def make_mesh(data: int | None = None, model: int | None = None, devices: Sequence | None = None) -> Mesh:
    """A ("data", "model") mesh over `devices` (default: `jax.devices()`, every process's on several hosts).

    `model` defaults to 1 (no tensor parallelism unless asked for); `data` to the devices `model` leaves, so
    `make_mesh()` puts every device on "data". data·model may be smaller than the device count (the first
    data·model devices are used), never larger.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    for name, size in (("data", data), ("model", model)):
        if size is not None and (not isinstance(size, (int, np.integer)) or size < 1):
            raise UserError(f"mesh axis {name!r} must be a positive integer, got {size!r}")
    model = 1 if model is None else model
    if data is None:
        if n % model:
            raise UserError(
                f"mesh axis model={model} does not divide the {n} available devices; "
                f"allowed: {[d for d in range(1, n + 1) if n % d == 0]}"
            )
        data = n // model
    if data * model > n:
        raise UserError(f"mesh data={data} x model={model} needs {data * model} devices, but only {n} are available")
    return jax.make_mesh(
        (data, model), AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=devices[: data * model]
    )


def parse_mesh(text: str) -> dict[str, int]:
    """"data=4,model=2" (either part optional, any order) -> {"data": 4, "model": 2}; bad text says what is allowed."""
    sizes: dict[str, int] = {}
    usage = f"expected comma-separated AXIS=SIZE with AXIS in {AXES}, e.g. 'data=4,model=2'; got {text!r}"
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in AXES:
            raise UserError(f"bad mesh axis {part!r}: {usage}")
        if name in sizes:
            raise UserError(f"mesh axis {name!r} given twice: {usage}")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise UserError(f"mesh axis {name!r} needs an integer size, got {value.strip()!r}: {usage}") from None
        if sizes[name] < 1:
            raise UserError(f"mesh axis {name!r} must be >= 1, got {sizes[name]}")
    if not sizes:
        raise UserError(f"empty mesh: {usage}")
    return sizes


def mesh_from_text(text: str, devices: Sequence | None = None) -> Mesh:
    """`make_mesh(**parse_mesh(text))`: the CLIs' `--mesh data=4,model=2`."""
    return make_mesh(**parse_mesh(text), devices=devices)


def describe(mesh: Mesh) -> str:
    """"data=4,model=2 over 8 cpu devices"."""
    shape = ",".join(f"{name}={size}" for name, size in mesh.shape.items())
    return f"{shape} over {mesh.devices.size} {mesh.devices.flat[0].platform} devices"


def _var_config(config: ModelConfig | VARConfig) -> VARConfig:
    return config.var if isinstance(config, ModelConfig) else config


def check_mesh(config: ModelConfig | VARConfig, batch: int | None, mesh: Mesh) -> None:
    """Raise ValueError unless the mesh fits: axes ("data", "model"), data | batch, model | heads and MLP width."""
    if not isinstance(mesh, Mesh) or tuple(mesh.axis_names) != AXES:
        names = getattr(mesh, "axis_names", None)
        raise UserError(f"mesh must be a jax.sharding.Mesh with axes {AXES} (see make_mesh), got axes {names}")
    c = _var_config(config)
    data, model = mesh.shape["data"], mesh.shape["model"]
    if batch is not None and batch % data:
        raise UserError(
            f"batch {batch} is not divisible by the mesh's data axis ({data}); use a multiple of {data} images "
            f"(e.g. {data * max(1, -(-batch // data))}) or a data axis dividing {batch}"
        )
    for what, size in (("num_heads", c.num_heads), ("MLP hidden size", c.mlp_hidden)):
        if size % model:
            common = math.gcd(c.num_heads, c.mlp_hidden)
            raise UserError(
                f"the model's {what} {size} is not divisible by the mesh's model axis ({model}); "
                f"allowed model axis sizes: {[m for m in range(1, common + 1) if common % m == 0]}"
            )


# --- parameters -------------------------------------------------------------------------------------------------
def _keys(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def param_spec(path: tuple[str, ...], ndim: int) -> P:
    """The PartitionSpec of one parameter from its key path (block attention/MLP weights split, rest replicated)."""
    if "blocks" not in path or len(path) < 2:
        return REPLICATED
    spec = BLOCK_SPECS.get(tuple(path[-2:]), REPLICATED)
    if spec is not REPLICATED and len(spec) != ndim:
        raise UserError(f"parameter {'/'.join(path)} has {ndim} dims, expected {len(spec)} for spec {spec}")
    return spec


def param_specs(params):
    """A pytree of PartitionSpecs matching `params` ({"var": ..., "vqvae": ...}, or either part alone)."""
    return jax.tree_util.tree_map_with_path(lambda path, x: param_spec(_keys(path), np.ndim(x)), params)


def param_shardings(params, mesh: Mesh):
    """NamedShardings for `params` on `mesh` (the argument to `jax.device_put`, or a jit's in_shardings)."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), param_specs(params),
                        is_leaf=lambda x: isinstance(x, P))


def shard_params(params, mesh: Mesh, config: ModelConfig | VARConfig | None = None):
    """`jax.device_put(params, param_shardings(params, mesh))` (checking the mesh against `config` if given).

    Arrays already placed so are not copied: calling it again (as `generate` does) is cheap.
    """
    if config is not None:
        check_mesh(config, None, mesh)
    return jax.device_put(params, param_shardings(params, mesh))


# --- KV cache and activations -----------------------------------------------------------------------------------
def cache_spec(x) -> P:
    """By rank, for a kind's stacked buffers: [n, rows, slots, H, Dh] (k, v; a quantised cache's K scales and minima)
    and [n, rows, slots, H] (V's) split rows over "data" and heads over "model"; slot_scale [n, capacity] replicated."""
    return {5: CACHE_KV, 4: P(None, "data", None, "model")}.get(np.ndim(x), REPLICATED)


def cache_shardings(cache: KVCache, mesh: Mesh) -> KVCache:
    return jax.tree.map(lambda x: NamedSharding(mesh, cache_spec(x)), cache)


def init_sharded_cache(
    layout: CacheLayout, batch: int, config: ModelConfig | VARConfig, mesh: Mesh, dtype, kv_dtype: str | None = None
) -> KVCache:
    """The empty cache `generate` starts from (2·batch rows under guidance), created directly in its shards."""
    c = _var_config(config)
    check_mesh(c, batch, mesh)
    make = lambda: init_cache(layout, 2 * batch, c.num_heads, c.head_dim, dtype, kv_dtype=kv_dtype)  # noqa: E731
    return jax.jit(make, out_shardings=cache_shardings(jax.eval_shape(make), mesh))()


def constrain(x, mesh: Mesh | None, spec: P = ROWS):
    """`with_sharding_constraint(x, NamedSharding(mesh, spec))` on every leaf of x; x unchanged without a mesh."""
    if mesh is None:
        return x
    sharding = NamedSharding(mesh, spec)
    return jax.tree.map(lambda leaf: jax.lax.with_sharding_constraint(leaf, sharding), x)


def constrain_cache(cache: KVCache, mesh: Mesh | None) -> KVCache:
    if mesh is None:
        return cache
    return jax.lax.with_sharding_constraint(cache, cache_shardings(cache, mesh))


def per_row(fn, mesh: Mesh | None, row_args: int = 1):
    """fn run shard by shard over "data" (`jax.shard_map`; no collectives): for row-local computations that
    XLA's partitioner would otherwise gather (`lax.top_k`). The first
    `row_args` arguments and the result are split by rows, the other arguments replicated. fn without a mesh.

    fn must treat rows independently and draw no random numbers (each shard would draw the same ones).
    """
    if mesh is None:
        return fn

    def sharded(*args):
        specs = tuple(ROWS if i < row_args else REPLICATED for i in range(len(args)))
        return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=ROWS)(*args)

    return sharded


def place_rows(x, mesh: Mesh):
    """Put a host array whose leading axis is the batch onto the mesh, split over "data"."""
    return jax.device_put(x, NamedSharding(mesh, ROWS))


def replicate(x, mesh: Mesh):
    return jax.device_put(x, NamedSharding(mesh, REPLICATED))
