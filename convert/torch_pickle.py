"""Read PyTorch checkpoints into numpy arrays without torch, and without running code from the file.

`torch.load` (and plain `pickle.load`) calls whatever globals a pickle names, so a downloaded checkpoint can run
arbitrary code. This reader unpickles with an allow-list instead: `collections.OrderedDict`, the tensor rebuild
functions `torch._utils._rebuild_tensor_v2` / `_rebuild_parameter` / `_rebuild_parameter_with_state` and the
`torch.*Storage` types. Each is replaced by a function of this module that only records what the pickle asks for;
any other global is refused (CheckpointError naming it) before anything is called. BUILD (`__setstate__`) is
refused on every object the allow-list creates, except the `_metadata` that `state_dict()` attaches to its
OrderedDict, which is ignored. Tensors stay references (storage, offset, shape, strides) until a state dict has
been chosen, so unused entries of a training checkpoint (optimizer state) are never read.

Formats:
- `torch.save` zip format (torch >= 1.6): `<prefix>/data.pkl`, raw storages in `<prefix>/data/<key>`, byte order in
  `<prefix>/byteorder` (little when absent). Entries are normally stored uncompressed: their bytes are read from a
  memory map at the entry's data offset. Storage CRCs are not checked (torch does not check them either).
- legacy format (torch < 1.6): consecutive pickles (magic number, protocol version, sys_info, the object, the
  storage keys), then per storage key an 8-byte element count and the raw elements.
- safetensors: the JSON header is parsed here, since `safetensors.numpy` cannot return bfloat16.

`open_state_dict` checks every tensor against its storage and returns `amskv_jax.lazy.LazyArray`s that read the memory
map only when materialised (streaming conversion); `load_state_dict` materialises them, so its arrays are copies that
own their memory. bfloat16 is `ml_dtypes.bfloat16`.
Training checkpoints nest state dicts (`trainer.var_wo_ddp`, `model`, `state_dict`, `ema`, ...): the entry is
chosen by its keys (`which="var"`: has `word_embed.weight`; `which="vae"`: has `quantize.embedding.weight`) and
named through `log`. A common `module.` / `_orig_mod.` prefix (DDP, torch.compile) is removed.
"""
from __future__ import annotations

import collections
import io
import json
import math
import mmap
import pickle
import struct
import sys
import zipfile
from pathlib import Path
from typing import Callable

import ml_dtypes
import numpy as np
from tqdm import tqdm

from amskv_jax.errors import UserError
from amskv_jax.lazy import LazyArray

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
PROGRESS_MIN_BYTES = 200 * 2**20
NESTING_DEPTH = 4
MAX_DIMS = 64  # numpy's limit
MAX_INDEX = 2**62  # bound on sizes, strides and offsets, so byte offsets fit numpy's intp
STRIPPED_PREFIXES = ("module.", "_orig_mod.")
KIND_MARKERS = {"var": "word_embed.weight", "vae": "quantize.embedding.weight"}
KIND_NAMES = {"var": "VAR", "vae": "VQ-VAE", None: "unrecognised"}
NOT_A_CHECKPOINT = "not a PyTorch checkpoint (neither a torch.save zip archive, nor a legacy torch.save file, nor " \
    "safetensors)"

STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
    "UntypedStorage": np.uint8,
}
STORAGE_MODULES = ("torch", "torch.cuda", "torch.storage")
SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8,
    "BOOL": np.bool_,
}


class CheckpointError(UserError):
    """A file that cannot be read as a checkpoint; the message names the file, the key or entry when known, and
    the problem."""


class _Opaque:
    """Base of the objects handed to a pickle: none of them accepts BUILD (`__setstate__`)."""

    __slots__ = ()
    what = "object"

    def __setstate__(self, state):
        raise _Refusal(f"BUILD (__setstate__) on {self.what} refused")

    def __repr__(self):
        return f"<{self.what}>"


class _Refusal(Exception):
    """Raised inside the unpickler; turned into a CheckpointError naming the file and the pickle."""


class _Global(_Opaque):
    """An allowed global: calls this module's replacement for it."""

    __slots__ = ("name", "fn")

    def __init__(self, name: str, fn: Callable):
        self.name, self.fn = name, fn

    @property
    def what(self):
        return self.name

    def __call__(self, *args):
        return self.fn(*args)


