"""The memory–fidelity frontier: held-out ΔNLL of every policy family at several budgets (`bench.fidelity
--frontier`).

Measured (`measure_frontier`): the per-layer budgets searched on calibration images (the model's train split, or
`--search-images`) at each `--search-budgets` fraction, then every family's settings (`fidelity.frontier_families`)
and the searched policies scored by teacher-forced NLL on held-out images (the model's held-out split, or
`--images`), and FID and class accuracy of generated samples (`--fid-samples`, 0 to skip) for the full cache and
each family's setting nearest the 75% cut. Reported (`format_frontier`, `plot_frontier`): a table and a PNG.

With `--precisions int8,int4,int2` (the LLM KV toolbox on scales): the full cache and the paper's AMS-KV settings
with every layer in each low-bit storage, MiKV (each paper setting's dropped scales kept in that storage), and
searches that choose each layer's capacity *and* storage under one
byte bound (`calibrate --search --precisions`, saved as mixed-<budget>.json).

Memory is the cache's bytes against the full cache's, both with bfloat16 compute (quantised storage with its
float32 scales; as `amskv_jax.memory` counts them: the scale in flight excluded; for unquantised policies the slot
share) and, beside it, against the reference's concatenated bfloat16 cache (every scale, the current one included:
680 tokens per layer at 256px), the convention of the paper's figures.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from amskv_jax.cache import cache_bytes
from amskv_jax.calibrate import search_calibrations
from amskv_jax.fidelity import FRONTIER_SEARCH_BUDGETS, frontier_families, policy_fidelity, reference_share
from amskv_jax.generate import default_top_k
from amskv_jax.nll import encode_images, evenly_spaced, model_images, policy_nll
from amskv_jax.policies import AMSKV, FullCache, MiKV, PerLayerPrecision

TARGET_SHARE = 0.25  # the 75% cut where FID and class accuracy are measured


@dataclasses.dataclass(frozen=True)
class Point:
    """One policy on the frontier: its family, name and setting, slots and bytes (and the full cache's; the share
    against the reference's concatenated cache), held-out mean NLL unguided and guided with their change against
    the full cache (%), and FID / class accuracy when measured. Bytes are per image row of a bfloat16-compute cache,
    quantised storage with its float32 scales (`cache.cache_bytes`); without quantised layers the byte share is the
    slot share."""

    family: str
    name: str
    setting: str
    slots: int
    full_slots: int
    reference_share: float
    nll: float
    guided_nll: float
    delta: float
    guided_delta: float
    bytes: int
    full_bytes: int
    fid: float | None = None
    accuracy: float | None = None

    @property
    def share(self) -> float:
        return self.bytes / self.full_bytes


def row_bytes(layout, config) -> int:
    """Bytes per image row of a layout's cache with bfloat16 compute (its layers' own storage, if any)."""
    return cache_bytes(layout, 1, config.num_heads, config.head_dim, jnp.bfloat16)


def precision_families(config, families: dict, precisions: tuple[str, ...]) -> dict:
    """Low-bit storage crossed with slots (KIVI's scheme at int8 / int4 / int2): the full cache and the paper's
    AMS-KV settings with every layer in each storage of `precisions`; and MiKV on scales: each paper setting with
    the scales it drops kept in each storage instead."""
    out = {"full (low-bit)": {f"full+{d}": PerLayerPrecision(FullCache(), (d,) * config.depth) for d in precisions}}
    for d in precisions:
        out[f"amskv (paper)+{d}"] = {f"{name}+{d}": PerLayerPrecision(policy, (d,) * config.depth)
                                     for name, policy in families["amskv (paper)"].items()}
    for d in precisions:
        out[f"mikv ({d})"] = {f"mikv-{name.removeprefix('amskv-')}-{d}": MiKV(policy, d)
                              for name, policy in families["amskv (paper)"].items()}
    return out


def measure_frontier(model, args) -> tuple[list[Point], dict]:
    """Every family's points on held-out images, and what they were measured on ({"heldout", "calibration",
    "searches": the search records, "policies": {name: policy}})."""
    c = model.config.var
    images, labels, heldout = evenly_spaced(*model_images(model, args.images, "heldout"), args.limit)
    calib_images, calib_labels, calibration = model_images(model, args.search_images, "train")
    print(f"held-out: {heldout}; search on {min(args.search_samples, len(calib_images))} of {calibration}",
          flush=True)
    search = functools.partial(
        search_calibrations, model, calib_images, calib_labels, args.search_budgets, samples=args.search_samples,
        batch=args.batch, dtype=args.dtype, model_name=args.model, source=calibration,
    )
    searches = search()
    families = frontier_families(c, searches[0])
    families["searched"] = {f"searched-{record['search']['budget']:g}": AMSKV.from_calibration(record)
                            for record in searches}
    if args.precisions:
        mixed = search(precisions=args.precisions)
        for record in mixed:
            record["search"]["name"] = f"mixed-{record['search']['budget']:g}"
        searches += mixed
        families.update(precision_families(c, families, args.precisions))
        families["searched (capacity and precision)"] = {
            record["search"]["name"]: AMSKV.from_calibration(record) for record in mixed}
    policies = {"full": FullCache(), **{name: p for settings in families.values() for name, p in settings.items()}}
    family_of = {"full": "full", **{name: f for f, settings in families.items() for name in settings}}
    gt, x = encode_images(model, images)
    layouts = {name: policy.layout(c) for name, policy in policies.items()}
    print(f"scoring {len(layouts)} policies on held-out NLL", flush=True)
    results = policy_nll(model, layouts, gt, x, labels, cfg=args.cfg, batch=args.batch, dtype=args.dtype,
                         progress=True)
    full, full_bytes = results["full"], row_bytes(layouts["full"], c)
    points = [
        Point(family_of[name], name, policies[name].describe(), r.slots, r.full_slots,
              reference_share(r.full_slots, c) * r.share, r.mean_unguided, r.mean_guided,
              100 * (r.mean_unguided / full.mean_unguided - 1), 100 * (r.mean_guided / full.mean_guided - 1),
              bytes=row_bytes(layouts[name], c), full_bytes=full_bytes)
        for name, r in results.items()
    ]
    return points, {"heldout": heldout, "calibration": calibration, "searches": searches, "policies": policies}


def at_cut(points: list[Point]) -> list[Point]:
    """The full cache and, per family, the setting whose share is nearest TARGET_SHARE (ties: the smaller)."""
    chosen = {}
    for p in points:
        key = (abs(p.share - TARGET_SHARE), p.share)
        if p.family not in chosen or key < chosen[p.family][0]:
            chosen[p.family] = (key, p)
    return [p for _, p in chosen.values()]


def with_sample_quality(model, args, points: list[Point], policies: dict, reference) -> list[Point]:
    """`points` with FID and class accuracy for the full cache and each family's setting at the 75% cut."""
    chosen = {p.name for p in at_cut(points)}
    labels = np.arange(args.fid_samples, dtype=np.int32) % model.config.var.num_classes
    print(f"FID and class accuracy, {args.fid_samples} samples each: {', '.join(sorted(chosen))}", flush=True)
    measured = policy_fidelity(
        model, {name: policies[name] for name in chosen}, labels, jax.random.key(args.seed), batch=args.batch,
        cfg=args.cfg, top_k=default_top_k(model.config) if args.top_k is None else args.top_k, top_p=args.top_p,
        dtype=args.dtype, classifier=reference.classifier, real_features=reference.features, progress=True,
    )
    return [dataclasses.replace(p, fid=measured[p.name].fid, accuracy=measured[p.name].accuracy)
            if p.name in measured else p for p in points]


