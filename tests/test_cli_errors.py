"""The command lines on input a user gets wrong: status 2 and one line `PROG: error: ...` that names the problem, before
anything is compiled; and `train finetune` end to end (a model directory `generate --model DIR` loads)."""
from __future__ import annotations

import json
import re
import zipfile

import jax
import numpy as np
import pytest
from PIL import Image

from amskv_jax import checkpoint
from amskv_jax import generate as gen_module
from amskv_jax.calibrate import main as calibrate_main
from amskv_jax.policies import CALIBRATION_FORMAT
from amskv_jax.train.__main__ import main as train_main
from conftest import random_params
from convert import from_torch

EMOJI32_CALIBRATION = checkpoint.EMBEDDED["emoji32"] / "layers.json"  # depth 6; the tiny preset has depth 2


def _error(main, argv, capsys, prog: str) -> str:
    """Run a command line that must fail on its input; returns its error message (the last line of stderr), after
    checking the status (2), the `PROG: error: ` form and that nothing else was printed on that line's behalf."""
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors and parser.error
        code = exit_.code
    assert code == 2, argv
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    last = err.rstrip("\n").splitlines()[-1]
    found = re.match(rf"{re.escape(prog)}( [a-z]+)?: error: ", last)  # a subcommand's argparse names itself too
    assert found, err
    return last[found.end():]


# --- python -m amskv_jax.generate --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--labels", "1,x"], "--labels must be comma-separated integers, got '1,x'"),
        (["--labels", "1,2,1"], "--labels repeats a class ('1,2,1'); use --batch for more images per class"),
        (["--labels", "3,10"], "labels [10] out of range; allowed: 0..9"),
        (["--labels", "1", "--batch", "0"], "--batch must be >= 1, got 0"),
        (["--labels", "1", "--top-p", "2"], "top_p must be in [0, 1]"),
        (["--labels", "1", "--policy", "amskv", "--calibration", "missing.json"],
         "missing.json: no such calibration file (write one with python -m amskv_jax.calibrate)"),
        (["--labels", "1", "--policy", "amskv", "--calibration", str(EMOJI32_CALIBRATION)],
         "calibration is for a model of depth 6, not 2"),
        (["--labels", "1", "--mesh", "data=2"], "needs 2 devices, but only 1 are available"),
        (["--labels", "1", "--policy", "fastest"], "invalid choice: 'fastest'"),
    ],
)
def test_generate_rejects_bad_input_before_compiling(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    gen_module._generate.clear_cache()
    assert message in _error(gen_module.main, ["--model", "tiny", *argv, "--out", "grid.png"], capsys,
                             "python -m amskv_jax.generate")
    assert gen_module._generate._cache_size() == 0 and not (tmp_path / "grid.png").exists()


def test_generate_rejects_a_calibration_file_of_another_format(capsys, tmp_path):
    bad = tmp_path / "layers.json"
    bad.write_text(json.dumps({**json.loads(EMOJI32_CALIBRATION.read_text()), "format": "something else"}))
    message = _error(gen_module.main, ["--model", "tiny", "--labels", "1", "--policy", "amskv", "--calibration",
                                       str(bad), "--out", str(tmp_path / "grid.png")], capsys,
                     "python -m amskv_jax.generate")
    assert message == f"{bad}: not a calibration file (format must be {CALIBRATION_FORMAT!r})"


def test_generate_names_a_missing_model_directory(capsys, tmp_path):
    message = _error(gen_module.main, ["--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "grid.png")],
                     capsys, "python -m amskv_jax.generate")
    assert str(tmp_path / "nowhere") in message


# --- python -m amskv_jax.calibrate -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--samples", "0"], "--samples and --batch must be >= 1, got 0 and 8"),
        (["--samples", "2", "--batch", "-1"], "--samples and --batch must be >= 1, got 2 and -1"),
        (["--samples", "2", "--fraction", "1.5"], "--fraction must be in [0, 1], got 1.5"),
        (["--samples", "2", "--fraction", "0.5", "--threshold", "0.2"], "not allowed with argument --fraction"),
        (["--samples", "2", "--finer-from", "4"], "--finer-from must be in [1, 3], got 4"),
        (["--samples", "2", "--finer-from", "0"], "--finer-from must be in [1, 3], got 0"),
        (["--samples", "4", "--batch", "2", "--mesh", "data=2"], "needs 2 devices, but only 1 are available"),
        (["--samples", "2", "--mesh", "pipe=2"], "bad mesh axis 'pipe=2'"),
        (["--samples", "2", "--measure", "q"], "invalid choice: 'q'"),
    ],
)
def test_calibrate_rejects_bad_input_before_writing(argv, message, capsys, tmp_path):
    out = tmp_path / "layers.json"
    assert message in _error(calibrate_main, ["--model", "tiny", *argv, "--out", str(out)], capsys,
                             "python -m amskv_jax.calibrate")
    assert not out.exists()


