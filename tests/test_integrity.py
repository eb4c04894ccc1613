"""Checkpoint integrity end to end: the checksum manifest, one clean error line, non-finite generations refused."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from amskv_jax import generate as gen_module
from amskv_jax import integrity
from amskv_jax.checkpoint import load_checkpoint, save_checkpoint
from amskv_jax.config import get_preset
from amskv_jax.untrusted import leaf_name
from conftest import random_params

CONFIG = get_preset("tiny")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def params():
    """Random numpy params of the tiny preset's shapes."""
    return random_params(CONFIG, std=0.02)


@pytest.fixture
def saved(tmp_path, params):
    return save_checkpoint(tmp_path / "ckpt", CONFIG, params)


def _data_files(directory: Path) -> list[Path]:
    return [f for f in (directory / "params").rglob("*") if f.is_file() and f.parent.name == "d"]


def test_manifest_is_written_last_and_a_good_copy_loads(saved, params):
    manifest = json.loads((saved / integrity.MANIFEST).read_text())
    assert set(manifest["files"]) == {str(f.relative_to(saved / "params")) for f in (saved / "params").rglob("*")
                                      if f.is_file()}
    assert manifest["arrays"]["var/params/head/bias"]["shape"] == [CONFIG.var.vocab_size]
    assert len(manifest["arrays"]) == len(jax.tree.leaves(params))
    _, loaded = load_checkpoint(saved)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
        np.testing.assert_array_equal(a, b)


def test_flipped_bytes_in_one_array_are_refused_naming_that_array(saved, params, monkeypatch):
    biggest = max(_data_files(saved), key=lambda f: f.stat().st_size)
    data = bytearray(biggest.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, inside some array's data
    biggest.write_bytes(bytes(data))
    monkeypatch.setenv(integrity.SKIP_ENV, "1")  # skipped on request: the damage goes through unnoticed
    _, damaged = load_checkpoint(saved)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    differ = [leaf_name(path) for (path, a), b in zip(flat, jax.tree.leaves(damaged)) if not np.array_equal(a, b)]
    assert len(differ) == 1
    monkeypatch.delenv(integrity.SKIP_ENV)
    with pytest.raises(integrity.IntegrityError) as err:
        load_checkpoint(saved)
    assert "1 array(s) fail their checksum" in str(err.value) and f"{differ[0]} (checksum" in str(err.value)


def test_a_truncated_file_is_one_line_and_exit_2_without_traceback(saved, tmp_path):
    biggest = max(_data_files(saved), key=lambda f: f.stat().st_size)
    os.truncate(biggest, biggest.stat().st_size // 2)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-m", "amskv_jax.generate", "--model", str(saved), "--out", str(tmp_path / "x.png")],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and biggest.name in lines[0] and "expected" in lines[0] and "truncated" in lines[0]
    assert not (tmp_path / "x.png").exists()


def test_a_directory_without_manifest_loads_with_a_notice(saved, params, capsys):
    (saved / integrity.MANIFEST).unlink()
    _, loaded = load_checkpoint(saved)
    assert len(jax.tree.leaves(loaded)) == len(jax.tree.leaves(params))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("notice: ") and "integrity write" in err[0]


def test_the_command_line_rewrites_and_checks_a_manifest(saved, capsys):
    (saved / integrity.MANIFEST).unlink()
    assert integrity.main(["check", str(saved)]) == 2
    assert "no checksums.json" in capsys.readouterr().err
    assert integrity.main(["write", str(saved)]) == 0
    assert integrity.main(["check", str(saved)]) == 0
    assert "arrays match" in capsys.readouterr().out


def test_a_nan_head_bias_is_flagged_and_the_command_line_writes_no_image(tmp_path, params, capsys):
    bad = jax.tree.map(np.asarray, params)
    bad["var"]["params"]["head"]["bias"] = np.full_like(bad["var"]["params"]["head"]["bias"], np.nan)
    assert gen_module.first_nonfinite_scale(np.array([True, False, False])) == 1
    assert gen_module.first_nonfinite_scale(np.array([True, True])) is None
    directory = save_checkpoint(tmp_path / "nan", CONFIG, bad)
    image = tmp_path / "x.png"
    assert gen_module.main(["--model", str(directory), "--labels", "1", "--out", str(image)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("python -m amskv_jax.generate: error: ")
    assert f"scale 1/{CONFIG.var.num_scales} (1-based" in err[-1] and "untrained or damaged" in err[-1]
    assert not image.exists()