class _StorageType(_Opaque):
    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype):
        self.name, self.dtype = name, np.dtype(dtype)

    @property
    def what(self):
        return self.name


class _Storage(_Opaque):
    """A storage named by a persistent id: `key` is its data record, `offset` (elements) and `numel` its part."""

    __slots__ = ("key", "dtype", "offset", "numel")
    what = "a storage"

    def __init__(self, key: str, dtype: np.dtype, offset: int, numel: int):
        self.key, self.dtype, self.offset, self.numel = key, dtype, offset, numel


class _Tensor(_Opaque):
    """A tensor to be read later: `size` elements of `storage` from `offset` with `stride` (in elements)."""

    __slots__ = ("storage", "offset", "size", "stride")
    what = "a tensor"

    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


class _OrderedDict(collections.OrderedDict):
    """OrderedDict as `state_dict()` pickles it; its `_metadata` (module versions), set by BUILD, is dropped."""

    __slots__ = ()

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise _Refusal(f"BUILD on OrderedDict with a {type(state).__name__} state refused")


def _is_index(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < MAX_INDEX


def _index_tuple(x, what: str) -> tuple:
    """`x` as a shape or strides: at most MAX_DIMS non-negative integers below MAX_INDEX."""
    if not (isinstance(x, (tuple, list)) and len(x) <= MAX_DIMS and all(_is_index(v) for v in x)):
        raise _Refusal(f"{what} {str(x)[:80]} is not a tuple of at most {MAX_DIMS} non-negative integers")
    return tuple(x)


def _shape(x, what: str) -> tuple:
    """`x` as a shape; its non-zero sizes multiply to less than MAX_INDEX (numpy checks even empty shapes)."""
    shape = _index_tuple(x, what)
    if math.prod(n for n in shape if n) >= MAX_INDEX:
        raise _Refusal(f"{what} {str(x)[:80]} has too many elements")
    return shape


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None) -> _Tensor:
    if not isinstance(storage, _Storage):
        raise _Refusal(f"_rebuild_tensor_v2 got a {type(storage).__name__} instead of a storage")
    if not _is_index(storage_offset):
        raise _Refusal(f"tensor storage offset {str(storage_offset)[:80]} is out of range")
    size, stride = _shape(size, "tensor size"), _index_tuple(stride, "tensor stride")
    if len(size) != len(stride):
        raise _Refusal(f"tensor size {size} and stride {stride} differ in length")
    return _Tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None) -> _Tensor:
    if not isinstance(data, _Tensor):
        raise _Refusal(f"_rebuild_parameter got a {type(data).__name__} instead of a tensor")
    return data


ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): _OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}


class _Unpickler(pickle._Unpickler):
    """Unpickler with the allow-list; collects the storages that persistent ids declare (key -> _Storage).

    It derives from the pure-Python implementation: the C one grows its memo table to the largest index a pickle
    names (LONG_BINPUT takes 32 bits), so five crafted bytes make it allocate and clear tens of GB. Pickles of
    state dicts are small, so the Python implementation's speed does not matter.
    """

    def __init__(self, file, storages: dict[str, _Storage]):
        super().__init__(file, encoding="utf-8")
        self.storages = storages

    def find_class(self, module, name):
        if (module, name) in ALLOWED_GLOBALS:
            return _Global(f"{module}.{name}", ALLOWED_GLOBALS[(module, name)])
        if module in STORAGE_MODULES and isinstance(name, str) and name.endswith("Storage"):
            if name not in STORAGE_DTYPES:
                raise _Refusal(f"unknown storage type {module}.{name}")
            return _StorageType(f"{module}.{name}", STORAGE_DTYPES[name])
        raise _Refusal(f"refused global {f'{module}.{name}'[:200]}: only tensors, storages and OrderedDict are "
                       f"allowed")

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or len(pid) not in (5, 6) or pid[0] not in ("storage", b"storage"):
            raise _Refusal(f"unsupported persistent id {str(pid)[:80]}: only storages are allowed")
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType):
            raise _Refusal(f"unknown storage type {str(storage_type)[:80]!r} for storage {str(key)[:80]!r}")
        if not isinstance(key, str) or not _is_index(numel):
            raise _Refusal(f"malformed storage id {str(pid)[:80]}")
        root = self.storages.setdefault(key, _Storage(key, storage_type.dtype, 0, numel))
        view = pid[5] if len(pid) == 6 else None
        return root if view is None else _storage_view(root, view)


