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

A run resumes where it stopped: each search, each policy's held-out NLL and each FID point is saved to
`DIR/progress.json` as soon as it is measured (`Progress`), and a rerun with the same flags and `--out` reuses them.

Memory is the cache's bytes against the full cache's, both with bfloat16 compute (quantised storage with its
float32 scales; as `amskv_jax.memory` counts them: the scale in flight excluded; for unquantised policies the slot
share) and, beside it, against the reference's concatenated bfloat16 cache (every scale, the current one included:
680 tokens per layer at 256px), the convention of the paper's figures.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from amskv_jax.cache import cache_bytes
from amskv_jax.calibrate import search_calibrations
from amskv_jax.errors import UserError
from amskv_jax.fidelity import FRONTIER_SEARCH_BUDGETS, frontier_families, policy_fidelity, reference_share
from amskv_jax.generate import default_top_k
from amskv_jax.nll import NLL, encode_images, evenly_spaced, model_images, policy_nll
from amskv_jax.policies import AMSKV, FullCache, MiKV, PerLayerPrecision

TARGET_SHARE = 0.25  # the 75% cut where FID and class accuracy are measured
PLOT_FLOOR = 0.01  # ΔNLL % drawn at this floor when at or below it (a log axis; lossless points sit on it)


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


class Progress:
    """What a frontier run has measured so far, in `DIR/progress.json`: the search records, each policy's held-out
    NLL (with the policy's description) and each FID point (with its sample count), saved after each one, so that a
    stopped run resumes where it stopped. `setting` (the flags that decide the figures) is saved with them; a
    directory holding a run with another setting is refused rather than mixed. The file is read as untrusted JSON."""

    STAGES = ("search", "nll", "fid")

    def __init__(self, out: Path, setting: dict):
        self.path, self.setting = out / "progress.json", setting
        self.done = {stage: {} for stage in self.STAGES}
        if not self.path.exists():
            return
        try:
            saved = json.loads(self.path.read_text())
            done = {stage: dict(saved["done"][stage]) for stage in self.STAGES}
            saved_setting = saved["setting"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{self.path}: not a frontier run's progress file ({type(e).__name__}: {e}); "
                            "remove it or use another --out") from None
        if saved_setting != setting:
            differ = sorted(k for k in setting.keys() | saved_setting.keys() if setting.get(k) != saved_setting.get(k))
            raise UserError(f"{self.path}: a frontier run with other {', '.join(differ)}; rerun with its flags to "
                            "resume it, or use another --out")
        self.done = done

    def __len__(self) -> int:
        return sum(len(entries) for entries in self.done.values())

    def get(self, stage: str, name: str, check: dict):
        """The saved value of `name` at `stage` when its entries in `check` match (else None: measure it again)."""
        entry = self.done[stage].get(name)
        return None if entry is None or any(entry.get(k) != v for k, v in check.items()) else entry["value"]

    def put(self, stage: str, name: str, value, check: dict) -> None:
        self.done[stage][name] = {**check, "value": value}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".json.partial")
        partial.write_text(json.dumps({"setting": self.setting, "done": self.done}, indent=1))
        os.replace(partial, self.path)  # a run stopped mid-write leaves the last complete file


def progress_setting(args) -> dict:
    """The flags that decide a frontier run's figures (not --batch, --search-budgets or --fid-samples: a rerun may
    change those; searches and FID points are keyed by budget and sample count)."""
    return {"model": str(args.model), "images": None if args.images is None else str(args.images),
            "limit": args.limit, "search_images": None if args.search_images is None else str(args.search_images),
            "search_samples": args.search_samples, "precisions": list(args.precisions), "cfg": args.cfg,
            "dtype": args.dtype, "seed": args.seed, "top_k": args.top_k, "top_p": args.top_p}


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


