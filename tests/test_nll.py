"""Teacher-forced NLL per policy: deterministic, larger for a lossy policy, clear errors for bad input; policy-aware
fine-tuning lowers the policy's own loss and writes a loadable model."""
from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from amskv_jax.checkpoint import Model, load_model
from amskv_jax.errors import UserError
from amskv_jax.nll import encode_images, layer_masks, masked_logits, policy_nll, unguided_nll
from amskv_jax.policies import AMSKV, CondensedOnly, FullCache
from amskv_jax.var import VAR, per_layer_blocks
from amskv_jax.train.configs import OptimConfig, get_config
from amskv_jax.train.data import load_image_folder, reference_transform
from amskv_jax.train.finetune import finetune, save_finetuned
from bench.fidelity import main as fidelity_main, nll_images
from conftest import random_params

TINY16 = get_config("tiny16").model  # 16×16 images, 3 scales, one block: the cheapest model to tokenise and train


def random_tiny16(seed: int = 0) -> Model:
    """TINY16 with `random_params` (N(0, 0.05²) weights)."""
    return Model(TINY16, random_params(TINY16, seed), "tiny16, random weights")


def test_nll_is_deterministic_and_condensed_costs_more_than_the_full_cache(emoji_folder, tmp_path):
    figures = []
    for run in ("a", "b"):
        out = tmp_path / run
        argv = ["--nll", "--images", str(emoji_folder), "--policies", "full,condensed", "--out", str(out)]
        assert fidelity_main(argv) == 0
        figures.append(json.loads((out / "nll.json").read_text())["policies"])
    assert figures[0] == figures[1]
    full, condensed = figures[0]["full"], figures[0]["condensed"]
    assert condensed["mean_unguided"] > full["mean_unguided"] + 0.05
    assert condensed["mean_guided"] > full["mean_guided"] + 0.05
    # scale 0 reads no cache under any policy; scale 1 reads scale 0, which `condensed` keeps
    assert condensed["unguided"][:2] == pytest.approx(full["unguided"][:2], rel=1e-6)
    assert "| condensed | " in (tmp_path / "a" / "nll.md").read_text()


def test_nll_images_are_the_chosen_split_or_an_even_subset_of_it(emoji_folder):
    """`--nll`'s images: the default for a model trained on all its data is all of it; `--split` picks another
    split (`train.data`'s fixed held-out split), `--limit` keeps evenly spaced images; `--split` with `--images`
    is refused."""
    model = random_tiny16()  # tiny16 trains on all of its data
    images, labels, source = nll_images(model, None)
    assert "all-split" in source and len(images) == len(labels) > 3
    held, held_labels, held_source = nll_images(model, None, "heldout")
    train, _, _ = nll_images(model, None, "train")
    assert "heldout-split" in held_source and len(held) and len(train)
    assert not {h.tobytes() for h in held} & {t.tobytes() for t in train}  # no image in both
    some, some_labels, some_source = nll_images(model, None, "all", limit=3)
    keep = np.linspace(0, len(images) - 1, 3).round().astype(int)
    np.testing.assert_array_equal(some, images[keep])
    np.testing.assert_array_equal(some_labels, labels[keep])
    assert some_source.startswith("3 of ") and keep[0] == 0 and keep[-1] == len(images) - 1
    with pytest.raises(UserError, match="--split picks from the model's own training data"):
        nll_images(model, emoji_folder, "train")


def test_folder_classes_follow_the_model_names_and_images_get_the_reference_transform(emoji_folder):
    images, labels = load_image_folder(emoji_folder, 32, 10, load_model("emoji32").classes)
    assert images.shape == (4, 32, 32, 3) and sorted(labels.tolist()) == [0, 0, 1, 3]  # faces, animals, food
    wide = Image.new("RGB", (90, 40), (255, 0, 0))
    out = reference_transform(wide, 32)  # shorter side to 36 (LANCZOS), centre crop 32
    assert out.shape == (32, 32, 3) and np.allclose(out, [1.0, -1.0, -1.0])


