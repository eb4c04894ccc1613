"""`bench.fidelity --frontier`: every family on held-out NLL (of `--limit` images) with both memory shares, the
searches written and loadable, the plot drawn; bad input refused in one line with nothing written."""
from __future__ import annotations

import json
import re

import pytest

import bench.fidelity
import bench.frontier
from amskv_jax.cache import cache_bytes
from amskv_jax.config import get_preset
from amskv_jax.policies import AMSKV, FullCache, PerLayerPrecision
from conftest import random_model
from test_search import error_line

TINY = get_preset("tiny").var  # 2 layers, scales 1 2 3 4: 14 slots per layer, 30 tokens in the reference's cache


@pytest.fixture
def tiny_model(monkeypatch):
    monkeypatch.setattr(bench.fidelity, "load_model", lambda spec, verify=None: random_model("tiny"))


class Stopped(Exception):
    """The run stopped (as by a signal) after some policies were scored."""


def test_the_frontier_covers_every_family_with_both_memory_shares(tmp_path, capsys, emoji_folder, tiny_model,
                                                                   monkeypatch):
    out = tmp_path / "frontier"
    argv = ["--frontier", "--model", "tiny", "--images", str(emoji_folder), "--search-images", str(emoji_folder),
            "--search-budgets", "0.7,1", "--search-samples", "3", "--fid-samples", "0", "--batch", "4",
            "--limit", "3", "--precisions", "int4", "--out", str(out)]
    # stopped after 5 policies' NLL, then resumed: the searches and those 5 are not measured again
    calls = {"nll": 0, "search": 0}
    real_nll, real_search = bench.frontier.policy_nll, bench.frontier.search_calibrations

    def counted(stage, real, stop_after=None):
        def run(*a, **k):
            if calls[stage] == stop_after:
                raise Stopped
            calls[stage] += 1
            return real(*a, **k)
        return run

    monkeypatch.setattr(bench.frontier, "policy_nll", counted("nll", real_nll, stop_after=5))
    monkeypatch.setattr(bench.frontier, "search_calibrations", counted("search", real_search))
    with pytest.raises(Stopped):
        bench.fidelity.main(argv)
    assert calls == {"nll": 5, "search": 2}  # capacity, then capacity+precision: two budgets each
    saved = json.loads((out / "progress.json").read_text())["done"]
    assert len(saved["nll"]) == 5 and len(saved["search"]) == 4
    monkeypatch.setattr(bench.frontier, "policy_nll", counted("nll", real_nll))
    assert bench.fidelity.main(argv) == 0
    assert calls["search"] == 2 and "(5 done before)" in capsys.readouterr().out
    report = json.loads((out / "frontier.json").read_text())
    assert calls["nll"] == len(report["points"])  # each policy scored once over both runs
    assert "held-out: 3 of the 4 images" in report["setting"]  # --limit: 3 of the 4 held-out images, evenly spaced
    points = {p["name"]: p for p in report["points"]}
    families = {p["family"] for p in points.values()}
    assert families == {"full", "amskv (paper)", "sliding", "condensed", "scalebudget", "ladder", "searched",
                        "full (low-bit)", "amskv (paper)+int4", "mikv (int4)", "searched (capacity and precision)"}
    assert points["full"]["delta"] == 0 and points["full"]["share"] == 1
    assert points["full"]["reference_share"] == pytest.approx(28 / 60)  # 2 × 14 slots of 2 × 30 tokens
    assert points["condensed-c2"]["share"] == pytest.approx(10 / 28)
    assert points["searched-0.7"]["share"] <= 0.7 and points["searched-1"]["delta"] == pytest.approx(0, abs=1e-9)
    assert points["condensed-c1"]["delta"] > 0  # a lossy cache costs held-out NLL
    search = json.loads((out / "search-0.7.json").read_text())
    assert list(AMSKV.from_calibration(search).budgets) == search["search"]["budgets"]
    # low-bit storage: the share counts bytes (bf16 compute, float32 scales), the searched bound holds
    int4 = PerLayerPrecision(FullCache(), ("int4", "int4")).layout(TINY)
    bf16 = FullCache().layout(TINY)
    expected = cache_bytes(int4, 1, TINY.num_heads, TINY.head_dim) / cache_bytes(bf16, 1, TINY.num_heads, TINY.head_dim)
    assert points["full+int4"]["share"] == pytest.approx(expected) and expected < 1
    assert points["full+int4"]["slots"] == points["full"]["slots"]
    mixed = json.loads((out / "mixed-0.7.json").read_text())
    assert points["mixed-0.7"]["share"] <= 0.7 and mixed["search"]["bytes"] <= mixed["search"]["byte_bound"]
    assert points["mixed-0.7"]["bytes"] == mixed["search"]["bytes"]
    assert AMSKV.from_calibration(mixed).layout(TINY).storages(None) == tuple(mixed["search"]["kv_dtypes"])
    # MiKV: AMS-KV's slots plus the dropped scales in int4, between the two in bytes
    paper = next(name for name, point in points.items() if point["family"] == "amskv (paper)")
    assert points[paper]["share"] < points[f"mikv-{paper.removeprefix('amskv-')}-int4"]["share"] < 1
    table = (out / "frontier.md").read_text()
    assert "| searched | searched-0.7 |" in table and "vs reference (incl. current scale)" in table
    assert (out / "frontier.png").stat().st_size > 10_000
    # a run with another setting is refused in one line, the saved run untouched
    before = (out / "progress.json").read_bytes()
    assert bench.fidelity.main([*argv, "--cfg", "2"]) == 2
    line = error_line(capsys.readouterr().err, False)
    assert re.search(r"progress.json: a frontier run with other cfg; rerun with its flags", line), line
    assert (out / "progress.json").read_bytes() == before


@pytest.mark.parametrize(
    "extra, message, usage",
    [
        (["--search-budgets", "0.25,1.5"],
         r"--search-budgets: budget must be a fraction of the full cache in \(0, 1\], got 1.5", True),
        (["--search-budgets", "0"],
         r"--search-budgets: budget must be a fraction of the full cache in \(0, 1\], got 0.0", True),
        (["--search-budgets", "x"], r"--search-budgets: could not convert string to float: 'x'", True),
        (["--search-budgets", ","], r"--search-budgets: no budget in ','", True),
        (["--search-images", "EMPTY"], "no images", False),
        (["--precisions", "int3"], r"--precisions: precision 'int3': a search chooses among quantised storage "
                                   r"dtypes; allowed: int8, float8_e4m3fn, int4, int2", True),
    ],
)
def test_bad_input_fails_in_one_line_and_writes_nothing(tmp_path, capsys, emoji_folder, tiny_model, extra, message,
                                                        usage):
    empty = tmp_path / "empty"
    (empty / "faces").mkdir(parents=True)
    out = tmp_path / "out"
    argv = ["--frontier", "--model", "tiny", "--images", str(emoji_folder), "--fid-samples", "0", "--out", str(out)]
    argv += [str(empty) if x == "EMPTY" else x for x in extra]
    try:
        code = bench.fidelity.main(argv)
    except SystemExit as exit_:  # argparse's errors in the command line itself
        code = exit_.code
    line = error_line(capsys.readouterr().err, usage)
    assert code == 2 and line.startswith("python -m bench.fidelity: error:")
    assert re.search(message, line), line
    assert not out.exists()
