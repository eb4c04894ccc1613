"""Session settings.

The tests never read or write the user's persistent compilation cache (`amskv_jax.compile_cache`): the command
lines' own cache is off (the tests of the cache itself point it at a temporary directory). JAX's persistent cache
is instead pointed at a directory made for this run of pytest, removed at its end, and shared by its worker
processes (pytest-xdist) and the command lines the tests start as child processes (`JAX_COMPILATION_CACHE_DIR`): a
program that one test compiled is loaded by the next that builds the same one, instead of compiled again. (JAX
writes an entry in place; a reader that meets a half-written one warns and compiles.)

Compiling dominates the suite, and most of XLA:CPU's compile time is code generation. The tests, and the command
lines they start, compile with LLVM unoptimised and XLA's older loop emitters (`FAST_CODEGEN`, in XLA_FLAGS unless
XLA_FLAGS names an optimisation level; LLVM at -O1 alone where this jaxlib's XLA no longer knows the emitters'
flag, which would abort every process): about a third of the compile time, other fusions, and code that rounds
some float32 results differently (logits by ~2e-6, measured), as another machine's BLAS would. Tests that read a
compiled program's structure (its copies of the cache) or that need two programs to round alike (equal sampled
tokens from two layer loops) compile as users' programs do (`compiling_as_users`, the `users_codegen` fixture):
LLVM at -O1 and the new emitters, whose optimised HLO and buffer assignment are checked identical to XLA's
defaults' (bench/RESULTS.md, Issue 27).
"""
import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

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
FAST_CODEGEN = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


def _xla_starts_with(flags: str) -> bool:
    """Whether this jaxlib's XLA starts with `flags` (it aborts the process on a flag it does not know)."""
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    probe = [sys.executable, "-c", "import jax; jax.devices()"]
    return subprocess.run(probe, env=env, capture_output=True, timeout=120).returncode == 0


if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):  # read when the backend starts
    fast = FAST_CODEGEN if _xla_starts_with(FAST_CODEGEN) else "--xla_backend_optimization_level=1"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {fast}".strip()
USERS_CODEGEN = {"xla_backend_optimization_level": 1}
if "xla_cpu_use_fusion_emitters" in os.environ["XLA_FLAGS"]:
    USERS_CODEGEN["xla_cpu_use_fusion_emitters"] = True
_owner = SESSION_ENV not in os.environ
if _owner:
    os.environ[SESSION_ENV] = tempfile.mkdtemp(prefix="amskv_tests_")
SESSION = Path(os.environ[SESSION_ENV])
os.environ["JAX_COMPILATION_CACHE_DIR"] = str(SESSION / "xla_cache")
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
HOST_DEVICES = 8  # the host CPU devices of the one child process that runs every check needing several


def pytest_unconfigure(config):
    if _owner:
        shutil.rmtree(os.environ[SESSION_ENV], ignore_errors=True)


@contextlib.contextmanager
def compiling_as_users():
    """Within it, programs compile with `USERS_CODEGEN` (options a compile is given still win): for checks that read
    a compiled program or need two programs to round alike. It sets the options where both `jax.jit` calls and
    `Lowered.compile` build them (jax's `get_compile_options`, an internal function: a jax that renames it fails
    here, visibly), and clears jax's in-memory caches on entry and exit, so that no program compiled the other way
    is reused (the persistent cache keys on the options)."""
    from jax._src import compiler

    get_compile_options = compiler.get_compile_options

    def as_users(*args, env_options_overrides=None, **kwargs):
        return get_compile_options(*args, env_options_overrides={**USERS_CODEGEN, **(env_options_overrides or {})},
                                   **kwargs)

    jax.clear_caches()
    compiler.get_compile_options = as_users
    try:
        yield
    finally:
        compiler.get_compile_options = get_compile_options
        jax.clear_caches()


@pytest.fixture
def users_codegen():
    """The test compiles as users' programs do (`compiling_as_users`)."""
    with compiling_as_users():
        yield


@pytest.fixture(scope="session")
def host_devices():
    """results(module) -> the directory where that test module's `on_host_devices(directory)` saved what it
    measured on `HOST_DEVICES` host CPU devices.

    The device count is fixed when jax starts, so every such check runs in one child process
    (`tests/host_devices.py`, started with that count), once per run of the suite: the first worker to ask runs it
    under a lock in the run's directory, the others wait and read what it saved. A check that raised left its
    traceback, which its module's tests show."""
    root = SESSION / "host_devices"
    with open(SESSION / "host_devices.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the first worker's run is saved (or has failed)
        if not (root / "done").exists():
            shutil.rmtree(root, ignore_errors=True)
            flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={HOST_DEVICES}"
            env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags.strip())
            tests = Path(__file__).parent
            child = subprocess.run([sys.executable, str(tests / "host_devices.py"), str(root)], env=env,
                                   capture_output=True, text=True, timeout=1200, cwd=tests.parent)
            assert child.returncode == 0, f"child failed:\n{child.stdout[-4000:]}\n{child.stderr[-4000:]}"
            (root / "done").touch()

    def results(module: str) -> Path:
        error = root / module / "error.txt"
        assert not error.exists(), f"{module}.on_host_devices raised:\n{error.read_text()[-4000:]}"
        return root / module

    return results


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
