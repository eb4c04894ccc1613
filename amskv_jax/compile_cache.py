"""JAX's persistent compilation cache for the command lines: a second run with the same shapes loads its compiled
programs from disk instead of compiling them again (a minute or more for a large model on CPU).

Every command line that compiles (`amskv_jax.generate`, `amskv_jax.calibrate`, `bench.run`, `bench.fidelity`,
`bench.attention`) calls `enable(args.no_compile_cache)` before its first JAX computation. The cache lives in
`$XDG_CACHE_HOME/amskv_jax/jax` (default `~/.cache/amskv_jax/jax`), or wherever `JAX_COMPILATION_CACHE_DIR` points;
`--no-compile-cache` or `AMSKV_NO_COMPILE_CACHE=1` turns it off. JAX keys each entry by the program, the compile
options, the backend and the jax / jaxlib versions, so a stale entry is never used, only left behind: delete the
directory to reclaim the space. Programs that call back into Python (`generate(..., progress=True)`) are never
written: JAX cannot persist host callbacks.
"""
from __future__ import annotations

import os
from pathlib import Path

import jax

DISABLE_ENV = "AMSKV_NO_COMPILE_CACHE"
# What JAX reports per compilation that goes through the cache (jax.monitoring event names).
_EVENTS = {"/jax/compilation_cache/compile_requests_use_cache": "requests",
           "/jax/compilation_cache/cache_hits": "hits"}
_counts = {"requests": 0, "hits": 0}
_listening = False


def default_dir() -> Path:
    """`$XDG_CACHE_HOME/amskv_jax/jax`, `~/.cache/amskv_jax/jax` when XDG_CACHE_HOME is unset."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "amskv_jax" / "jax"


def disabled_by_env() -> bool:
    return os.environ.get(DISABLE_ENV, "") not in ("", "0")


def add_flag(parser) -> None:
    """`--no-compile-cache` on a command line's parser."""
    parser.add_argument("--no-compile-cache", action="store_true",
                        help=f"compile every program afresh instead of reusing the persistent compilation cache "
                        f"(default {default_dir()}; also {DISABLE_ENV}=1)")


def enable(disable: bool = False) -> Path | None:
    """Turn the persistent compilation cache on (before the first compilation) and count its hits; returns its
    directory, or None when `disable` or the environment turns it off.

    Every program is written, however quick its compilation (JAX's defaults skip programs that compile in under a
    second and let some file systems set a minimum entry size): on CPU most of the start-up is many small programs
    besides the large one."""
    global _listening
    if disable or disabled_by_env():
        return None
    directory = Path(jax.config.jax_compilation_cache_dir or default_dir())
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    if not _listening:
        jax.monitoring.register_event_listener(_count)
        _listening = True
    return directory


def _count(event: str, **_kwargs) -> None:
    if event in _EVENTS:
        _counts[_EVENTS[event]] += 1


def stats() -> dict[str, int]:
    """{"requests": compilations that consulted the cache, "hits": those loaded from it} since the process started."""
    return dict(_counts)


def describe(directory: Path | None) -> str:
    """One phrase for a command line's output: how many programs came from the cache, and where it is."""
    if directory is None:
        return "persistent compilation cache off"
    counts = stats()
    return f"{counts['hits']} of {counts['requests']} programs from the persistent compilation cache {directory}"
