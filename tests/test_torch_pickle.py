"""convert.torch_pickle: every checkpoint format loads to the same arrays, hostile pickles are refused without
running anything, broken files give a CheckpointError naming the file (and the key), and mutated checkpoints
(hypothesis) only ever load or raise CheckpointError.

Hand-made pickles are written opcode by opcode (`_g`, `_s`, `_tuple`, ...) so that the tests need no torch.
"""
from __future__ import annotations

import contextlib
import json
import pickle
import pickletools
import shutil
import signal
import struct
import subprocess
import zipfile
from collections import Counter
from datetime import timedelta
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from convert.torch_pickle import CheckpointError, load_state_dict

FIXTURES = Path(__file__).parent / "fixtures"
TINY = FIXTURES / "tiny"
QUIET = {"log": lambda *_: None}


# ---- pickle opcodes and containers

def _g(module: str, name: str) -> bytes:
    """GLOBAL module.name"""
    return f"c{module}\n{name}\n".encode()


def _s(text: str) -> bytes:
    """BINUNICODE text"""
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def _short(text: str) -> bytes:
    """SHORT_BINUNICODE text (protocol 4)"""
    return b"\x8c" + bytes([len(text.encode())]) + text.encode()


def _i(n: int) -> bytes:
    """BININT n"""
    return b"J" + struct.pack("<i", n)


