"""Session settings.

The tests never read or write the user's persistent compilation cache (`amskv_jax.compile_cache`): the command
lines' own cache is off (the tests of the cache itself point it at a temporary directory). JAX's persistent cache
is instead pointed at a directory made for this run of pytest, removed at its end, and shared by its worker
processes (pytest-xdist) and the command lines the tests start as child processes (`JAX_COMPILATION_CACHE_DIR`): a
program that one test compiled is loaded by the next that builds the same one, instead of compiled again. (JAX
writes an entry in place; a reader that meets a half-written one warns and compiles.)

Compiling dominates the suite, and most of XLA:CPU's compile time is LLVM optimising the generated code. The tests,
and the command lines they start, compile with LLVM at -O1 (`--xla_backend_optimization_level=1`; XLA's default is
2): the same HLO after the same passes, and the same buffer assignment (what the memory and copy tests read), in
about a quarter less time, for programs that run a little slower. (-O0 halves the time, but its code rounds
differently enough between two equal programs to flip a sampled token.) A level given in XLA_FLAGS is kept.
"""
import os
import shutil
import tempfile

import jax
import numpy as np
import pytest
from PIL import Image

from amskv_jax.checkpoint import Model
from amskv_jax.compile_cache import DISABLE_ENV
from amskv_jax.config import ModelConfig, get_preset
from amskv_jax.untrusted import param_shapes

SESSION_ENV = "AMSKV_TEST_SESSION_CACHE"  # set by the first process of the run (pytest itself, or its controller)

os.environ[DISABLE_ENV] = "1"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):  # read when the backend starts
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=1".strip()
_owner = SESSION_ENV not in os.environ
if _owner:
    os.environ[SESSION_ENV] = tempfile.mkdtemp(prefix="amskv_tests_xla_")
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ[SESSION_ENV]
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
jax.config.update("jax_compilation_cache_dir", os.environ[SESSION_ENV])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def pytest_unconfigure(config):
    if _owner:
        shutil.rmtree(os.environ[SESSION_ENV], ignore_errors=True)


# --- helpers shared by the test modules (`from conftest import ...`) ------------------------------------------------


def random_params(config: ModelConfig, seed: int = 0, std: float = 0.05) -> dict:
    """{"var": ..., "vqvae": ...} in `config`'s shapes, every leaf N(0, std²) (biases and norm scales too), as host
    numpy arrays drawn from `param_shapes` (nothing initialised or compiled). Unlike `init_params` no leaf is a
    constant, so every parameter matters to the tests' figures; the same seed gives the same values."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (std * rng.standard_normal(s.shape)).astype(s.dtype), param_shapes(config))


def random_model(preset: str, seed: int = 0) -> Model:
    """A preset's model with `random_params` (std 0.05)."""
    config = get_preset(preset)
    return Model(config, random_params(config, seed), f"preset {preset}, N(0, 0.05^2) weights (seed {seed})")


EMOJI = {"faces": ["\U0001F600", "\U0001F60E"], "animals": ["\U0001F436"], "food": ["\U0001F34E"]}


@pytest.fixture(scope="module")
def emoji_folder(tmp_path_factory):
    """Four emoji (32 px) in class subfolders named by the embedded model's class names."""
    from amskv_jax.train.data import render

    root = tmp_path_factory.mktemp("emoji")
    for name, sequences in EMOJI.items():
        (root / name).mkdir()
        for i, sequence in enumerate(sequences):
            pixels = np.round((render(sequence, 32) + 1) * 127.5).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root
