"""The checks that need several host CPU devices, in one process: conftest's `host_devices` fixture starts it with
`HOST_DEVICES` devices and reads what it saves. Each module below gets its own directory, out/<module>, for its
`on_host_devices(directory)`; one that raises leaves its traceback there (error.txt) for its tests to show, and the
others still run."""
from __future__ import annotations

import importlib
import sys
import traceback
from pathlib import Path

# test_sharding last: its command-line check replaces the model loader of this process
MODULES = ("test_attention", "test_lowbit", "test_lowering", "test_sharding")


def main(out: Path) -> None:
    for name in MODULES:
        directory = out / name
        directory.mkdir(parents=True)
        try:
            importlib.import_module(name).on_host_devices(directory)
        except Exception:  # noqa: BLE001 - saved for that module's tests; the other modules' checks still run
            (directory / "error.txt").write_text(traceback.format_exc())


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main(Path(sys.argv[1]))
