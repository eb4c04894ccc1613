"""End-to-end generation: shapes and ranges, one compilation for new labels/keys, validation before compiling."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amskv_jax import generate as gen_module
from amskv_jax.checkpoint import MissingVQVAEError, init_params
from amskv_jax.config import get_preset
from amskv_jax.generate import generate, image_grid
from amskv_jax.policies import AMSKV, DEFAULT_MAX_DELTA_NLL, DEFAULT_POLICY
from conftest import random_params

CONFIG = get_preset("tiny")


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, seed=0)


# The tests below share one compiled program (two images, top_k 5; labels, keys, cfg and top_p are arguments).
def test_generate_returns_tokens_per_scale_and_images_in_unit_range(params):
    out = generate(params, [1, 2], jax.random.key(0), config=CONFIG, top_k=5, top_p=0.9)
    assert [t.shape for t in out.tokens] == [(2, pn * pn) for pn in CONFIG.var.patch_nums]
    assert all(int(t.min()) >= 0 and int(t.max()) < CONFIG.var.vocab_size for t in out.tokens)
    assert out.images.shape == (2, 64, 64, 3)
    assert 0.0 <= float(out.images.min()) and float(out.images.max()) <= 1.0


def test_generate_compiles_once_for_new_labels_keys_and_guidance(params):
    gen_module._generate.clear_cache()
    for labels, seed, cfg, top_p in [([0, 1], 0, 1.5, 0.9), ([5, 9], 1, 4.0, 0.5), ([3, 3], 2, 0.0, 0.0)]:
        generate(params, labels, jax.random.key(seed), config=CONFIG, cfg=cfg, top_k=5, top_p=top_p)
    assert gen_module._generate._cache_size() == 1


def test_greedy_generation_is_deterministic_and_key_independent(params):
    # top_p far below 1/top_k keeps only each token's most likely code: greedy
    a = generate(params, [4, 2], jax.random.key(0), config=CONFIG, top_k=5, top_p=1e-6)
    b = generate(params, [4, 2], jax.random.key(7), config=CONFIG, top_k=5, top_p=1e-6)
    for x, y in zip(a.tokens, b.tokens):
        np.testing.assert_array_equal(x, y)


def test_greedy_generation_draws_each_scales_largest_logit():
    """top_k=1 draws the argmax of the guided logits at every scale. In this program (the scan, chunks of 8 rows,
    compiled as the suite compiles) XLA computed the logits once for the sampler's sort and again for its threshold
    comparison, an ulp apart, and emptied the support of 5 of scale 1's 32 tokens, which drew token 0
    (`sampling.top_k_top_p_filter`)."""
    config = get_preset("tiny-ladder256")
    layout = AMSKV(budgets=(46, 5)).layout(config.var)
    labels = jnp.arange(8, dtype=jnp.int32) % config.var.num_classes
    out = generate(random_params(config), labels, jax.random.key(1), config=config, layout=layout, top_k=1,
                   layer_loop="scan", row_chunk=8, return_logits=True)
    for si, (tokens, logits) in enumerate(zip(out.tokens, out.logits, strict=True)):
        np.testing.assert_array_equal(np.asarray(tokens).reshape(len(labels), -1),
                                      np.asarray(logits).argmax(-1), err_msg=f"scale {si}")


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

    from amskv_jax.checkpoint import DEFAULT_MODEL, load_model

    model = load_model()
    assert model.classes is not None and len(model.classes) == model.config.var.num_classes
    assert model.calibration is not None and model.calibration["depth"] == model.config.var.depth
    out = tmp_path / "grid.png"
    assert gen_module.main(["--batch", "2", "--out", str(out)]) == 0  # the README's main job, with a smaller batch
    side = model.config.vqvae.image_size
    rows = min(model.config.var.num_classes, 10)
    grid = np.asarray(Image.open(out))
    assert grid.shape[:2] == (rows * (side + 2) + 2, 2 * (side + 2) + 2)
    assert grid[2:2 + side, 2:2 + side].std() > 0.05 * 255  # the first image is not a flat colour
    printed = capsys.readouterr().out
    assert f"embedded model {DEFAULT_MODEL}" in printed and "images/s" in printed and f"0 {model.classes[0]}" in printed
    assert f"generating {len(model.config.var.patch_nums)} scales" in printed
    assert "persistent compilation cache off" in printed  # tests/conftest.py keeps the user's cache out of tests
    assert "saved" in printed and "full cache" in printed  # the cache used beside the full cache's
    # emoji32's calibration records its searched policy's held-out ΔNLL within 5%: the main job runs AMS-KV
    assert model.calibration["held_out"]["delta_nll"] <= DEFAULT_MAX_DELTA_NLL
    assert f"policy {DEFAULT_POLICY} (no --policy given: its searched {DEFAULT_POLICY} policy's held-out ΔNLL" in printed


def test_compare_writes_the_full_cache_row_above_the_policy_row_for_the_same_seeds(tmp_path, capsys):
    """The --compare grid against two separate runs on the same labels and seed, one per cache: its rows must be,
    label by label, the full-cache run's row and then the policy run's row (same programs, so bit-identical). The
    tiny preset (random weights) compiles in a third of the embedded model's time; the main job's test covers that."""
    from PIL import Image

    def grid_rows(*argv):
        out = tmp_path / f"{len(list(tmp_path.iterdir()))}.png"
        assert gen_module.main(["--model", "tiny", "--labels", "0,1", "--batch", "2", *argv, "--out", str(out)]) == 0
        grid = np.asarray(Image.open(out))
        side = (grid.shape[1] - 2) // 2 - 2  # two columns
        assert (grid.shape[0] - 2) % (side + 2) == 0
        return [grid[2 + r * (side + 2): 2 + r * (side + 2) + side] for r in range((grid.shape[0] - 2) // (side + 2))]

    compared = grid_rows("--policy", "sliding", "--compare")
    printed = capsys.readouterr().out
    assert "full cache:" in printed and "rows alternate: full cache, then" in printed
    full, sliding = grid_rows("--policy", "full"), grid_rows("--policy", "sliding")
    assert len(compared) == 4 and len(full) == len(sliding) == 2
    for label in range(2):
        np.testing.assert_array_equal(compared[2 * label], full[label])
        np.testing.assert_array_equal(compared[2 * label + 1], sliding[label])
    assert any(not np.array_equal(f, s) for f, s in zip(full, sliding))  # the policy changes the images


def test_generated_logits_under_a_lossy_policy_are_teacher_forcing_under_its_layout():
    """generate(return_logits=True) under AMS-KV with two cache kinds (no quantisation) against the teacher-forced
    forward pass under the same layout on the generated tokens, guided the same way: equal up to float32 rounding;
    the unmasked teacher-forced pass is far away (the layout changes what is attended)."""
    import jax.numpy as jnp

    from amskv_jax import sampling
    from amskv_jax.policies import AMSKV
    from amskv_jax.var import VAR
    from amskv_jax.vqvae import VQVAE
    from conftest import random_model

    model = random_model("tiny")
    c = model.config.var
    layout = AMSKV(budgets=(10, None), condensed_scales=1).layout(c)  # condensed + the latest scale; one unlimited
    assert len(layout.kinds) == 2
    labels = jnp.arange(4) % c.num_classes
    out = generate(model.params, labels, jax.random.key(0), config=model.config, layout=layout, cfg=2.0, top_k=0,
                   top_p=0.9, return_logits=True)
    x = VQVAE(model.config.vqvae).apply(model.params["vqvae"], out.tokens, method=VQVAE.idx_to_var_input)
    rows = sampling.guidance_rows(labels, c.num_classes)
    errors = {}
    for name, forced_layout in (("layout", layout), ("unmasked", None)):
        logits = VAR(c).apply(model.params["var"], rows, jnp.repeat(x, 2, axis=0), layout=forced_layout)
        errors[name] = max(
            float(np.abs(sampling.apply_guidance(logits[:, b:e], 2.0, sampling.guidance_ratio(si, c.num_scales))
                         - ref).max() / np.abs(ref).max())
            for si, ((b, e), ref) in enumerate(zip(c.begin_ends, out.logits, strict=True))
        )
    assert errors["layout"] < 1e-5 and errors["unmasked"] > 1e-3, errors