def format_frontier(points: list[Point]) -> str:
    """Markdown, one row per policy, families together in increasing memory."""
    lines = [
        "| family | policy | cache vs full (bytes) | vs reference (incl. current scale) | held-out NLL | ΔNLL % | "
        "guided ΔNLL % | FID | class accuracy | setting |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in sorted(points, key=lambda p: (p.family != "full", p.family, p.share, p.name)):
        fid = "" if p.fid is None else f"{p.fid:.3f}"
        accuracy = "" if p.accuracy is None else f"{p.accuracy:.3f}"
        lines.append(
            f"| {p.family} | {p.name} | {100 * p.share:.1f}% | {100 * p.reference_share:.1f}% | {p.nll:.4f} | "
            f"{p.delta:+.1f}% | {p.guided_delta:+.1f}% | {fid} | {accuracy} | {p.setting} |"
        )
    return "\n".join(lines)


def plot_frontier(points: list[Point], path: Path, title: str) -> None:
    """Held-out ΔNLL % against the share of the full cache, one line per family (searched points as stars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for family in sorted({p.family for p in points} - {"full"}):
        mine = sorted((p for p in points if p.family == family), key=lambda p: p.share)
        searched = family.startswith("searched")
        style = dict(marker="*", markersize=12, linewidth=2.2) if searched else dict(marker="o")
        ax.plot([100 * p.share for p in mine], [max(p.delta, 0.1) for p in mine], label=family, **style)
    ax.axvline(100 * TARGET_SHARE, color="grey", linestyle=":", linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("cache, % of the full bfloat16 cache's bytes (in-flight scale excluded)")
    ax.set_ylabel("held-out ΔNLL vs the full cache, % (log; floor 0.1)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_frontier(args, model, points: list[Point], sources: dict) -> None:
    """frontier.md, frontier.json, frontier.png and the searches (search-<budget>.json, loadable with
    `--calibration`) under args.out."""
    args.out.mkdir(parents=True, exist_ok=True)
    header = (f"model `{args.model}` ({model.description}); held-out: {sources['heldout']}; searched on "
              f"{sources['calibration']} ({args.search_samples} of them at most); guidance cfg {args.cfg}, "
              f"{args.dtype}, jax {jax.__version__} on {jax.devices()[0].device_kind}; FID and class accuracy: "
              f"{args.fid_samples} samples for the full cache and each family's setting nearest a "
              f"{100 * (1 - TARGET_SHARE):.0f}% cut")
    table = format_frontier(points)
    (args.out / "frontier.md").write_text(f"{header}\n\n{table}\n")
    (args.out / "frontier.json").write_text(json.dumps(
        {"setting": header, "points": [{**dataclasses.asdict(p), "share": p.share} for p in points]}, indent=1))
    for record in sources["searches"]:
        (args.out / f"{search_name(record)}.json").write_text(json.dumps(record, indent=1))
    plot_frontier(points, args.out / "frontier.png", f"{args.model}: memory-fidelity frontier (held-out)")
    print(table, flush=True)
    print(f"wrote {args.out}/frontier.md, frontier.json, frontier.png, "
          + ", ".join(f"{search_name(r)}.json" for r in sources["searches"]))


def search_name(record: dict) -> str:
    """A search's file name (no suffix): search-<budget>, or mixed-<budget> when precision was searched too."""
    return record["search"].get("name", f"search-{record['search']['budget']:g}")


def default_search_budgets() -> str:
    return ",".join(f"{b:g}" for b in FRONTIER_SEARCH_BUDGETS)
