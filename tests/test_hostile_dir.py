"""A checkpoint directory is untrusted input (issue 26): hostile variants of a converted tiny checkpoint are refused
with one line and exit status 2, before anything reads outside the directory, hangs, or allocates what a file
declares; writers never write through a link.

Every variant is built from one conversion of `tests/fixtures/tiny` in a temporary folder, the way an attacker who
controls the directory would (rewriting `checksums.json` to match where that gets further). The loads run in one
shared subprocess (a python + jax start costs seconds) under a memory limit (RLIMIT_AS) and a time limit, which a
hang or an allocation driven by a declared size would break; markers on stderr split its output per case.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import tensorstore as ts

from amskv_jax import cli, integrity
from amskv_jax.checkpoint import init_params, save_checkpoint
from amskv_jax.config import get_preset
from amskv_jax.untrusted import MANIFEST, UntrustedInputError, open_new, params_files, read_json, write_atomic
from convert import from_torch

ROOT = Path(__file__).resolve().parents[1]
TINY = Path(__file__).parent / "fixtures" / "tiny"
MEMORY_LIMIT = 3 << 30  # bytes of address space per subprocess; a tiny load needs well under 2 GiB
TIMEOUT = 900  # seconds for the shared subprocess (about 40 loads; generous for a loaded 2-core machine)
MAX_LINE = 1000  # characters of one error line
SECRET = "SECRET_KEY_NAME"
HEAD_BIAS = "var.params.head.bias"


# The limit is set by the child itself before it imports anything (a preexec_fn would run in a fork of this
# multithreaded process); then it runs the module or code it was given, with the remaining arguments.
LIMITED = f"""
import resource, runpy, sys
resource.setrlimit(resource.RLIMIT_AS, ({MEMORY_LIMIT}, {MEMORY_LIMIT}))
kind, what, *sys.argv[1:] = sys.argv[1:]
runpy.run_module(what, run_name="__main__", alter_sys=True) if kind == "-m" else exec(what)
"""


def _run(args: list, timeout: int = TIMEOUT) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` or `python -c CODE ARGS` in a subprocess with MEMORY_LIMIT of address space."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "AMSKV_NO_COMPILE_CACHE": "1"}
    return subprocess.run([sys.executable, "-c", LIMITED, *args], capture_output=True, env=env, cwd=ROOT,
                          timeout=timeout)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("converted") / "tiny"
    assert from_torch.main([str(TINY / "var.pth"), "--vae", str(TINY / "vae_f16.safetensors"), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def outside(tmp_path_factory) -> Path:
    """Files outside every checkpoint directory, which no case may read or write."""
    where = tmp_path_factory.mktemp("outside")
    (where / "secret.json").write_text(json.dumps({SECRET: 1}))
    (where / "victim").write_text("untouched")
    return where


# --- what an attacker does to a copy ---------------------------------------------------------------------------------


def refresh_manifest(d: Path, shapes: dict | None = None) -> None:
    """Rewrite checksums.json to match the files as they now are (and declare `shapes` for some arrays)."""
    manifest = json.loads((d / MANIFEST).read_text())
    manifest["files"] = params_files(d.resolve())
    for name, shape in (shapes or {}).items():
        manifest["arrays"][name]["shape"] = shape
    (d / MANIFEST).write_text(json.dumps(manifest))


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    path.write_text(json.dumps(edit(data) or data))


def fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def link(path: Path, target) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    path.symlink_to(target)


def ocdbt_write(d: Path, key: str, value: bytes) -> None:
    store = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{d / 'params'}/"}).result()
    store.write(key.encode(), value).result()


def zstd_bomb(size: int) -> bytes:
    """A zstd frame of RLE blocks that decompresses to `size` zero bytes (4 bytes per 128 KiB)."""
    block = 128 << 10
    frame = struct.pack("<I", 0xFD2FB528) + bytes([0x00, 0x38])  # no content size; a 128 KiB window
    count = size // block
    for i in range(count):
        frame += struct.pack("<I", int(i == count - 1) | (1 << 1) | (block << 3))[:3] + b"\x00"
    return frame


def per_leaf_metadata(d: Path, outside: Path) -> None:
    def edit(meta):
        meta["use_ocdbt"] = False
        entry = next(iter(meta["tree_metadata"].values()))
        entry["key_metadata"][-1]["key"] = str(outside / "secret.json")
    edit_json(d / "params" / "_METADATA", edit)
    refresh_manifest(d)


def absolute_key(d: Path, outside: Path) -> None:
    edit_json(d / "params" / "_METADATA",
              lambda m: next(iter(m["tree_metadata"].values()))["key_metadata"][-1].update(key=str(outside)))
    refresh_manifest(d)


def data_file_outside(d: Path, outside: Path) -> None:
    data = max((d / "params" / "ocdbt.process_0" / "d").iterdir(), key=lambda f: f.stat().st_size)
    shutil.copy(data, outside / data.name)
    link(data, outside / data.name)


def huge_shape(d: Path, with_manifest: bool) -> None:
    zarray = {"chunks": [400_000_000], "compressor": {"id": "zstd", "level": 1}, "dimension_separator": ".",
              "dtype": "<f4", "fill_value": None, "filters": None, "order": "C", "shape": [400_000_000],
              "zarr_format": 2}
    ocdbt_write(d, f"{HEAD_BIAS}/.zarray", json.dumps(zarray).encode())
    ocdbt_write(d, f"{HEAD_BIAS}/0", zstd_bomb(1_600_000_000))
    if with_manifest:
        refresh_manifest(d, {"var/params/head/bias": [400_000_000]})
    else:
        (d / MANIFEST).unlink()


def compressed_bomb(d: Path) -> None:
    ocdbt_write(d, f"{HEAD_BIAS}/0", zstd_bomb(1_600_000_000))  # declared: 512 floats
    refresh_manifest(d)


def deep(path: Path, levels: int = 100_000) -> None:
    path.write_text("[" * levels + "]" * levels)


def sparse(path: Path) -> None:
    with path.open("r+b") as f:
        f.truncate(6 << 30)


def var_field(d: Path, **fields) -> None:
    edit_json(d / "config.json", lambda c: c["var"].update(fields))


def many_damaged_files(d: Path) -> None:
    edit_json(d / MANIFEST, lambda m: m["files"].update({f"d/{i:032x}": 1 for i in range(50_000)}))


def write_calibration(d: Path, **fields) -> None:
    data = {"format": "amskv-calibration/1", "depth": 2, "patch_nums": [1, 2, 3, 4], "demanding_layers": [0],
            "scores": {"similarity": [0.1, 0.2], "dispersion": [0.3, 0.4]}, **fields}
    (d / "layers.json").write_text(json.dumps(data))


# name: (build(d, outside), action, expected return code, text the error line must hold)
CASES = {
    "a good copy loads": (lambda d, o: None, "load", 0, None),
    "a good copy checks": (lambda d, o: ((d / "classes.json").write_text(json.dumps(list("abcdefghij"))),
                                         write_calibration(d)), "check", 0, None),
    # reads outside the directory
    "_METADATA of the per-leaf layout naming a leaf by an absolute path": (per_leaf_metadata, "load", 2,
                                                                          "not the OCDBT layout"),
    "_METADATA key that is an absolute path": (absolute_key, "load", 2, "not a plain name"),
    "a data file linked to a file outside": (data_file_outside, "load", 2, "leaves the directory"),
    "classes.json linked to a JSON file outside": (
        lambda d, o: link(d / "classes.json", o / "secret.json"), "load", 2, "leaves the directory"),
    "config.json linked outside": (lambda d, o: link(d / "config.json", o / "victim"), "check", 2,
                                   "leaves the directory"),
    # hangs and unbounded reads
    "_METADATA a FIFO": (lambda d, o: fifo(d / "params" / "_METADATA"), "load", 2, "a FIFO"),
    "_CHECKPOINT_METADATA a FIFO": (lambda d, o: fifo(d / "params" / "_CHECKPOINT_METADATA"), "load", 2, "a FIFO"),
    "manifest.ocdbt a FIFO": (lambda d, o: fifo(d / "params" / "manifest.ocdbt"), "load", 2, "a FIFO"),
    "config.json a FIFO": (lambda d, o: fifo(d / "config.json"), "load", 2, "a FIFO"),
    "_METADATA linked to /dev/zero": (lambda d, o: link(d / "params" / "_METADATA", "/dev/zero"), "load", 2,
                                      "leaves the directory"),
    "a device inside params/": (lambda d, o: link(d / "params" / "d" / ("0" * 32), "/dev/zero"), "load", 2,
                                "leaves the directory"),
    # declared sizes
    "a huge declared shape, manifest to match": (lambda d, o: huge_shape(d, True), "load", 2, "the config implies"),
    "a huge declared shape, no manifest": (lambda d, o: huge_shape(d, False), "load", 2, "declares shape"),
    "a chunk that decompresses to 1.6 GB": (lambda d, o: compressed_bomb(d), "load", 2, "cannot be read"),
    # wrong types and structure
    "config depth a float": (lambda d, o: var_field(d, depth=2.5), "load", 2, "var.depth = 2.5 must be an integer"),
    "config depth a string": (lambda d, o: var_field(d, depth="2"), "load", 2, "must be an integer"),
    "config var a list": (lambda d, o: edit_json(d / "config.json", lambda c: {**c, "var": []}), "load", 2,
                          "var must be an object"),
    "config patch_nums not increasing": (lambda d, o: var_field(d, patch_nums=[2, 1]), "load", 2, "config.json"),
    "config nested 30,000 deep": (lambda d, o: deep(d / "config.json", 30_000), "load", 2, "nested deeper"),
    "config a 6 GB sparse file": (lambda d, o: sparse(d / "config.json"), "load", 2, "more than the"),
    "config not UTF-8": (lambda d, o: (d / "config.json").write_bytes(b'{"var": "\xff"}'), "load", 2, "not UTF-8"),
    "config empty": (lambda d, o: (d / "config.json").write_text(""), "load", 2, "config.json: not JSON"),
    "manifest files a list": (lambda d, o: edit_json(d / MANIFEST, lambda m: {**m, "files": []}), "load", 2,
                              "damaged manifest"),
    "manifest nested 100,000 deep": (lambda d, o: deep(d / MANIFEST), "load", 2, "nested deeper"),
    "_METADATA tree a list": (lambda d, o: (edit_json(d / "params" / "_METADATA", lambda m: {**m, "tree_metadata": []}),
                                            refresh_manifest(d)), "load", 2, "tree_metadata"),
    "_CHECKPOINT_METADATA a list": (lambda d, o: ((d / "params" / "_CHECKPOINT_METADATA").write_text("[]"),
                                                  refresh_manifest(d)), "load", 2, "must be a JSON object"),
    "classes.json an object": (lambda d, o: (d / "classes.json").write_text('{"a": 1}'), "load", 2, "list of"),
    "layers.json a float depth": (lambda d, o: write_calibration(d, depth=2.0), "check", 2, "layers.json: depth"),
    "layers.json scores as text": (lambda d, o: write_calibration(d, scores={"similarity": "ab", "dispersion": []}),
                                   "load", 2, "scores.similarity"),
    # config contradicting the params
    "config wider than the params": (lambda d, o: var_field(d, embed_dim=256), "load", 2, "do not match"),
    "config with more classes, manifest present": (lambda d, o: var_field(d, num_classes=20), "load", 2,
                                                   "the config implies"),
    "config with more classes, no manifest": (lambda d, o: (var_field(d, num_classes=20), (d / MANIFEST).unlink()),
                                              "load", 2, "declares shape"),
    # verification never silently off
    "manifest a directory": (lambda d, o: ((d / MANIFEST).unlink(), (d / MANIFEST).mkdir()), "load", 2,
                             "a directory, not a regular file"),
    "manifest a FIFO": (lambda d, o: fifo(d / MANIFEST), "load", 2, "a FIFO"),
    "manifest linked to /dev/zero": (lambda d, o: link(d / MANIFEST, "/dev/zero"), "load", 2, "leaves the directory"),
    "manifest missing, check asked": (lambda d, o: (d / MANIFEST).unlink(), "check", 2, "no checksums.json"),
    # messages
    "50,000 damaged files": (lambda d, o: many_damaged_files(d), "load", 2, "and 49992 more"),
    "class names with ANSI escapes": (lambda d, o: (d / "classes.json").write_text(json.dumps(["\x1b[31mred"] * 3)),
                                      "load", 2, "\\x1b[31mred"),
    # writers never follow links
    "integrity write with checksums.json.tmp linked outside": (
        lambda d, o: link(d / (MANIFEST + ".tmp"), o / "victim"), "write", 0, None),
    "integrity write with checksums.json linked outside": (lambda d, o: link(d / MANIFEST, o / "victim"), "write", 0,
                                                           None),
}

RUNNER = """
import json, sys
from amskv_jax import cli, integrity
from amskv_jax.checkpoint import load_model

