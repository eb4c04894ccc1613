"""The command lines' persistent compilation cache: where it lives, how it is turned off, and that a second run of
`python -m amskv_jax.generate` loads its programs from it instead of compiling them."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from amskv_jax import compile_cache
from amskv_jax.checkpoint import save_checkpoint
from convert.from_torch import convert

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).parent.parent


def test_cache_directory_is_per_user_and_xdg_aware(monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", "/somewhere")
    assert compile_cache.default_dir() == Path("/somewhere/amskv_jax/jax")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert compile_cache.default_dir() == Path.home() / ".cache" / "amskv_jax" / "jax"


def test_flag_and_environment_turn_it_off(monkeypatch):
    monkeypatch.setenv(compile_cache.DISABLE_ENV, "1")
    assert compile_cache.enable() is None
    monkeypatch.setenv(compile_cache.DISABLE_ENV, "0")
    assert compile_cache.enable(disable=True) is None
    assert compile_cache.describe(None) == "persistent compilation cache off"


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    config, params = convert(FIXTURES / "tiny" / "var.pth", FIXTURES / "tiny" / "vae_f16.safetensors", log=print)
    return save_checkpoint(out, config, params)


def test_second_generate_loads_every_program_from_the_cache(tmp_path, tiny_checkpoint):
    env = {k: v for k, v in os.environ.items() if k not in (compile_cache.DISABLE_ENV, "JAX_COMPILATION_CACHE_DIR")}
    env.update(XDG_CACHE_HOME=str(tmp_path / "xdg"), JAX_PLATFORMS="cpu")
    command = [sys.executable, "-m", "amskv_jax.generate", "--model", str(tiny_checkpoint), "--labels", "1",
               "--batch", "1", "--out", str(tmp_path / "grid.png")]
    counts = []
    for _ in range(2):
        proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr
        found = re.search(r"(\d+) of (\d+) programs from the persistent compilation cache (\S+)\)", proc.stdout)
        assert found, proc.stdout
        counts.append((int(found[1]), int(found[2])))
        assert Path(found[3]) == tmp_path / "xdg" / "amskv_jax" / "jax"
    entries = list((tmp_path / "xdg" / "amskv_jax" / "jax").iterdir())
    assert any("generate" in e.name for e in entries)
    (cold_hits, cold_requests), (warm_hits, warm_requests) = counts
    assert cold_hits == 0 and cold_requests >= 1
    assert warm_hits == warm_requests == cold_requests