def _tuple(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def _dict(entries: dict[str, bytes]) -> bytes:
    return b"}(" + b"".join(_s(k) + v for k, v in entries.items()) + b"u"


def _tensor(size, stride, offset=0, storage="0", numel=12, storage_type="FloatStorage", legacy=False) -> bytes:
    """torch._utils._rebuild_tensor_v2(<storage>, offset, size, stride, False, OrderedDict())"""
    pid = [_s("storage"), _g("torch", storage_type), _s(storage), _s("cpu"), _i(numel)] + [b"N"] * legacy
    args = [_tuple(*pid) + b"Q", _i(offset), _tuple(*map(_i, size)), _tuple(*map(_i, stride)), b"\x89",
            _g("collections", "OrderedDict") + b")R"]
    return _g("torch._utils", "_rebuild_tensor_v2") + _tuple(*args) + b"R"


def _state_dict(entries: dict[str, bytes]) -> bytes:
    """A protocol-2 pickle of OrderedDict(entries), as state_dict() saves it."""
    items = b"".join(_s(k) + v for k, v in entries.items())
    return b"\x80\x02" + _g("collections", "OrderedDict") + b")R(" + items + b"u."


def _write_zip(path: Path, pkl: bytes, storages: dict[str, bytes] | None = None, byteorder=b"little",
               extra: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", pkl)
        zf.writestr("archive/byteorder", byteorder)
        for name, data in {**{f"data/{k}": v for k, v in (storages or {}).items()}, **(extra or {})}.items():
            zf.writestr(f"archive/{name}", data)
    return path


def _legacy_header(little_endian: bool = True) -> bytes:
    """The three pickles before the object: magic number, protocol version, sys_info."""
    sys_info = {"protocol_version": 1001, "little_endian": little_endian,
                "type_sizes": {"short": 2, "int": 4, "long": 4}}
    return b"".join(pickle.dumps(x, 2) for x in (0x1950A86A20F9469CFC6C, 1001, sys_info))


def _write_legacy(path: Path, pkl: bytes, storages: dict[str, np.ndarray] | None = None, big=False) -> Path:
    storages = storages or {}
    order = ">" if big else "<"
    data = b"".join(struct.pack(f"{order}q", a.size) + a.astype(a.dtype.newbyteorder(order)).tobytes()
                    for a in storages.values())
    path.write_bytes(_legacy_header(not big) + pkl + pickle.dumps(list(storages), 2) + data)
    return path


def _zip_entries(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {name: zf.read(name) for name in zf.namelist()}


def _rezip(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return path


def _error(path, **kwargs) -> str:
    with pytest.raises(CheckpointError) as info:
        load_state_dict(path, **QUIET, **kwargs)
    assert str(path) in str(info.value)
    return str(info.value)


# ---- the fixtures load to the same arrays

@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    return load_state_dict(TINY / "var.pth")


@pytest.mark.parametrize("name", ["var_legacy.pth", "var_ckpt_wrapped.pth", "var.safetensors"])
def test_formats_load_the_same_arrays(name, reference):
    sd = load_state_dict(TINY / name, **QUIET)
    assert sd.keys() == reference.keys()  # safetensors stores keys sorted
    for key, value in reference.items():
        assert sd[key].dtype == value.dtype and sd[key].shape == value.shape, key
        np.testing.assert_array_equal(sd[key], value, err_msg=key)


def test_bf16_checkpoint_is_the_f32_one_rounded(reference):
    sd = load_state_dict(TINY / "var_bf16.pth")
    assert list(sd) == list(reference)
    for key, value in reference.items():
        if value.dtype == np.float32:
            assert sd[key].dtype == ml_dtypes.bfloat16, key
            np.testing.assert_array_equal(sd[key].view(np.uint16), value.astype(ml_dtypes.bfloat16).view(np.uint16))
        else:
            np.testing.assert_array_equal(sd[key], value)


def test_wrapped_checkpoint_names_the_entry_it_uses(reference):
    lines = []
    sd = load_state_dict(TINY / "var_ckpt_wrapped.pth", which="var", log=lines.append)
    assert lines == [f"{TINY / 'var_ckpt_wrapped.pth'}: using nested entry trainer.var_wo_ddp"]
    assert list(sd) == list(reference)


@pytest.mark.parametrize("config", ["tiny", "tiny-saln", "ladder256"])
def test_var_checkpoints_match_keys_json(config):
    sd = load_state_dict(FIXTURES / config / "var.pth")
    expected = json.loads((FIXTURES / config / "keys.json").read_text())["var"]
    assert [(k, list(v.shape), f"torch.{v.dtype}") for k, v in sd.items()] == [tuple(e) for e in expected]


def test_float16_vqvae_matches_keys_json():
    sd = load_state_dict(TINY / "vae_f16.safetensors", which="vae")
    expected = json.loads((TINY / "keys.json").read_text())["vae"]
    assert sorted((k, list(v.shape)) for k, v in sd.items()) == sorted((k, shape) for k, shape, _ in expected)
    assert {k for k, v in sd.items() if v.dtype != np.float16} == {"quantize.ema_vocab_hit_SV"}


def test_arrays_own_their_memory(tmp_path, reference):
    path = shutil.copy(TINY / "var.pth", tmp_path / "var.pth")
    sd = load_state_dict(path)
    Path(path).write_bytes(b"\0" * 100)
    for key, value in sd.items():
        assert value.flags.writeable and value.flags.c_contiguous, key
        np.testing.assert_array_equal(value, reference[key])


# ---- hand-made checkpoints: views, byte order, wrappers

STORAGE = np.arange(12, dtype=np.float32)
VIEWS = {  # key: (size, stride, offset) into STORAGE, and the numpy equivalent
    "matrix": ((3, 4), (4, 1), 0, STORAGE.reshape(3, 4)),
    "transposed": ((4, 3), (1, 4), 0, STORAGE.reshape(3, 4).T),
    "strided": ((5,), (2,), 2, STORAGE[2::2]),
    "scalar": ((), (), 7, STORAGE[7]),
    "empty": ((0, 3), (3, 1), 0, STORAGE[:0].reshape(0, 3)),
}


@pytest.mark.parametrize("container, big", [("zip", False), ("zip", True), ("legacy", False), ("legacy", True)])
def test_views_are_rebuilt_from_offset_size_and_stride(tmp_path, container, big):
    legacy = container == "legacy"
    pkl = _state_dict({k: _tensor(size, stride, offset, legacy=legacy) for k, (size, stride, offset, _) in
                       VIEWS.items()})
    if legacy:
        path = _write_legacy(tmp_path / "views.pth", pkl, {"0": STORAGE}, big=big)
    else:
        data = STORAGE.astype(">f4" if big else "<f4").tobytes()
        path = _write_zip(tmp_path / "views.pth", pkl, {"0": data}, byteorder=b"big" if big else b"little")
    sd = load_state_dict(path)
    for key, (*_, expected) in VIEWS.items():
        assert sd[key].dtype == np.float32 and sd[key].shape == expected.shape, key
        np.testing.assert_array_equal(sd[key], expected, err_msg=key)


def test_legacy_storage_views(tmp_path):
    pid = _tuple(_s("storage"), _g("torch", "FloatStorage"), _s("root"), _s("cpu"), _i(12),
                 _tuple(_s("view"), _i(4), _i(6))) + b"Q"
    tensor = _g("torch._utils", "_rebuild_tensor_v2") + _tuple(pid, _i(1), _tuple(_i(3)), _tuple(_i(1)), b"\x89",
                                                               b"N") + b"R"
    sd = load_state_dict(_write_legacy(tmp_path / "view.pth", _state_dict({"w": tensor}), {"root": STORAGE}))
    np.testing.assert_array_equal(sd["w"], STORAGE[5:8])


def test_parameters_and_prefixes(tmp_path):
    parameter = _g("torch._utils", "_rebuild_parameter") + _tuple(_tensor((12,), (1,)), b"\x88", b"N") + b"R"
    pkl = _state_dict({"module._orig_mod.word_embed.weight": parameter,
                       "module._orig_mod.head.bias": _tensor((2,), (1,))})
    sd = load_state_dict(_write_zip(tmp_path / "p.pth", pkl, {"0": STORAGE.tobytes()}))
    assert list(sd) == ["word_embed.weight", "head.bias"]
    np.testing.assert_array_equal(sd["word_embed.weight"], STORAGE)


def test_nested_entries_are_chosen_by_their_keys(tmp_path):
    var = _dict({"word_embed.weight": _tensor((12,), (1,))})
    vae = _dict({"quantize.embedding.weight": _tensor((3, 4), (4, 1))})
    pkl = b"\x80\x02" + _dict({"epoch": _i(3), "trainer": _dict({"var_wo_ddp": var, "vae_local": vae})}) + b"."
    path = _write_zip(tmp_path / "ckpt.pth", pkl, {"0": STORAGE.tobytes()})
    for which, entry, key in [(None, "var_wo_ddp", "word_embed.weight"), ("var", "var_wo_ddp", "word_embed.weight"),
                              ("vae", "vae_local", "quantize.embedding.weight")]:
        lines = []
        assert list(load_state_dict(path, which=which, log=lines.append)) == [key]
        assert lines == [f"{path}: using nested entry trainer.{entry}"]


def test_safetensors_bfloat16_and_detection_by_content(tmp_path):
    values = np.array([[1.5, -2.0], [0.25, 3.0]], ml_dtypes.bfloat16)
    header = json.dumps({"__metadata__": {"format": "np"},
                         "w": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 8]}}).encode()
    path = tmp_path / "w.bin"
    path.write_bytes(struct.pack("<Q", len(header)) + header + values.tobytes())
    sd = load_state_dict(path)
    assert sd["w"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(sd["w"].view(np.uint16), values.view(np.uint16))


# ---- hostile pickles

def _payloads(marker: Path) -> dict[str, tuple[bytes, str, bool]]:
    """name: (pickle, the global it must be refused for, whether plain pickle.loads runs the command)."""
    cmd = f"touch {marker}"
    call_eval = _g("builtins", "eval") + _s(f"__import__('os').system({cmd!r})") + b"\x85R"
    popen_args = b"](" + _s("touch") + _s(str(marker)) + b"e\x85"
    return {
        "GLOBAL+REDUCE p0": (b"cos\nsystem\n(V" + cmd.encode() + b"\ntR.", "os.system", True),
        "GLOBAL+REDUCE p2": (b"\x80\x02cposix\nsystem\n" + _s(cmd) + b"\x85R.", "posix.system", True),
        "eval p2": (b"\x80\x02" + call_eval + b".", "builtins.eval", True),
        "STACK_GLOBAL p4": (b"\x80\x04" + _short("subprocess") + _short("Popen") + b"\x93" + popen_args + b"R.",
                            "subprocess.Popen", True),
        "INST p0": (b"(V" + cmd.encode() + b"\nios\nsystem\n.", "os.system", True),
        "OBJ p1": (b"(cos\nsystem\nV" + cmd.encode() + b"\no.", "os.system", True),
        "NEWOBJ p2": (b"\x80\x02" + _g("subprocess", "Popen") + popen_args + b"\x81.", "subprocess.Popen", False),
        "getattr chain p2": (b"\x80\x02" + _g("builtins", "getattr") + _g("builtins", "__import__") + _s("os")
                             + b"\x85R" + _s("system") + b"\x86R" + _s(cmd) + b"\x85R.", "builtins.getattr", True),
        "BUILD on refused class p2": (b"\x80\x02" + _g("functools", "partial") + _g("os", "system") + b"\x85\x81"
                                      + _tuple(_g("os", "system"), _tuple(_s(cmd)), b"N", b"N") + b"b.",
                                      "functools.partial", False),
        "inside a state dict p2": (_state_dict({"w": call_eval}), "builtins.eval", True),
        "inside a persistent id p2": (b"\x80\x02" + _tuple(_s("storage"), call_eval) + b"Q.", "builtins.eval", True),
        "BUILD on a tensor": (_state_dict({"w": _tensor((3,), (1,)) + _dict({"__class__": b"N"}) + b"b"}),
                              "BUILD (__setstate__) on a tensor", False),
        "BUILD on an allowed global": (b"\x80\x02" + _g("torch._utils", "_rebuild_tensor_v2")
                                       + _dict({"__code__": b"N"}) + b"b.",
                                       "BUILD (__setstate__) on torch._utils._rebuild_tensor_v2", False),
        "BUILD slot state on OrderedDict": (b"\x80\x02" + _g("collections", "OrderedDict") + b")RN"
                                            + _dict({"__class__": b"N"}) + b"\x86b.", "BUILD on OrderedDict", False),
        "BUILD on a storage type": (b"\x80\x02" + _g("torch", "FloatStorage") + _dict({"dtype": b"N"}) + b"b.",
                                    "BUILD (__setstate__) on torch.FloatStorage", False),
    }


PAYLOAD_NAMES = list(_payloads(Path("marker")))


def _container(kind: str, path: Path, pkl: bytes) -> Path:
    if kind == "zip":
        return _write_zip(path, pkl, {"0": STORAGE.tobytes()})
    if kind == "legacy":
        return _write_legacy(path, pkl)
    path.write_bytes(pkl)
    return path


@pytest.mark.parametrize("container", ["zip", "legacy", "bare pickle"])
@pytest.mark.parametrize("payload", PAYLOAD_NAMES)
def test_hostile_pickles_are_refused_without_running(tmp_path, payload, container):
    marker = tmp_path / "marker"
    pkl, refused, _ = _payloads(marker)[payload]
    message = _error(_container(container, tmp_path / "evil.pth", pkl))
    assert refused in message
    assert not marker.exists()


@pytest.mark.parametrize("payload", [name for name, (_, _, live) in _payloads(Path("m")).items() if live])
def test_hostile_payloads_are_live_under_plain_pickle(tmp_path, payload):
    """Control: the payloads above do run a command when loaded by pickle itself (which may fail afterwards)."""
    marker = tmp_path / "marker"
    with contextlib.suppress(pickle.UnpicklingError):
        result = pickle.loads(_payloads(marker)[payload][0])
        if isinstance(result, subprocess.Popen):
            result.wait()
    assert marker.exists()


# ---- broken input

def test_missing_and_non_checkpoint_files(tmp_path):
    assert "cannot open" in _error(tmp_path / "missing.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    assert "empty file" in _error(tmp_path / "empty.pth")
    (tmp_path / "random.pth").write_bytes(np.random.default_rng(0).bytes(4096))
    assert "not a PyTorch checkpoint" in _error(tmp_path / "random.pth")
    (tmp_path / "notes.txt").write_text("just some text\nnothing to see\n")
    assert "not a PyTorch checkpoint" in _error(tmp_path / "notes.txt")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as zf:
        zf.writestr("readme.txt", "hello")
    assert "without data.pkl" in _error(tmp_path / "other.zip")


def test_which_must_be_known():
    with pytest.raises(ValueError, match="which"):
        load_state_dict(TINY / "var.pth", which="unet")


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_zip(tmp_path, keep):
    data = (TINY / "var.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: int(len(data) * keep)])
    assert "truncated or corrupt zip" in _error(tmp_path / "cut.pth")


def test_truncated_legacy(tmp_path):
    data = (TINY / "var_legacy.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[:-100])
    assert "truncated" in _error(tmp_path / "cut.pth")


def test_storage_record_shorter_than_its_tensor(tmp_path):
    entries = _zip_entries(TINY / "var.pth")
    entries["var/data/0"] = entries["var/data/0"][:256]
    message = _error(_rezip(tmp_path / "short.pth", entries))
    assert "'pos_start'" in message and "storage '0'" in message


@pytest.mark.parametrize("size, stride, problem", [
    ((13,), (1,), "needs 13 elements"),
    ((3, 4), (5, 1), "needs 14 elements"),
    ((100,), (0,), "expanded"),
])
def test_tensor_beyond_its_storage(tmp_path, size, stride, problem):
    pkl = _state_dict({"ok": _tensor((12,), (1,)), "bad.weight": _tensor(size, stride)})
    message = _error(_write_zip(tmp_path / "big.pth", pkl, {"0": STORAGE.tobytes()}))
    assert "'bad.weight'" in message and problem in message


def test_missing_storage_record_and_bad_byteorder(tmp_path):
    pkl = _state_dict({"w": _tensor((12,), (1,), storage="7")})
    assert "storage '7' has no record archive/data/7" in _error(_write_zip(tmp_path / "a.pth", pkl))
    pkl = _state_dict({"w": _tensor((12,), (1,))})
    path = _write_zip(tmp_path / "b.pth", pkl, {"0": STORAGE.tobytes()}, byteorder=b"middle")
    assert "unknown byte order 'middle'" in _error(path)


def test_unknown_storage_types(tmp_path):
    pkl = _state_dict({"w": _tensor((12,), (1,), storage_type="QInt8Storage")})
    assert "unknown storage type torch.QInt8Storage" in _error(_write_zip(tmp_path / "q.pth", pkl))
    pid = _tuple(_s("storage"), _s("FloatStorage"), _s("0"), _s("cpu"), _i(12)) + b"Q"
    pkl = _state_dict({"w": _g("torch._utils", "_rebuild_tensor_v2") + _tuple(pid, _i(0), _tuple(_i(12)),
                                                                             _tuple(_i(1))) + b"R"})
    assert "unknown storage type 'FloatStorage'" in _error(_write_zip(tmp_path / "s.pth", pkl))


def test_legacy_storage_count_mismatch(tmp_path):
    pkl = _state_dict({"w": _tensor((12,), (1,), numel=12, legacy=True)})
    assert "storage '0' holds 11 elements, the pickle says 12" in _error(
        _write_legacy(tmp_path / "l.pth", pkl, {"0": STORAGE[:11]}))


@pytest.mark.parametrize("obj, described", [
    (b"\x80\x02](" + _i(1) + _i(2) + b"e.", "holds a list;"),
    (b"\x80\x02" + _dict({"epoch": _i(3), "w": _tensor((12,), (1,))}) + b".", "holds a dict (keys: epoch, w);"),
    (b"\x80\x02" + _tensor((12,), (1,)) + b".", "holds a single tensor;"),
])
def test_pickles_that_are_not_state_dicts(tmp_path, obj, described):
    message = _error(_write_zip(tmp_path / "x.pth", obj, {"0": STORAGE.tobytes()}))
    assert described in message and "found no state dict" in message


def test_wrong_kind_of_state_dict():
    assert "holds a VAR state dict, not a VQ-VAE one" in _error(TINY / "var.pth", which="vae")
    assert "holds a VAR state dict, not a VQ-VAE one" in _error(TINY / "var.safetensors", which="vae")
    assert "no VQ-VAE state dict found; state dicts found: trainer.var_wo_ddp (VAR)" in _error(
        TINY / "var_ckpt_wrapped.pth", which="vae")


def test_torchscript_archive(tmp_path):
    path = _write_zip(tmp_path / "ts.pt", _state_dict({}), extra={"constants.pkl": b"\x80\x02]."})
    assert "TorchScript" in _error(path)


def test_broken_safetensors(tmp_path):
    (tmp_path / "a.safetensors").write_bytes(b"\x10\0\0\0\0\0\0\0{not json at all")
    assert "not valid JSON" in _error(tmp_path / "a.safetensors")
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    (tmp_path / "b.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    assert "entry 'w'" in _error(tmp_path / "b.safetensors")
    header = json.dumps({"w": {"dtype": "F7", "shape": [1], "data_offsets": [0, 1]}}).encode()
    (tmp_path / "c.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0")
    assert "entry 'w' is malformed" in _error(tmp_path / "c.safetensors")


# ---- mutated checkpoints (hypothesis)

FUZZ = settings(deadline=timedelta(seconds=5), database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FUZZ_CASES: Counter = Counter()  # (strategy, outcome) -> cases run


class _Hang(BaseException):
    """Raised by the alarm; a BaseException so that no `except Exception` in the loader can swallow it."""


@contextlib.contextmanager
def _time_limit(seconds: float):
    def alarm(signum, frame):
        raise _Hang(f"load_state_dict ran for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _check_load(path: Path, strategy: str) -> None:
    """Loads to a dict of str -> ndarray, or raises CheckpointError; nothing else, and within 20 s."""
    with _time_limit(20):
        try:
            sd = load_state_dict(path, **QUIET)
        except CheckpointError:
            FUZZ_CASES[strategy, "CheckpointError"] += 1
            return
    assert isinstance(sd, dict)
    assert all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in sd.items())
    FUZZ_CASES[strategy, "loaded"] += 1


def _zip_regions(path: Path) -> list[range]:
    """Byte ranges of var.pth worth mutating: data.pkl, local headers, the central directory, and anywhere."""
    data = path.read_bytes()
    with zipfile.ZipFile(path) as zf:
        infos, central = zf.infolist(), range(zf.start_dir, len(data))

    def data_offset(info):
        name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
        return info.header_offset + 30 + name_len + extra_len

    pkl = next(i for i in infos if i.filename.endswith("data.pkl"))
    headers = [range(i.header_offset, data_offset(i)) for i in infos[:8]]
    return [range(data_offset(pkl), data_offset(pkl) + pkl.file_size), central, *headers, range(len(data))]


def _legacy_regions(path: Path) -> list[range]:
    """The five pickles before the storages' data, and anywhere."""
    with open(path, "rb") as f:
        for _ in range(5):
            list(pickletools.genops(f))
        return [range(f.tell()), range(path.stat().st_size)]


def _flips(regions: list[range]):
    offsets = st.sampled_from(regions).flatmap(lambda r: st.integers(r.start, r.stop - 1))
    return st.lists(st.tuples(offsets, st.integers(1, 255)), min_size=1, max_size=8)


def _flip(data: bytes, flips) -> bytes:
    out = bytearray(data)
    for offset, mask in flips:
        out[offset] ^= mask
    return bytes(out)


def _run_fuzz(strategy_name: str, test, max_examples: int) -> None:
    before = sum(n for (name, _), n in FUZZ_CASES.items() if name == strategy_name)
    settings(FUZZ, max_examples=max_examples)(test)()
    outcomes = {outcome: n for (name, outcome), n in FUZZ_CASES.items() if name == strategy_name}
    ran = sum(outcomes.values()) - before
    print(f"{strategy_name}: {ran} cases ({outcomes})")
    assert ran >= max_examples


@pytest.mark.parametrize("name, regions, max_examples", [
    ("var.pth", _zip_regions, 30), ("var_legacy.pth", _legacy_regions, 30)])
def test_fuzz_flipped_bytes(tmp_path, name, regions, max_examples):
    data = (TINY / name).read_bytes()
    path = tmp_path / name

    @given(flips=_flips(regions(TINY / name)))
    def check(flips):
        path.write_bytes(_flip(data, flips))
        _check_load(path, f"flip {name}")

    _run_fuzz(f"flip {name}", check, max_examples)


def test_fuzz_mutated_pickle_in_a_valid_zip(tmp_path):
    """Mutations of data.pkl behind a correct CRC, so that they reach the unpickler."""
    entries = _zip_entries(TINY / "var.pth")
    pkl = entries["var/data.pkl"]
    opcodes = sorted({ord(c) for c in "().0123456789:=NQRSTVX]abcdeghijklmopqrstu}\x80\x81\x85\x86\x87\x88\x89\x8a"
                      "\x8c\x8d\x93\x94\x95"})
    edit = st.tuples(st.sampled_from(["replace", "insert", "delete"]), st.integers(0, len(pkl) - 1),
                     st.one_of(st.sampled_from(opcodes), st.integers(0, 255)))

    @given(edits=st.lists(edit, min_size=1, max_size=4))
    def check(edits):
        mutated = bytearray(pkl)
        for kind, offset, value in edits:
            offset = min(offset, len(mutated) - 1)
            if kind == "replace":
                mutated[offset] = value
            elif kind == "insert":
                mutated.insert(offset, value)
            else:
                del mutated[offset]
        _check_load(_rezip(tmp_path / "mutated.pth", {**entries, "var/data.pkl": bytes(mutated)}), "pickle edits")

    _run_fuzz("pickle edits", check, 40)


def test_fuzz_truncated(tmp_path):
    files = {name: (TINY / name).read_bytes() for name in ("var.pth", "var_legacy.pth")}

    @given(name=st.sampled_from(sorted(files)), keep=st.floats(0, 1))
    def check(name, keep):
        data = files[name]
        (tmp_path / name).write_bytes(data[: int(len(data) * keep)])
        _check_load(tmp_path / name, "truncation")

    _run_fuzz("truncation", check, 25)


def test_fuzz_swapped_entries(tmp_path):
    entries = _zip_entries(TINY / "var.pth")
    names = list(entries)

    @given(i=st.integers(0, len(names) - 1), j=st.integers(0, len(names) - 1))
    def check(i, j):
        swapped = {**entries, names[i]: entries[names[j]], names[j]: entries[names[i]]}
        _check_load(_rezip(tmp_path / "swapped.pth", swapped), "swapped entries")

    _run_fuzz("swapped entries", check, 25)