def measure_frontier(model, args, progress: Progress) -> tuple[list[Point], dict]:
    """Every family's points on held-out images, and what they were measured on ({"heldout", "calibration",
    "searches": the search records, "policies": {name: policy}}); what `progress` holds is reused, the rest saved
    to it as it is measured."""
    c = model.config.var
    images, labels, heldout = evenly_spaced(*model_images(model, args.images, "heldout"), args.limit)
    calib_images, calib_labels, calibration = model_images(model, args.search_images, "train")
    print(f"held-out: {heldout}; search on {min(args.search_samples, len(calib_images))} of {calibration}",
          flush=True)
    if len(progress):
        print(f"resuming {progress.path}: " + ", ".join(f"{len(progress.done[s])} {s}" for s in Progress.STAGES),
              flush=True)

    def search(precisions=()) -> list[dict]:
        """One record per budget: the saved ones read back, the others searched in one call (the images' scores
        shared between budgets) and each saved as soon as it is searched."""
        def name(budget: float) -> str:
            return f"{'mixed' if precisions else 'search'}-{budget:g}"

        def save(record: dict) -> None:
            if precisions:
                record["search"]["name"] = name(record["search"]["budget"])
            progress.put("search", name(record["search"]["budget"]), record, {})

        todo = [b for b in args.search_budgets if progress.get("search", name(b), {}) is None]
        if todo:
            search_calibrations(model, calib_images, calib_labels, todo, samples=args.search_samples,
                                batch=args.batch, dtype=args.dtype, model_name=args.model, source=calibration,
                                precisions=precisions, on_record=save)
        return [progress.get("search", name(b), {}) for b in args.search_budgets]

    searches = search()
    families = frontier_families(c, searches[0])
    families["searched"] = {f"searched-{record['search']['budget']:g}": AMSKV.from_calibration(record)
                            for record in searches}
    if args.precisions:
        mixed = search(precisions=args.precisions)
        searches += mixed
        families.update(precision_families(c, families, args.precisions))
        families["searched (capacity and precision)"] = {
            record["search"]["name"]: AMSKV.from_calibration(record) for record in mixed}
    policies = {"full": FullCache(), **{name: p for settings in families.values() for name, p in settings.items()}}
    family_of = {"full": "full", **{name: f for f, settings in families.items() for name in settings}}
    gt, x = encode_images(model, images)
    layouts = {name: policy.layout(c) for name, policy in policies.items()}
    checks = {name: {"describe": policy.describe()} for name, policy in policies.items()}
    todo = [name for name in layouts if progress.get("nll", name, checks[name]) is None]
    print(f"scoring {len(layouts)} policies on held-out NLL ({len(layouts) - len(todo)} done before)", flush=True)
    for name in todo:
        r, = policy_nll(model, {name: layouts[name]}, gt, x, labels, cfg=args.cfg, batch=args.batch,
                        dtype=args.dtype, progress=True).values()
        progress.put("nll", name, dataclasses.asdict(r), checks[name])
    results = {name: NLL(**{k: tuple(v) if isinstance(v, list) else v
                            for k, v in progress.get("nll", name, checks[name]).items()}) for name in layouts}
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


def with_sample_quality(model, args, points: list[Point], policies: dict, reference, progress: Progress
                        ) -> list[Point]:
    """`points` with FID and class accuracy for the full cache and each family's setting at the 75% cut, measured
    a policy at a time (the full cache with the first) and saved to `progress`."""
    chosen = sorted({p.name for p in at_cut(points)}, key=lambda name: (name != "full", name))
    labels = np.arange(args.fid_samples, dtype=np.int32) % model.config.var.num_classes
    print(f"FID and class accuracy, {args.fid_samples} samples each: {', '.join(chosen)}", flush=True)

    def check(name: str) -> dict:
        return {"describe": policies[name].describe(), "samples": args.fid_samples}

    todo = [name for name in chosen if progress.get("fid", name, check(name)) is None]
    groups = [todo[:2], *([name] for name in todo[2:])] if todo[:1] == ["full"] else [[name] for name in todo]
    for group in groups:
        measured = policy_fidelity(
            model, {name: policies[name] for name in group}, labels, jax.random.key(args.seed), batch=args.batch,
            cfg=args.cfg, top_k=default_top_k(model.config) if args.top_k is None else args.top_k, top_p=args.top_p,
            dtype=args.dtype, classifier=reference.classifier, real_features=reference.features, progress=True,
        )
        for name, result in measured.items():
            progress.put("fid", name, {"fid": result.fid, "accuracy": result.accuracy}, check(name))
    saved = {name: progress.get("fid", name, check(name)) for name in chosen}
    return [dataclasses.replace(p, **saved[p.name]) if p.name in saved else p for p in points]


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

    fig, ax = plt.subplots(figsize=(9.5, 4.8))
    tab20 = plt.get_cmap("tab20").colors
    colors, markers = tab20[::2] + tab20[1::2], "osD^vPXph<>"  # the 10 dark shades first, then their light pairs
    for i, family in enumerate(sorted({p.family for p in points} - {"full"})):  # a colour of its own per family
        mine = sorted((p for p in points if p.family == family), key=lambda p: p.share)
        searched = family.startswith("searched")
        style = (dict(marker="*", markersize=12, linewidth=2.2) if searched
                 else dict(marker=markers[i % len(markers)], markersize=5))
        ax.plot([100 * p.share for p in mine], [max(p.delta, PLOT_FLOOR) for p in mine], label=family,
                color=colors[i % len(colors)], **style)
    ax.axvline(100 * TARGET_SHARE, color="grey", linestyle=":", linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("cache, % of the full bfloat16 cache's bytes (in-flight scale excluded)")
    ax.set_ylabel(f"held-out ΔNLL vs the full cache, % (log; floor {PLOT_FLOOR})")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
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
