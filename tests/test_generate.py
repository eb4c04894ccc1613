"""End-to-end generation: shapes and ranges, one compilation for new labels/keys, validation before compiling."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from amskv_jax import generate as gen_module
from amskv_jax.checkpoint import MissingVQVAEError, init_params
from amskv_jax.config import get_preset
from amskv_jax.generate import generate, image_grid

CONFIG = get_preset("tiny")


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, seed=0)


def test_generate_returns_tokens_per_scale_and_images_in_unit_range(params):
    out = generate(params, [1, 2, 3], jax.random.key(0), config=CONFIG, top_k=10, top_p=0.9)
    assert [t.shape for t in out.tokens] == [(3, pn * pn) for pn in CONFIG.var.patch_nums]
    assert all(int(t.min()) >= 0 and int(t.max()) < CONFIG.var.vocab_size for t in out.tokens)
    assert out.images.shape == (3, 64, 64, 3)
    assert 0.0 <= float(out.images.min()) and float(out.images.max()) <= 1.0


def test_generate_compiles_once_for_new_labels_keys_and_guidance(params):
    gen_module._generate.clear_cache()
    for labels, seed, cfg, top_p in [([0, 1], 0, 1.5, 0.9), ([5, 9], 1, 4.0, 0.5), ([3, 3], 2, 0.0, 0.0)]:
        generate(params, labels, jax.random.key(seed), config=CONFIG, cfg=cfg, top_k=5, top_p=top_p)
    assert gen_module._generate._cache_size() == 1


def test_greedy_generation_is_deterministic_and_key_independent(params):
    a = generate(params, [4, 2], jax.random.key(0), config=CONFIG, top_k=1, top_p=0.0)
    b = generate(params, [4, 2], jax.random.key(7), config=CONFIG, top_k=1, top_p=0.0)
    for x, y in zip(a.tokens, b.tokens):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(labels=[0, 10]), r"labels \[10\] out of range; allowed: 0..9"),
        (dict(labels=[-1]), r"labels \[-1\] out of range"),
        (dict(labels=[]), "non-empty"),
        (dict(labels=[1], top_k=100000), r"top_k must be in \[0, 512\]"),
        (dict(labels=[1], top_p=1.5), r"top_p must be in \[0, 1\]"),
        (dict(labels=[1], dtype="float16"), "unknown dtype 'float16'; allowed: float32, bfloat16"),
    ],
)
def test_invalid_inputs_fail_before_compiling(params, kwargs, message):
    gen_module._generate.clear_cache()
    labels = kwargs.pop("labels")
    with pytest.raises(ValueError, match=message):
        generate(params, labels, jax.random.key(0), config=CONFIG, **kwargs)
    assert gen_module._generate._cache_size() == 0


def test_params_without_a_vqvae_fail_before_tracing(params):
    gen_module._generate.clear_cache()
    with pytest.raises(MissingVQVAEError, match="no 'vqvae': a checkpoint converted without --vae"):
        generate({"var": params["var"]}, [1], jax.random.key(0), config=CONFIG)
    assert gen_module._generate._cache_size() == 0


def test_image_grid_tiles_with_gutters():
    images = np.zeros((5, 4, 4, 3))
    grid = image_grid(images, columns=3)
    assert grid.shape == (2 * 6 + 2, 3 * 6 + 2, 3) and grid.dtype == np.uint8
    assert (grid[2:6, 2:6] == 0).all() and (grid[0] == 255).all()


def test_main_job_writes_one_grid_row_per_class_with_the_embedded_model(tmp_path, capsys):
    from PIL import Image

    from amskv_jax.checkpoint import load_model

    model = load_model()
    assert model.classes is not None and len(model.classes) == model.config.var.num_classes
    assert model.calibration is not None and model.calibration["depth"] == model.config.var.depth
    out = tmp_path / "grid.png"
    assert gen_module.main(["--batch", "2", "--policy", "amskv", "--out", str(out)]) == 0
    side = model.config.vqvae.image_size
    rows = min(model.config.var.num_classes, 10)
    assert Image.open(out).size == (2 * (side + 2) + 2, rows * (side + 2) + 2)
    printed = capsys.readouterr().out
    assert "embedded model emoji32" in printed and "images/s" in printed and "0 faces" in printed
    assert f"generating {len(model.config.var.patch_nums)} scales" in printed
    assert "persistent compilation cache off" in printed  # tests/conftest.py keeps the user's cache out of tests
    assert "saved" in printed and "full cache" in printed  # the cache used beside the full cache's


def test_compare_writes_the_full_cache_row_above_the_policy_row_for_the_same_seeds(tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "compare.png"
    assert gen_module.main(["--labels", "0,1", "--batch", "2", "--policy", "sliding", "--compare",
                            "--out", str(out)]) == 0
    grid = np.asarray(Image.open(out))
    side = (grid.shape[1] - 2) // 2 - 2
    assert grid.shape[:2] == (4 * (side + 2) + 2, 2 * (side + 2) + 2)  # label 0: full, sliding; label 1: full, sliding

    def row(r):
        return grid[2 + r * (side + 2): 2 + r * (side + 2) + side].astype(int)

    # scale 0 never reads the cache, and sliding keeps one scale: rows differ, but the same draw starts each column
    assert np.abs(row(0) - row(1)).mean() > 0 or np.abs(row(2) - row(3)).mean() > 0
    printed = capsys.readouterr().out
    assert "full cache:" in printed and "rows alternate: full cache, then" in printed
