"""Cold and warm start of `python -m amskv_jax.generate`: seconds from process start until generation starts.

    python -m bench.warm_start [--runs 2] [-- GENERATE ARGS ...]

Runs the command line `--runs` times in fresh processes that share one new, empty persistent compilation cache (a
temporary directory, removed afterwards): the first run compiles every program (cold), the later ones load them from
the cache (warm). For each run it prints the seconds from process start to the line `generate` prints once its
program is compiled and dispatched ("compiled in ..."), the CPU seconds the process had used by then (on a busy
machine, a better guide than the wall time to what an idle one would take), the seconds to the end, and the cache
hits that line reports. Arguments
after `--` go to `amskv_jax.generate` (default: its defaults, the embedded model). The cache key is the program, so
repeat this whenever the model's structure changes.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from amskv_jax.compile_cache import DISABLE_ENV

REPO = Path(__file__).parent.parent
READY = "compiled in "
CACHE = re.compile(r"(\d+) of (\d+) programs from the persistent compilation cache")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a running process so far (all its threads; Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def time_run(command: list[str], env: dict) -> dict:
    """One run: {"ready_s": wall seconds to the "compiled in" line, "ready_cpu_s": the CPU seconds the process had
    used by then, "total_s", "hits", "requests", "output"}."""
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env)
    ready, cpu, hits, lines = None, None, None, []
    for line in child.stdout:
        lines.append(line)
        if ready is None and READY in line:
            ready, cpu = time.perf_counter() - start, _cpu_seconds(child.pid)
            hits = CACHE.search(line)
    if child.wait() != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{''.join(lines)}")
    return {"ready_s": ready, "ready_cpu_s": cpu, "total_s": time.perf_counter() - start,
            "hits": int(hits[1]) if hits else None, "requests": int(hits[2]) if hits else None, "output": "".join(lines)}


def measure(generate_args: list[str], runs: int = 2) -> list[dict]:
    """`runs` runs of the command line sharing a fresh persistent compilation cache."""
    cache = Path(tempfile.mkdtemp(prefix="amskv_warm_start_"))
    env = {k: v for k, v in os.environ.items() if k != DISABLE_ENV}
    env["XDG_CACHE_HOME"] = str(cache)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    command = [sys.executable, "-m", "amskv_jax.generate", "--out", str(cache / "grid.png"), *generate_args]
    try:
        return [time_run(command, env) for _ in range(runs)]
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, generate_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(prog="python -m bench.warm_start", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2, help="runs sharing one fresh cache (the first is cold)")
    args = parser.parse_args(ours)
    print(f"python -m amskv_jax.generate {' '.join(generate_args)}".rstrip())
    for i, run in enumerate(measure(generate_args, args.runs)):
        print(f"{'cold' if i == 0 else 'warm'}: generating after {run['ready_s']:.2f} s ({run['ready_cpu_s']:.2f} CPU "
              f"s), done after {run['total_s']:.2f} s; {run['hits']} of {run['requests']} programs from the cache")
    return 0


if __name__ == "__main__":
    sys.exit(main())
