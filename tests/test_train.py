"""Training: both stages' losses fall on a handful of rendered emoji, runs resume, and the committed model generates."""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from amskv_jax.checkpoint import DEFAULT_MODEL, EMBEDDED
from amskv_jax.errors import UserError
from amskv_jax.train import loop
from amskv_jax.train.__main__ import main
from amskv_jax.train.configs import OptimConfig, get_config

CFG = get_config("tiny16")
STEPS = CFG.vqvae_optim.steps
# Every VQ-VAE run here takes the config's step count: the step count is part of the compiled program (the learning
# rate schedule), so the runs share two compiles (fresh state, restored state) through the session's cache.


def _first_last(run: Path, n: int = 3) -> tuple[float, float]:
    losses = [r["loss"] for r in loop.read_log(run)]
    return float(np.mean(losses[:n])), float(np.mean(losses[-n:]))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A VQ-VAE run, uninterrupted (the reference of the resumed runs below); a VAR run on it."""
    root = tmp_path_factory.mktemp("runs")
    assert main(["vqvae", "--config", "tiny16", "--out", str(root / "vqvae")]) == 0
    assert main(["var", "--config", "tiny16", "--vqvae", str(root / "vqvae"), "--out", str(root / "var")]) == 0
    return root


def test_vqvae_loss_falls(runs):
    first, last = _first_last(runs / "vqvae")
    assert last < 0.8 * first


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


@pytest.mark.parametrize("name", sorted(EMBEDDED))
def test_embedded_model_fits_its_budget_and_its_classifier_names_its_classes(name):
    from amskv_jax.checkpoint import load_model
    from amskv_jax.classifier import load_classifier

    assert load_model(name).classes == load_classifier(name).config.classes
    assert sum(f.stat().st_size for f in EMBEDDED[name].rglob("*") if f.is_file()) <= 16 * 2**20


# The default model generates in the main job's test (tests/test_generate.py), with every scale's logits checked
@pytest.mark.parametrize("name", sorted(set(EMBEDDED) - {DEFAULT_MODEL}))
def test_committed_model_generates_one_image_per_class_on_cpu(name):
    from amskv_jax.checkpoint import load_model
    from amskv_jax.generate import generate

    model = load_model(name)
    labels = np.arange(model.config.var.num_classes)  # one image per class, at the model's full ladder
    out = generate(model.params, labels, jax.random.key(0), config=model.config, top_k=100, top_p=0.95)
    images = np.asarray(out.images)
    side = model.config.vqvae.image_size
    assert [t.shape[1] for t in out.tokens] == [pn * pn for pn in model.config.var.patch_nums]
    assert images.shape == (len(labels), side, side, 3) and np.isfinite(images).all()
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


def _saving(out: Path) -> bool:
    """Whether a checkpoint is being written (orbax writes it in `<step>.orbax-checkpoint-tmp-*`, then renames it)."""
    return any((out / "checkpoints").glob("*.orbax-checkpoint-tmp*"))


def _stop_after(out: Path, steps: int, signum: int, *extra: str, mid_save: bool = False) -> subprocess.CompletedProcess:
    """Start a tiny16 VQ-VAE run, send `signum` once it has logged `steps` steps (`mid_save`: and is writing a
    checkpoint), return the finished process."""
    proc = subprocess.Popen(_train_cmd(out, *extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600

    def ready() -> bool:
        return _logged_steps(out) >= steps and (not mid_save or _saving(out))

    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    if not ready():
        proc.kill()
        moment = f"{steps} steps" + (" and a save in progress" if mid_save else "")
        pytest.fail(f"the run ended or timed out before {moment} (it logged {_logged_steps(out)} steps): "
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


def test_sigterm_saves_and_the_rerun_ends_where_an_uninterrupted_run_does(runs, tmp_path):
    """A stopped run resumes in another process, continuing the step count without repeating a step, and ends
    where the uninterrupted run of the fixture does."""
    out = tmp_path / "stopped"
    stopped = _stop_after(out, 5, signal.SIGTERM, "--save-every", "1000")
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr
    assert "stopped: SIGTERM at step" in stopped.stderr and "Traceback" not in stopped.stderr
    saved = _latest_restorable(out)
    assert 5 <= saved < STEPS and saved == _logged_steps(out)  # nothing since the save is lost
    assert main(["vqvae", "--config", "tiny16", "--out", str(out), "--save-every", "1000"]) == 0
    assert _latest_restorable(out) == STEPS
    resumed, straight = loop.read_log(out), loop.read_log(runs / "vqvae")
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    np.testing.assert_allclose([r["loss"] for r in resumed], [r["loss"] for r in straight], rtol=1e-5)


def test_a_kill_at_any_moment_leaves_a_checkpoint_that_loads(tmp_path):
    """SIGKILL cannot be caught: orbax's commit by rename must leave the last finished checkpoint whole. The kill
    lands while a checkpoint is being written (saving every step), the worst moment; the rerun then finishes."""
    out = tmp_path / "run"
    killed = _stop_after(out, 2, signal.SIGKILL, "--save-every", "1", mid_save=True)
    assert killed.returncode == -signal.SIGKILL
    assert _latest_restorable(out) >= 1
    assert main(["vqvae", "--config", "tiny16", "--out", str(out), "--save-every", "1000"]) == 0
    assert _latest_restorable(out) == STEPS


def test_a_signal_after_a_steps_save_check_still_saves_that_step(tmp_path, monkeypatch):
    """SIGTERM landing after step 3 was logged and its save was decided (not due), before the next step: the run
    still saves step 3, so the checkpoint holds every logged step (this once failed the SIGTERM test above)."""
    import os

    opt = OptimConfig(steps=6, batch_size=1, lr=0.1, warmup_steps=1, save_every=1000)
    save = ocp.CheckpointManager.save

    def save_then_signal(manager, step, *args, **kwargs):
        saved = save(manager, step, *args, **kwargs)
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # recorded by the run's handler, seen at the next step
        return saved

    def step(state, batch, key):
        del batch, key
        return {**state, "params": {"w": state["params"]["w"] + 1}}, {"loss": state["params"]["w"]}

    monkeypatch.setattr(ocp.CheckpointManager, "save", save_then_signal)
    state = {"params": {"w": jnp.zeros(())}, "opt_state": {"n": jnp.zeros(())}}
    with pytest.raises(loop.TrainingInterrupted) as stopped:
        loop.run(tmp_path, state, step, lambda i: {}, opt, "count", {"stage": "count"}, save_seconds=math.inf)
    assert stopped.value.step == 3 == _logged_steps(tmp_path)
    assert _latest_restorable(tmp_path) == 3


def test_save_seconds_saves_by_wall_time(tmp_path):
    """`loop.run` on a one-number state, `save_every` far away: with `save_seconds` 0 every step is saved (the last
    two are kept), without a time limit not the step before the last."""
    opt = OptimConfig(steps=4, batch_size=1, lr=0.1, warmup_steps=1, save_every=1000)

    def step(state, batch, key):
        del batch, key
        return {**state, "params": {"w": state["params"]["w"] + 1}}, {"loss": state["params"]["w"]}

    kept = {}
    for save_seconds in (0.0, math.inf):
        out = tmp_path / str(save_seconds)
        state = {"params": {"w": jnp.zeros(())}, "opt_state": {"n": jnp.zeros(())}}
        loop.run(out, state, step, lambda i: {}, opt, "count", {"stage": "count"}, save_seconds=save_seconds)
        with ocp.CheckpointManager(out / "checkpoints", options=ocp.CheckpointManagerOptions(read_only=True)) as m:
            kept[save_seconds] = m.all_steps()
    assert kept[0.0] == [3, 4] and 3 not in kept[math.inf]


def test_an_evaluation_hook_logs_every_save_every_steps_and_at_the_end(tmp_path):
    """`loop.run(evaluate=...)` scores the state after steps 2, 4 and the last (5) into eval_log.csv; a resumed
    run keeps the rows up to its checkpoint and adds the rest once."""
    opt = OptimConfig(steps=5, batch_size=1, lr=0.1, warmup_steps=1, save_every=2)

    def step(state, batch, key):
        del batch, key
        return {**state, "params": {"w": state["params"]["w"] + 1}}, {"loss": state["params"]["w"]}

    state = {"params": {"w": jnp.zeros(())}, "opt_state": {"n": jnp.zeros(())}}
    score = lambda s: {"w": s["params"]["w"]}  # noqa: E731
    loop.run(tmp_path, state, step, lambda i: {}, dataclasses.replace(opt, steps=3), "count", {"stage": "count"},
             evaluate=score, save_seconds=math.inf)
    loop.run(tmp_path, state, step, lambda i: {}, opt, "count", {"stage": "count"}, evaluate=score)
    assert [(r["step"], r["w"]) for r in loop.read_log(tmp_path, "eval_log.csv")] == [(2, 2), (3, 3), (4, 4), (5, 5)]


def test_token_nll_is_the_mean_cross_entropy_of_whole_batches():
    """`var_trainer.token_nll` against log-softmax in numpy on one teacher-forced pass: 40 images score as their
    first 32 (one batch of 32), per token."""
    from amskv_jax.train.var_trainer import init_var, token_nll
    from amskv_jax.var import VAR

    c = CFG.model.var
    params = init_var(c, 0)["params"]
    rng = np.random.default_rng(0)
    gt = rng.integers(0, c.vocab_size, (40, c.seq_len)).astype(np.int32)
    x = rng.normal(size=(40, c.seq_len - c.first_l, c.cvae)).astype(np.float32)
    labels = rng.integers(0, c.num_classes, 40).astype(np.int32)
    scores = token_nll(c, {"probe": (gt, x, labels)})({"params": params})
    logits = np.asarray(VAR(c).apply({"params": params}, labels[:32], x[:32]), np.float64)
    log_p = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    expected = -np.take_along_axis(log_p, gt[:32, :, None], -1).mean()
    assert scores.keys() == {"probe_nll"}
    np.testing.assert_allclose(scores["probe_nll"], expected, rtol=1e-5)
    with pytest.raises(UserError, match="the few set has 8 images; the NLL needs at least 32"):
        token_nll(c, {"few": (gt[:8], x[:8], labels[:8])})


def test_a_restore_failure_is_a_run_error_only_for_damaged_or_foreign_files():
    class Manager:
        def __init__(self, err):
            self.err = err

        def restore(self, step, args):
            raise self.err

    damaged = ValueError("DATA_LOSS: Error reading")
    wrapped = Exception("Encountered error while reading array index")  # how orbax raises a failed array read
    wrapped.__cause__ = damaged
    refused = r"/out/checkpoints/3: cannot be restored into this run \(ValueError: DATA_LOSS"
    for err in (damaged, wrapped):
        with pytest.raises(loop.RunError, match=refused) as info:
            loop._restore(Manager(err), 3, {}, Path("/out"))
        assert info.value.__cause__ is err
    for bug in (TypeError("a bug"), Exception("a bug")):  # e.g. a malformed state: a traceback, not a user's error
        with pytest.raises(type(bug), match="a bug"):
            loop._restore(Manager(bug), 3, {}, Path("/out"))


def _tree_bytes(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _refused(argv: list[str], out: Path, capsys, *words: str) -> None:
    """The command fails with one line naming `out` and `words`, and leaves every byte of `out` as it was."""
    before, _ = _tree_bytes(out), capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(out) in err[0] and all(w in err[0] for w in words), err
    assert _tree_bytes(out) == before


def test_a_run_directory_of_another_run_or_a_damaged_checkpoint_is_refused_untouched(runs, tmp_path, capsys):
    """Each stage refuses the others' directories before it writes there (its data and token caches: the copies
    here lack them, so any early write would show)."""
    vqvae, var = tmp_path / "vqvae", tmp_path / "var"
    for source, copy in ((runs / "vqvae", vqvae), (runs / "var", var)):
        shutil.copytree(source, copy, ignore=shutil.ignore_patterns("data-*.npz", "tokens.npz"))
    tiny = ["--config", "tiny16"]
    _refused(["classifier", *tiny, "--out", str(vqvae), "--steps", "2"], vqvae, capsys, "another run", "stage")
    _refused(["var", *tiny, "--vqvae", str(runs / "vqvae"), "--out", str(vqvae)], vqvae, capsys, "another run", "stage")
    _refused(["vqvae", *tiny, "--out", str(var)], var, capsys, "another run", "stage")

    # the VAR run resumed on another VQ-VAE (same config, other weights)
    config, variables = loop.load_params(runs / "vqvae")
    loop.save_params(tmp_path / "other", config, jax.tree.map(lambda a: np.asarray(a) * 0.5, variables))
    _refused(["var", *tiny, "--vqvae", str(tmp_path / "other"), "--out", str(var)], var, capsys, "vqvae_run")

    damaged = tmp_path / "damaged"
    shutil.copytree(runs / "vqvae", damaged)
    checkpoint = damaged / "checkpoints" / str(STEPS)
    data = max((p for p in checkpoint.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data.write_bytes(b"\0" * data.stat().st_size)  # the arrays' bytes
    _refused(["vqvae", *tiny, "--out", str(damaged)], damaged, capsys, f"{checkpoint}", "cannot be restored")


def test_a_run_json_from_before_the_later_keys_is_accepted_and_gains_them(tmp_path):
    """The identity of a run started before "data" and "vqvae_run" existed (it held the image count instead)."""
    model = {"depth": 6}
    (tmp_path / "run.json").write_text(json.dumps({"images": 3539, "model": model, "stage": "var"}))
    identity = {"stage": "var", "model": model, "data": "ranges/all/16", "vqvae_run": "0123"}
    loop.check_identity(tmp_path, identity)
    assert json.loads((tmp_path / "run.json").read_text()) == {"images": 3539, **identity}
    with pytest.raises(loop.RunError, match="its vqvae_run differ"):
        loop.check_identity(tmp_path, {**identity, "vqvae_run": "4567"})
    (tmp_path / "run.json").write_text(json.dumps({"images": 3539, "model": model, "stage": "vqvae"}))
    with pytest.raises(loop.RunError, match="its stage differ"):
        loop.check_identity(tmp_path, identity)


def test_runs_default_to_a_directory_outside_the_checkout(runs, monkeypatch, tmp_path):
    """Without --out a stage resumes (here: finishes, its steps all done) and writes in its default directory."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert loop.default_run_dir("emoji16l", "var") == tmp_path / "amskv_jax" / "runs" / "emoji16l" / "var"
    default = tmp_path / "amskv_jax" / "runs" / "tiny16" / "vqvae"
    finished = shutil.ignore_patterns("params", "config.json", "checksums.json", "classes.json")
    shutil.copytree(runs / "vqvae", default, ignore=finished)  # the run, before it wrote its results
    assert main(["vqvae", "--config", "tiny16"]) == 0
    assert loop.load_params(default)[0] == CFG.model and _latest_restorable(default) == STEPS
