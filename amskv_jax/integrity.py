"""Checksums for checkpoint directories: a manifest beside `params/` that proves a copy is intact.

`checksums.json` records, for every array of the params tree, its path (`var/params/head/bias`), dtype, shape and
CRC-32 of its bytes (C order), and the size of every file under `params/`. `save_checkpoint` writes it LAST, after
the params and `config.json`, through a temporary file and a rename: a directory without it was written before
manifests existed, or its writer stopped part way.

Reading the manifest, and checking it against the directory before any array is read, is the gate's job
(`amskv_jax/untrusted.py`: file sizes, the set of files, every array's dtype and shape against the config); after
the arrays are read, `check_arrays` compares each one's digest and names every array that fails.
`AMSKV_SKIP_VERIFY=1` (or `--no-verify` on the command lines) skips the digests, not the gate. This module needs
no loader: the command line reads arrays through the gate.

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
from amskv_jax.untrusted import (
    MANIFEST, MANIFEST_FORMAT, IntegrityError, leaf_name, listing, open_checkpoint, params_files, read_params, show,
    write_atomic,
)

SKIP_ENV = "AMSKV_SKIP_VERIFY"


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
        arrays[leaf_name(path)] = {"dtype": str(leaf.dtype), "shape": list(leaf.shape), "crc32": digest(leaf)}
    return arrays


def write_manifest(directory: str | Path, params) -> Path:
    """Write directory/checksums.json for `params` (the tree just saved under directory/params/), through a fresh
    temporary file and a rename (`untrusted.write_atomic`: never through a link)."""
    directory = Path(directory)
    manifest = {"format": MANIFEST_FORMAT, "digest": "crc32", "files": params_files(directory.resolve()),
                "arrays": describe_arrays(params)}
    return write_atomic(directory / MANIFEST, json.dumps(manifest, indent=1) + "\n")


def check_arrays(directory: Path, manifest: dict, params) -> None:
    """Raise IntegrityError naming every array of `params` that differs from the manifest (or is missing/extra);
    `directory` (the checkpoint's root, `CheckedDirectory.root`) is escaped here for the message."""
    expected, found = manifest["arrays"], describe_arrays(params)
    bad = [f"{show(name)} (missing)" for name in expected if name not in found]
    bad += [f"{name} (not in the manifest)" for name in found if name not in expected]
    for name in expected.keys() & found.keys():
        e, f = expected[name], found[name]
        if (e["dtype"], e["shape"]) != (f["dtype"], f["shape"]):
            bad.append(f"{name} ({f['dtype']}{f['shape']}, expected {show(e['dtype'])}{show(e['shape'], 60)})")
        elif e["crc32"] != f["crc32"]:
            bad.append(f"{name} (checksum {f['crc32']}, expected {e['crc32']})")
    if bad:
        raise IntegrityError(
            f"{show(directory)}: {len(bad)} array(s) fail their checksum, the copy is damaged: {listing(sorted(bad))}"
        )


@cli.command("python -m amskv_jax.integrity")
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m amskv_jax.integrity", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("write", "check"),
                        help="write: (re)write the manifest from the params as they are; check: verify against it")
    parser.add_argument("directory", help="a checkpoint directory (config.json and params/)")
    args = parser.parse_args(argv)
    if args.action == "write":
        # the params exactly as stored (no check against a stale manifest, no re-stacking of an old layout)
        checked = open_checkpoint(args.directory, manifest="ignored")
        params = read_params(checked)
        print(f"wrote {show(write_manifest(args.directory, params))} ({len(jax.tree.leaves(params))} arrays)")
        return 0
    checked = open_checkpoint(args.directory, manifest="required")
    params = read_params(checked)
    check_arrays(checked.root, checked.manifest, params)
    extras = [name for name, value in (("classes.json", checked.classes), ("layers.json", checked.calibration))
              if value is not None]
    print(f"{checked.shown}: all {len(jax.tree.leaves(params))} arrays match {MANIFEST}; config.json"
          f"{''.join(', ' + name for name in extras)} well-formed and consistent")
    return 0


if __name__ == "__main__":
    sys.exit(main())
