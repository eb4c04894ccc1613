"""Peak memory and time of `python -m convert.from_torch` on a published-size checkpoint with random weights.

    python -m bench.convert_memory --preset d30 [--dtype bfloat16] [--dir DIR] [--source-tree PATH] [--keep] [--json]

Writes `DIR/var_PRESET.pth` and `DIR/vae_ch160v4096z32.pth` with `bench.make_checkpoint` (kept and reused by later runs;
d30: 8.0 + 0.4 GB), converts them in a child process and reports the child's peak resident set size (`VmHWM` of
/proc/self/status, which the child prints as it exits: it counts the memory-mapped input pages the converter touched
as well as its own arrays; also less the peak of a child that only imports the converter: the interpreter, JAX and
orbax. Not the kernel's `ru_maxrss`: Linux carries a parent's peak over into its child's, so a parent larger than the
child, such as pytest or this process after writing the checkpoints, would be reported instead; killed by the
watchdog, the last 0.2 s sample of `VmHWM`), the converter's own peak resident anonymous memory (`RssAnon` of
/proc/PID/status, sampled every 0.2 s: its arrays and buffers without the mapped input, which the kernel may drop
under pressure), the wall time, and what the converter promises to stay within: the input
files' size plus the largest array it writes (the largest tensor, or, with per-block parameters stacked along depth, the
largest stack) plus 0.5 GB (`SLACK_BYTES`: the allocator's and tensorstore's buffers while one array is written chunk by
chunk). `--source-tree` runs another checkout's converter (e.g. an older commit extracted with `git archive`), for
before/after figures. The converted output is deleted afterwards unless `--keep`. A watchdog kills the child when the
machine's available memory falls below `--min-available-gb` (the figure is then reported as aborted), so a converter
that needs more than the machine has does not take other processes down with it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.make_checkpoint import PRESETS, VAE_NAME, published_keys, write_checkpoint

REPO = Path(__file__).parent.parent
SLACK_BYTES = int(0.5e9)


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) * 1024


def _status_bytes(pid: int, field: str) -> int:
    """A memory figure of /proc/PID/status in bytes, 0 once the process is gone: "RssAnon" (resident anonymous
    memory: its own allocations, not the mapped input file) or "VmHWM" (its peak resident set so far)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(f"{field}:"))
    except (OSError, StopIteration):
        return 0


def _reporting_peak(statement: str) -> list[str]:
    """A Python command line that runs `statement`, then (even when it raises, SystemExit included) prints a last
    line "VmHWM KB": its own peak resident set (`_reported_peak`). Self-contained: it runs in `--source-tree`."""
    report = ("print('\\nVmHWM', next(line.split()[1] for line in open('/proc/self/status') "
              "if line.startswith('VmHWM:')), flush=True)")
    return [sys.executable, "-c", f"try:\n    {statement}\nfinally:\n    {report}"]


def _reported_peak(output: str) -> int | None:
    """Bytes of the peak a `_reporting_peak` child printed last; None when it printed none (killed)."""
    found = re.findall(r"^VmHWM (\d+)$", output, re.MULTILINE)
    return int(found[-1]) * 1024 if found else None


def largest_arrays(keys, out_itemsize: int) -> dict:
    """The largest single tensor of the state dict and the largest per-block stack (depth × one block's tensor),
    in the output dtype's bytes."""
    per_block: dict[str, int] = {}
    for key, shape, _ in keys:
        parts = key.split(".")
        if parts[0] == "blocks":
            name = ".".join(parts[2:])
            per_block[name] = per_block.get(name, 0) + math.prod(shape)
    return {"largest_tensor_bytes": max(math.prod(shape) for _, shape, _ in keys) * out_itemsize,
            "largest_stack_bytes": max(per_block.values()) * out_itemsize}