@cli.command("load")
def load(argv):
    load_model(argv[0])
    return 0

for name, action, directory in json.load(open(sys.argv[1])):
    print(f"@@case {name}", file=sys.stderr, flush=True)
    rc = load([directory]) if action == "load" else integrity.main([action, directory])
    print(f"@@rc {rc}", file=sys.stderr, flush=True)
"""


def _cases_output(stderr: str) -> dict[str, tuple[int, list[str]]]:
    """{case: (return code, its stderr lines)} from the runner's markers."""
    out, name, lines = {}, None, []
    for line in stderr.splitlines():
        if line.startswith("@@case "):
            name, lines = line[len("@@case "):], []
        elif line.startswith("@@rc "):
            out[name] = (int(line[len("@@rc "):]), lines)
        else:
            lines.append(line)
    return out


def test_every_hostile_directory_is_one_line_and_exit_2(converted, outside, tmp_path):
    jobs = []
    for i, (name, (build, action, _, _)) in enumerate(CASES.items()):
        d = tmp_path / f"case{i}"
        shutil.copytree(converted, d, symlinks=True)
        build(d, outside)
        jobs.append((name, action, str(d)))
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    proc = _run(["-c", RUNNER, str(tmp_path / "jobs.json")])
    stderr = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    results = _cases_output(stderr)
    failures = []
    for name, (_, _, rc, text) in CASES.items():
        got_rc, lines = results[name]
        errors = [line for line in lines if ": error: " in line]
        if rc == 0:
            ok = got_rc == 0 and not errors
        else:
            ok = (got_rc == 2 and len(errors) == 1 and text in errors[0] and len(errors[0]) <= MAX_LINE
                  and errors[0].isprintable() and SECRET not in errors[0])
        if not ok:
            failures.append(f"{name}: rc {got_rc}, {lines}")
    assert not failures, "\n".join(failures)
    assert (outside / "victim").read_text() == "untouched"
    assert json.loads((outside / "secret.json").read_text()) == {SECRET: 1}
    for i, (name, (_, action, _, _)) in enumerate(CASES.items()):
        if action == "write":
            written = tmp_path / f"case{i}" / MANIFEST
            assert written.is_file() and not written.is_symlink(), name


