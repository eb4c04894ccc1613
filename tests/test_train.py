"""Training: both stages' losses fall on a handful of rendered emoji, runs resume, and the committed model generates."""
from __future__ import annotations

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
    assert out.finite.shape == (model.config.var.num_scales,) and bool(out.finite.all())  # every scale's logits
    assert images.std() > 0.05  # not a flat colour
