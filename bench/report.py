"""The tables of `python -m bench.run`: its plain records (`bench.measure`) as the markdown of results.md."""
from __future__ import annotations

MIB = 2**20


def _table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def _mib(x: int) -> str:
    return f"{x / MIB:,.3f}"


def _ratio(x) -> str:
    return "–" if x is None else f"{x:.3f}"


def _num(x, fmt: str) -> str:
    return format(x, fmt) if isinstance(x, (int, float)) else str(x)


def _finite(row: dict) -> str:
    if row["status"] != "ok":
        return "–"
    return "yes" if row.get("nonfinite_scale") is None else f"NO, from scale {row['nonfinite_scale']}"


def format_report(results: dict) -> str:
    """results.md: the run's settings, then one table per measurement (memory, attention, generation, max batch)."""
    meta = results["meta"]
    peak = meta["peak_flops"]
    out = [
        "# bench.run results",
        "",
        f"suite {meta['suite']}; device {meta['device_kind']} ({meta['backend']}), jax {meta['jax_version']}; "
        f"dtype {meta['dtype']}; attention impl {meta['impl']} → {meta['impl_resolved']}; {meta['reps']} timed "
        f"repetitions after a warm-up, policies interleaved; peak "
        f"{_num(peak / 1e12, '.0f') + ' TFLOP/s bf16' if isinstance(peak, float) else peak}; "
        f"wall {meta.get('wall_s', 0):.1f} s.",
        "",
        f"Compile times: {meta.get('compile_cache', 'persistent compilation cache off')} (a program loaded from the "
        "cache times its loading, not its compilation; `--no-compile-cache` measures compilation).",
        "",
        "Weights: " + "; ".join(f"{k}: {v}" for k, v in meta["weights"].items()) + ".",
        "",
        "Policies: " + "; ".join(f"{m}/{p}: {d}" for m, s in meta["policy_settings"].items() for p, d in s.items())
        + ".",
        "",
        "Every ratio is policy ÷ full cache at the same model and batch.",
        "",
        "## 1. KV-cache bytes and compiled memory",
        "",
        "cache: the exact K/V buffers (`amskv_jax.memory`); peak KV: plus one layer's fresh K/V of the largest scale; "
        "argument / output / temp: `compile().memory_analysis()` of the whole `generate` program (temp holds the "
        "cache and every intermediate); MiB.",
        "",
    ]
    rows = []
    for r in results["memory"]:
        comp = r["compiled"]
        cells = [_mib(comp[k]) for k in ("argument_bytes", "output_bytes", "temp_bytes")] if isinstance(comp, dict) \
            else [comp, "", ""]
        rows.append([r["model"], r["batch"], r["policy"], f"{r['slots']:,}", _mib(r["cache_bytes"]),
                     _ratio(r["cache_ratio"]), _mib(r["peak_kv_bytes"]), _ratio(r["peak_kv_ratio"]), *cells,
                     _ratio(r["temp_ratio"])])
    out += [_table(["model", "batch", "policy", "slots", "cache MiB", "÷ full", "peak KV MiB", "÷ full",
                    "argument MiB", "output MiB", "temp MiB", "temp ÷ full"], rows), ""]

    out += ["## 2. Attention time per scale", "",
            "`cached_attention` over each layer's cache with its read mask, summed over the layers; ms, median "
            "[min–max] of the repetitions. read: cache slots the scale's queries read, over all layers; cache: the "
            "slots allocated. Every path reads only the live slots, so the time follows read, not cache.", ""]
    rows = []
    for r in results["attention"]:
        t = (f"{r['median_ms']:.3f} [{r['min_ms']:.3f}–{r['max_ms']:.3f}]" if r["status"] == "ok" else r["status"])
        rows.append([r["model"], r["batch"], f"{r['scale']} ({r['pn']}×{r['pn']})", r["policy"],
                     f"{r['read_slots']:,}", f"{r['capacity_slots']:,}", t, _ratio(r["ratio_vs_full"])])
    out += [_table(["model", "batch", "scale", "policy", "read slots", "cache slots", "ms", "÷ full"], rows), ""]

    out += ["## 3. End-to-end generation", "",
            f"`generate` (cfg {meta['cfg']}, top-p {meta['top_p']}, top-k 900 capped at the vocabulary, VQ-VAE "
            "decode included); s, median [min–max]; compile time separate. speed ÷ full is images/s ÷ the full "
            "cache's (above 1 is faster). MFU: model FLOPs (2·params·L per row, 2 rows for guidance, plus "
            "attention) per second ÷ the device's bf16 peak. finite: whether every scale's logits were finite in the "
            "warm-up run; otherwise the first scale that was not (1-based): the weights are untrained or damaged, "
            "the images garbage and only the times mean anything.", ""]
    rows = []
    for r in results["generate"]:
        t = f"{r['median_s']:.4f} [{r['min_s']:.4f}–{r['max_s']:.4f}]" if r["status"] == "ok" else r["status"]
        ref = r["torch_reference"]
        if isinstance(ref, dict):
            ref = f"{ref['median_s']:.4f} ({ref['device']})" if ref["status"] == "ok" else ref["status"]
        mfu = r["mfu"]
        rows.append([r["model"], r["batch"], r["policy"], _num(r.get("compile_s", "–"), ".2f"), t,
                     _num(r.get("images_per_s", "–"), ".2f"), _ratio(r["speedup_vs_full"]),
                     f"{100 * mfu:.2f}%" if isinstance(mfu, float) else mfu, ref, _finite(r)])
    out += [_table(["model", "batch", "policy", "compile s", "s / batch", "images/s", "speed ÷ full", "MFU",
                    "torch reference s", "finite"], rows), ""]

    out += ["## 4. Largest batch that fits", "",
            "Real allocations: the program is compiled and run at doubling batch sizes until out-of-memory, then "
            "bisected to within 1/16.", ""]
    rows = [[r["model"], r["policy"], r["max_batch"], _ratio(r.get("ratio_vs_full")),
             ", ".join(f"{b}{'' if ok else ' OOM'}" for b, ok in r["tried"]) or "–"] for r in results["max_batch"]]
    out += [_table(["model", "policy", "max batch", "÷ full", "tried"], rows), ""]
    return "\n".join(out)
