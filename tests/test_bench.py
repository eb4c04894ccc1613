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
    opts = bench.parse_args(["--suite", "cpu", "--models", "tiny", "--batches", "1", "--reps", "1", "--all-rows",
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
    # --all-rows: the full cache once more with every row at once; at batch 1 the default chunk is every row too,
    # so both compile to the same program (same temporaries), and the row names it
    generated = {r["policy"]: r for r in data["generate"]}
    assert list(generated) == ["full", "amskv", measure.ALL_ROWS] and f"| {measure.ALL_ROWS} |" in md
    memory = {r["policy"]: r["compiled"] for r in data["memory"]}
    assert memory[measure.ALL_ROWS]["temp_bytes"] == memory["full"]["temp_bytes"] > 0
    assert generated[measure.ALL_ROWS]["status"] == "ok" and generated[measure.ALL_ROWS]["time_ratio_vs_full"] > 0
    assert report._finite({"status": "ok", "nonfinite_scale": 2}) == "NO, from scale 2"


def _live_tokens(plan, si: int, patch_nums) -> int:
    """Tokens a layer's queries at scale si read from its cache: the sizes of the scales it keeps."""
    return sum(patch_nums[s] ** 2 for s in plan.reads[si])


def test_cpu_suite_byte_and_flop_figures_match_counts_made_here(cpu_run):
    """The deterministic figures of the run against counts made here from the layouts and the cache itself (the
    timings are measured, not checked: they belong to bench/, not to a test)."""
    import jax.numpy as jnp

    from amskv_jax.cache import init_cache
    from amskv_jax.config import get_preset
    from amskv_jax.policies import policy_from_name

    _, results, _ = cpu_run
    c = get_preset("tiny").var
    layouts = {p: policy_from_name(p, c).layout(c) for p in ("full", "amskv")}
    rows = 2  # batch 1 under guidance
    mem = {r["policy"]: r for r in results["memory"]}
    assert set(mem) == {"full", "amskv", measure.ALL_ROWS, "reference"}
    for p, layout in layouts.items():
        cache = init_cache(layout, rows, c.num_heads, c.head_dim, jnp.float32)
        assert mem[p]["cache_bytes"] == sum(x.nbytes for x in jax.tree.leaves(cache)), p
        assert mem[p]["slots"] == sum(layout.capacities)
        assert mem[p]["cache_ratio"] == mem[p]["cache_bytes"] / mem["full"]["cache_bytes"]
        compiled = mem[p]["compiled"]
        assert isinstance(compiled, dict) and compiled["argument_bytes"] > 0 and compiled["temp_bytes"] > 0
    assert mem["reference"]["cache_bytes"] == 2 * rows * c.depth * c.seq_len * c.embed_dim * 4  # K and V, float32
    assert mem["amskv"]["cache_bytes"] < mem["full"]["cache_bytes"] < mem["reference"]["cache_bytes"]

    kv = {r["policy"]: r for r in results["kv_per_scale"]}
    for p, layout in layouts.items():
        expected = [2 * rows * c.embed_dim * 4 * sum(_live_tokens(plan, si, c.patch_nums) for plan in layout.layers)
                    for si in range(c.num_scales)]
        assert kv[p]["read_bytes"] == expected, p
    assert kv["amskv"]["read_bytes"][-1] < kv["full"]["read_bytes"][-1]

    gen = {r["policy"]: r for r in results["generate"]}
    assert all(r["status"] == "ok" and r["nonfinite_scale"] is None for r in gen.values())
    # the policies differ only in the attention term: 2 rows × (QKᵀ + PV = 4·l·C per read key) × the keys not read
    saved = sum(4 * (pn * pn) * c.embed_dim * (_live_tokens(f, si, c.patch_nums) - _live_tokens(a, si, c.patch_nums))
                for f, a in zip(layouts["full"].layers, layouts["amskv"].layers, strict=True)
                for si, pn in enumerate(c.patch_nums))
    assert saved > 0 and gen["full"]["flops_per_image"] - gen["amskv"]["flops_per_image"] == 2 * saved
    assert gen[measure.ALL_ROWS]["flops_per_image"] == gen["full"]["flops_per_image"]
    assert all(r["mfu"] == measure.NA_CPU and r["torch_reference"] == bench.TORCH_NOT_RUN for r in gen.values())
    attention = results["attention"]
    assert [(r["policy"], r["scale"]) for r in attention] == [(p, si) for si in range(4) for p in ("full", "amskv")]
    for r in attention:
        assert r["status"] == "ok" and r["runs"] == 1
        assert r["read_slots"] == sum(_live_tokens(plan, r["scale"], c.patch_nums)
                                      for plan in layouts[r["policy"]].layers)
    assert results["torch_reference"] == []
    assert [r["max_batch"] for r in results["max_batch"]] == [measure.NA_CPU] * 2


def _report_records() -> dict:
    """A results dict as bench.run returns it, made up here: one model at one batch, the full cache and a policy
    that ran out of memory in generation, one attention scale, a largest batch."""
    meta = {"suite": "gpu", "device_kind": "Made-up GPU", "backend": "gpu", "jax_version": "0", "dtype": "bfloat16",
            "impl": "auto", "impl_resolved": "pallas", "reps": 3, "peak_flops": 1e15, "wall_s": 12.0, "cfg": 1.5,
            "top_p": 0.96, "weights": {"d16": "random"}, "policy_settings": {"d16": {"full": "all", "amskv": "some"}}}
    compiled = {"argument_bytes": 3 * 2**20, "output_bytes": 2**19, "temp_bytes": 2**21}
    memory = [
        {"model": "d16", "batch": 8, "policy": "full", "slots": 4240, "cache_bytes": 10 * 2**20,
         "peak_kv_bytes": 12 * 2**20, "compiled": compiled, "cache_ratio": 1.0, "peak_kv_ratio": 1.0,
         "temp_ratio": 1.0},
        {"model": "d16", "batch": 8, "policy": "amskv", "slots": 1740, "cache_bytes": 2**20,
         "peak_kv_bytes": 3 * 2**20, "compiled": "OOM", "cache_ratio": 0.1, "peak_kv_ratio": 0.25,
         "temp_ratio": None},
    ]
    attention = [{"model": "d16", "batch": 8, "policy": "full", "scale": 9, "pn": 16, "read_slots": 6800,
                  "capacity_slots": 6800, "status": "ok", "median_ms": 2.0, "min_ms": 1.5, "max_ms": 2.5,
                  "ratio_vs_full": 1.0}]
    generate = [
        {"model": "d16", "batch": 8, "policy": "full", "status": "ok", "compile_s": 3.25, "median_s": 0.5,
         "min_s": 0.4, "max_s": 0.75, "images_per_s": 16.0, "speedup_vs_full": 1.0, "mfu": 0.125,
         "torch_reference": {"status": "ok", "median_s": 0.8, "device": "cuda"}, "nonfinite_scale": 2},
        {"model": "d16", "batch": 8, "policy": "amskv", "status": "OOM", "speedup_vs_full": None, "mfu": "OOM",
         "torch_reference": "not run"},
    ]
    max_batch = [{"model": "d16", "policy": "full", "max_batch": 96, "ratio_vs_full": 1.0,
                  "tried": [(64, True), (128, False), (96, True)]}]
    return {"meta": meta, "memory": memory, "kv_per_scale": [], "attention": attention, "generate": generate,
            "max_batch": max_batch, "torch_reference": []}


def _table_rows(report: str, heading: str) -> list[list[str]]:
    """The body rows of the first table after `heading`, as lists of stripped cells."""
    lines = report[report.index(heading):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| "))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_report_shows_the_records_it_is_given():
    report = bench.format_report(_report_records())
    assert "device Made-up GPU (gpu)" in report and "peak 1000 TFLOP/s bf16" in report and "wall 12.0 s" in report
    memory = _table_rows(report, "## 1.")
    assert memory[0] == ["d16", "8", "full", "4,240", "10.000", "1.000", "12.000", "1.000", "3.000", "0.500", "2.000",
                         "1.000"]
    assert memory[1] == ["d16", "8", "amskv", "1,740", "1.000", "0.100", "3.000", "0.250", "OOM", "", "", "–"]
    attention = _table_rows(report, "## 2.")
    assert attention == [["d16", "8", "9 (16×16)", "full", "6,800", "6,800", "2.000 [1.500–2.500]", "1.000"]]
    generate = _table_rows(report, "## 3.")
    assert generate[0] == ["d16", "8", "full", "3.25", "0.5000 [0.4000–0.7500]", "16.00", "1.000", "12.50%",
                           "0.8000 (cuda)", "NO, from scale 2"]
    assert generate[1] == ["d16", "8", "amskv", "–", "OOM", "–", "–", "OOM", "not run", "–"]
    assert _table_rows(report, "## 4.") == [["d16", "full", "96", "1.000", "64, 128 OOM, 96"]]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--models", "d17"], "model 'd17' is neither an embedded model"),
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
    assert all(isinstance(r["compile_s"], float) and isinstance(r["trace_cpu_s"], float) for r in records)
    assert sum(line.startswith("| tiny |") for line in lines) == 2
    with pytest.raises(SystemExit, match="unknown policies.*allowed: full"):
        compile_time.main(["--models", "tiny", "--policies", "fastest"])


def test_bench_builds_a_models_policies_from_its_calibration():
    """`bench.run` and `bench.layer_loop` time the policy `generate --policy` runs: for the embedded model, AMS-KV
    with the searched budgets of its layers.json, not the first layers standing in for the demanding ones."""
    from amskv_jax.checkpoint import EMBEDDED

    searched = json.loads((EMBEDDED["emoji32"] / "layers.json").read_text())["search"]
    policy = measure.load("emoji32", seed=0).policy("amskv")  # the search chose storage too: PerLayerPrecision
    assert policy.policy.budgets == tuple(searched["budgets"]) and policy.kv_dtypes == tuple(searched["kv_dtypes"])
    assert measure.load("tiny", seed=0).policy("amskv").budgets != tuple(searched["budgets"])
