"""A checkpoint directory is untrusted input: the one gate it passes before anything reads it.

People pass converted directories around, so `--model DIR` and `python -m amskv_jax.integrity` treat one the way
`convert.from_torch` treats a `.pth`: hostile until checked. `open_checkpoint` checks, in this order, before any array
byte is read and before orbax or tensorstore opens anything:

1. Every path loading opens resolves inside the directory and is a regular file (no FIFO, device or socket; a link
   only where its target stays inside). `params/` may hold only what an orbax OCDBT checkpoint holds
   (`PARAMS_FILES`); the per-leaf layout written without OCDBT, whose `_METADATA` names leaves by paths (an absolute
   one reads any file on the machine), is refused.
2. JSON files are read with a size bound checked before reading (`JSON_LIMITS`), must be UTF-8 and at most
   `MAX_JSON_DEPTH` deep.
3. `config.json`: its fields, their JSON types and bounds (`CONFIG_BOUNDS`), then `ModelConfig`'s own rules.
4. `checksums.json` when it exists (it must then be a regular, well-formed file: never "unverified"): its structure,
   then that `params/` holds exactly the files it lists, at their sizes.
5. `params/_METADATA` and the manifest name exactly the arrays the config implies (`param_shapes`: the model, a
   VAR without VQ-VAE, a training stage, or the per-block layout of earlier versions), with those dtypes and shapes.
6. Inside the OCDBT store (read by tensorstore with its B-tree node size pinned, `OCDBT_CONFIG`), only those arrays'
   keys exist, and each array's zarr metadata declares the config's shape in C-ordered chunks (at most
   MAX_CHUNKS), an allowed dtype and codec; so no declared size drives an allocation, and tensorstore refuses a
   chunk that decompresses to more.
7. `classes.json` and `layers.json`, when present: their structure, printable class names, the config's depth and
   ladder.

`read_params` then reads the arrays with tensorstore directly (not through orbax, whose event loop prints
tracebacks from its threads when a read fails). Every refusal is an `UntrustedInputError` (a `ValueError`: the
command lines print it as one line, exit 2) that names the file and the problem, with every value taken from the
directory escaped and bounded (`show`). Writers use `write_atomic` / `open_new`: never through a link.

What a directory is trusted for after the gate: its arrays' values (they may be any numbers: `generate` flags
non-finite logits) and its class names as labels. The checksums catch damage, not tampering (a digest stored beside
the data it guards proves nothing about who wrote both).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import os
import re
import shlex
import stat
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import tensorstore as ts

from amskv_jax import quant
from amskv_jax.cli import printable
from amskv_jax.config import ModelConfig, VARConfig, VQVAEConfig
from amskv_jax.errors import UserError
from amskv_jax.policies import CALIBRATION_FORMAT
from amskv_jax.var import VAR
from amskv_jax.vqvae import VQVAE

MANIFEST = "checksums.json"
MANIFEST_FORMAT = 1
CONFIG = "config.json"
CLASSES = "classes.json"
CALIBRATION = "layers.json"

# Largest accepted size of each JSON file, checked before reading (bytes). A d36 manifest is ~0.2 MB.
JSON_LIMITS = {CONFIG: 64 << 10, CLASSES: 1 << 20, CALIBRATION: 8 << 20, MANIFEST: 32 << 20,
               "params/_METADATA": 32 << 20, "params/_CHECKPOINT_METADATA": 1 << 20}
MAX_JSON_DEPTH = 16
MAX_FILES = 100_000  # under params/
MAX_CHUNKS = 1 << 16  # chunks of one stored array
MAX_MESSAGE_VALUE = 300  # characters of one untrusted value (a path, a key) in a message
MAX_PROBLEMS = 8  # problems listed in one message (then "and N more")

# Files an orbax OCDBT checkpoint holds under params/, relative, '/'-separated.
PARAMS_FILES = re.compile(
    r"(_CHECKPOINT_METADATA|_METADATA|commit_success\.txt|manifest\.ocdbt|d/[0-9a-f]{32}"
    r"|ocdbt\.process_[0-9]{1,6}/(manifest\.ocdbt|d/[0-9a-f]{32}))"
)
PARAMS_DIRS = re.compile(r"(d|ocdbt\.process_[0-9]{1,6}|ocdbt\.process_[0-9]{1,6}/d)")
# The OCDBT configuration orbax writes; pinning it makes tensorstore refuse a store that raises the bound on a
# decoded B-tree node (100 MB) instead of decompressing whatever the store declares.
OCDBT_CONFIG = {"compression": {"id": "zstd"}, "max_decoded_node_bytes": 100_000_000, "max_inline_value_bytes": 1024,
                "version_tree_arity_log2": 4}
FLOAT_DTYPES = ("float32", "bfloat16", "float16")  # what a floating leaf may be stored as (`--dtype`)
ZARR_DTYPES = {"<f4": "float32", "bfloat16": "bfloat16", "<f2": "float16", "<i4": "int32"}
KEY = re.compile(r"[A-Za-z0-9_]{1,100}")

# Bounds on config values, beyond ModelConfig's own rules: generous for any published model (d36: depth 36, width
# 2304), small enough that the shapes they imply are sane to compute with.
CONFIG_BOUNDS = {
    "depth": (1, 256), "embed_dim": (1, 1 << 16), "num_heads": (1, 1024), "num_classes": (1, 1 << 20),
    "vocab_size": (1, 1 << 20), "cvae": (1, 1 << 12), "mlp_ratio": (0.0, 64.0), "norm_eps": (0.0, 1.0),
    "cond_drop_rate": (0.0, 1.0), "z_channels": (1, 1 << 12), "ch": (1, 1 << 13), "num_res_blocks": (0, 64),
    "quant_resi": (-10.0, 10.0), "share_quant_resi": (1, 1024), "beta": (0.0, 1e3), "in_channels": (1, 64),
    "patch_nums": (1, 1024), "ch_mult": (1, 64),
}
MAX_LADDER = 64  # entries of patch_nums / ch_mult
MAX_PARAMS = 1 << 34  # elements over all arrays the config implies


class UntrustedInputError(UserError):
    """A checkpoint directory (or a file in one) that is not what loading may read; the message names the file."""


class IntegrityError(UntrustedInputError):
    """A checkpoint directory whose files or arrays do not match its manifest."""


# --- messages ----------------------------------------------------------------------------------------------------


def show(value, limit: int = MAX_MESSAGE_VALUE) -> str:
    """An untrusted value (a path, a key, a name) for a message: escaped and cut (`cli.printable`)."""
    return printable(value, limit)


def listing(problems: list[str]) -> str:
    """At most MAX_PROBLEMS items, comma-separated, then how many more."""
    more = len(problems) - MAX_PROBLEMS
    return ", ".join(problems[:MAX_PROBLEMS]) + (f" and {more} more" if more > 0 else "")


# --- files -------------------------------------------------------------------------------------------------------


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a link")):
        if test(mode):
            return name
    return "not a regular file"


def inside(root: Path, relative: str) -> Path:
    """root/relative resolved (links followed), which must stay inside `root` (itself resolved)."""
    path = root / relative
    try:
        resolved = path.resolve(strict=True)
    except FileNotFoundError:
        raise UntrustedInputError(f"{show(path)}: missing") from None
    except (OSError, RuntimeError) as err:  # a link loop
        raise UntrustedInputError(f"{show(path)}: cannot be resolved ({show(err)})") from None
    if not resolved.is_relative_to(root):
        raise UntrustedInputError(f"{show(path)}: a link that leaves the directory {show(root)}")
    return resolved


def read_bytes(path: Path, limit: int, shown: Path | None = None) -> bytes:
    """The bytes of a regular file of at most `limit` bytes. Opened without following a final link and without
    blocking (a FIFO would hang), then checked with fstat before a byte is read."""
    shown = show(shown or path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise UntrustedInputError(f"{shown}: missing") from None
    except OSError as err:
        raise UntrustedInputError(f"{shown}: cannot be opened ({show(err.strerror)})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UntrustedInputError(f"{shown}: {_kind(info.st_mode)}, not a regular file")
        if info.st_size > limit:
            raise UntrustedInputError(f"{shown}: {info.st_size} bytes, more than the {limit} allowed")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise UntrustedInputError(f"{shown}: grew past the {limit} bytes allowed while being read")
    return data


def read_json(path: str | Path, limit: int, root: Path | None = None):
    """A JSON file's value: a regular file (inside `root` when given) of at most `limit` bytes, UTF-8, nested at
    most MAX_JSON_DEPTH deep."""
    path = Path(path)
    resolved = inside(root, str(path.relative_to(root))) if root is not None else path
    data = read_bytes(resolved, limit, shown=path)
    try:
        value = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise UntrustedInputError(f"{show(path)}: not UTF-8 (byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise UntrustedInputError(f"{show(path)}: not JSON ({show(err.msg)} at line {err.lineno} column {err.colno})") \
            from None
    except RecursionError:
        raise UntrustedInputError(f"{show(path)}: JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    if _depth(value) > MAX_JSON_DEPTH:
        raise UntrustedInputError(f"{show(path)}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return value


def _depth(value) -> int:
    depth, level = 0, [value]
    while level:
        depth += 1
        level = [v for x in level if isinstance(x, (dict, list)) for v in (x.values() if isinstance(x, dict) else x)]
    return depth - 1


def open_new(path: str | Path, mode: str = "w", **kwargs):
    """A new, empty file at `path`, opened with `open(..., mode)`: whatever was there (a file, or a link, which is
    removed, never followed) is replaced, and the file is created exclusively (O_EXCL | O_NOFOLLOW)."""
    path = Path(path)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    return os.fdopen(fd, mode, **kwargs)


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write `data` to `path` through a fresh temporary file in the same directory (created exclusively, never a
    link), then rename it over `path`: a link at `path` is replaced, never written through, and a reader sees the
    old file or the new one, never half of one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# --- what the config implies ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def param_shapes(config: ModelConfig) -> dict:
    """{"var": variables, "vqvae": variables} as `jax.ShapeDtypeStruct`s: the Flax modules' init, traced, not run
    (seconds: cached per config; do not modify the result)."""
    c = config.var
    labels = jnp.zeros((1,), jnp.int32)
    x = jnp.zeros((1, c.seq_len - c.first_l, c.cvae), jnp.float32)
    side = 2 ** (len(config.vqvae.ch_mult) - 1)  # the smallest image (a 1x1 latent): the shapes do not depend on it
    img = jnp.zeros((1, side, side, 3), jnp.float32)
    key = jax.random.key(0)
    return {"var": jax.eval_shape(VAR(c).init, key, labels, x), "vqvae": jax.eval_shape(VQVAE(config.vqvae).init, key, img)}


def leaf_name(path) -> str:
    """"var/params/head/bias" for a tree path."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _leaves(tree) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {leaf_name(p): (str(x.dtype), tuple(x.shape)) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _per_block(var: dict, config: VARConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The VAR leaves of the per-block layout of earlier versions (`blocks_0` …, mat_qkv kernel [C, 3C])."""
    out = {}
    for name, (dtype, shape) in var.items():
        if not name.startswith("params/blocks/"):
            out[name] = (dtype, shape)
            continue
        shape = (shape[1], 3 * config.embed_dim) if name.endswith("mat_qkv/kernel") else shape[1:]
        for i in range(config.depth):
            out[name.replace("params/blocks/", f"params/blocks_{i}/", 1)] = (dtype, shape)
    return out