def test_the_command_line_refuses_a_fifo_in_a_non_utf8_directory_in_one_line(converted, tmp_path):
    d = Path(os.fsdecode(bytes(tmp_path) + b"/ckpt-\xff\x1b[31m"))
    shutil.copytree(converted, d, symlinks=True)
    fifo(d / "params" / "_METADATA")
    image = tmp_path / "x.png"
    proc = _run(["-m", "amskv_jax.generate", "--model", os.fsencode(d), "--out", str(image)], timeout=300)
    stderr = proc.stderr.decode("utf-8", "replace")
    lines = stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, stderr
    assert lines[0].startswith("python -m amskv_jax.generate: error: ") and "a FIFO" in lines[0]
    assert "ckpt-\\udcff\\x1b[31m" in lines[0] and "\x1b" not in lines[0]
    assert not image.exists()


def test_save_checkpoint_replaces_links_instead_of_writing_through_them(tmp_path, outside):
    config = get_preset("tiny")
    d = tmp_path / "out"
    d.mkdir()
    link(d / "config.json", outside / "victim")
    link(d / MANIFEST, outside / "victim")
    save_checkpoint(d, config, init_params(config))
    assert (outside / "victim").read_text() == "untouched"
    assert not (d / "config.json").is_symlink() and not (d / MANIFEST).is_symlink()
    assert integrity.main(["check", str(d)]) == 0


