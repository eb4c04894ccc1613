"""The benchmark command lines no other test runs, each on the smallest input it takes: what they print or return is
checked against counts made here; the times they measure are not (they belong to bench/RESULTS.md)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import numpy as np
import pytest

from amskv_jax.config import get_preset
from amskv_jax.policies import DEFAULT_POLICY, policy_from_name
from bench import attention as bench_attention
from bench import convert_memory, make_checkpoint, warm_start
from bench.fidelity import main as fidelity_main

TINY_KEYS = json.loads((Path(__file__).parent / "fixtures" / "tiny" / "keys.json").read_text())


def test_attention_bench_prints_one_row_per_plan_scale_and_impl(capsys):
    assert bench_attention.main(["--models", "tiny", "--batches", "1", "--reps", "1", "--dtype", "float32"]) == 0
    printed = capsys.readouterr().out
    assert "# skipping cudnn" in printed  # no NVIDIA GPU here
    rows = [line.split() for line in printed.splitlines() if line.startswith("tiny ")]
    c = get_preset("tiny").var
    expected = []
    for name in ("full", DEFAULT_POLICY):
        plans = {}  # distinct layer plans, in layer order, with how many layers share each
        for plan in policy_from_name(name, c).layout(c).layers:
            plans[plan] = plans.get(plan, 0) + 1
        for plan, count in plans.items():
            label = name if len(plans) == 1 else f"{name}:{count}L"
            for si in range(c.num_scales - 3, c.num_scales):
                for impl in ("xla", "pallas"):
                    keys = f"{int(plan.read_mask(si).sum())}/{plan.capacity}"
                    expected.append([label, "1", str(c.patch_nums[si] ** 2), keys, impl])
    assert [[r[1], r[2], r[3], r[4], r[5]] for r in rows] == expected
    assert all(float(r[6]) > 0 and r[8] == "-" for r in rows)  # ms measured; no peak known on CPU


def test_attention_bench_rejects_bad_batches(capsys):
    with pytest.raises(SystemExit) as info:
        bench_attention.main(["--models", "tiny", "--batches", "1,x"])
    assert info.value.code == 2
    assert "python -m bench.attention: error: --batches must be comma-separated integers, got '1,x'" in \
        capsys.readouterr().err


@pytest.fixture
def tiny_published(monkeypatch):
    """bench.make_checkpoint and bench.convert_memory with a "tiny" preset: the tiny fixture's torch keys stand in for
    the published state dicts (the smallest published one, d16, is 1.2 GB)."""
    keys = {"var_tiny": TINY_KEYS["var"], make_checkpoint.VAE_NAME: TINY_KEYS["vae"]}

    def published_keys(name):
        return [(key, tuple(shape), dtype) for key, shape, dtype in keys[name]]

    for module in (make_checkpoint, convert_memory):
        monkeypatch.setattr(module, "PRESETS", (*make_checkpoint.PRESETS, "tiny"))
        monkeypatch.setattr(module, "published_keys", published_keys)
    return published_keys


def test_make_checkpoint_writes_a_torch_zip_the_converter_reads(tiny_published, tmp_path, capsys):
    from convert.torch_pickle import load_state_dict

    assert make_checkpoint.main(["--preset", "tiny", "--out", str(tmp_path), "--vae"]) == 0
    assert f"wrote {tmp_path / 'var_tiny'}.pth" in capsys.readouterr().out
    for name in ("var_tiny", make_checkpoint.VAE_NAME):
        state = load_state_dict(tmp_path / f"{name}.pth")
        assert [(k, tuple(np.shape(v))) for k, v in state.items()] == [(k, s) for k, s, _ in tiny_published(name)]
        floats = np.concatenate([np.ravel(v) for k, v in state.items() if np.asarray(v).dtype == np.float32])
        assert abs(floats.std() - 0.02) < 1e-3 and abs(floats.mean()) < 1e-3


def test_convert_memory_converts_in_a_child_and_reports_sizes(tiny_published, tmp_path, capsys):
    # no watchdog: the tiny conversion needs little, and a busy machine's memory must not abort it
    assert convert_memory.main(["--preset", "tiny", "--dir", str(tmp_path), "--min-available-gb", "0", "--json"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["status"] == "ok" and record["preset"] == "tiny" and record["dtype"] == "float32"
    files = [tmp_path / "var_tiny.pth", tmp_path / f"{make_checkpoint.VAE_NAME}.pth"]
    assert record["input_bytes"] == sum(f.stat().st_size for f in files)
    keys = tiny_published("var_tiny") + tiny_published(make_checkpoint.VAE_NAME)
    assert record["largest_tensor_bytes"] == 4 * max(int(np.prod(s)) for _, s, _ in keys)
    stacks: dict[str, int] = {}  # "blocks.{i}.NAME": one stack per NAME over the blocks
    for key, shape, _ in keys:
        if key.startswith("blocks."):
            name = key.split(".", 2)[2]
            stacks[name] = stacks.get(name, 0) + 4 * int(np.prod(shape))
    assert record["largest_stack_bytes"] == max(stacks.values())
    largest = max(record["largest_tensor_bytes"], record["largest_stack_bytes"])
    assert record["bound_bytes"] == record["input_bytes"] + largest + convert_memory.SLACK_BYTES
    conversion = record["peak_rss_bytes"] - record["baseline_rss_bytes"]  # the converter's own, past its imports
    assert 0 < conversion <= record["bound_bytes"] and record["within_bound"] is True
    assert not (tmp_path / "var_tiny_flax").exists()  # the converted output is deleted


def test_warm_start_loads_every_program_of_the_second_run_from_the_cache(capsys):
    assert warm_start.main(["--runs", "2", "--", "--model", "tiny", "--labels", "1", "--batch", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "python -m amskv_jax.generate --model tiny --labels 1 --batch 1"
    cold, warm = (re.search(r"(\d+) of (\d+) programs from the cache", line) for line in lines[1:3])
    assert lines[1].startswith("cold: ") and lines[2].startswith("warm: ")
    assert int(cold[1]) == 0 and int(cold[2]) > 0
    assert int(warm[1]) == int(warm[2]) == int(cold[2])


def test_fidelity_bench_samples_writes_its_report_and_scores_the_full_cache_exactly(tmp_path, capsys):
    """bench.fidelity without --nll: generation under each policy against the full cache, on random tiny weights
    (no classifier: FID is skipped with a note)."""
    out = tmp_path / "out"
    argv = ["--model", "tiny", "--samples", "2", "--batch", "2", "--policies", "full,condensed", "--no-lpips",
            "--top-k", "5", "--out", str(out)]
    assert fidelity_main(argv) == 0
    assert "FID and class accuracy not measured" in capsys.readouterr().out
    data = json.loads((out / "fidelity.json").read_text())
    full, condensed = data["policies"]["full"], data["policies"]["condensed"]
    assert full["agreement"] == [1.0] * 4 and full["token_agreement"] == 1.0 and full["psnr"] is not None
    assert condensed["agreement"][0] == 1.0 and condensed["memory_fraction"] < 1.0
    assert full["fid"] is None and data["real_data"].startswith("FID and class accuracy not measured")
    md = (out / "fidelity.md").read_text()
    assert "| full | " in md and "| condensed | " in md
    from PIL import Image

    side = get_preset("tiny").vqvae.image_size
    assert Image.open(out / "fidelity_grid.png").size == (2 * (side + 2) + 2, 2 * (side + 2) + 2)  # 2 policies


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--kv-dtypes", "int3"], "--kv-dtypes: unknown ['int3']; allowed: default, "),
        (["--samples", "0"], "--samples and --batch must be >= 1, got 0 and 16"),
        (["--policies", "full,fastest"], "fastest"),
    ],
)
def test_fidelity_bench_rejects_bad_input(argv, message, tmp_path, capsys):
    try:  # argparse's errors exit, the user errors return the status
        code = fidelity_main(["--model", "tiny", *argv, "--out", str(tmp_path / "out")])
    except SystemExit as exit_:
        code = exit_.code
    assert code == 2
    assert message in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_layer_loop_bench_prints_one_row_per_policy_and_loop(capsys):
    from bench import layer_loop

    assert layer_loop.main(["--model", "tiny", "--policies", "full", "--loops", "scan,per-layer", "--reps", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| tiny |")]
    assert [row.split("|")[2:4] for row in rows] == [[" full ", " scan "], [" full ", " per-layer "]]


def test_end_to_end_checks_a_converted_directory_without_reading_it_and_refuses_one_without_manifest(tmp_path, capsys):
    from amskv_jax.checkpoint import param_shapes, save_checkpoint
    from amskv_jax.config import get_preset
    from bench import end_to_end
    from convert.from_torch import convert

    fixtures = Path(__file__).parent / "fixtures" / "tiny"
    config, params = convert(fixtures / "var.pth", fixtures / "vae_f16.safetensors", log=lambda *_: None)
    directory = save_checkpoint(tmp_path / "tiny", config, params)
    assert end_to_end.main([str(directory), "--no-load", "--json"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["arrays"] == len(jax.tree.leaves(param_shapes(get_preset("tiny"))))
    assert record["stored_bytes"] == sum(np.asarray(x).nbytes for x in jax.tree.leaves(params))
    assert record["files_checked"] > 0 and record["images_shape"] == [1, 64, 64, 3]
    (directory / "checksums.json").unlink()
    assert end_to_end.main([str(directory), "--no-load"]) == 2
    assert "no checksums.json" in capsys.readouterr().err