def expected_layouts(config: ModelConfig) -> dict[str, dict[str, tuple[str, tuple[int, ...]]]]:
    """{layout: {leaf name: (dtype, shape)}} of every params tree a directory with this config may hold."""
    shapes = param_shapes(config)
    var = {k.removeprefix("var/"): v for k, v in _leaves({"var": shapes["var"]}).items()}
    vqvae = {k.removeprefix("vqvae/"): v for k, v in _leaves({"vqvae": shapes["vqvae"]}).items()}
    old = _per_block(var, config.var)

    def prefixed(prefix, leaves):
        return {f"{prefix}/{k}": v for k, v in leaves.items()}

    return {
        "model": {**prefixed("var", var), **prefixed("vqvae", vqvae)},
        "model without VQ-VAE": prefixed("var", var),
        "model (per-block layout)": {**prefixed("var", old), **prefixed("vqvae", vqvae)},
        "model without VQ-VAE (per-block layout)": prefixed("var", old),
        "VAR training stage": var, "VAR training stage (per-block layout)": old, "VQ-VAE training stage": vqvae,
    }


# --- the gate ------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CheckedDirectory:
    """A checkpoint directory that passed `open_checkpoint`. `arrays`: {leaf name: (stored dtype, shape)};
    `manifest`: the parsed checksums.json, or None when absent (or not asked for); `classes` and `calibration`:
    classes.json and layers.json when present."""

    root: Path
    shown: str  # the directory as given, escaped for messages
    config: ModelConfig
    manifest: dict | None
    arrays: dict[str, tuple[str, tuple[int, ...]]]
    classes: tuple[str, ...] | None
    calibration: dict | None

    @property
    def has_vqvae(self) -> bool:
        return any(name.startswith("vqvae/") for name in self.arrays)


