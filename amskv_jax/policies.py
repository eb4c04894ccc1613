"""Cache policies: each decides which earlier scales a layer's queries read, and so the cache layout.

A policy is a frozen, hashable dataclass with one method, `reads(layer, si, depth, patch_nums)`, returning the
earlier scales that scale si's queries read from the cache at that layer (their own scale is always attended, from
its fresh K/V). `layout(config)` validates the settings against the model and turns them into the static
`CacheLayout` (per-layer capacities, write segments, read masks) that the model and kernels consume; a scale no later
query reads is never written, and slots of scales no later query reads are reused.

* `FullCache`: every earlier scale (the reference's behaviour; 424 slots per layer at 256px).
* `AMSKV`, the paper's form: a token budget per layer (cache slots), the `condensed_scales` coarsest scales locked
  in, whole scales evicted first-in-first-out when the next would not fit (`fifo_reads`). Cache-demanding layers
  (calibration, `calibrate.py`) get a large budget C_max, the others C_min (`AMSKV.two_level`); or every layer's
  budget comes from the NLL search (`calibrate --search`, `search.py`). The paper decides during generation; here
  the choice is made offline, because a static-shape program sizes its buffers when it compiles.
* Baselines: `SlidingWindow` (recent scales, no condensed ones), `CondensedOnly`, `ScaleBudget` (ScaleKV-like:
  "drafter" layers keep a large window, "refiner" layers a small one) and `Ladder` (LaCache-like: each layer a
  window of the history shifted with its depth).
* Precision (the LLM KV toolbox on scales): `PerLayerPrecision` (KVTuner-like: another policy's slots, each layer in
  a storage dtype of its own) and `MiKV` (another policy's slots, the scales it drops kept in a low-precision tier
  instead of dropped).

`POLICIES` names the settings the command lines and benchmarks compare; `policy_from_name(name, config,
calibration)` builds one for a model. Calibration files (`calibrate.py` writes them) are read here with
`read_calibration`; one made for another depth or ladder is refused.
"""
from __future__ import annotations

import abc
import dataclasses
import itertools
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from amskv_jax.cache import CacheLayout, build_layout, with_low_tier
from amskv_jax.config import VARConfig
from amskv_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Policy(abc.ABC):
    """Base class: subclasses override `reads`, `describe` and (for their settings) `validate`."""

    @abc.abstractmethod
    def reads(self, layer: int, si: int, depth: int, patch_nums: tuple[int, ...]) -> tuple[int, ...]:
        """The earlier scales (each < si) whose K/V scale si's queries read at `layer`."""

    @abc.abstractmethod
    def describe(self) -> str:
        """One line for tables and logs."""

    def validate(self, depth: int, patch_nums: tuple[int, ...]) -> None:
        """Raise ValueError for settings that do not fit a model of this depth and ladder."""

    def storages(self) -> tuple[str | None, ...] | None:
        """Each layer's own K/V storage dtype (None: the cache's); None when no layer has one."""
        return None

    def layout(self, config: VARConfig) -> CacheLayout:
        self.validate(config.depth, config.patch_nums)
        return build_layout(
            lambda layer, si: self.reads(layer, si, config.depth, config.patch_nums),
            config.depth,
            config.patch_nums,
            policy=repr(self),
            kv_dtypes=self.storages(),
        )


def _kept(si: int, condensed: int, window: int | None) -> tuple[int, ...]:
    """Scales < si that are condensed (index < condensed) or among the `window` most recent (None: all)."""
    return tuple(s for s in range(si) if s < condensed or window is None or s >= si - window)