def test_bad_input_fails_with_a_message(tmp_path, emoji_folder, capsys):
    def error(*argv):
        """stderr of a run that fails with status 2 (argparse's errors exit, the user errors return it)."""
        try:
            code = fidelity_main(["--nll", *argv, "--out", str(tmp_path / "out")])
        except SystemExit as exit_:
            code = exit_.code
        assert code == 2, argv
        return capsys.readouterr().err

    (tmp_path / "flat").mkdir()
    assert "no class subfolders" in error("--images", str(tmp_path / "flat"))
    (tmp_path / "empty" / "faces").mkdir(parents=True)
    assert "no images" in error("--images", str(tmp_path / "empty"))
    (tmp_path / "broken" / "faces").mkdir(parents=True)
    (tmp_path / "broken" / "faces" / "x.png").write_text("not an image")
    assert "x.png: cannot read the image" in error("--images", str(tmp_path / "broken"))
    assert "no such image folder" in error("--images", str(tmp_path / "missing"))
    emoji32 = load_model("emoji32")
    calibration = dict(emoji32.calibration)
    calibration.update(depth=4, scores={k: v[:4] for k, v in calibration["scores"].items()})
    calibration.pop("search", None)  # a well-formed depth-4 file: refused for the model, not for itself
    (tmp_path / "d4.json").write_text(json.dumps(calibration))
    assert "depth 4, not 6" in error("--images", str(emoji_folder), "--calibration", str(tmp_path / "d4.json"))
    model = random_tiny16()
    gt, x = encode_images(model, np.zeros((1, 16, 16, 3), np.float32))
    with pytest.raises(UserError, match="does not fit a model of depth 1"):
        policy_nll(model, {"d6": FullCache().layout(emoji32.config.var)}, gt, x, np.zeros(1, np.int32))


def test_finetuning_under_a_policy_lowers_its_teacher_forced_loss_and_writes_a_loadable_model(tmp_path):
    model = random_tiny16()
    c = model.config.var
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (8, 16, 16, 3)).astype(np.float32)
    labels = np.arange(8, dtype=np.int32) % c.num_classes
    layout = CondensedOnly(condensed_scales=1).layout(c)
    gt, x = encode_images(model, images)
    before = policy_nll(model, {"p": layout}, gt, x, labels)["p"].mean_unguided
    opt = OptimConfig(steps=6, batch_size=8, lr=3e-3, warmup_steps=1, weight_decay=0.0)
    params = finetune(model, layout, images, labels, opt, tmp_path)
    assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(a, b), params["vqvae"], model.params["vqvae"]))
    save_finetuned(tmp_path, model, params, {"policy": "test"})
    tuned = load_model(str(tmp_path))
    assert tuned.config == model.config
    after = policy_nll(tuned, {"p": layout}, gt, x, labels)["p"].mean_unguided
    assert after < before - 0.1, (before, after)
    with pytest.raises(FileExistsError):
        save_finetuned(tmp_path, model, params, {})


def test_masks_as_an_argument_give_the_layouts_logits_and_the_unguided_nll():
    """`masked_logits` with `layer_masks(layout)` equals the layout's own teacher-forced forward (kinds interleaved,
    one kind, the full cache), with stacked and with per-layer params, and `unguided_nll` equals policy_nll's
    unguided mean."""
    model = random_tiny16()
    c = dataclasses.replace(model.config.var, depth=3)
    inner = model.params["var"]["params"]
    blocks = jax.tree.map(lambda a: jnp.concatenate([a, a * 0.5, a * -1.0]), inner["blocks"])  # 1 block -> 3
    var_params = {**model.params["var"], "params": {**inner, "blocks": blocks}}
    model = Model(dataclasses.replace(model.config, var=c), {**model.params, "var": var_params}, "depth 3")
    labels = jnp.array([1, 4], jnp.int32)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, c.seq_len - c.first_l, c.cvae), np.float32))
    layouts = [AMSKV(budgets=(5, 1, 5), condensed_scales=1).layout(c), CondensedOnly(1).layout(c),
               FullCache().layout(c)]
    for layout in layouts:
        want = VAR(c).apply(model.params["var"], labels, x, layout)
        masks = jnp.asarray(layer_masks(layout))
        for params in (model.params["var"], per_layer_blocks(model.params["var"])):
            got = masked_logits(params, labels, x, masks, config=c)
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    gt = np.random.default_rng(2).integers(0, c.vocab_size, (3, c.seq_len)).astype(np.int32)
    x3, labels3 = np.asarray(jnp.concatenate([x, x[:1]])), np.array([1, 4, 2], np.int32)
    for layout in layouts:
        full = policy_nll(model, {"p": layout}, gt, x3, labels3, batch=2)["p"].mean_unguided
        assert unguided_nll(model, layout, gt, x3, labels3, batch=2) == pytest.approx(full, rel=1e-6)
    assert unguided_nll(model, layouts[0], gt, x3, labels3) > unguided_nll(model, layouts[2], gt, x3, labels3)