def open_checkpoint(directory: str | Path, manifest: str = "optional") -> CheckedDirectory:
    """Check a checkpoint directory (the module docstring lists what, in order) and return what was read.

    `manifest`: "optional" (load: checked when present), "required" (`integrity check`), or "ignored"
    (`integrity write`, which replaces it; every other check still runs)."""
    if manifest not in ("optional", "required", "ignored"):
        raise ValueError(f"manifest={manifest!r}; allowed: optional, required, ignored")
    shown = show(directory)
    root = _root(directory)
    if not os.path.lexists(root / "params") or inside(root, "params") != root / "params" or \
            not (root / "params").is_dir():
        raise UntrustedInputError(f"{shown}: not a checkpoint directory (needs config.json and a params/ directory)")
    config = _read_config(root)
    files = params_files(root)
    parsed = None
    if manifest != "ignored" and (os.path.lexists(root / MANIFEST) or manifest == "required"):
        if not os.path.lexists(root / MANIFEST):
            raise IntegrityError(f"{shown}: no {MANIFEST}; write one with `python -m amskv_jax.integrity write "
                                 f"{show(shlex.quote(str(directory)))}`")
        parsed = _read_manifest(root)
        _check_files(root, parsed, files)
    expected = _match_layout(root, config, parsed)
    arrays = _check_stored_arrays(root, expected, parsed)
    return CheckedDirectory(root, shown, config, parsed, arrays, *_read_extras(root, config))


