"""Write a published-size VAR checkpoint with random weights in the reference's `torch.save` zip format, without torch.

    python -m bench.make_checkpoint --preset d30 --out DIR [--vae] [--seed 0]

Writes `DIR/var_{preset}.pth` (d30: 8.0 GB) and, with `--vae`, `DIR/vae_ch160v4096z32.pth` beside it: the state
dicts' keys, shapes and dtypes are the published checkpoints' (`tests/fixtures/published_keys/`), the values
Gaussian (std 0.02; integer buffers 0). The archive is what `torch.save(state_dict)` writes: `archive/data.pkl`, a
protocol-2 pickle of an OrderedDict of `torch._utils._rebuild_tensor_v2` calls on persistent-id storages, one
uncompressed `archive/data/<n>` record per tensor, `archive/byteorder` and `archive/version`. Tensors are generated
and written one at a time, so this needs memory for the largest tensor only. For conversion benchmarks
(`bench.convert_memory`); nothing here can generate meaningful images.
"""
from __future__ import annotations

import argparse
import json
import math
import struct
import sys
import zipfile
from pathlib import Path

import numpy as np

from amskv_jax.errors import UserError

KEYS = Path(__file__).parent.parent / "tests" / "fixtures" / "published_keys"
PRESETS = ("d16", "d20", "d24", "d30", "d36")
VAE_NAME = "vae_ch160v4096z32"
STORAGES = {"torch.float32": ("FloatStorage", np.float32), "torch.int64": ("LongStorage", np.int64)}


def published_keys(name: str) -> list[tuple[str, tuple[int, ...], str]]:
    """[(key, shape, torch dtype)] of a published state dict: `var_d30`, `vae_ch160v4096z32`, ..."""
    return [(key, tuple(shape), dtype) for key, shape, dtype in json.loads((KEYS / f"{name}.json").read_text())["keys"]]


def _str(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data  # BINUNICODE


def _int(n: int) -> bytes:
    if not 0 <= n < 2**31:
        raise UserError(f"{n} does not fit a BININT")
    return b"J" + struct.pack("<i", n)


def _tuple(items: list[bytes]) -> bytes:
    return b"(" + b"".join(items) + b"t"  # MARK ... TUPLE


def _global(module: str, name: str) -> bytes:
    return f"c{module}\n{name}\n".encode()


def _tensor_pickle(storage_key: str, shape: tuple[int, ...], dtype: str) -> bytes:
    """`_rebuild_tensor_v2(<storage>, 0, shape, contiguous stride, False, OrderedDict())`, as torch pickles it."""
    strides = [math.prod(shape[i + 1:]) for i in range(len(shape))]
    storage_id = _tuple([_str("storage"), _global("torch", STORAGES[dtype][0]), _str(storage_key), _str("cpu"),
                         _int(math.prod(shape))]) + b"Q"  # BINPERSID
    args = [storage_id, _int(0), _tuple([_int(n) for n in shape]), _tuple([_int(s) for s in strides]), b"\x89",
            _global("collections", "OrderedDict") + b")R"]
    return _global("torch._utils", "_rebuild_tensor_v2") + _tuple(args) + b"R"


def state_dict_pickle(keys: list[tuple[str, tuple[int, ...], str]]) -> bytes:
    """The data.pkl of an OrderedDict whose i-th tensor lives in storage record `str(i)`."""
    items = b"".join(_str(key) + _tensor_pickle(str(i), shape, dtype) for i, (key, shape, dtype) in enumerate(keys))
    return b"\x80\x02" + _global("collections", "OrderedDict") + b")R(" + items + b"u."


def write_checkpoint(path: Path, keys: list[tuple[str, tuple[int, ...], str]], seed: int = 0) -> int:
    """Write a zip-format checkpoint of random tensors with these keys; returns its size in bytes."""
    rng = np.random.default_rng(seed)
    prefix = "archive/"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        zf.writestr(prefix + "data.pkl", state_dict_pickle(keys))
        zf.writestr(prefix + "byteorder", "little")
        for i, (_key, shape, dtype) in enumerate(keys):
            np_dtype = STORAGES[dtype][1]
            if np.issubdtype(np_dtype, np.floating):
                values = rng.standard_normal(shape, dtype=np_dtype) * np_dtype(0.02)
            else:
                values = np.zeros(shape, np_dtype)
            with zf.open(f"{prefix}data/{i}", "w", force_zip64=True) as f:
                f.write(values.tobytes())
        zf.writestr(prefix + "version", "3\n")
    return path.stat().st_size


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.make_checkpoint", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=PRESETS, required=True, help="published VAR size")
    parser.add_argument("--out", required=True, help="directory to write var_PRESET.pth into (created)")
    parser.add_argument("--vae", action="store_true", help=f"also write {VAE_NAME}.pth beside it")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = [f"var_{args.preset}"] + [VAE_NAME] * args.vae
    for name in names:
        size = write_checkpoint(out / f"{name}.pth", published_keys(name), seed=args.seed)
        print(f"wrote {out / name}.pth: {size / 1e9:.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
