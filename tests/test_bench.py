"""bench/run.py: the CPU suite end to end on the tiny preset, the command line's validation, and the weight export
to the PyTorch reference (checked against the fixtures' torch key list; torch itself is never imported)."""
from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from amskv_jax.checkpoint import init_params
from bench import measure, report, torch_reference
from bench import run as bench

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    opts = bench.parse_args(["--suite", "cpu", "--models", "tiny", "--batches", "1", "--reps", "1",
                             "--out", str(out)])
    printed = []
    results = bench.run(opts, log=printed.append)
    return out, results, "\n".join(printed)


def test_cpu_suite_files_and_keys(cpu_run):
    out, results, printed = cpu_run
    for name in ("results.md", "results.json", "kv_bytes_per_scale.png", "images_per_s.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    data = json.loads((out / "results.json").read_text())
    assert set(data) >= {"meta", "memory", "kv_per_scale", "attention", "generate", "max_batch", "torch_reference"}
    assert set(data["meta"]) >= {"suite", "models", "policies", "batches", "reps", "dtype", "backend",
                                 "device_kind", "peak_flops", "weights", "wall_s", "torch_reference"}
    assert data["meta"]["policies"] == ["full", "amskv"]
    md = (out / "results.md").read_text()
    for heading in ("KV-cache bytes", "Attention time per scale", "End-to-end generation", "Largest batch"):
        assert heading in md and heading in printed
    assert all(r["nonfinite_scale"] is None for r in data["generate"]) and "| finite |" in md
    assert report._finite({"status": "ok", "nonfinite_scale": 2}) == "NO, from scale 2"


def test_cpu_suite_figures_consistent(cpu_run):
    _, results, _ = cpu_run
    mem = {r["policy"]: r for r in results["memory"]}
    assert set(mem) == {"full", "amskv", "reference"}
    assert 0 < mem["amskv"]["cache_bytes"] < mem["full"]["cache_bytes"] < mem["reference"]["cache_bytes"]
    assert mem["amskv"]["cache_ratio"] < 1 and mem["full"]["cache_ratio"] == 1
    for p in ("full", "amskv"):
        compiled = mem[p]["compiled"]
        assert isinstance(compiled, dict) and compiled["argument_bytes"] > 0 and compiled["temp_bytes"] > 0

    kv = {r["policy"]: r for r in results["kv_per_scale"]}
    assert len(kv["full"]["read_bytes"]) == 4  # tiny: 4 scales
    assert all(a <= f for a, f in zip(kv["amskv"]["read_bytes"], kv["full"]["read_bytes"], strict=True))
    assert kv["amskv"]["read_bytes"][-1] < kv["full"]["read_bytes"][-1]

    attention = results["attention"]
    assert len(attention) == 2 * 4
    for r in attention:
        assert r["status"] == "ok" and 0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"]
        assert r["ratio_vs_full"] > 0

    gen = {r["policy"]: r for r in results["generate"]}
    for r in gen.values():
        assert r["status"] == "ok" and r["compile_s"] > 0
        assert 0 < r["min_s"] <= r["median_s"] <= r["max_s"]
        assert r["images_per_s"] == pytest.approx(1 / r["median_s"])
        assert r["mfu"] == measure.NA_CPU
        assert r["torch_reference"] == bench.TORCH_NOT_RUN == "not run (--torch-reference not given)"
        assert r["flops_per_image"] > 0
    assert gen["amskv"]["flops_per_image"] < gen["full"]["flops_per_image"]  # fewer keys attended
    assert gen["full"]["speedup_vs_full"] == 1
    assert results["torch_reference"] == []
    assert [r["max_batch"] for r in results["max_batch"]] == [measure.NA_CPU] * 2


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--models", "d17"], "unknown model 'd17'"),
        (["--policies", "full,nope"], "unknown policy"),
        (["--batches", "0"], "--batches must be integers >= 1"),
        (["--batches", "1,x"], "--batches must be comma-separated integers"),
        (["--reps", "0"], "--reps must be >= 1"),
        (["--torch-reference", "/nonexistent"], "not a FoundationVision/VAR checkout"),
    ],
)
def test_cli_rejects_bad_input(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        bench.parse_args(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_defaults():
    cpu = bench.parse_args([])
    assert (cpu.models, cpu.batches, cpu.dtype, cpu.max_batch) == (["tiny-ladder256"], [1, 8], "float32", False)
    gpu = bench.parse_args(["--suite", "gpu", "--policies", "amskv,full,amskv"])
    assert gpu.models == ["d16", "d30"] and gpu.batches == [32, 64, 128, 256, 512] and gpu.max_batch
    assert gpu.policies == ["full", "amskv"] and gpu.dtype == "bfloat16"
    assert bench.parse_args(["--policies", "all"]).policies[0] == "full"


def test_state_dict_export_round_trips():
    """Our params, exported under the reference's torch keys (the fixture's key list), map back unchanged."""
    from amskv_jax.config import get_preset
    from convert.mapping import state_dict_to_params

    keys = json.loads((FIXTURES / "tiny" / "keys.json").read_text())
    params = init_params(get_preset("tiny"), seed=1)
    for ours, theirs in (("var", "var"), ("vqvae", "vae")):
        shapes = {key: tuple(shape) for key, shape, _ in keys[theirs]}
        sd = torch_reference.params_to_state_dict(params[ours]["params"], shapes)
        back = state_dict_to_params(sd, params[ours]["params"])
        flat_a, flat_b = jax.tree.leaves(params[ours]["params"]), jax.tree.leaves(back)
        assert len(flat_a) == len(flat_b)
        for a, b in zip(flat_a, flat_b, strict=True):
            np.testing.assert_array_equal(a, b)


def test_compile_time_prints_one_record_per_model_and_policy_and_rejects_unknown_names(capsys):
    from bench import compile_time

    assert compile_time.main(["--models", "tiny", "--policies", "full,amskv", "--batch", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert [(r["model"], r["policy"]) for r in records] == [("tiny", "full"), ("tiny", "amskv")]
    assert all(r["compile_s"] > 0 and r["trace_cpu_s"] > 0 for r in records)
    assert sum(line.startswith("| tiny |") for line in lines) == 2
    with pytest.raises(SystemExit, match="unknown policies.*allowed: full"):
        compile_time.main(["--models", "tiny", "--policies", "fastest"])
