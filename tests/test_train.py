"""Training: both stages' losses fall on a handful of rendered emoji, runs resume, and the committed model generates."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from amskv_jax.train import loop
from amskv_jax.train.__main__ import main
from amskv_jax.train.configs import get_config

CFG = get_config("tiny16")
ASSET = Path(__file__).parents[1] / "amskv_jax" / "assets" / "emoji32"


def _first_last(run: Path, n: int = 3) -> tuple[float, float]:
    losses = [r["loss"] for r in loop.read_log(run)]
    return float(np.mean(losses[:n])), float(np.mean(losses[-n:]))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A VQ-VAE run trained 4 steps, then resumed to CFG's step count; a VAR run on it."""
    root = tmp_path_factory.mktemp("runs")
    assert main(["vqvae", "--config", "tiny16", "--out", str(root / "vqvae"), "--steps", "4"]) == 0
    assert main(["vqvae", "--config", "tiny16", "--out", str(root / "vqvae")]) == 0
    assert main(["var", "--config", "tiny16", "--vqvae", str(root / "vqvae"), "--out", str(root / "var")]) == 0
    return root


def test_vqvae_loss_falls(runs):
    first, last = _first_last(runs / "vqvae")
    assert last < 0.8 * first


def test_resumed_run_continues_the_step_count_without_repeating_steps(runs):
    steps = [int(r["step"]) for r in loop.read_log(runs / "vqvae")]
    assert steps == list(range(1, CFG.vqvae_optim.steps + 1))
    options = ocp.CheckpointManagerOptions(read_only=True)
    with ocp.CheckpointManager(runs / "vqvae" / "checkpoints", options=options) as manager:
        assert manager.latest_step() == CFG.vqvae_optim.steps


def test_var_loss_falls(runs):
    first, last = _first_last(runs / "var")
    assert last < 0.85 * first


def test_export_writes_a_loadable_bf16_checkpoint(runs):
    from amskv_jax.checkpoint import load_model

    assert main(["export", "--vqvae", str(runs / "vqvae"), "--var", str(runs / "var"), "--out", str(runs / "m")]) == 0
    model = load_model(str(runs / "m"))
    assert model.config == CFG.model
    for directory in (runs / "m", runs / "vqvae", runs / "var"):  # every writer goes through save_checkpoint
        assert (directory / "checksums.json").is_file()
    kernel = model.params["var"]["params"]["head"]["kernel"]
    assert kernel.dtype == jax.numpy.bfloat16


def test_committed_model_generates_a_batch_on_cpu():
    from amskv_jax.checkpoint import load_model
    from amskv_jax.generate import generate

    model = load_model(str(ASSET))
    labels = np.arange(4) % model.config.var.num_classes
    out = generate(model.params, labels, jax.random.key(0), config=model.config, top_k=100, top_p=0.95)
    images = np.asarray(out.images)
    side = model.config.vqvae.image_size
    assert images.shape == (4, side, side, 3) and np.isfinite(images).all()
    assert out.finite.shape == (len(labels), model.config.var.num_scales)  # [B, S]: every image, every scale
    assert bool(out.finite.all())
    assert images.std() > 0.05  # not a flat colour


def _train_cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "amskv_jax.train", "vqvae", "--config", "tiny16", "--out", str(out), *extra]


def _logged_steps(out: Path) -> int:
    try:
        return len((out / "loss_log.csv").read_text().splitlines()) - 1
    except FileNotFoundError:
        return 0


def _stop_after(out: Path, steps: int, signum: int, *extra: str) -> subprocess.CompletedProcess:
    """Start a tiny16 VQ-VAE run, send `signum` once it has logged `steps` steps, return the finished process."""
    proc = subprocess.Popen(_train_cmd(out, *extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while _logged_steps(out) < steps and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if _logged_steps(out) < steps:
        proc.kill()
        pytest.fail(f"the run logged {_logged_steps(out)} of {steps} steps before it ended or timed out: "
                    f"{proc.communicate()[1][-2000:]}")
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def _latest_restorable(out: Path) -> int:
    """The latest checkpoint's step, after restoring it in full (raises when it does not load)."""
    with ocp.CheckpointManager(out / "checkpoints", options=ocp.CheckpointManagerOptions(read_only=True)) as manager:
        step = manager.latest_step()
        manager.restore(step, args=ocp.args.StandardRestore())
        return step


def test_sigterm_saves_and_the_rerun_ends_where_an_uninterrupted_run_does(tmp_path):
    steps = "30"
    stopped = _stop_after(tmp_path / "stopped", 5, signal.SIGTERM, "--steps", steps, "--save-every", "1000")
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr
    assert "stopped: SIGTERM at step" in stopped.stderr and "Traceback" not in stopped.stderr
    saved = _latest_restorable(tmp_path / "stopped")
    assert 5 <= saved < 30 and saved == _logged_steps(tmp_path / "stopped")  # nothing since the save is lost
    assert main(["vqvae", "--config", "tiny16", "--out", str(tmp_path / "stopped"), "--steps", steps]) == 0
    assert main(["vqvae", "--config", "tiny16", "--out", str(tmp_path / "straight"), "--steps", steps]) == 0
    resumed, straight = (loop.read_log(tmp_path / name) for name in ("stopped", "straight"))
    assert [r["step"] for r in resumed] == list(range(1, 31))
    np.testing.assert_allclose([r["loss"] for r in resumed], [r["loss"] for r in straight], rtol=1e-5)


def test_a_kill_at_any_moment_leaves_a_checkpoint_that_loads(tmp_path):
    """SIGKILL cannot be caught: orbax's commit by rename must leave the last finished checkpoint whole. Saving
    every step puts most kills inside a save."""
    out = tmp_path / "run"
    for stop_at in (2, 5):
        killed = _stop_after(out, stop_at, signal.SIGKILL, "--steps", "200", "--save-every", "1")
        assert killed.returncode == -signal.SIGKILL
        assert _latest_restorable(out) >= stop_at - 1
    assert main(["vqvae", "--config", "tiny16", "--out", str(out), "--steps", "10"]) == 0


def _tree_bytes(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_run_directory_of_another_stage_or_a_damaged_checkpoint_is_refused_untouched(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["vqvae", "--config", "tiny16", "--out", str(out), "--steps", "2"]) == 0
    before, _ = _tree_bytes(out), capsys.readouterr()
    assert main(["classifier", "--config", "tiny16", "--out", str(out), "--steps", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(out) in err[0] and "another run" in err[0] and "stage" in err[0], err
    assert _tree_bytes(out) == before

    data = max((p for p in (out / "checkpoints" / "2").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data.write_bytes(b"\0" * data.stat().st_size)  # the arrays' bytes
    before = _tree_bytes(out)
    assert main(["vqvae", "--config", "tiny16", "--out", str(out), "--steps", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{out}/checkpoints/2" in err[0] and "cannot be restored" in err[0], err
    assert _tree_bytes(out) == before


def test_runs_default_to_a_directory_outside_the_checkout(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert loop.default_run_dir("emoji16l", "var") == tmp_path / "amskv_jax" / "runs" / "emoji16l" / "var"
    assert main(["vqvae", "--config", "tiny16", "--steps", "1"]) == 0
    assert _latest_restorable(tmp_path / "amskv_jax" / "runs" / "tiny16" / "vqvae") == 1