def measure(preset: str, directory: Path, dtype: str = "float32", source_tree: Path = REPO,
            min_available_gb: float = 1.5, keep: bool = False, log=print) -> dict:
    """Convert `directory`'s random checkpoint (written first if absent) with `source_tree`'s converter in a child
    process into `directory`/var_PRESET_flax (deleted afterwards unless `keep`); returns a plain record of sizes, peak
    RSS and time."""
    directory.mkdir(parents=True, exist_ok=True)
    files = {}
    for name in (f"var_{preset}", VAE_NAME):
        path = directory / f"{name}.pth"
        if not path.is_file():
            log(f"writing {path} (random weights) ...")
            write_checkpoint(path, published_keys(name))
        files[name] = path
    out = directory / f"var_{preset}_flax"
    shutil.rmtree(out, ignore_errors=True)
    argv = ["convert.from_torch", str(files[f"var_{preset}"]), "--vae", str(files[VAE_NAME]), "--out", str(out),
            "--dtype", dtype]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(source_tree))
    imports = subprocess.run(_reporting_peak("import convert.from_torch"), cwd=source_tree, env=env,
                             capture_output=True, text=True, check=True)
    baseline = _reported_peak(imports.stdout)
    start = time.perf_counter()
    # python -m convert.from_torch ARGS, reporting its peak
    run_module = f"import runpy, sys; sys.argv = {argv!r}; runpy.run_module(sys.argv[0], run_name='__main__')"
    child = subprocess.Popen(_reporting_peak(run_module), cwd=source_tree, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    killed = threading.Event()
    peak_anon, peak_sampled = [0], [0]

    def watchdog():
        while child.poll() is None:
            peak_anon[0] = max(peak_anon[0], _status_bytes(child.pid, "RssAnon"))
            peak_sampled[0] = max(peak_sampled[0], _status_bytes(child.pid, "VmHWM"))
            if _available_bytes() < min_available_gb * 2**30:
                killed.set()
                child.kill()
                return
            time.sleep(0.2)

    threading.Thread(target=watchdog, daemon=True).start()
    output = child.stdout.read()
    code = child.wait()
    seconds = time.perf_counter() - start
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    if code != 0 and not killed.is_set():
        raise RuntimeError(f"python -m {' '.join(argv)} failed ({code}):\n{output}")
    peak = _reported_peak(output)
    peak = peak_sampled[0] if peak is None else peak  # killed by the watchdog: its last sample
    keys = published_keys(f"var_{preset}") + published_keys(VAE_NAME)
    input_bytes = sum(path.stat().st_size for path in files.values())
    largest = largest_arrays(keys, 2 if dtype == "bfloat16" else 4)
    bound = input_bytes + max(largest.values()) + SLACK_BYTES
    return {
        "preset": preset, "dtype": dtype, "source_tree": str(source_tree),
        "input_bytes": input_bytes, **largest,
        "baseline_rss_bytes": baseline, "peak_rss_bytes": peak, "peak_anon_bytes": peak_anon[0],
        "seconds": seconds,
        "bound_bytes": bound, "within_bound": peak - baseline <= bound,
        "status": "aborted: machine memory ran low" if killed.is_set() else "ok",
    }


def report(record: dict) -> str:
    gb = 1e9
    conversion = record["peak_rss_bytes"] - record["baseline_rss_bytes"]
    return (f"{record['preset']} -> {record['dtype']} ({record['status']}), converter from {record['source_tree']}\n"
            f"  input files  {record['input_bytes'] / gb:6.2f} GB (VAR + VQ-VAE)\n"
            f"  peak RSS     {record['peak_rss_bytes'] / gb:6.2f} GB = {record['baseline_rss_bytes'] / gb:.2f} GB "
            f"interpreter (JAX, orbax imported) + {conversion / gb:.2f} GB conversion\n"
            f"  conversion   {conversion / gb:6.2f} GB = input {'+' if conversion >= record['input_bytes'] else '-'} "
            f"{abs(conversion - record['input_bytes']) / gb:.2f} GB (largest tensor "
            f"{record['largest_tensor_bytes'] / gb:.2f} GB, largest per-block stack "
            f"{record['largest_stack_bytes'] / gb:.2f} GB)\n"
            f"  own memory   {record['peak_anon_bytes'] / gb:6.2f} GB resident anonymous memory at its peak (sampled every "
            f"0.2 s; the mapped input not counted)\n"
            f"  bound        {record['bound_bytes'] / gb:6.2f} GB = input + largest array + "
            f"{SLACK_BYTES / gb:.1f} GB: {'met' if record['within_bound'] else 'NOT met'}\n"
            f"  time         {record['seconds']:6.1f} s")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.convert_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=PRESETS, default="d30")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--dir", default=str(Path(tempfile.gettempdir()) / "amskv_convert_memory"),
                        help="where the random checkpoints are written and kept (default: a folder in the temp dir)")
    parser.add_argument("--source-tree", default=str(REPO), help="checkout whose converter runs (default: this one)")
    parser.add_argument("--min-available-gb", type=float, default=1.5,
                        help="kill the conversion when the machine's available memory falls below this")
    parser.add_argument("--keep", action="store_true",
                        help="keep the converted directory DIR/var_PRESET_flax (for python -m bench.end_to_end)")
    parser.add_argument("--json", action="store_true", help="print the record as JSON")
    args = parser.parse_args(argv)
    record = measure(args.preset, Path(args.dir), args.dtype, Path(args.source_tree).absolute(),
                     args.min_available_gb, args.keep)
    print(json.dumps(record) if args.json else report(record))
    return 0 if record["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