def _storage_view(root: _Storage, view) -> _Storage:
    """A legacy storage view: (view key, offset, numel) into `root`."""
    if not (isinstance(view, tuple) and len(view) == 3 and _is_index(view[1]) and _is_index(view[2])):
        raise _Refusal(f"malformed storage view {str(view)[:80]} of storage {root.key!r}")
    return _Storage(root.key, root.dtype, view[1], view[2])


def _unpickle(file, source: str, what: str, storages: dict[str, _Storage], invalid: str | None = None):
    """One restricted pickle from `file`; a malformed one raises CheckpointError(`invalid` or a description)."""
    try:
        return _Unpickler(file, storages).load()
    except _Refusal as err:
        raise CheckpointError(f"{source}: {what}: {err}; nothing from the file was executed") from None
    except Exception as err:  # any failure of a malformed pickle
        detail = invalid or f"{what} is not a valid pickle ({type(err).__name__}: {err})"
        raise CheckpointError(f"{source}: {detail}") from None


def _not_a_checkpoint(source: str) -> CheckpointError:
    return CheckpointError(f"{source}: {NOT_A_CHECKPOINT}")


def _map(path: Path) -> mmap.mmap:
    """A read-only map of the whole file; closed when no LazyArray over it is referenced any more."""
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


# ---- zip format

def _open_zip_state_dict(path: Path, source: str, which: str | None, log) -> dict[str, LazyArray]:
    with _open_zip(path, source) as zf:
        infos = {info.filename: info for info in zf.infolist()}
        prefix = _zip_prefix(infos, source)
        byteorder = _zip_byteorder(zf, infos, prefix, source)
        pkl = _read_entry(zf, infos, prefix + "data.pkl", source)
        obj = _unpickle(io.BytesIO(pkl), source, prefix + "data.pkl", {})
        sd = _choose(obj, which, source, log)
        mm = _map(path)

        def locate(key: str) -> tuple:
            name = f"{prefix}data/{key}"
            if name not in infos:
                raise CheckpointError(f"{source}: storage {key!r} has no record {name}")
            info = infos[name]
            if info.compress_type != zipfile.ZIP_STORED:  # torch.save never compresses; read such entries now
                return _read_entry(zf, infos, name, source), 0, info.file_size
            return mm, _entry_data_offset(mm, info, source), info.file_size

        return _lazy_arrays(sd, locate, byteorder, source)


