"""The plots of `python -m bench.run` (matplotlib, optional): K/V bytes read per scale, and images/s per batch."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def write_plots(results: dict, out: Path) -> list[str]:
    """Write OUT/kv_bytes_per_scale.png and OUT/images_per_s.png from `bench.measure`'s records; returns the file
    names written (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    models = results["meta"]["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, name in zip(axes[0], models, strict=True):
        rows = [r for r in results["kv_per_scale"] if r["model"] == name]
        top = max(r["allocated_bytes"] for r in rows)
        unit, div = next(((u, d) for u, d in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)) if top >= d), ("B", 1))
        for r in rows:
            line, = ax.plot(range(len(r["patch_nums"])), np.asarray(r["read_bytes"]) / div, marker="o",
                            label=f"{r['policy']} (allocated {r['allocated_bytes'] / div:,.1f} {unit}, dotted)")
            ax.axhline(r["allocated_bytes"] / div, color=line.get_color(), linestyle=":", linewidth=1)
            ax.set_xticks(range(len(r["patch_nums"])), [f"{pn}²" for pn in r["patch_nums"]])
            ax.set_title(f"{name}, batch {r['batch']}, {r['dtype']}")
        ax.set_xlabel("scale (tokens)")
        ax.set_ylabel(f"K/V read from the cache, all layers ({unit})")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "kv_bytes_per_scale.png", dpi=120)
    plt.close(fig)
    written.append("kv_bytes_per_scale.png")

    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, name in zip(axes[0], models, strict=True):
        rows = [r for r in results["generate"] if r["model"] == name and r["status"] == "ok"]
        for policy in results["meta"]["policies"]:
            pts = sorted((r["batch"], r["images_per_s"]) for r in rows if r["policy"] == policy)
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=policy)
        refs = sorted((r["batch"], r["images_per_s"]) for r in results["torch_reference"]
                      if r["model"] == name and r["status"] == "ok")
        if refs:
            ax.plot(*zip(*refs, strict=True), marker="x", linestyle="--", label="torch reference")
        ax.set_xscale("log", base=2)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("batch")
        ax.set_ylabel("images/s")
        ax.set_title(name)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "images_per_s.png", dpi=120)
    plt.close(fig)
    written.append("images_per_s.png")
    return written


