"""Sharded generation on 8 simulated CPU devices: the same tokens and images as one device, the intended shardings,
and clear errors for meshes that do not fit.

The device count is fixed when jax starts, so the checks that need 8 devices run once, in the child process of
every check that needs several host devices (`on_host_devices`, conftest's `host_devices`); it saves its results to
a directory that the tests below read. Mesh parsing needs no devices and runs here.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from amskv_jax.errors import UserError

DEVICES = 8
MESHES = {"data8": (8, 1), "data4_model2": (4, 2)}
# One static top_k, so one compiled program per mesh serves both runs: with top_p below 1/top_k only the argmax
# survives the filter, so the "greedy" run is greedy (as top_k=1 would be) while the other one samples.
RUNS = {"greedy": dict(top_k=20, top_p=1e-3, cfg=1.5), "sampled": dict(top_k=20, top_p=0.9, cfg=2.0)}
LABELS = [0, 3, 5, 9, 1, 1, 7, 2]
LOSSY_MESH_RUNS = {"data4_model2-xla": "xla", "data4_model2-pallas": "pallas"}  # AMS-KV, int8 cache
COLLECTIVE = r"= (?:\S+|\([^)]*\)) (all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter|collective-broadcast)\("


# --- in the child: everything that needs 8 devices -----------------------------------------------------------------
def on_host_devices(out_dir: Path) -> None:
    """Run with 8 host devices (`tests/host_devices.py`), compiled as users' programs are (conftest): the sharded
    tokens are compared with one device's as users' programs round them."""
    from conftest import compiling_as_users

    with compiling_as_users():
        _sharded_runs(out_dir)


def _sharded_runs(out_dir: Path) -> None:
    import contextlib
    import io

    import jax
    import jax.numpy as jnp

    from amskv_jax import checkpoint, generate as gen_module, sharding
    from amskv_jax.config import get_preset
    from amskv_jax.policies import AMSKV, FullCache
    from conftest import random_params

    assert jax.device_count() == DEVICES, jax.devices()
    config = get_preset("tiny")
    params = random_params(config)
    layout = FullCache().layout(config.var)
    report: dict = {"specs": {}, "errors": {}, "compiles": {}, "collectives": {}, "all_gathers": {}}
    arrays: dict[str, np.ndarray] = {}

    def run(name, mesh, **kwargs):
        out = gen_module.generate(params, LABELS, jax.random.key(1), config=config, mesh=mesh, **kwargs)
        for si, tokens in enumerate(out.tokens):
            arrays[f"{name}/tokens{si}"] = np.asarray(tokens)
        arrays[f"{name}/images"] = np.asarray(out.images)
        return out

    for run_name, kwargs in RUNS.items():
        run(f"single/{run_name}", None, **kwargs)
    for mesh_name, (data, model) in MESHES.items():
        mesh = sharding.make_mesh(data=data, model=model)
        specs = report["specs"][mesh_name] = {}
        gen_module._generate.clear_cache()
        for run_name, kwargs in RUNS.items():
            out = run(f"{mesh_name}/{run_name}", mesh, **kwargs)
        specs["tokens"] = list(out.tokens[-1].sharding.spec)
        specs["images"] = list(out.images.sharding.spec)
        specs["finite"] = list(out.finite.sharding.spec)
        # new labels and key: the compiled program is reused
        gen_module.generate(params, LABELS[::-1], jax.random.key(9), config=config, mesh=mesh, **RUNS["sampled"])
        report["compiles"][mesh_name] = gen_module._generate._cache_size()
        # the collectives XLA put in the program: lowered as generate lowers it (the same arguments, under the mesh),
        # the same program, so a persistent-cache hit rather than a second compile
        with jax.set_mesh(mesh):
            hlo = gen_module._generate.lower(
                sharding.shard_params(params, mesh), sharding.place_rows(jnp.asarray(LABELS, jnp.int32), mesh),
                sharding.replicate(jax.random.key(1), mesh), jnp.float32(1.5), jnp.float32(0.9), config=config,
                layout=layout, top_k=20, more_smooth=False, dtype="float32", impl="xla", progress=False,
                return_logits=False, mesh=mesh,
            ).compile().as_text()
        report["collectives"][mesh_name] = sorted(set(re.findall(COLLECTIVE, hlo)))
        report["all_gathers"][mesh_name] = len(re.findall(r"= \S+ all-gather(?:-start)?\(", hlo))

        placed = sharding.shard_params(params, mesh)
        block = placed["var"]["params"]["blocks"]  # every block, stacked on a leading depth axis
        for name, leaf in [
            ("mat_qkv", block["attn"]["mat_qkv"]["kernel"]), ("q_bias", block["attn"]["q_bias"]),
            ("scale_mul", block["attn"]["scale_mul_1H11"]), ("proj", block["attn"]["proj"]["kernel"]),
            ("proj_bias", block["attn"]["proj"]["bias"]), ("fc1", block["ffn"]["fc1"]["kernel"]),
            ("fc1_bias", block["ffn"]["fc1"]["bias"]), ("fc2", block["ffn"]["fc2"]["kernel"]),
            ("class_emb", placed["var"]["params"]["class_emb"]["embedding"]),
            ("head", placed["var"]["params"]["head"]["kernel"]),
            ("codebook", placed["vqvae"]["params"]["quantize"]["embedding"]["embedding"]),
        ]:
            specs[name] = list(leaf.sharding.spec)
            assert leaf.sharding.mesh == mesh
        # local shard of the head-split qkv kernel [D, C, 3, H, Dh]: a 1/model slice of the heads
        specs["mat_qkv_shard_shape"] = list(block["attn"]["mat_qkv"]["kernel"].addressable_shards[0].data.shape)
        cache = sharding.init_sharded_cache(layout, len(LABELS), config, mesh, jnp.float32)
        kind = cache.kinds[0]  # the full cache: one kind, every layer
        specs["cache_k"] = list(kind.k.sharding.spec)
        specs["cache_v"] = list(kind.v.sharding.spec)
        specs["cache_slot_scale"] = list(kind.slot_scale.sharding.spec)
        specs["cache_k_shard_shape"] = list(kind.k.addressable_shards[0].data.shape)
        specs["cache_k_shape"] = list(kind.k.shape)

    # AMS-KV's two cache kinds with an int8 cache, the XLA path and the Pallas kernel (interpreted on CPU). Layer 0's
    # ring buffer wraps at scale 2 (two segments), which the scan sharded here writes with one gather and one scatter
    # (`cache.masked_scatter`) and one device's unrolled loop with plain updates
    amskv = AMSKV(budgets=(13, 5), condensed_scales=0).layout(config.var)
    report["amskv_kinds"] = len(amskv.kinds)
    report["amskv_wrapped_writes"] = len(amskv.kinds[0].writes[2])
    lossy = dict(RUNS["greedy"], layout=amskv, kv_dtype="int8")
    run("amskv_int8/single", None, **lossy)
    for mesh_name, impl in LOSSY_MESH_RUNS.items():
        run(f"amskv_int8/{mesh_name}", sharding.make_mesh(data=4, model=2), impl=impl, **lossy)

    report["meshes"] = {
        text: dict(sharding.mesh_from_text(text).shape) if text else dict(sharding.make_mesh().shape)
        for text in ("", "data=4", "model=2", "model=2,data=2")
    }
    # meshes that do not fit fail before compiling
    gen_module._generate.clear_cache()
    bad = {
        "batch": (LABELS[:6], sharding.make_mesh(data=4, model=2)),
        "heads": (LABELS, sharding.make_mesh(data=2, model=4)),
    }
    for name, (labels, mesh) in bad.items():
        try:
            gen_module.generate(params, labels, jax.random.key(0), config=config, mesh=mesh)
            report["errors"][name] = None
        except UserError as err:
            report["errors"][name] = str(err)
    report["errors"]["compiled"] = gen_module._generate._cache_size()
    checkpoint.load_model = lambda spec, verify=None: checkpoint.Model(config, params, "test weights")  # the CLI's loader
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            gen_module.main(["--model", "tiny", "--labels", "1,2,3", "--batch", "2", "--mesh", "data=4,model=2"])
        report["errors"]["cli"] = None
    except SystemExit as exit_:
        report["errors"]["cli"] = exit_.code
    report["errors"]["cli_stderr"] = stderr.getvalue()
    np.savez(out_dir / "arrays.npz", **arrays)
    (out_dir / "report.json").write_text(json.dumps(report))


# --- the tests -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def child(host_devices):
    out_dir = host_devices("test_sharding")
    report = json.loads((out_dir / "report.json").read_text())
    with np.load(out_dir / "arrays.npz") as data:
        arrays = dict(data)
    return report, arrays


@pytest.mark.parametrize("run", list(RUNS))
@pytest.mark.parametrize("mesh", list(MESHES))
def test_sharded_generation_equals_the_single_device_run(child, mesh, run):
    _, arrays = child
    scales = sum(1 for name in arrays if name.startswith(f"single/{run}/tokens"))
    assert scales == 4
    for si in range(scales):
        np.testing.assert_array_equal(arrays[f"{mesh}/{run}/tokens{si}"], arrays[f"single/{run}/tokens{si}"])
    np.testing.assert_allclose(arrays[f"{mesh}/{run}/images"], arrays[f"single/{run}/images"], rtol=0, atol=1e-4)


@pytest.mark.parametrize("mesh_run", list(LOSSY_MESH_RUNS))
def test_sharded_amskv_with_an_int8_cache_equals_the_single_device_run(child, mesh_run):
    """Two cache kinds, int8 storage, rows over data and heads over model, through the XLA path and through the
    Pallas kernel's shard_map: the single device's tokens (greedy) and images."""
    report, arrays = child
    assert report["amskv_kinds"] == 2 and report["amskv_wrapped_writes"] == 2
    for si in range(4):
        np.testing.assert_array_equal(arrays[f"amskv_int8/{mesh_run}/tokens{si}"],
                                      arrays[f"amskv_int8/single/tokens{si}"])
    np.testing.assert_allclose(arrays[f"amskv_int8/{mesh_run}/images"], arrays["amskv_int8/single/images"],
                               rtol=0, atol=1e-4)
    full = np.concatenate([arrays[f"single/greedy/tokens{si}"].ravel() for si in range(4)])
    lossy = np.concatenate([arrays[f"amskv_int8/single/tokens{si}"].ravel() for si in range(4)])
    assert (full != lossy).any()  # the layout and the int8 cache are really in use


def test_sampled_runs_really_sample(child):
    _, arrays = child
    greedy = np.concatenate([arrays[f"single/greedy/tokens{si}"].ravel() for si in range(4)])
    sampled = np.concatenate([arrays[f"single/sampled/tokens{si}"].ravel() for si in range(4)])
    assert (greedy != sampled).mean() > 0.3


@pytest.mark.parametrize("mesh", list(MESHES))
def test_params_cache_and_outputs_carry_the_intended_shardings(child, mesh):
    report, _ = child
    specs = report["specs"][mesh]
    model = MESHES[mesh][1]
    # block params carry a leading depth axis that is never split
    assert specs["mat_qkv"] == [None, None, None, "model", None]  # [D, C, 3, H, Dh]: split by heads
    assert specs["fc1"] == [None, None, "model"]  # column-split
    assert specs["proj"] == specs["fc2"] == [None, "model", None]  # row-split
    assert specs["q_bias"] == specs["fc1_bias"] == [None, "model"]
    assert specs["scale_mul"] == [None, None, "model", None, None]
    for replicated in ("proj_bias", "class_emb", "head", "codebook"):
        assert specs[replicated] == [], replicated
    assert specs["mat_qkv_shard_shape"] == [2, 128, 3, 2 // model, 64]
    assert specs["cache_k"] == specs["cache_v"] == [None, "data", None, "model", None]
    assert specs["cache_slot_scale"] == []
    layers, rows, capacity, heads, head_dim = specs["cache_k_shape"]
    assert layers == 2 and rows == 2 * len(LABELS)
    assert specs["cache_k_shard_shape"] == [layers, rows // MESHES[mesh][0], capacity, heads // model, head_dim]
    assert specs["tokens"] == specs["images"] == ["data"]
    assert specs["finite"] in (["data"], ["data", None])  # [B, S] flags, row by row: no reduction across shards


def test_data_parallel_program_has_no_communication_and_model_parallel_only_reductions(child):
    """Guidance rows sit next to their image's rows and sampling runs per shard: nothing crosses the data axis.
    The model axis only all-reduces proj/fc2's partial sums: mat_qkv is split by heads, as are attention and the
    cache, so no q, k or v activation is all-gathered (there is no all-gather at all)."""
    report, _ = child
    assert report["collectives"]["data8"] == []
    assert report["collectives"]["data4_model2"] == ["all-reduce"]
    assert report["all_gathers"] == {mesh: 0 for mesh in MESHES}


def test_generate_compiles_once_per_mesh_for_new_labels_and_keys(child):
    report, _ = child
    assert report["compiles"] == {mesh: 1 for mesh in MESHES}


def test_mesh_defaults_put_every_device_on_data_and_use_model_only_when_asked(child):
    report, _ = child
    assert report["meshes"] == {
        "": {"data": 8, "model": 1}, "data=4": {"data": 4, "model": 1}, "model=2": {"data": 4, "model": 2},
        "model=2,data=2": {"data": 2, "model": 2},
    }


def test_meshes_that_do_not_fit_fail_before_compiling_with_clear_messages(child):
    report, _ = child
    errors = report["errors"]
    assert "batch 6 is not divisible by the mesh's data axis (4)" in errors["batch"]
    assert "num_heads 2 is not divisible by the mesh's model axis (4)" in errors["heads"]
    assert "allowed model axis sizes: [1, 2]" in errors["heads"]
    assert errors["compiled"] == 0
    assert errors["cli"] == 2 and "batch 6 is not divisible by the mesh's data axis (4)" in errors["cli_stderr"]


# --- no devices needed -----------------------------------------------------------------------------------------------
def test_parse_mesh_reads_axis_sizes_and_rejects_bad_text():
    from amskv_jax.sharding import parse_mesh

    assert parse_mesh("data=4,model=2") == {"data": 4, "model": 2}
    assert parse_mesh(" model=2 ") == {"model": 2}
    for text, message in [
        ("data=4,pipe=2", "bad mesh axis 'pipe=2'"),
        ("data4", "bad mesh axis 'data4'"),
        ("data=four", "needs an integer size, got 'four'"),
        ("data=0", "must be >= 1"),
        ("data=2,data=2", "given twice"),
        ("", "empty mesh"),
    ]:
        with pytest.raises(UserError, match=message):
            parse_mesh(text)


def test_make_mesh_defaults_to_all_devices_on_data_and_rejects_too_many():
    import jax

    from amskv_jax.sharding import make_mesh

    devices = jax.devices()[:1]
    mesh = make_mesh(devices=devices)
    assert dict(mesh.shape) == {"data": 1, "model": 1}
    with pytest.raises(UserError, match="needs 4 devices, but only 1 are available"):
        make_mesh(data=2, model=2, devices=devices)
    with pytest.raises(UserError, match="model=2 does not divide the 1 available devices"):
        make_mesh(model=2, devices=devices)
    with pytest.raises(UserError, match="mesh axis 'data' must be a positive integer"):
        make_mesh(data=0, devices=devices)