def _check_count(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        allowed = "an integer >= 0" + (" or None (every earlier scale)" if allow_none else "")
        raise UserError(f"{name} must be {allowed}, got {value!r}")


def _check_condensed(condensed: int, patch_nums: tuple[int, ...]) -> None:
    if condensed > len(patch_nums):
        raise UserError(f"condensed_scales {condensed} exceeds the {len(patch_nums)} scales of {patch_nums}")


def _layer_set(name: str, layers: Sequence[int]) -> tuple[int, ...]:
    if isinstance(layers, (str, bytes)) or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
        raise UserError(f"{name} must be a sequence of layer indices, got {layers!r}")
    return tuple(sorted(set(layers)))


def _validate_layers(policy: str, name: str, layers: tuple[int, ...], fitted_depth: int | None, depth: int) -> None:
    if fitted_depth is not None and fitted_depth != depth:
        raise UserError(f"{policy} was made for a model of depth {fitted_depth}, not {depth}")
    bad = [x for x in layers if not 0 <= x < depth]
    if bad:
        raise UserError(f"{policy}: {name} {bad} out of range; a depth-{depth} model has layers 0..{depth - 1}")


def _window_text(window: int | None) -> str:
    return "window all" if window is None else f"window {window}"


@dataclasses.dataclass(frozen=True)
class FullCache(Policy):
    """Every earlier scale stays: the reference's behaviour."""

    def reads(self, layer, si, depth, patch_nums):
        return tuple(range(si))

    def describe(self) -> str:
        return "full cache: every earlier scale"


def fifo_reads(si: int, sizes: Sequence[int], condensed: int, budget: int | None) -> tuple[int, ...]:
    """AMS-KV's eviction as a static rule: the scales < si that a layer with a `budget` of slots holds when scale
    si attends. The `condensed` coarsest scales are locked in; the other written scales enter newest first while
    they fit beside them, and the first that does not fit ends the run: its elders were evicted first-in-first-out
    to make room for it, or it was never cached because it alone would not fit (None: every earlier scale)."""
    kept = list(range(min(si, condensed)))
    used = sum(sizes[s] for s in kept)
    recent = []
    for s in range(si - 1, condensed - 1, -1):
        if budget is not None and used + sizes[s] > budget:
            break
        recent.append(s)
        used += sizes[s]
    return tuple(kept + recent[::-1])


def fifo_capacity(patch_nums: Sequence[int], condensed: int, budget: int | None) -> int:
    """The slots a layer with this budget really holds: the largest set it keeps for one scale (the kept sets are
    nested windows, so the live tokens after each write are the next scale's kept set); always <= budget."""
    sizes = [pn * pn for pn in patch_nums]
    return max(sum(sizes[s] for s in fifo_reads(si, sizes, condensed, budget)) for si in range(len(sizes)))


def budget_levels(patch_nums: Sequence[int], condensed: int = 2) -> tuple[int, ...]:
    """Every distinct capacity a FIFO layer can have on this ladder, smallest (the condensed scales alone) to the
    full cache's: the budgets worth choosing between (a budget between two levels holds what the lower one does)."""
    sizes = [pn * pn for pn in patch_nums]
    low, high = sum(sizes[:condensed]), sum(sizes[:-1])
    return tuple(sorted({fifo_capacity(patch_nums, condensed, budget) for budget in range(low, high + 1)}))


def cut_fits(patch_nums: Sequence[int], cut: float, condensed: int = 2) -> bool:
    """Whether a cut of the full cache leaves every layer at least the condensed scales (`AMSKV.two_level`)."""
    levels = budget_levels(patch_nums, condensed)
    return levels[0] <= (1 - cut) * levels[-1] + 1e-9


@dataclasses.dataclass(frozen=True)
class AMSKV(Policy):
    """AMS-KV as the paper defines it: per-layer token budgets, condensed scales locked, FIFO eviction of whole
    scales (`fifo_reads`).

    budgets: one per layer, in cache slots (None: unlimited); a layer holds the `condensed_scales` coarsest scales
    and as many of the most recent scales as fit. The paper gives cache-demanding layers a large budget C_max and
    the others a small one C_min (`AMSKV.two_level`, the named settings `amskv-70/80/90`); `calibrate --search`
    chooses every layer's budget by teacher-forced NLL (`AMSKV.from_calibration`). patch_nums: the ladder the
    budgets were chosen for, if any (a budget in tokens means nothing on another ladder); a layout for another
    depth or ladder is refused.
    """

    budgets: tuple[int | None, ...]
    condensed_scales: int = 2
    patch_nums: tuple[int, ...] | None = None

    def __post_init__(self):
        _check_count("condensed_scales", self.condensed_scales)
        if isinstance(self.budgets, (str, bytes)) or not hasattr(self.budgets, "__iter__"):
            raise UserError(f"budgets must be a sequence of per-layer slot counts, got {self.budgets!r}")
        for budget in self.budgets:
            _check_count("every budget", budget, allow_none=True)
        object.__setattr__(self, "budgets", tuple(self.budgets))
        if self.patch_nums is not None:
            object.__setattr__(self, "patch_nums", tuple(self.patch_nums))

    def validate(self, depth, patch_nums):
        if len(self.budgets) != depth:
            raise UserError(f"AMSKV was made for a model of depth {len(self.budgets)}, not {depth}")
        if self.patch_nums is not None and self.patch_nums != tuple(patch_nums):
            raise UserError(f"AMSKV's budgets were chosen for the ladder {list(self.patch_nums)}, not "
                             f"{list(patch_nums)}")
        _check_condensed(self.condensed_scales, patch_nums)
        condensed = sum(pn * pn for pn in patch_nums[: self.condensed_scales])
        low = [(layer, b) for layer, b in enumerate(self.budgets) if b is not None and b < condensed]
        if low:
            raise UserError(f"AMSKV: budgets {low} (layer, slots) are below the {condensed} slots of the "
                             f"{self.condensed_scales} condensed scales, which every layer keeps")

    def reads(self, layer, si, depth, patch_nums):
        return fifo_reads(si, [pn * pn for pn in patch_nums], self.condensed_scales, self.budgets[layer])

    def describe(self) -> str:
        runs = [(b, len(list(group))) for b, group in itertools.groupby(self.budgets)]
        text = ", ".join(("all" if b is None else str(b)) + (f" ×{n}" if n > 1 else "") for b, n in runs)
        return f"AMS-KV: condensed {self.condensed_scales}; per-layer budgets (slots) [{text}]"

    @classmethod
    def two_level(
        cls, patch_nums: Sequence[int], depth: int, cut: float, demanding_layers: Sequence[int],
        condensed_scales: int = 2,
    ) -> AMSKV:
        """The paper's allocation at a cut of the full cache's slots: the demanding layers the large budget C_max,
        as large as leaves every other layer the condensed scales within (1 − cut) of the full cache, then the
        other layers the largest budget C_min the rest allows (without demanding layers, every layer the largest
        budget that fits). Demanding layers come first because they are the ones whose history matters (weak
        inter-scale similarity); given only what a uniform C_min leaves, they got little or nothing more than the
        others (bench/RESULTS.md, Issue 22: "Demanding layers first")."""
        if not 0 <= cut < 1:
            raise UserError(f"cut must be in [0, 1), got {cut}")
        demanding = _layer_set("demanding_layers", demanding_layers)
        _validate_layers("AMSKV", "demanding_layers", demanding, None, depth)
        levels = budget_levels(patch_nums, condensed_scales)
        total = math.floor((1 - cut) * depth * levels[-1] + 1e-9)
        if depth * levels[0] > total:
            raise UserError(f"a {cut:.0%} cut leaves {total} slots; the condensed scales alone need "
                             f"{depth * levels[0]} ({depth} layers × {levels[0]})")
        k = len(demanding)
        c_max = max(c for c in levels if k * c + (depth - k) * levels[0] <= total)
        c_min = max(c for c in levels if k * c_max + (depth - k) * c <= total)
        budgets = tuple(c_max if layer in demanding else c_min for layer in range(depth))
        return cls(budgets=budgets, condensed_scales=condensed_scales, patch_nums=tuple(patch_nums))

    @classmethod
    def from_calibration(cls, path: str | Path | dict, *, cut: float = 0.8, fraction: float | None = None,
                         threshold: float | None = None) -> Policy:
        """AMS-KV from a calibration file (`python -m amskv_jax.calibrate`): the searched per-layer budgets when
        the file holds a search (`calibrate --search`; with its per-layer storage, a `PerLayerPrecision`, when it
        searched precision too), else the paper's two-level allocation at `cut` with the file's demanding layers
        (or those `fraction` / `threshold` picks from its similarity scores)."""
        data = read_calibration(path) if isinstance(path, (str, Path)) else path
        patch_nums = tuple(data["patch_nums"])
        if "search" in data and fraction is None and threshold is None:
            search = data["search"]
            policy = cls(budgets=tuple(search["budgets"]), condensed_scales=search["condensed_scales"],
                         patch_nums=patch_nums)
            storages = search.get("kv_dtypes")
            return policy if storages is None else PerLayerPrecision(policy, tuple(storages))
        layers = data["demanding_layers"]
        if fraction is not None or threshold is not None:
            layers = select_layers(data["scores"]["similarity"], fraction=fraction, threshold=threshold, lowest=True)
        return cls.two_level(patch_nums, data["depth"], cut, layers)


def storage_label(kv_dtype: str | None) -> str:
    """A layer's storage dtype for tables: its name, or "compute" (the compute dtype) for None."""
    return "compute" if kv_dtype is None else kv_dtype


@dataclasses.dataclass(frozen=True)
class PerLayerPrecision(Policy):
    """Another policy's slots, each layer's K/V stored in a dtype of its own (KVTuner's layer-wise precision, here
    chosen by teacher-forced NLL: `calibrate --search --precisions`). kv_dtypes: one per layer, each None (the
    cache's storage, by default the compute dtype) or one of `quant.KV_DTYPES`; layers of one storage form their own
    cache kinds, so each stack is exactly its storage's size."""

    policy: Policy
    kv_dtypes: tuple[str | None, ...]

    def __post_init__(self):
        from amskv_jax.quant import check_kv_dtype

        if not isinstance(self.policy, Policy) or isinstance(self.policy, PerLayerPrecision):
            raise UserError(f"PerLayerPrecision wraps a slot policy, got {self.policy!r}")
        if isinstance(self.kv_dtypes, (str, bytes)) or not hasattr(self.kv_dtypes, "__iter__"):
            raise UserError(f"kv_dtypes must be one storage dtype per layer, got {self.kv_dtypes!r}")
        object.__setattr__(self, "kv_dtypes", tuple(self.kv_dtypes))
        for kv_dtype in self.kv_dtypes:
            check_kv_dtype(kv_dtype)

    def validate(self, depth, patch_nums):
        self.policy.validate(depth, patch_nums)
        if len(self.kv_dtypes) != depth:
            raise UserError(f"per-layer storage for {len(self.kv_dtypes)} layers, but the model has {depth}")

    def reads(self, layer, si, depth, patch_nums):
        return self.policy.reads(layer, si, depth, patch_nums)

    def storages(self):
        return self.kv_dtypes

    def describe(self) -> str:
        runs = [(s, len(list(group))) for s, group in itertools.groupby(self.kv_dtypes)]
        text = ", ".join(storage_label(s) + (f" ×{n}" if n > 1 else "") for s, n in runs)
        return f"{self.policy.describe()}; per-layer storage [{text}]"


@dataclasses.dataclass(frozen=True)
class MiKV(Policy):
    """MiKV on scales (Yang et al., 2024, "No Token Left Behind"): `policy`'s slots as the cache stores them, and
    every earlier scale the policy would drop kept instead in `low_dtype` (int4 or int2, KIVI's scheme), so every
    query reads every earlier scale, the evicted ones at a few bits. Each layer has two static tiers, each its own
    slot plan and buffers (`LayerLayout.low`); a scale is written to the low tier when some later query reads it
    from there (while it is still in the policy's window it may sit in both)."""

    policy: Policy
    low_dtype: str = "int4"

    def __post_init__(self):
        from amskv_jax.quant import ASYMMETRIC, SYMMETRIC

        if not isinstance(self.policy, Policy) or isinstance(self.policy, MiKV):
            raise UserError(f"MiKV keeps another policy's dropped scales, got {self.policy!r}")
        allowed = (*SYMMETRIC, *ASYMMETRIC)
        if self.low_dtype not in allowed:
            raise UserError(f"MiKV's low_dtype must be a quantised storage dtype; got {self.low_dtype!r}, allowed: "
                             f"{', '.join(allowed)}")

    def validate(self, depth, patch_nums):
        self.policy.validate(depth, patch_nums)

    def reads(self, layer, si, depth, patch_nums):
        return self.policy.reads(layer, si, depth, patch_nums)

    def low_reads(self, layer, si, depth, patch_nums) -> tuple[int, ...]:
        """The earlier scales scale si reads from the low tier: every one the policy does not read."""
        kept = set(self.policy.reads(layer, si, depth, patch_nums))
        return tuple(s for s in range(si) if s not in kept)

    def storages(self):
        return self.policy.storages()

    def describe(self) -> str:
        return f"MiKV: {self.policy.describe()}; every other earlier scale in {self.low_dtype}"

    def layout(self, config: VARConfig) -> CacheLayout:
        self.validate(config.depth, config.patch_nums)
        low = build_layout(lambda layer, si: self.low_reads(layer, si, config.depth, config.patch_nums),
                           config.depth, config.patch_nums, policy="", kv_dtypes=(self.low_dtype,) * config.depth)
        return with_low_tier(self.policy.layout(config), low, policy=repr(self))


@dataclasses.dataclass(frozen=True)
class SlidingWindow(Policy):
    """The `window` most recent earlier scales in every layer, no condensed scales (StreamingLLM without sinks)."""

    window: int = 1

    def __post_init__(self):
        _check_count("window", self.window)

    def reads(self, layer, si, depth, patch_nums):
        return _kept(si, 0, self.window)

    def describe(self) -> str:
        return f"sliding: {_window_text(self.window)}, no condensed"


@dataclasses.dataclass(frozen=True)
class CondensedOnly(Policy):
    """Only the `condensed_scales` coarsest scales in every layer (plus, as always, the current scale)."""

    condensed_scales: int = 2

    def __post_init__(self):
        _check_count("condensed_scales", self.condensed_scales)

    def validate(self, depth, patch_nums):
        _check_condensed(self.condensed_scales, patch_nums)

    def reads(self, layer, si, depth, patch_nums):
        return _kept(si, self.condensed_scales, 0)

    def describe(self) -> str:
        return f"condensed only: condensed {self.condensed_scales}"


@dataclasses.dataclass(frozen=True)
class ScaleBudget(Policy):
    """ScaleKV-like per-layer budgets at scale granularity.

    ScaleKV (Li et al. 2025) gives "drafter" layers, whose attention is spread over the history, a large token
    budget and "refiner" layers, which mostly attend to the current map, a small one. Our layouts are scale-granular,
    so a budget is a window of recent scales: drafters keep `drafter_window` (None: everything), refiners
    `refiner_window` (0: the current scale only). No condensed scales. `ScaleBudget.from_calibration` picks the
    drafters by attention dispersion.
    """

    drafter_layers: tuple[int, ...] = ()
    drafter_window: int | None = None
    refiner_window: int = 0
    depth: int | None = None

    def __post_init__(self):
        _check_count("drafter_window", self.drafter_window, allow_none=True)
        _check_count("refiner_window", self.refiner_window)
        if self.drafter_window is not None and self.drafter_window < self.refiner_window:
            raise UserError(
                f"drafter_window ({self.drafter_window}) must be >= refiner_window ({self.refiner_window}) or None"
            )
        object.__setattr__(self, "drafter_layers", _layer_set("drafter_layers", self.drafter_layers))

    def validate(self, depth, patch_nums):
        _validate_layers("ScaleBudget", "drafter_layers", self.drafter_layers, self.depth, depth)

    def reads(self, layer, si, depth, patch_nums):
        return _kept(si, 0, self.drafter_window if layer in self.drafter_layers else self.refiner_window)

    def describe(self) -> str:
        return (
            f"scale budget: drafter layers {list(self.drafter_layers)}: {_window_text(self.drafter_window)}; "
            f"refiners: {_window_text(self.refiner_window)}; no condensed"
        )

    @classmethod
    def from_calibration(
        cls,
        path: str | Path,
        *,
        fraction: float | None = None,
        threshold: float | None = None,
        drafter_window: int | None = None,
        refiner_window: int = 0,
    ) -> ScaleBudget:
        """Drafters = the layers of highest attention dispersion in a calibration file (a fraction of the layers,
        or those above a threshold; by default the same number as the file's demanding layers)."""
        data = read_calibration(path)
        if fraction is None and threshold is None:
            fraction = len(data["demanding_layers"]) / data["depth"]
        layers = select_layers(data["scores"]["dispersion"], fraction=fraction, threshold=threshold, lowest=False)
        return cls(
            drafter_layers=tuple(layers), drafter_window=drafter_window, refiner_window=refiner_window,
            depth=data["depth"],
        )


@dataclasses.dataclass(frozen=True)
class Ladder(Policy):
    """LaCache's ladder (Shi et al. 2025) on scales: every layer keeps the `condensed_scales` coarsest scales and a
    window of `span` other earlier scales, placed along the history by depth: layer 0 reads the oldest ones, the
    last layer the most recent, the layers between evenly shifted in between. Together the layers read the whole
    history while each holds a window (plus the scales it will read later, which the capacity counts)."""

    span: int = 1
    condensed_scales: int = 2

    def __post_init__(self):
        _check_count("span", self.span)
        _check_count("condensed_scales", self.condensed_scales)

    def validate(self, depth, patch_nums):
        _check_condensed(self.condensed_scales, patch_nums)

    def reads(self, layer, si, depth, patch_nums):
        history = list(range(self.condensed_scales, si))
        start = 0
        if len(history) > self.span:
            start = round(layer * (len(history) - self.span) / max(depth - 1, 1))
        return tuple(range(min(si, self.condensed_scales))) + tuple(history[start : start + self.span])

    def describe(self) -> str:
        return f"ladder: condensed {self.condensed_scales}, span {self.span}, shifted from oldest (layer 0) to newest"


# --- calibration files -------------------------------------------------------------------------------------------

CALIBRATION_FORMAT = "amskv-calibration/1"


def select_layers(
    scores: Sequence[float], *, fraction: float | None = None, threshold: float | None = None, lowest: bool = True
) -> list[int]:
    """Layers picked by score: the round(fraction·depth) lowest (or highest) ones, or those below (above)
    `threshold`. Exactly one of fraction and threshold must be given."""
    if (fraction is None) == (threshold is None):
        raise ValueError("give exactly one of fraction and threshold")
    if fraction is not None:
        if not 0 <= fraction <= 1:
            raise UserError(f"fraction must be in [0, 1], got {fraction}")
        count = layer_count(fraction, len(scores))
        order = sorted(range(len(scores)), key=lambda i: (scores[i] if lowest else -scores[i], i))
        return sorted(order[:count])
    return [i for i, s in enumerate(scores) if (s < threshold if lowest else s > threshold)]


def layer_count(fraction: float, depth: int) -> int:
    """round(fraction·depth), halves rounded up (0.35 of 30 layers is 11)."""
    return min(depth, math.floor(fraction * depth + 0.5))


def read_calibration(path: str | Path, config: VARConfig | None = None) -> dict:
    """A calibration file's contents, read as untrusted input (size, UTF-8, nesting bounded) and checked for the
    fields policies use (and a search's budgets, if any) and, given the model's `config`, for its depth and ladder;
    a bad file is one `UserError` naming it."""
    from amskv_jax import untrusted  # untrusted imports this module (CALIBRATION_FORMAT)

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such calibration file (write one with python -m amskv_jax.calibrate)")
    data = untrusted.read_json(path, untrusted.JSON_LIMITS[untrusted.CALIBRATION])
    depth, ladder = (None, None) if config is None else (config.depth, config.patch_nums)
    problem = untrusted.calibration_problem(data, depth, ladder)
    if problem is not None:
        raise UserError(f"{untrusted.show(path)}: {problem}")
    return data


# --- the named settings ------------------------------------------------------------------------------------------

# The paper's settings: 20% of layers (lowest inter-scale similarity) cache-demanding with budget C_max, the rest C_min,
# at a 70%, 80% or 90% cut of the full cache's slots (`AMSKV.two_level`).
DEMANDING_FRACTION = 0.20
PAPER_CUTS = {"amskv-70": 0.70, "amskv-80": 0.80, "amskv-90": 0.90}
# `amskv`, the default: the best setting at a cut of at least 75% on the embedded model (bench/RESULTS.md, "Issue 22"),
# which is the searched one: a calibration file holding a search (`calibrate --search`; emoji32 ships one at 25%)
# gives its budgets. Without one, the paper's allocation at an 85% cut, which keeps d30's default cache at least 80%
# below the full one (`tests/test_memory.py`); on emoji32 and emoji16l 75% and 80% did a little better.
DEFAULT_CUT = 0.85


def choose_demanding_layers(fraction: float, depth: int, calibration: dict | None) -> tuple[int, ...]:
    """The round(fraction·depth) layers of lowest similarity; without calibration the first layers stand in
    (lower layers need more cache in PyramidKV and ScaleKV; the count, and so the memory, is the same)."""
    if calibration is None:
        return tuple(range(layer_count(fraction, depth)))
    return tuple(select_layers(calibration["scores"]["similarity"], fraction=fraction, lowest=True))


def choose_drafter_layers(count: int, depth: int, calibration: dict | None) -> tuple[int, ...]:
    """ScaleBudget's `count` drafters: the layers of highest attention dispersion; without calibration the first
    layers stand in (as in `choose_demanding_layers`)."""
    if calibration is None:
        return tuple(range(count))
    return tuple(select_layers(calibration["scores"]["dispersion"], fraction=count / depth, lowest=False))


def _paper(cut: float) -> Callable[[VARConfig, dict | None], Policy]:
    """The paper's setting at `cut`; on a ladder too short for the cut (the condensed scales alone exceed it, as in
    the 3-scale test presets) every layer keeps the condensed scales alone, the smallest AMS-KV."""

    def make(config: VARConfig, calibration: dict | None) -> Policy:
        if not cut_fits(config.patch_nums, cut):
            floor = budget_levels(config.patch_nums)[0]
            return AMSKV(budgets=(floor,) * config.depth, patch_nums=config.patch_nums)
        layers = choose_demanding_layers(DEMANDING_FRACTION, config.depth, calibration)
        return AMSKV.two_level(config.patch_nums, config.depth, cut, layers)

    return make


def _default(config: VARConfig, calibration: dict | None) -> Policy:
    if calibration is not None and "search" in calibration:
        return AMSKV.from_calibration(calibration)
    return _paper(DEFAULT_CUT)(config, calibration)


def _scale_budget(config: VARConfig, calibration: dict | None) -> Policy:
    """Drafters keep everything, refiners only the current scale; as many drafters as fit in the default AMS-KV's
    slots, so the two compare at equal (at most the default's) memory, but at least one: where one whole layer
    exceeds the default's slots (emoji16l: 424 against 380) zero drafters would be no cache at all."""
    budget = sum(POLICIES[DEFAULT_POLICY](config, calibration).layout(config).capacities)
    full_layer = sum(config.patch_nums[s] ** 2 for s in range(config.num_scales - 1))
    count = min(config.depth, max(1, budget // full_layer))
    drafters = choose_drafter_layers(count, config.depth, calibration)
    return ScaleBudget(drafter_layers=drafters, drafter_window=None, refiner_window=0, depth=config.depth)


POLICIES: dict[str, Callable[[VARConfig, dict | None], Policy]] = {
    "full": lambda config, calibration: FullCache(),
    "amskv": _default,
    **{name: _paper(cut) for name, cut in PAPER_CUTS.items()},
    "sliding": lambda config, calibration: SlidingWindow(window=1),
    "condensed": lambda config, calibration: CondensedOnly(condensed_scales=2),
    "scalebudget": _scale_budget,
    "ladder": lambda config, calibration: Ladder(span=1, condensed_scales=2),
    "mikv": lambda config, calibration: MiKV(_default(config, calibration), "int4"),
    "mikv-int2": lambda config, calibration: MiKV(_default(config, calibration), "int2"),
}
DEFAULT_POLICY = "amskv"
# The command lines' cache when none is named: `amskv` where the model's calibration records that its searched policy
# raises the held-out NLL by at most this fraction (`calibrate --search` measures it on the held-out split), else
# the full cache (issue 22: the default follows the evidence).
DEFAULT_MAX_DELTA_NLL = 0.05


def default_policy_name(calibration: dict | None) -> tuple[str, str]:
    """(the policy a command line uses when none is named, a line saying why): `DEFAULT_POLICY` when `calibration`
    (checked contents, or None) holds a search whose held-out ΔNLL is at most `DEFAULT_MAX_DELTA_NLL`, else "full"."""
    limit = f"{DEFAULT_MAX_DELTA_NLL:.0%}"
    if calibration is None or "search" not in calibration:
        return "full", f"the model has no searched {DEFAULT_POLICY} policy"
    if "held_out" not in calibration:
        return "full", f"no held-out NLL is recorded for its searched {DEFAULT_POLICY} policy"
    delta = calibration["held_out"]["delta_nll"]
    within = delta <= DEFAULT_MAX_DELTA_NLL
    verdict = "at most" if within else "above"
    reason = f"its searched {DEFAULT_POLICY} policy's held-out ΔNLL {delta:+.2%} is {verdict} {limit}"
    return (DEFAULT_POLICY if within else "full"), reason


def policy_from_name(name: str, config: VARConfig, calibration: str | Path | dict | None = None) -> Policy:
    """The named setting for a model (`config`: its depth and ladder); `calibration` (a file or its contents)
    picks the demanding / drafter layers (and, holding a search, `amskv`'s budgets), else the first layers stand
    in. A calibration made for another depth or ladder is refused."""
    if name not in POLICIES:
        raise UserError(f"unknown policy {name!r}; known policies: {', '.join(POLICIES)}")
    if isinstance(calibration, (str, Path)):
        calibration = read_calibration(calibration, config)  # a mismatch names the file
    elif calibration is not None:
        check_calibration(calibration, config)
    return POLICIES[name](config, calibration)


def check_calibration(calibration: dict, config: VARConfig) -> None:
    """Raise UserError when a calibration's contents (read by `read_calibration` or the checkpoint gate) are not for
    `config`'s model (depth, ladder). The file is not known here: `read_calibration(path, config)` names it."""
    from amskv_jax import untrusted  # untrusted imports this module (CALIBRATION_FORMAT)

    problem = untrusted.calibration_problem(calibration, config.depth, config.patch_nums)
    if problem is not None:
        raise UserError(problem)
