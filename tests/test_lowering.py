"""One program for every platform: the whole `generate` lowered on this CPU host for "cuda" and for "tpu" holds that
platform's attention kernel (the strongest check possible without the device).

The kernel is chosen where the program is lowered (`jax.lax.platform_dependent` in `amskv_jax.attention`), so the
CUDA export must call the Triton kernel (`__gpu$xla.gpu.triton`) and the TPU export splash attention's Mosaic kernel
(`tpu_custom_call`), for the full cache, AMS-KV and an int8 cache, on one device and sharded over two ("data" and
"model"), with impl "pallas" and "auto". The programs are lowered as `jax.export.export(..., platforms=[...])`
lowers them, `jit(...).trace(...).lower(lowering_platforms=...)`: in jax 0.10.2 a second `jax.export` of `generate`
with another static setting in the same process fails inside jax (`stages.in_avals`: 358 avals for 347 arguments),
whatever `jax.clear_caches()`. The sharded programs need two devices, and the device count is fixed when jax starts,
so the lowering runs in the child process of the checks that need several host devices (`on_host_devices`, conftest's
`host_devices`), which writes the custom-call targets of every program to a JSON file that the tests read.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

DEVICES = 2
KERNELS = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}
# impl: {name: (policy, kv_dtype, mesh axes or None)}
CASES = {
    "pallas": {
        "full": ("full", None, None),
        "amskv": ("amskv", None, None),
        "amskv-int8": ("amskv", "int8", None),
        "full-data2": ("full", None, {"data": 2}),
        "amskv-int8-model2": ("amskv", "int8", {"data": 1, "model": 2}),
    },
    "auto": {"full": ("full", None, None), "amskv-data2": ("amskv", None, {"data": 2})},
}
PROGRAMS = [f"{impl}/{name}" for impl, cases in CASES.items() for name in cases]


def on_host_devices(directory: Path) -> None:
    import functools

    import jax
    import jax.numpy as jnp

    from jax.sharding import NamedSharding

    from amskv_jax import generate as gen_module, sharding
    from amskv_jax.config import get_preset
    from amskv_jax.generate import generate
    from amskv_jax.memory import abstract_params
    from amskv_jax.policies import policy_from_name

    assert jax.device_count() >= DEVICES, jax.devices()
    config = get_preset("tiny")
    params = abstract_params(config, "float32")
    labels = jax.ShapeDtypeStruct((2,), jnp.int32)
    key = jax.eval_shape(jax.random.key, 0)
    targets = {}
    for case in PROGRAMS:
        impl, name = case.split("/")
        policy, kv_dtype, axes = CASES[impl][name]
        mesh = None if axes is None else sharding.make_mesh(**axes)
        layout = policy_from_name(policy, config.var).layout(config.var)
        if mesh is None:
            fn = jax.jit(functools.partial(generate, config=config, layout=layout, kv_dtype=kv_dtype, impl=impl, top_k=0))
            traced = fn.trace(params, labels, key)
        else:  # what `generate(..., mesh=mesh)` traces (it places concrete arrays first, so it cannot run under jit)
            placed = jax.tree.map(lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s), params,
                                  sharding.param_shardings(params, mesh))
            rows = jax.ShapeDtypeStruct(labels.shape, labels.dtype, sharding=NamedSharding(mesh, sharding.ROWS))
            scalar = jax.ShapeDtypeStruct((), jnp.float32)
            with jax.set_mesh(mesh):
                traced = gen_module._generate.trace(
                    placed, rows, key, scalar, scalar, config=config, layout=layout, top_k=0, more_smooth=False,
                    dtype="float32", impl=impl, kv_dtype=kv_dtype, progress=False, return_logits=False, mesh=mesh,
                )
        for platform in (*KERNELS, "cpu"):
            text = traced.lower(lowering_platforms=(platform,)).as_text()
            targets[f"{case}/{platform}"] = re.findall(r"custom_call @([\w$.]+)", text)
    (directory / "targets.json").write_text(json.dumps(targets))


@pytest.fixture(scope="module")
def targets(host_devices):
    return json.loads((host_devices("test_lowering") / "targets.json").read_text())


@pytest.mark.parametrize("platform", list(KERNELS))
@pytest.mark.parametrize("case", PROGRAMS)
def test_the_program_for_a_platform_calls_its_kernel(targets, case, platform):
    """The platform's kernel and no other platform's."""
    calls = targets[f"{case}/{platform}"]
    assert KERNELS[platform] in calls, calls
    assert set(calls) <= {KERNELS[platform], "Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape"}, calls


@pytest.mark.parametrize("case", PROGRAMS)
def test_the_program_for_cpu_holds_no_kernel(targets, case):
    """On CPU "auto" is the XLA path and "pallas" the interpreted kernel: plain HLO, no custom call of a kernel."""
    assert not set(targets[f"{case}/cpu"]) & set(KERNELS.values())
