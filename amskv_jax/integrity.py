"""Checksums for checkpoint directories: a manifest beside `params/` that proves a copy is intact.

`checksums.json` records, for every array of the params tree, its path (`var/params/head/bias`), dtype, shape and
CRC-32 of its bytes (C order), and the size of every file under `params/`. `save_checkpoint` writes it LAST, after
the params and `config.json`, through a temporary file and a rename: a directory without it was written before
manifests existed, or its writer stopped part way.

`load_checkpoint` checks the file sizes before orbax reads anything (a truncated or missing data file is named
without starting orbax's asynchronous reads, which would otherwise leave tensorstore callbacks firing at a closed
event loop after the error), then, after the restore, each array's dtype, shape and digest; it names every array that
fails. `AMSKV_SKIP_VERIFY=1` (or `--no-verify` on the command lines) skips the digests, not the size check (a stat).

Why CRC-32: the faults to catch are flipped bytes and truncation. CRC-32 detects every error burst up to 32 bits
(so any single flipped byte) and misses a random multi-byte corruption with probability 2⁻³²; dtype, shape and file
sizes catch truncation outright. It is not a defence against deliberate tampering (nor is any digest stored beside the
data it guards). Throughput of the standard library's candidates on this 2-core CPU (256 MiB buffer, best of 3, the
machine shared with other jobs; see bench/RESULTS.md): zlib.crc32 1.23 GiB/s, zlib.adler32 0.88, hashlib.sha256 0.70,
sha1 0.71, blake2b 0.50, md5 0.42. CRC-32 is the fastest and its error detection is exactly what is needed.

    python -m amskv_jax.integrity write DIR   # (re)write DIR/checksums.json from the params as they are now
    python -m amskv_jax.integrity check DIR   # verify DIR against its manifest; exit 2 naming what fails
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import zlib
from pathlib import Path

import jax
import numpy as np

from amskv_jax import cli

MANIFEST = "checksums.json"
SKIP_ENV = "AMSKV_SKIP_VERIFY"
FORMAT = 1


class IntegrityError(ValueError):
    """A checkpoint directory whose files or arrays do not match its manifest."""


def verify_by_default() -> bool:
    """False when the environment variable AMSKV_SKIP_VERIFY is set to anything but "" or "0"."""
    return os.environ.get(SKIP_ENV, "") in ("", "0")


def digest(array) -> str:
    """CRC-32 of the array's bytes in C order, as 8 hex digits."""
    return f"{zlib.crc32(np.ascontiguousarray(array).reshape(-1).view(np.uint8)):08x}"  # a byte view: bfloat16 too


def describe_arrays(params) -> dict[str, dict]:
    """{"var/params/head/bias": {"dtype", "shape", "crc32"}} for every leaf of a params tree."""
    arrays = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        leaf = np.asarray(leaf)
        arrays[_name(path)] = {"dtype": str(leaf.dtype), "shape": list(leaf.shape), "crc32": digest(leaf)}
    return arrays


def write_manifest(directory: str | Path, params) -> Path:
    """Write directory/checksums.json for `params` (the tree just saved under directory/params/)."""
    directory = Path(directory)
    manifest = {"format": FORMAT, "digest": "crc32", "files": _file_sizes(directory / "params"),
                "arrays": describe_arrays(params)}
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    tmp.replace(directory / MANIFEST)
    return directory / MANIFEST


def read_manifest(directory: str | Path) -> dict | None:
    """The parsed manifest, or None when the directory has none (written before manifests existed)."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise IntegrityError(f"{path}: damaged manifest ({err})") from None
    if manifest.get("format") != FORMAT or manifest.get("digest") != "crc32":
        raise IntegrityError(f"{path}: unknown manifest format {manifest.get('format')!r}; allowed: {FORMAT}")
    return manifest


def check_files(directory: str | Path, manifest: dict) -> None:
    """Raise IntegrityError naming every file under params/ that is missing or whose size differs."""
    params = Path(directory) / "params"
    found = _file_sizes(params)
    bad = [
        f"{name} (missing)" if name not in found else
        f"{name} ({'truncated: ' if found[name] < size else ''}{found[name]} bytes, expected {size})"
        for name, size in manifest["files"].items()
        if found.get(name) != size
    ]
    if bad:
        raise IntegrityError(f"{params}: {len(bad)} damaged file(s): {', '.join(bad)}")


def check_arrays(directory: str | Path, manifest: dict, params) -> None:
    """Raise IntegrityError naming every array of `params` that differs from the manifest (or is missing/extra)."""
    expected, found = manifest["arrays"], describe_arrays(params)
    bad = [f"{name} (missing)" for name in expected if name not in found]
    bad += [f"{name} (not in the manifest)" for name in found if name not in expected]
    for name in expected.keys() & found.keys():
        e, f = expected[name], found[name]
        if (e["dtype"], e["shape"]) != (f["dtype"], f["shape"]):
            bad.append(f"{name} ({f['dtype']}{f['shape']}, expected {e['dtype']}{e['shape']})")
        elif e["crc32"] != f["crc32"]:
            bad.append(f"{name} (checksum {f['crc32']}, expected {e['crc32']})")
    if bad:
        raise IntegrityError(
            f"{Path(directory)}: {len(bad)} array(s) fail their checksum, the copy is damaged: {', '.join(sorted(bad))}"
        )


def _name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _file_sizes(params_dir: Path) -> dict[str, int]:
    return {str(f.relative_to(params_dir)): f.stat().st_size for f in sorted(params_dir.rglob("*")) if f.is_file()}


@cli.command("python -m amskv_jax.integrity")
def main(argv=None) -> int:
    from amskv_jax import checkpoint

    parser = argparse.ArgumentParser(prog="python -m amskv_jax.integrity", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("write", "check"),
                        help="write: (re)write the manifest from the params as they are; check: verify against it")
    parser.add_argument("directory", help="a checkpoint directory (config.json and params/)")
    args = parser.parse_args(argv)
    if args.action == "write":
        # the params exactly as stored (no check against a stale manifest, no re-stacking of an old layout)
        (Path(args.directory) / MANIFEST).unlink(missing_ok=True)
        params = checkpoint.restore_params(args.directory)
        print(f"wrote {write_manifest(args.directory, params)} ({len(jax.tree.leaves(params))} arrays)")
        return 0
    if read_manifest(args.directory) is None:
        raise IntegrityError(f"{args.directory}: no {MANIFEST}; write one with "
                             f"`python -m amskv_jax.integrity write {args.directory}`")
    _, params = checkpoint.load_checkpoint(args.directory, verify=True)
    print(f"{args.directory}: all {len(jax.tree.leaves(params))} arrays match {MANIFEST}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