def read_model_files(directory: str | Path) -> tuple[ModelConfig, tuple[str, ...] | None, dict | None]:
    """(config, classes, calibration) of a model directory, through the same checks as `open_checkpoint`, without
    looking at its params: for commands that need the model's shape only (`amskv_jax.memory`)."""
    root = _root(directory)
    config = _read_config(root)
    return (config, *_read_extras(root, config))


def _root(directory: str | Path) -> Path:
    shown = show(directory)
    try:
        root = Path(directory).resolve(strict=True)
    except (OSError, RuntimeError):
        raise UntrustedInputError(f"{shown}: no such directory") from None
    if not root.is_dir():
        raise UntrustedInputError(f"{shown}: not a directory")
    return root


def _read_config(root: Path) -> ModelConfig:
    path = root / CONFIG
    data = read_json(path, JSON_LIMITS[CONFIG], root)
    if not isinstance(data, dict) or set(data) != {"var", "vqvae"}:
        raise UntrustedInputError(f"{show(path)}: must be an object with exactly the keys var and vqvae")
    sections = []
    for kind, key in ((VARConfig, "var"), (VQVAEConfig, "vqvae")):
        section = data[key]
        if not isinstance(section, dict):
            raise UntrustedInputError(f"{show(path)}: {key} must be an object, not {type(section).__name__}")
        fields = {f.name: f.type for f in dataclasses.fields(kind)}
        unknown = sorted(set(section) - set(fields))
        if unknown:
            raise UntrustedInputError(f"{show(path)}: unknown {key} field(s) {show(unknown)}; allowed: "
                                      f"{sorted(fields)}")
        values = {}
        for name, value in section.items():
            problem = _config_value_problem(name, fields[name], value)
            if problem:
                raise UntrustedInputError(f"{show(path)}: {key}.{name} = {show(json.dumps(value))} {problem}")
            values[name] = tuple(value) if isinstance(value, list) else value
        sections.append(_guard(path, lambda: kind(**values)))
    config = _guard(path, lambda: ModelConfig(var=sections[0], vqvae=sections[1]))
    total = sum(math.prod(x.shape) for x in jax.tree.leaves(param_shapes(config)))  # cached for expected_layouts
    if total > MAX_PARAMS:
        raise UntrustedInputError(f"{show(path)}: implies {total:,} parameters, more than the {MAX_PARAMS:,} allowed")
    return config


def _guard(path: Path, make):
    """make(); a ValueError (a rule of the config) becomes one that names the file."""
    try:
        return make()
    except ValueError as err:
        raise UntrustedInputError(f"{show(path)}: {show(err, 400)}") from None


def _config_value_problem(name: str, annotation: str, value) -> str | None:
    """Why a config value of this field's annotation ("int", "float", "bool", "tuple[int, ...]") is refused."""
    low, high = CONFIG_BOUNDS.get(name, (None, None))
    if annotation == "bool":
        return None if isinstance(value, bool) else "must be true or false"
    if annotation == "tuple[int, ...]":
        if not isinstance(value, list) or not 1 <= len(value) <= MAX_LADDER:
            return f"must be a list of 1 to {MAX_LADDER} integers"
        items = value
    else:
        items = [value]
    for item in items:
        if annotation == "float":
            if isinstance(item, bool) or not isinstance(item, (int, float)) or not math.isfinite(item):
                return "must be a finite number"
        elif isinstance(item, bool) or not isinstance(item, int):
            return "must be an integer"
        if low is not None and not low <= item <= high:
            return f"must be in [{low}, {high}]"
    return None