def test_writers_create_fresh_files_and_never_follow_links(tmp_path, outside):
    link(tmp_path / "log.csv", outside / "victim")
    with open_new(tmp_path / "log.csv") as f:
        f.write("step\n")
    link(tmp_path / "layers.json", outside / "victim")
    write_atomic(tmp_path / "layers.json", "{}")
    assert (outside / "victim").read_text() == "untouched"
    assert (tmp_path / "log.csv").read_text() == "step\n" and not (tmp_path / "log.csv").is_symlink()
    assert json.loads((tmp_path / "layers.json").read_text()) == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layers.json", "log.csv"]  # no temporary file left


def test_read_json_names_the_file_and_bounds_size_and_depth(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("[" * 20 + "]" * 20)
    with pytest.raises(UntrustedInputError, match="x.json: JSON nested deeper than 16"):
        read_json(path, 1000)
    path.write_text("[1]" + " " * 1000)
    with pytest.raises(UntrustedInputError, match=r"x.json: 1003 bytes, more than the 1000 allowed"):
        read_json(path, 1000)
    assert read_json(path, 2000) == [1]


def test_an_error_line_is_bounded_and_escaped():
    line = cli.one_line(ValueError("bad \x1b[2J\n" + "x" * 5000 + os.fsdecode(b"\xff")))
    assert line.startswith("bad \\x1b[2J x") and len(line) == cli.MAX_MESSAGE and line.isprintable()