def test_calibrate_names_a_missing_model_directory(capsys, tmp_path):
    message = _error(calibrate_main, ["--model", str(tmp_path / "nowhere"), "--samples", "2", "--out",
                                      str(tmp_path / "layers.json")], capsys, "python -m amskv_jax.calibrate")
    assert str(tmp_path / "nowhere") in message


# --- python -m convert.from_torch --------------------------------------------------------------------------------
def test_convert_refuses_a_hostile_checkpoint_without_running_it(capsys, tmp_path):
    """A torch zip checkpoint whose pickle calls os.system: refused (status 2, one line), the command never runs."""
    marker = tmp_path / "ran"
    command = f"touch {marker}"
    pkl = b"\x80\x02cos\nsystem\nX" + len(command).to_bytes(4, "little") + command.encode() + b"\x85R."
    path = tmp_path / "var_d16.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pkl)
        zf.writestr("archive/byteorder", "little")
        zf.writestr("archive/version", "3\n")
    message = _error(from_torch.main, [str(path), "--out", str(tmp_path / "out")], capsys,
                     "python -m convert.from_torch")
    assert str(path) in message and "os.system" in message
    assert not marker.exists() and not (tmp_path / "out").exists()


# --- python -m amskv_jax.train finetune ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny16_model(tmp_path_factory):
    """A tiny16 model directory (`random_params`) and an image folder for it."""
    from amskv_jax.train.configs import get_config

    root = tmp_path_factory.mktemp("finetune")
    config = get_config("tiny16").model
    checkpoint.save_checkpoint(root / "model", config, random_params(config))
    rng = np.random.default_rng(0)
    for label in (0, 3):
        (root / "images" / str(label)).mkdir(parents=True)
        for i in range(2):
            pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "images" / str(label) / f"{i}.png")
    return root