def params_files(root: Path) -> dict[str, int]:
    """{name relative to params/: size} of every file under params/: regular files (or links to regular files
    inside the directory), named as an OCDBT checkpoint names them."""
    params = root / "params"
    found, bad = {}, []
    for dirpath, dirnames, filenames in os.walk(params, onerror=_raise):
        for name in sorted(dirnames) + sorted(filenames):
            path = Path(dirpath) / name
            relative = path.relative_to(params).as_posix()
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                target = inside(root, path.relative_to(root).as_posix())
                mode = os.stat(target).st_mode
                if not stat.S_ISREG(mode):
                    bad.append(f"{show(relative)} (a link to {_kind(mode)})")
                    continue
            if stat.S_ISDIR(mode):
                if not PARAMS_DIRS.fullmatch(relative):
                    bad.append(f"{show(relative)}/ (not part of an orbax OCDBT checkpoint)")
            elif not stat.S_ISREG(mode):
                bad.append(f"{show(relative)} ({_kind(mode)})")
            elif not PARAMS_FILES.fullmatch(relative):
                bad.append(f"{show(relative)} (not part of an orbax OCDBT checkpoint)")
            else:
                found[relative] = os.stat(path).st_size
            if len(found) + len(bad) > MAX_FILES:
                raise UntrustedInputError(f"{show(params)}: more than {MAX_FILES} files")
        dirnames[:] = [d for d in dirnames if PARAMS_DIRS.fullmatch((Path(dirpath) / d).relative_to(params).as_posix())
                       and not os.path.islink(Path(dirpath) / d)]
    if bad:
        raise UntrustedInputError(f"{show(params)}: {len(bad)} file(s) loading must not open: {listing(bad)}")
    return found


def _raise(err: OSError):
    raise UntrustedInputError(f"{show(err.filename)}: cannot be listed ({show(err.strerror)})")


def _read_manifest(root: Path) -> dict:
    """checksums.json, checked for its structure: {"format": 1, "digest": "crc32", "files": {name: size},
    "arrays": {name: {"dtype", "shape", "crc32"}}}."""
    path = root / MANIFEST
    data = read_json(path, JSON_LIMITS[MANIFEST], root)
    if not isinstance(data, dict) or set(data) != {"format", "digest", "files", "arrays"}:
        raise IntegrityError(f"{show(path)}: damaged manifest (must be an object with the keys format, digest, files "
                             "and arrays)")
    if data["format"] != MANIFEST_FORMAT or data["digest"] != "crc32":
        raise IntegrityError(f"{show(path)}: unknown manifest format {show(data['format'])} / digest "
                             f"{show(data['digest'])}; allowed: {MANIFEST_FORMAT} / crc32")
    files, arrays = data["files"], data["arrays"]
    if not isinstance(files, dict) or not all(
        isinstance(k, str) and PARAMS_FILES.fullmatch(k) and type(v) is int and v >= 0 for k, v in files.items()
    ):
        raise IntegrityError(f"{show(path)}: damaged manifest (files must map params/ file names to sizes)")
    if not isinstance(arrays, dict) or not all(_manifest_entry_ok(k, v) for k, v in arrays.items()):
        raise IntegrityError(f"{show(path)}: damaged manifest (arrays must map names to dtype, shape and crc32)")
    return data


def _manifest_entry_ok(name, entry) -> bool:
    return (isinstance(name, str) and isinstance(entry, dict) and set(entry) == {"dtype", "shape", "crc32"}
            and isinstance(entry["dtype"], str) and isinstance(entry["shape"], list)
            and all(type(n) is int and n >= 0 for n in entry["shape"])
            and isinstance(entry["crc32"], str) and re.fullmatch(r"[0-9a-f]{8}", entry["crc32"]) is not None)


def _check_files(root: Path, manifest: dict, found: dict[str, int]) -> None:
    """Raise IntegrityError naming every file under params/ that is missing, of another size, or not listed."""
    bad = [
        f"{name} (missing)" if name not in found else
        f"{name} ({'truncated: ' if found[name] < size else ''}{found[name]} bytes, expected {size})"
        for name, size in manifest["files"].items()
        if found.get(name) != size
    ]
    bad += [f"{name} (not in the manifest)" for name in found if name not in manifest["files"]]
    if bad:
        raise IntegrityError(f"{show(root / 'params')}: {len(bad)} damaged file(s): {listing(bad)}")


