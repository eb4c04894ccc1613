"""Low-bit KV storage (int4, int2; `quant.py`): the packing, the bytes, the cache's write against teacher forcing's
fake quantisation, the TPU path, and the Pallas kernel per shard under a mesh. The attention paths against the
reference and the round trips are in `test_quant.py`, parametrised over every quantised dtype."""
from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amskv_jax import quant
from amskv_jax.attention import tpu
from amskv_jax.attention.reference import cached_attention_reference
from amskv_jax.cache import build_layout, cache_bytes, init_cache
from amskv_jax.config import PATCH_NUMS_256, get_preset
from amskv_jax.memory import memory_table
from amskv_jax.policies import POLICIES, policy_from_name
from test_quant import LAYOUT, SI, _attend, _rel, _written_caches

LOW = list(quant.ASYMMETRIC)


@pytest.mark.parametrize("kv", LOW)
def test_pack_puts_chunk_p_in_bits_b_times_p_and_unpacks_exactly(kv):
    bits, parts = quant.ASYMMETRIC[kv], quant.chunks(kv)
    codes = np.random.default_rng(0).integers(0, 2**bits, (3, 5, 64))
    packed = np.asarray(quant.pack(jnp.asarray(codes), kv))
    assert packed.dtype == np.uint8 and packed.shape == (3, 5, 64 // parts)
    width = 64 // parts
    expected = sum(codes[..., p * width:(p + 1) * width] << (bits * p) for p in range(parts))
    np.testing.assert_array_equal(packed, expected)
    for p in range(parts):
        chunk = codes[..., p * width:(p + 1) * width]
        np.testing.assert_array_equal(quant.unpack_chunk(jnp.asarray(packed), kv, p), chunk)


@pytest.mark.parametrize("kv", LOW)
def test_a_group_of_equal_values_is_stored_exactly(kv):
    """A 1-token scale's K (per channel over one token) has min = max: scale 0, read back exactly as its minimum."""
    k = jnp.asarray(np.random.default_rng(0).standard_normal((2, 1, 3, 64), np.float32))
    stored, scale, minimum = quant.quantize_k(k, kv)
    assert float(jnp.abs(scale).max()) == 0
    np.testing.assert_array_equal(quant.dequantize(stored, scale[:, None], minimum[:, None], kv), k)


@pytest.mark.parametrize("kv", LOW)
def test_low_bit_buffers_are_packed_and_counted_exactly(kv):
    """init_cache's buffers: uint8 codes of head_dim / P bytes, float32 scales and minima; cache_bytes is their size."""
    config = get_preset("tiny").var
    for name in POLICIES:
        layout = policy_from_name(name, config).layout(config)
        cache = jax.eval_shape(lambda: init_cache(layout, 4, 2, 64, jnp.bfloat16, kv_dtype=kv))  # noqa: B023
        kind = cache.kinds[0]
        assert kind.k.dtype == kind.v.dtype == jnp.uint8 and kind.k.shape[-1] == 64 // quant.chunks(kv)
        assert kind.scales.kv_dtype == kv and kind.scales.k_min.shape == kind.scales.k.shape
        assert kind.scales.v_min.shape == kind.scales.v.shape
        actual = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
        assert cache_bytes(layout, 4, 2, 64, jnp.bfloat16, kv) == actual, name


def test_d30_low_bit_values_take_a_half_and_a_quarter_of_int8_and_count_scale_and_minimum():
    config = get_preset("d30").var
    table = memory_table(config, 128, "bfloat16", kv_dtypes=("int8", "int4", "int2"))
    rows = {(r.policy, r.kv_dtype): r for r in table}
    heads, dh = config.num_heads, config.head_dim
    values = 30 * 424 * 2 * 256 * config.embed_dim  # full cache: 424 slots per layer, 256 rows, K and V, one byte each
    scales = 4 * 256 * heads * (9 * dh + 424) * 30  # float32: K per channel for 9 groups, V per slot
    assert rows["full", "int8"].cache_bytes == values + 4 * 30 * 424 + scales
    assert rows["full", "int4"].cache_bytes == values // 2 + 4 * 30 * 424 + 2 * scales
    assert rows["full", "int2"].cache_bytes == values // 4 + 4 * 30 * 424 + 2 * scales
    print({k: f"{r.cache_bytes / 2**30:.3f} GiB, cut {100 * r.reduction_vs_full:.1f}%" for k, r in rows.items()
           if k[0] in ("full", "amskv")})


@pytest.mark.parametrize("kv", ["int8", *LOW])
def test_what_the_cache_stores_is_what_teacher_forcing_reads(kv):
    """Scales written one by one into a quantised cache and read back (dequantised at their slots) equal
    `quant.fake_quantize_kv` of the same K/V bit for bit: teacher forcing under kv_dtype sees the cache's values."""
    patch_nums = PATCH_NUMS_256[:5]
    layout = build_layout(lambda layer, si: tuple(range(si)), 1, patch_nums, "full")
    plan = layout.layers[0]
    L = sum(pn * pn for pn in patch_nums)
    keys = jnp.asarray(np.random.default_rng(1).standard_normal((2, L, 2, 64), np.float32))
    k_BLHD = keys / jnp.linalg.norm(keys, axis=-1, keepdims=True)
    v_BLHD = jnp.asarray(np.random.default_rng(2).standard_normal((2, L, 2, 64), np.float32) * 3)

    @jax.jit
    def stored(k_BLHD, v_BLHD):
        cache = init_cache(layout, 2, 2, 64, jnp.float32, kv_dtype=kv).kinds[0]
        begin = 0
        for si, pn in enumerate(patch_nums):
            if plan.written(si):
                span = slice(begin, begin + pn * pn)
                cache = cache.write(0, plan.writes[si], si, k_BLHD[:, span], v_BLHD[:, span], group=plan.group(si))
            begin += pn * pn
        layer = cache.layer(0)
        last = len(patch_nums) - 1  # every earlier scale is live here, at token offsets (the full cache's slots)
        return layer.scales.dequantize_k(layer.k, plan.slot_groups(last)), layer.scales.dequantize_v(layer.v)

    cached = L - patch_nums[-1] ** 2
    k_read, v_read = (x[:, :cached] for x in stored(k_BLHD, v_BLHD))
    k_fake, v_fake = jax.jit(quant.fake_quantize_kv, static_argnums=(2, 3))(k_BLHD, v_BLHD, patch_nums, kv)
    np.testing.assert_array_equal(k_read, k_fake[:, :cached])
    np.testing.assert_array_equal(v_read, v_fake[:, :cached])


@pytest.mark.parametrize("kv", LOW)
def test_tpu_path_over_a_low_bit_cache_matches_the_reference(kv):
    """Splash attention (interpreted) dequantises first, then attends like the reference on the same int4 / int2
    cache (f32: the tolerance of `test_attention.py`'s TPU checks)."""
    caches, fresh, scale_mul_H = _written_caches(3, jnp.float32)
    ref = _attend(cached_attention_reference, fresh, caches[kv], scale_mul_H)
    static_mask = LAYOUT.layers[0].read_mask(SI)
    out = _attend(functools.partial(tpu.cached_attention, static_mask=static_mask, interpret=True), fresh,
                  caches[kv], scale_mul_H)
    assert out.dtype == jnp.float32
    assert _rel(out, ref) < 1e-5


def on_host_devices(directory) -> None:
    """Run with 8 host devices (`tests/host_devices.py`; the mesh takes 4): the interpreted GPU kernel over an int4
    cache under a data=2 x model=2 mesh, its error against the unsharded reference, to directory/mesh.json. (int2
    differs only in its chunk count, which the unsharded kernel tests cover.)"""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from amskv_jax import attention, sharding

    caches, (q, k, v), scale_mul_H = _written_caches(4, jnp.float32)
    plan, c = LAYOUT.layers[0], caches["int4"]
    mask = c.read_mask(plan.reads[SI])
    ref = cached_attention_reference(q, k, v, c.k, c.v, mask, scale_mul_H, scales=c.scales,
                                     k_group=plan.slot_groups(SI))
    mesh = sharding.make_mesh(data=2, model=2)
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
    heads = P("data", None, "model", None)
    scales = jax.tree.map(lambda x: put(x, heads if x.ndim == 4 else P("data", None, "model")), c.scales)
    args = [put(x, heads) for x in (q, k, v, c.k, c.v)] + [put(mask, P()), put(scale_mul_H, P("model"))]
    fn = jax.jit(lambda *a, scales: attention.cached_attention(*a, impl="pallas", static_mask=plan.read_mask(SI),
                                                               scales=scales, k_group=plan.slot_groups(SI)))
    with jax.set_mesh(mesh):
        o = fn(*args, scales=scales)
    (directory / "mesh.json").write_text(json.dumps({"int4": float(jnp.abs(o - ref).max() / jnp.abs(ref).max())}))


def test_pallas_kernel_over_a_low_bit_cache_runs_per_shard_under_a_mesh(host_devices):
    """A data=2 x model=2 mesh of host devices (`on_host_devices`, in the child process), int4: the dispatch shards
    the packed codes, the scales and the minima (one `KVScales`) by rows and heads, and the interpreted GPU kernel
    gives the reference's result."""
    errors = json.loads((host_devices("test_lowbit") / "mesh.json").read_text())
    assert set(errors) == {"int4"} and max(errors.values()) < 1e-5, errors
