"""Session settings.

The tests never read or write the user's persistent compilation cache (`amskv_jax.compile_cache`): the command
lines' own cache is off (the tests of the cache itself point it at a temporary directory). JAX's persistent cache
is instead pointed at a directory made for this run of pytest, removed at its end, and shared by its worker
processes (pytest-xdist) and the command lines the tests start as child processes (`JAX_COMPILATION_CACHE_DIR`): a
program that one test compiled is loaded by the next that builds the same one, instead of compiled again. (JAX
writes an entry in place; a reader that meets a half-written one warns and compiles.)

The tests compile their programs with XLA's CPU code generator unoptimised (`--xla_backend_optimization_level=0`,
in XLA_FLAGS before JAX starts, so the children inherit it). They compile hundreds of small programs that each run
for milliseconds, and LLVM's optimisation is about half of each compile. It changes nothing they check: XLA's
HLO passes, fusion, buffer assignment (`memory_analysis()`) and custom calls are the same at every level, and
without fast math (XLA leaves it off) LLVM does not reorder float arithmetic; the tests that compare bit for bit
compare two programs compiled alike.
"""
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()

import jax  # noqa: E402  (after XLA_FLAGS)

from amskv_jax.compile_cache import DISABLE_ENV  # noqa: E402

SESSION_ENV = "AMSKV_TEST_SESSION_CACHE"  # set by the first process of the run (pytest itself, or its controller)

os.environ[DISABLE_ENV] = "1"
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