def _metadata_names(root: Path) -> list[str]:
    """The leaf names params/_METADATA lists ("var/params/head/bias"), each key a plain identifier, in the OCDBT
    layout; _CHECKPOINT_METADATA, when present, must be a bounded JSON object."""
    checkpoint_meta = root / "params" / "_CHECKPOINT_METADATA"
    if os.path.lexists(checkpoint_meta) and not isinstance(
        read_json(checkpoint_meta, JSON_LIMITS["params/_CHECKPOINT_METADATA"], root), dict
    ):
        raise UntrustedInputError(f"{show(checkpoint_meta)}: must be a JSON object")
    path = root / "params" / "_METADATA"
    meta = read_json(path, JSON_LIMITS["params/_METADATA"], root)
    if not isinstance(meta, dict) or not isinstance(meta.get("tree_metadata"), dict):
        raise UntrustedInputError(f"{show(path)}: must be an object with a tree_metadata object")
    if meta.get("use_ocdbt") is not True or meta.get("use_zarr3", False) is not False:
        raise UntrustedInputError(
            f"{show(path)}: not the OCDBT layout this package writes (use_ocdbt {show(meta.get('use_ocdbt'))}); "
            "the per-leaf layout names its arrays by paths and is refused"
        )
    names = []
    for entry in meta["tree_metadata"].values():
        keys = entry.get("key_metadata") if isinstance(entry, dict) else None
        value = entry.get("value_metadata") if isinstance(entry, dict) else None
        if not isinstance(keys, list) or not all(isinstance(k, dict) and isinstance(k.get("key"), str) for k in keys):
            raise UntrustedInputError(f"{show(path)}: a tree_metadata entry without a key_metadata list")
        bad = [k["key"] for k in keys if not KEY.fullmatch(k["key"])]
        if bad:
            raise UntrustedInputError(f"{show(path)}: leaf key {show(bad[0])} is not a plain name (letters, digits, _)")
        if not isinstance(value, dict) or value.get("value_type") != "np.ndarray" or value.get("skip_deserialize"):
            raise UntrustedInputError(f"{show(path)}: leaf {show('/'.join(k['key'] for k in keys))} is not a stored "
                                      "numpy array")
        names.append("/".join(k["key"] for k in keys))
    return names