def _open_zip(path: Path, source: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except Exception as err:  # zipfile reports corruption with many exception types
        raise CheckpointError(f"{source}: truncated or corrupt zip archive ({type(err).__name__}: {err})") from None


def _zip_prefix(infos: dict, source: str) -> str:
    pickles = sorted((n for n in infos if n == "data.pkl" or n.endswith("/data.pkl")), key=len)
    if not pickles:
        raise CheckpointError(f"{source}: zip archive without data.pkl: not a PyTorch checkpoint")
    prefix = pickles[0][: -len("data.pkl")]
    if prefix + "constants.pkl" in infos:
        raise CheckpointError(f"{source}: a TorchScript archive (torch.jit.save); save a state_dict instead")
    return prefix


def _zip_byteorder(zf: zipfile.ZipFile, infos: dict, prefix: str, source: str) -> str:
    if prefix + "byteorder" not in infos:
        return "little"
    byteorder = _read_entry(zf, infos, prefix + "byteorder", source).decode(errors="replace")
    if byteorder not in ("little", "big"):
        raise CheckpointError(f"{source}: unknown byte order {byteorder[:20]!r} in {prefix}byteorder")
    return byteorder


def _read_entry(zf: zipfile.ZipFile, infos: dict, name: str, source: str) -> bytes:
    try:
        return zf.read(infos[name])
    except Exception as err:  # bad CRC, truncation, unsupported compression, ...
        raise CheckpointError(f"{source}: cannot read zip entry {name} ({type(err).__name__}: {err})") from None


def _entry_data_offset(mm, info: zipfile.ZipInfo, source: str) -> int:
    """Where a stored entry's bytes start: after its 30-byte local header, file name and extra field."""
    start = info.header_offset
    if start + 30 > len(mm) or mm[start:start + 4] != b"PK\x03\x04":
        raise CheckpointError(f"{source}: zip entry {info.filename} has no local header at {start}")
    name_len, extra_len = struct.unpack_from("<HH", mm, start + 26)
    data = start + 30 + name_len + extra_len
    if data + info.file_size > len(mm):
        raise CheckpointError(f"{source}: zip entry {info.filename} runs past the end of the file (truncated)")
    return data


# ---- legacy format

def _open_legacy_state_dict(path: Path, source: str, which: str | None, log) -> dict[str, LazyArray]:
    """The pickles are read from the memory map, whose reads stop at the end of the file: a crafted length makes
    a file object allocate that much first."""
    storages: dict[str, _Storage] = {}
    mm = _map(path)
    if _unpickle(mm, source, "first pickle", {}, invalid=NOT_A_CHECKPOINT) != LEGACY_MAGIC:
        raise _not_a_checkpoint(source)
    if _unpickle(mm, source, "protocol version", {}) != LEGACY_PROTOCOL:
        raise CheckpointError(f"{source}: unsupported legacy protocol version (expected {LEGACY_PROTOCOL})")
    sys_info = _unpickle(mm, source, "sys_info", {})
    obj = _unpickle(mm, source, "object pickle", storages)
    keys = _unpickle(mm, source, "storage key list", {})
    sd = _choose(obj, which, source, log)
    little = not isinstance(sys_info, dict) or sys_info.get("little_endian", True)
    byteorder = "little" if little else "big"
    offsets = _legacy_storage_offsets(mm, mm.tell(), keys, storages, byteorder, source)

    def locate(key: str) -> tuple:
        return mm, *offsets[key]

    return _lazy_arrays(sd, locate, byteorder, source)


def _legacy_storage_offsets(mm, pos: int, keys, storages: dict, byteorder: str, source: str) -> dict:
    """key -> (byte offset, nbytes) of each storage: an 8-byte element count, then the elements."""
    if not isinstance(keys, list) or sorted(keys, key=str) != sorted(storages):
        raise CheckpointError(f"{source}: the storage key list does not match the storages the pickle uses")
    offsets = {}
    for key in keys:
        if pos + 8 > len(mm):
            raise CheckpointError(f"{source}: storage {key!r}: file truncated before its data")
        (count,) = struct.unpack_from("<q" if byteorder == "little" else ">q", mm, pos)
        if count != storages[key].numel:
            raise CheckpointError(f"{source}: storage {key!r} holds {count} elements, the pickle says "
                                  f"{storages[key].numel}")
        nbytes = count * storages[key].dtype.itemsize
        if pos + 8 + nbytes > len(mm):
            raise CheckpointError(f"{source}: storage {key!r}: file truncated inside its data")
        offsets[key] = (pos + 8, nbytes)
        pos += 8 + nbytes
    return offsets


# ---- choosing the state dict

def _is_state_dict(x) -> bool:
    return (isinstance(x, dict) and len(x) > 0 and all(isinstance(k, str) for k in x)
            and all(isinstance(v, _Tensor) for v in x.values()))


def _strip_prefix(sd: dict) -> dict:
    """`sd` without the prefixes that wrapping modules add to every key (DDP, torch.compile, in any nesting)."""
    while prefix := next((p for p in STRIPPED_PREFIXES if all(k.startswith(p) for k in sd)), None):
        sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _kind(sd: dict) -> str | None:
    return next((kind for kind, marker in KIND_MARKERS.items() if marker in sd), None)


def _state_dicts(obj, path: str = "", depth: int = 0, seen: set | None = None) -> list[tuple[str, dict]]:
    """(dotted path, state dict) of every dict of tensors nested in dicts, shallowest first; a dict reached twice
    (the memo lets a pickle share one object many times) is visited once."""
    seen = set() if seen is None else seen
    if not isinstance(obj, dict) or id(obj) in seen:
        return []
    seen.add(id(obj))
    if _is_state_dict(obj):
        return [(path, _strip_prefix(obj))]
    if depth == NESTING_DEPTH:
        return []
    children = [(f"{path}.{k}" if path else str(k), v) for k, v in obj.items() if isinstance(k, (str, int))]
    nested = [e for p, v in children for e in _state_dicts(v, p, depth + 1, seen)]
    return sorted(nested, key=lambda e: e[0].count("."))


def _describe(obj) -> str:
    if isinstance(obj, _Tensor):
        return "a single tensor"
    if isinstance(obj, dict):
        return f"a dict (keys: {', '.join(str(k)[:40] for k in list(obj)[:8])})"
    return f"a {type(obj).__name__}"


def _choose(obj, which: str | None, source: str, log) -> dict[str, _Tensor]:
    """The state dict to load: `obj` itself, or the nested one `which` asks for (with None: VAR, then VQ-VAE)."""
    entries = _state_dicts(obj)
    if not entries:
        raise CheckpointError(f"{source}: holds {_describe(obj)}; found no state dict (a dict whose values are all "
                              f"tensors) in it")
    if entries[0][0] == "":
        _check_kind(entries[0][1], which, source)
        return entries[0][1]
    wanted = _matching(entries, which)
    if not wanted:
        found = ", ".join(f"{p} ({KIND_NAMES[_kind(sd)]})" for p, sd in entries)
        raise CheckpointError(f"{source}: no {KIND_NAMES[which] if which else 'VAR or VQ-VAE'} state dict found; "
                              f"state dicts found: {found}")
    others = "".join(f", {p}" for p, _ in wanted[1:])
    log(f"{source}: using nested entry {wanted[0][0]}" + (f" (also matching: {others[2:]})" if others else ""))
    return wanted[0][1]


def _matching(entries: list[tuple[str, dict]], which: str | None) -> list[tuple[str, dict]]:
    for kind in (which,) if which else KIND_MARKERS:
        matches = [e for e in entries if _kind(e[1]) == kind]
        if matches:
            return matches
    return entries if which is None and len(entries) == 1 else []


def _check_kind(sd: dict, which: str | None, source: str) -> None:
    kind = _kind(sd)
    if which and kind and kind != which:
        raise CheckpointError(f"{source}: holds a {KIND_NAMES[kind]} state dict, not a {KIND_NAMES[which]} one")


# ---- lazy arrays

def _lazy_arrays(sd: dict[str, _Tensor], locate, byteorder: str, source: str) -> dict[str, LazyArray]:
    """Every tensor, checked against its storage now and read later; `locate(storage key)` gives (buffer, byte
    offset, nbytes)."""
    return {key: _lazy_array(key, tensor, locate, byteorder, source) for key, tensor in sd.items()}


def _progress(total: int, source: str) -> tqdm:
    """A byte progress bar on stderr, shown only for large files on a terminal."""
    quiet = total < PROGRESS_MIN_BYTES or not sys.stderr.isatty()
    return tqdm(total=total, unit="B", unit_scale=True, desc=Path(source).name, disable=quiet)


def _lazy_array(key: str, t: _Tensor, locate, byteorder: str, source: str) -> LazyArray:
    """Tensor `key` as a strided view of its storage, after checking that the storage holds every element it
    addresses."""
    dtype = t.storage.dtype
    if 0 in t.size:
        return LazyArray(t.size, dtype, lambda: np.empty(t.size, dtype))
    buf, start, nbytes = locate(t.storage.key)
    available = min(nbytes // dtype.itemsize, t.storage.offset + t.storage.numel)
    extent = t.storage.offset + t.offset + 1 + sum((n - 1) * s for n, s in zip(t.size, t.stride))
    if extent > available:
        raise CheckpointError(f"{source}: tensor {key!r} needs {extent} elements of storage {t.storage.key!r}, "
                              f"which holds {available}")
    if math.prod(t.size) > t.storage.numel:
        raise CheckpointError(f"{source}: tensor {key!r} has more elements ({math.prod(t.size)}) than its "
                              f"storage ({t.storage.numel}); expanded (stride-0) tensors are not supported")
    strides = [s * dtype.itemsize if n > 1 else 0 for n, s in zip(t.size, t.stride)]

    def view() -> np.ndarray:
        flat = np.frombuffer(buf, dtype, count=extent, offset=start)
        strided = np.lib.stride_tricks.as_strided(flat[t.storage.offset + t.offset:], t.size, strides, writeable=False)
        return _native(strided, byteorder)

    return LazyArray(t.size, dtype, view)


def _native(arr: np.ndarray, byteorder: str) -> np.ndarray:
    """`arr` read from a file in `byteorder`, in this machine's byte order."""
    unit = arr.dtype.itemsize // (2 if arr.dtype.kind == "c" else 1)
    if byteorder == sys.byteorder or unit == 1:
        return arr
    return arr.view(f"u{unit}").byteswap().view(arr.dtype)


# ---- safetensors

def _is_safetensors(path: Path, head: bytes) -> bool:
    """By suffix, or by content: an 8-byte header length that fits the file, then a JSON object."""
    if path.suffix == ".safetensors":
        return True
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return struct.unpack_from("<Q", head)[0] + 8 <= path.stat().st_size


def _open_safetensors(path: Path, source: str) -> dict[str, LazyArray]:
    mm = _map(path)
    header, data_start = _safetensors_header(mm, source)
    return {key: _safetensors_array(mm, data_start, key, entry, source)
            for key, entry in header.items() if key != "__metadata__"}


def _safetensors_header(mm, source: str) -> tuple[dict, int]:
    if len(mm) < 8:
        raise CheckpointError(f"{source}: not a safetensors file (shorter than its 8-byte header length)")
    (length,) = struct.unpack_from("<Q", mm)
    if 8 + length > len(mm):
        raise CheckpointError(f"{source}: safetensors header length {length} runs past the end of the file")
    try:
        header = json.loads(bytes(mm[8:8 + length]))
    except ValueError as err:
        raise CheckpointError(f"{source}: safetensors header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{source}: safetensors header is not a JSON object")
    return header, 8 + length


def _safetensors_array(mm, data_start: int, key: str, entry, source: str) -> LazyArray:
    try:
        dtype = np.dtype(SAFETENSORS_DTYPES[entry["dtype"]])
        shape = _shape(entry["shape"], "shape")
        begin, end = entry["data_offsets"]
    except (KeyError, TypeError, ValueError, _Refusal) as err:
        raise CheckpointError(f"{source}: safetensors entry {key!r} is malformed ({type(err).__name__}: "
                              f"{err})") from None
    count = math.prod(shape)
    if not (_is_index(begin) and _is_index(end) and end - begin == count * dtype.itemsize
            and data_start + end <= len(mm)):
        raise CheckpointError(f"{source}: safetensors entry {key!r}: data offsets {begin}..{end} do not hold "
                              f"{shape} {dtype} inside the file")
    return LazyArray(shape, dtype, lambda: np.frombuffer(mm, dtype, count=count, offset=data_start + begin)
                     .reshape(shape))


# ---- entry point

def load_state_dict(path, *, which: str | None = None, log=print) -> dict[str, np.ndarray]:
    """The state dict in `path` (torch.save zip or legacy format, or safetensors) as numpy arrays that own their
    memory: `open_state_dict`'s, every one read. Raises CheckpointError."""
    sd = open_state_dict(path, which=which, log=log)
    out = {}
    with _progress(sum(x.nbytes for x in sd.values()), str(path)) as bar:
        for key, lazy in sd.items():
            out[key] = lazy.materialise()
            bar.update(lazy.nbytes)
    return out


def open_state_dict(path, *, which: str | None = None, log=print) -> dict[str, LazyArray]:
    """The state dict in `path` (torch.save zip or legacy format, or safetensors) as LazyArrays over a memory map of
    the file: the pickle, the storage records and every tensor's extent are checked now, the values read only when
    an array is materialised.

    `which` ("var", "vae" or None) picks the state dict of a training checkpoint that nests several; with None the
    VAR one is preferred. `log` receives one line when a nested entry is used. Raises CheckpointError.
    """
    if which not in (None, *KIND_MARKERS):
        raise UserError(f"which must be None, 'var' or 'vae', not {which!r}")
    path = Path(path)
    source = str(path)
    head = _head(path, source)
    if _is_safetensors(path, head):
        sd = _open_safetensors(path, source)
        _check_kind(sd, which, source)
        return sd
    if head.startswith(b"PK"):
        return _open_zip_state_dict(path, source, which, log)
    return _open_legacy_state_dict(path, source, which, log)


def _head(path: Path, source: str) -> bytes:
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as err:
        raise CheckpointError(f"{source}: cannot open ({err.strerror or err})") from None
    if not head:
        raise CheckpointError(f"{source}: empty file, {NOT_A_CHECKPOINT}")
    if head[257:262] == b"ustar":
        raise CheckpointError(f"{source}: a tar-format checkpoint (torch < 0.4), not supported")
    return head