def test_finetune_writes_a_model_directory_that_generate_loads(tiny16_model, capsys):
    out = tiny16_model / "tuned"
    argv = ["finetune", "--model", str(tiny16_model / "model"), "--policy", "condensed", "--images",
            str(tiny16_model / "images"), "--steps", "2", "--batch-size", "4", "--out", str(out)]
    assert train_main(argv) == 0
    printed = capsys.readouterr().out
    assert "under condensed" in printed and "4 images, 2 steps, batch 4" in printed and f"wrote {out}" in printed
    source, tuned = checkpoint.load_model(str(tiny16_model / "model")), checkpoint.load_model(str(out))
    assert tuned.config == source.config
    for a, b in zip(jax.tree.leaves(source.params["vqvae"]), jax.tree.leaves(tuned.params["vqvae"]), strict=True):
        np.testing.assert_array_equal(a, b)  # the VQ-VAE is frozen
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(source.params["var"]),
                                                         jax.tree.leaves(tuned.params["var"]), strict=True)]
    assert sum(changed) > len(changed) // 2  # the VAR trained
    provenance = json.loads((out / "finetune.json").read_text())
    assert provenance["policy"] == "condensed" and provenance["optim"]["steps"] == 2
    assert provenance["images"] == str(tiny16_model / "images")
    assert len((out / "run" / "loss_log.csv").read_text().strip().splitlines()) == 1 + 2  # header, two steps

    # ... and refuses to write over it
    message = _error(train_main, argv, capsys, "python -m amskv_jax.train")
    assert message == f"{out}/params exists; remove it or pick another --out"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "tiny"],
         "this model has no known training data here; pass --images DIR (one subfolder per class)"),
        (["--model", "tiny", "--images", "missing"], "missing: no such image folder"),
        (["--model", "tiny", "--calibration", str(EMOJI32_CALIBRATION)],
         f"{EMOJI32_CALIBRATION}: the calibration is for a model of depth 6, not 2"),
        (["--model", "tiny", "--policy", "fastest"], "invalid choice: 'fastest'"),
    ],
)
def test_finetune_rejects_bad_input_before_training(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert message in _error(train_main, ["finetune", *argv, "--out", "out"], capsys, "python -m amskv_jax.train")
    assert not (tmp_path / "out").exists()


# --- what becomes one line, and what does not ------------------------------------------------------------------------
def test_only_the_projects_errors_become_one_line(capsys):
    """A `UserError` (or a file-system error) is the user's: one line, status 2. A library's ValueError is a bug:
    it propagates with its traceback instead of being dressed up as bad input."""
    from amskv_jax import cli
    from amskv_jax.errors import UserError

    def failing(err):
        return cli.command("prog")(lambda argv: (_ for _ in ()).throw(err))

    assert failing(UserError("bad\nvalue"))([]) == 2
    assert capsys.readouterr().err == "prog: error: bad value\n"
    assert failing(FileNotFoundError("x.json: missing"))([]) == 2
    with pytest.raises(ValueError, match="not ours"):
        failing(ValueError("not ours"))([])
    with pytest.raises(ZeroDivisionError):
        failing(ZeroDivisionError())([])


@pytest.mark.parametrize(
    "content, message",
    [
        (b"{", "not JSON"),
        (b"\xff\xfe", "not UTF-8"),
        (b"[" * 100 + b"]" * 100, "nested deeper than 16 levels"),
        (b"[]", "not a calibration file"),
        (json.dumps({"format": CALIBRATION_FORMAT, "depth": 2.0}).encode(), "depth 2.0 is not a layer count"),
        (json.dumps({"format": CALIBRATION_FORMAT, "depth": 2, "patch_nums": [1, 2, 3, 4],
                     "held_out": {"delta_nll": "0.01"}}).encode(), "held_out.delta_nll must be a finite number"),
    ],
)
def test_generate_rejects_a_hostile_calibration_file_in_one_line(content, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "layers.json").write_bytes(content)
    error = _error(gen_module.main, ["--model", "tiny", "--labels", "1", "--policy", "amskv", "--calibration",
                                     "layers.json", "--out", "grid.png"], capsys, "python -m amskv_jax.generate")
    assert error.startswith("layers.json: ") and message in error, error


def test_a_model_directory_with_a_calibration_for_another_ladder_is_refused_naming_it(capsys, tmp_path):
    """layers.json of the model's depth but another ladder: the checkpoint gate refuses the directory in one line
    naming the file, before the file's layers would pick a policy's layers for the wrong scales."""
    from amskv_jax.config import get_preset

    config = get_preset("tiny")  # depth 2, ladder (1, 2, 3, 4)
    directory = checkpoint.save_checkpoint(tmp_path / "model", config, random_params(config))
    calibration = {"format": CALIBRATION_FORMAT, "depth": 2, "patch_nums": [1, 2, 4], "demanding_layers": [1],
                   "scores": {"similarity": [0.5, 0.1], "dispersion": [0.2, 0.3]}}
    (directory / "layers.json").write_text(json.dumps(calibration))
    message = _error(gen_module.main, ["--model", str(directory), "--labels", "1", "--out", str(tmp_path / "x.png")],
                     capsys, "python -m amskv_jax.generate")
    assert message == f"{directory / 'layers.json'}: the calibration is for the ladder [1, 2, 4], not [1, 2, 3, 4]"
    assert not (tmp_path / "x.png").exists()


def test_calibration_files_of_the_search_are_checked_field_by_field(tmp_path):
    from amskv_jax.errors import UserError
    from amskv_jax.policies import read_calibration

    data = json.loads(EMOJI32_CALIBRATION.read_text())
    assert read_calibration(EMOJI32_CALIBRATION)["search"]["budgets"] == data["search"]["budgets"]
    for field, value, message in [
        ("budgets", [66, 46, 5], "search.budgets must be 6 positive slot counts"),
        ("budgets", [66, 46, 5, 5, 5, "5"], "search.budgets must be 6 positive slot counts"),
        ("condensed_scales", 99, "search.condensed_scales must be a scale count in [0, 7]"),
    ]:
        bad = json.loads(json.dumps(data))
        bad["search"][field] = value
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(UserError, match=re.escape(message)):
            read_calibration(tmp_path / "bad.json")