def _match_layout(root: Path, config: ModelConfig, manifest: dict | None) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{leaf: (dtype, shape)} of the layout (`expected_layouts`) whose leaves _METADATA lists; with a manifest, its
    arrays must be exactly those, with dtypes and shapes the config allows."""
    names = set(_metadata_names(root))
    layouts = expected_layouts(config)
    for expected in layouts.values():
        if names == set(expected):
            break
    else:
        expected = layouts["model"] if any(n.startswith(("var/", "vqvae/")) for n in names) else \
            layouts["VAR training stage"]
        problems = [f"{show(n)} (not in the config's model)" for n in sorted(names - set(expected))]
        problems += [f"{show(n)} (missing)" for n in sorted(set(expected) - names)]
        raise UntrustedInputError(f"{show(root / 'params' / '_METADATA')}: its arrays do not match "
                                  f"{show(root / CONFIG)}: {listing(problems)}")
    if manifest is not None:
        problems = [f"{show(n)} (not in the config's model)" for n in sorted(set(manifest["arrays"]) - names)]
        problems += [f"{show(n)} (missing)" for n in sorted(names - set(manifest["arrays"]))]
        for name in sorted(names & set(manifest["arrays"])):
            entry, (dtype, shape) = manifest["arrays"][name], expected[name]
            if tuple(entry["shape"]) != shape or not _dtype_ok(entry["dtype"], dtype):
                problems.append(f"{name} ({show(entry['dtype'])}{show(entry['shape'], 60)}, the config implies "
                                f"{dtype}{list(shape)})")
        if problems:
            raise IntegrityError(f"{show(root / MANIFEST)}: its arrays do not match {show(root / CONFIG)}: "
                                 f"{listing(problems)}")
    return expected


def _dtype_ok(stored: str, expected: str) -> bool:
    return stored in FLOAT_DTYPES if expected in FLOAT_DTYPES else stored == expected


def ocdbt_spec(root: Path) -> dict:
    """The tensorstore kvstore spec of params/ (OCDBT over the local files, its configuration pinned)."""
    return {"driver": "ocdbt", "base": {"driver": "file", "path": f"{root / 'params'}/"}, "config": OCDBT_CONFIG}


def _check_stored_arrays(root: Path, expected: dict, manifest: dict | None) -> dict[str, tuple[str, tuple]]:
    """Each array's zarr metadata inside the OCDBT store: the config's shape in C-ordered chunks (at most
    MAX_CHUNKS of them; `lazy.save_arrays` writes chunks of a few MiB), an allowed dtype (the manifest's, when there
    is one) and codec; and no keys in the store but those arrays' metadata and chunks."""
    params = show(root / "params")
    try:
        store = ts.KvStore.open(ocdbt_spec(root)).result()
        keys = store.list().result()
    except ValueError as err:
        raise UntrustedInputError(f"{params}: not a readable OCDBT store ({show(err, 300)})") from None
    found = {k.decode("utf-8", "replace") for k in keys}
    missing = sorted(f"{name.replace('/', '.')}/.zarray" for name in expected
                     if f"{name.replace('/', '.')}/.zarray" not in found)
    if missing:
        raise UntrustedInputError(f"{params}: the OCDBT store lacks the config's arrays: "
                                  f"{listing([f'{k} (missing)' for k in missing])}")
    arrays, wanted = {}, set()
    reads = {name: store.read(f"{name.replace('/', '.')}/.zarray".encode()) for name in expected}  # concurrently
    for name, (dtype, shape) in expected.items():
        try:
            raw = reads[name].result().value
        except ValueError as err:
            raise UntrustedInputError(f"{params}: {name}'s zarr metadata cannot be read ({show(err, 300)})") from None
        if len(raw) > 64 << 10:
            raise UntrustedInputError(f"{params}: {name}'s zarr metadata is {len(raw)} bytes")
        try:
            meta = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise UntrustedInputError(f"{params}: {name}'s zarr metadata is not JSON") from None
        stored = ZARR_DTYPES.get(meta.get("dtype")) if isinstance(meta, dict) and isinstance(meta.get("dtype"), str) \
            else None
        problem = _zarr_problem(meta, shape, dtype, stored)
        if problem is None and manifest is not None and manifest["arrays"][name]["dtype"] != stored:
            problem = f"dtype {stored}, the manifest says {show(manifest['arrays'][name]['dtype'])}"
        if problem:
            raise UntrustedInputError(f"{params}: array {name}: {problem}")
        arrays[name] = (stored, shape)
        key = name.replace("/", ".")
        grid = [range(-(-n // c)) for n, c in zip(shape, meta["chunks"])]
        wanted |= {f"{key}/.zarray"} | {f"{key}/{'.'.join(map(str, i)) or '0'}" for i in itertools.product(*grid)}
    unknown = [show(k) for k in sorted(found - wanted)]
    missing = sorted(wanted - found)
    if unknown or missing:
        problems = [f"{k} (unexpected)" for k in unknown] + [f"{k} (missing)" for k in missing]
        raise UntrustedInputError(f"{params}: the OCDBT store's keys do not match the config's arrays: "
                                  f"{listing(problems)}")
    return arrays


def _zarr_problem(meta, shape: tuple[int, ...], dtype: str, stored: str | None) -> str | None:
    if not isinstance(meta, dict):
        return "zarr metadata is not an object"
    if meta.get("zarr_format") != 2 or meta.get("order") != "C" or meta.get("filters") is not None:
        return "zarr metadata is not zarr 2, C order, without filters"
    chunks = meta.get("chunks")
    fits = (isinstance(chunks, list) and len(chunks) == len(shape)
            and all(type(c) is int and 1 <= c <= max(n, 1) for c, n in zip(chunks, shape)))
    if meta.get("shape") != list(shape) or not fits or math.prod(-(-n // c) for n, c in zip(shape, chunks)) \
            > MAX_CHUNKS:
        return (f"declares shape {show(meta.get('shape'), 60)} in chunks {show(chunks, 60)}; the config implies "
                f"{list(shape)} in at most {MAX_CHUNKS} chunks")
    if stored is None or not _dtype_ok(stored, dtype):
        allowed = FLOAT_DTYPES if dtype in FLOAT_DTYPES else [dtype]
        return f"dtype {show(meta.get('dtype'))}; allowed: {', '.join(allowed)}"
    compressor = meta.get("compressor")
    if compressor is not None and not (isinstance(compressor, dict) and compressor.get("id") == "zstd"):
        return f"compressor {show(compressor, 60)}; allowed: zstd or none"
    if meta.get("fill_value") is not None or meta.get("dimension_separator", ".") != ".":
        return "zarr metadata has a fill value or a separator other than '.'"
    return None


def _read_extras(root: Path, config: ModelConfig) -> tuple[tuple[str, ...] | None, dict | None]:
    """(classes.json, layers.json), each None when absent; checked for structure and against the config."""
    classes = calibration = None
    path = root / CLASSES
    if os.path.lexists(path):
        data = read_json(path, JSON_LIMITS[CLASSES], root)
        if not isinstance(data, list) or not 1 <= len(data) <= config.var.num_classes:
            raise UntrustedInputError(f"{show(path)}: must be a list of 1 to {config.var.num_classes} class names "
                                      "(num_classes in config.json)")
        for i, name in enumerate(data):
            if not isinstance(name, str) or not 1 <= len(name) <= 200 or not name.isprintable():
                raise UntrustedInputError(f"{show(path)}: class {i} is {show(repr(name), 60)}: a class name "
                                          "must be printable text of 1 to 200 characters")
        classes = tuple(data)
    path = root / CALIBRATION
    if os.path.lexists(path):
        calibration = read_json(path, JSON_LIMITS[CALIBRATION], root)
        problem = calibration_problem(calibration, config.var.depth, config.var.patch_nums)
        if problem:
            raise UntrustedInputError(f"{show(path)}: {problem}")
    return classes, calibration


def calibration_problem(data, depth: int | None = None, patch_nums: tuple[int, ...] | None = None) -> str | None:
    """Why a calibration file's value is not one for a model of `depth` layers and ladder `patch_nums` (None when
    it is; either None: any the file well-formedly declares): the fields the policies read (format, depth,
    patch_nums, demanding_layers, scores.similarity, scores.dispersion, and a search's budgets and condensed_scales
    and the held-out ΔNLL when present). The caller names the file."""
    if not isinstance(data, dict) or data.get("format") != CALIBRATION_FORMAT:
        return f"not a calibration file (format must be {CALIBRATION_FORMAT!r})"
    if type(data.get("depth")) is not int or not 1 <= data["depth"] <= CONFIG_BOUNDS["depth"][1]:
        return f"depth {show(data.get('depth'), 40)} is not a layer count in [1, {CONFIG_BOUNDS['depth'][1]}]"
    ladder = data.get("patch_nums")
    if not isinstance(ladder, list) or not 1 <= len(ladder) <= MAX_LADDER or not all(
        type(pn) is int and 1 <= pn <= CONFIG_BOUNDS["patch_nums"][1] for pn in ladder
    ):
        return f"patch_nums must be 1 to {MAX_LADDER} scale sides in [1, {CONFIG_BOUNDS['patch_nums'][1]}]"
    if depth is not None and data["depth"] != depth:
        return f"the calibration is for a model of depth {data['depth']}, not {depth}"
    if patch_nums is not None and tuple(ladder) != tuple(patch_nums):
        return f"the calibration is for the ladder {ladder}, not {list(patch_nums)}"
    depth = data["depth"]
    if "search" in data:
        search = data["search"]
        budgets = search.get("budgets") if isinstance(search, dict) else None
        if not isinstance(budgets, list) or len(budgets) != depth or not all(
            type(b) is int and 1 <= b <= MAX_PARAMS for b in budgets
        ):
            return f"search.budgets must be {depth} positive slot counts"
        if type(search.get("condensed_scales")) is not int or not 0 <= search["condensed_scales"] <= len(ladder):
            return f"search.condensed_scales must be a scale count in [0, {len(ladder)}]"
        storages = search.get("kv_dtypes")
        if "kv_dtypes" in search and (not isinstance(storages, list) or len(storages) != depth or not all(
            s is None or s in quant.KV_DTYPES for s in storages
        )):
            return (f"search.kv_dtypes must be {depth} storage dtypes, each null (the compute dtype) or one of "
                    f"{', '.join(quant.KV_DTYPES)}")
    if "held_out" in data:
        held = data["held_out"]
        delta = held.get("delta_nll") if isinstance(held, dict) else None
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not math.isfinite(delta):
            return "held_out.delta_nll must be a finite number (the searched policy's held-out NLL change, a fraction)"
    layers = data.get("demanding_layers")
    if not isinstance(layers, list) or not all(type(i) is int and 0 <= i < depth for i in layers) \
            or len(set(layers)) != len(layers):
        return f"demanding_layers must list distinct layers in [0, {depth})"
    scores = data.get("scores")
    for key in ("similarity", "dispersion"):
        values = scores.get(key) if isinstance(scores, dict) else None
        if not isinstance(values, list) or len(values) != depth or not all(
            not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) for v in values
        ):
            return f"scores.{key} must be {depth} finite numbers"
    return None


def read_params(checked: CheckedDirectory) -> dict:
    """The params tree of a checked directory, exactly as stored (numpy arrays), read with tensorstore: every
    array's shape, dtype and codec were checked, so no read allocates more than the config's arrays."""
    base = ocdbt_spec(checked.root)
    stores = {}
    try:
        for name in checked.arrays:
            spec = {"driver": "zarr", "kvstore": {**base, "path": name.replace("/", ".") + "/"}}
            stores[name] = ts.open(spec, open=True, read=True).result()
        reads = {name: store.read() for name, store in stores.items()}
        values = {}
        for name, future in reads.items():
            values[name] = future.result()
    except ValueError as err:
        raise IntegrityError(f"{show(checked.root / 'params')}: array {name} cannot be read: {show(err, 300)}") \
            from None
    tree: dict = {}
    for name, value in values.items():
        *parents, last = name.split("/")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = np.asarray(value)
    return tree
