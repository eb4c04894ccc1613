"""Cache policies: each decides which earlier scales a layer's queries read, and so the cache layout.

A policy is a frozen, hashable dataclass with one method, `reads(layer, si, depth, patch_nums)`, returning the
earlier scales that scale si's queries read from the cache at that layer (their own scale is always attended, from
its fresh K/V). `layout(config)` validates the settings against the model and turns them into the static
`CacheLayout` (per-layer capacities, write segments, read masks) that the model and kernels consume; a scale no later
query reads is never written, and slots of scales no later query reads are reused.

* `FullCache`: every earlier scale (the reference's behaviour; 424 slots per layer at 256px).
* `AMSKV`: the `condensed_scales` coarsest scales plus the `local_window` most recent ones; cache-demanding layers
  (chosen by calibration, `calibrate.py`) get their own, larger `demanding_window` (None: everything).
* Baselines: `SlidingWindow` (recent scales, no condensed ones), `CondensedOnly`, and `ScaleBudget` (ScaleKV-like:
  "drafter" layers, those whose attention is spread over many earlier scales, keep a large window; "refiner" layers
  keep only a small recent window besides the current scale).

`POLICIES` names the settings the command lines and benchmarks compare; `policy_from_name(name, depth, calibration)`
builds one for a model depth. Calibration files (`calibrate.py` writes them) are read here with `read_calibration`.
"""
from __future__ import annotations

import abc
import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from amskv_jax.cache import CacheLayout, build_layout
from amskv_jax.config import VARConfig


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

    def layout(self, config: VARConfig) -> CacheLayout:
        self.validate(config.depth, config.patch_nums)
        return build_layout(
            lambda layer, si: self.reads(layer, si, config.depth, config.patch_nums),
            config.depth,
            config.patch_nums,
            policy=repr(self),
        )


def _kept(si: int, condensed: int, window: int | None) -> tuple[int, ...]:
    """Scales < si that are condensed (index < condensed) or among the `window` most recent (None: all)."""
    return tuple(s for s in range(si) if s < condensed or window is None or s >= si - window)


def _check_count(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        allowed = "an integer >= 0" + (" or None (every earlier scale)" if allow_none else "")
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _layer_set(name: str, layers: Sequence[int]) -> tuple[int, ...]:
    if isinstance(layers, (str, bytes)) or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
        raise ValueError(f"{name} must be a sequence of layer indices, got {layers!r}")
    return tuple(sorted(set(layers)))


def _validate_layers(policy: str, name: str, layers: tuple[int, ...], fitted_depth: int | None, depth: int) -> None:
    if fitted_depth is not None and fitted_depth != depth:
        raise ValueError(f"{policy} was made for a model of depth {fitted_depth}, not {depth}")
    bad = [x for x in layers if not 0 <= x < depth]
    if bad:
        raise ValueError(f"{policy}: {name} {bad} out of range; a depth-{depth} model has layers 0..{depth - 1}")


def _window_text(window: int | None) -> str:
    return "window all" if window is None else f"window {window}"


@dataclasses.dataclass(frozen=True)
class FullCache(Policy):
    """Every earlier scale stays: the reference's behaviour."""

    def reads(self, layer, si, depth, patch_nums):
        return tuple(range(si))

    def describe(self) -> str:
        return "full cache: every earlier scale"


@dataclasses.dataclass(frozen=True)
class AMSKV(Policy):
    """Condensed + local scales; cache-demanding layers keep a larger window.

    condensed_scales: the coarsest scales every layer keeps (2: 1 + 4 tokens). local_window: how many of the most
    recent earlier scales the other layers keep (0: condensed only; their queries still see their own scale).
    demanding_layers: the cache-demanding layers (from `AMSKV.from_calibration`); demanding_window: their window,
    at least local_window, None for every earlier scale. depth: the depth the layers were chosen for, if any; a
    layout for another depth is refused.
    """

    condensed_scales: int = 2
    local_window: int = 1
    demanding_layers: tuple[int, ...] = ()
    demanding_window: int | None = None
    depth: int | None = None

    def __post_init__(self):
        _check_count("condensed_scales", self.condensed_scales)
        _check_count("local_window", self.local_window)
        _check_count("demanding_window", self.demanding_window, allow_none=True)
        if self.demanding_window is not None and self.demanding_window < self.local_window:
            raise ValueError(
                f"demanding_window ({self.demanding_window}) must be >= local_window ({self.local_window}) or None"
            )
        object.__setattr__(self, "demanding_layers", _layer_set("demanding_layers", self.demanding_layers))

    def validate(self, depth, patch_nums):
        _validate_layers("AMSKV", "demanding_layers", self.demanding_layers, self.depth, depth)
        if self.condensed_scales > len(patch_nums):
            raise ValueError(
                f"condensed_scales {self.condensed_scales} exceeds the {len(patch_nums)} scales of {patch_nums}"
            )

    def reads(self, layer, si, depth, patch_nums):
        window = self.demanding_window if layer in self.demanding_layers else self.local_window
        return _kept(si, self.condensed_scales, window)

    def describe(self) -> str:
        text = f"AMS-KV: condensed {self.condensed_scales}, {_window_text(self.local_window)}"
        if self.demanding_layers:
            text += f"; demanding layers {list(self.demanding_layers)}: {_window_text(self.demanding_window)}"
        return text

    @classmethod
    def from_calibration(
        cls,
        path: str | Path,
        *,
        condensed_scales: int = 2,
        local_window: int = 0,
        demanding_window: int | None = 2,
        fraction: float | None = None,
        threshold: float | None = None,
    ) -> AMSKV:
        """AMS-KV with the demanding layers of a calibration file (`python -m amskv_jax.calibrate`); the windows
        default to the default setting's (`POLICIES["amskv"]`).

        The layers are the file's own choice unless `fraction` or `threshold` redo it from the recorded per-layer
        scores (lowest inter-scale similarity first)."""
        data = read_calibration(path)
        layers = data["demanding_layers"]
        if fraction is not None or threshold is not None:
            layers = select_layers(data["scores"]["similarity"], fraction=fraction, threshold=threshold, lowest=True)
        return cls(
            condensed_scales=condensed_scales, local_window=local_window, demanding_layers=tuple(layers),
            demanding_window=demanding_window, depth=data["depth"],
        )


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
        if self.condensed_scales > len(patch_nums):
            raise ValueError(
                f"condensed_scales {self.condensed_scales} exceeds the {len(patch_nums)} scales of {patch_nums}"
            )

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
            raise ValueError(
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
            raise ValueError(f"fraction must be in [0, 1], got {fraction}")
        count = layer_count(fraction, len(scores))
        order = sorted(range(len(scores)), key=lambda i: (scores[i] if lowest else -scores[i], i))
        return sorted(order[:count])
    return [i for i, s in enumerate(scores) if (s < threshold if lowest else s > threshold)]


def layer_count(fraction: float, depth: int) -> int:
    """round(fraction·depth), halves rounded up (0.35 of 30 layers is 11)."""
    return min(depth, math.floor(fraction * depth + 0.5))


def read_calibration(path: str | Path) -> dict:
    """A calibration file's contents, checked for the fields policies use."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such calibration file (write one with python -m amskv_jax.calibrate)")
    data = json.loads(path.read_text())
    if data.get("format") != CALIBRATION_FORMAT:
        raise ValueError(f"{path}: format {data.get('format')!r} is not {CALIBRATION_FORMAT!r}")
    depth = data["depth"]
    for key in ("similarity", "dispersion"):
        if len(data["scores"][key]) != depth:
            raise ValueError(f"{path}: scores[{key!r}] has {len(data['scores'][key])} entries for depth {depth}")
    return data


# --- the named settings ------------------------------------------------------------------------------------------

# The default AMS-KV: 20% of layers (lowest inter-scale similarity) cache-demanding, keeping the 2 most recent scales
# besides the condensed ones; the rest condensed only. Chosen on the embedded model by `python -m bench.fidelity
# --sweep`: it beat the 35%-of-layers, window-1 setting on every fidelity figure with less memory (bench/RESULTS.md).
DEMANDING_FRACTION = 0.20
DEMANDING_WINDOW = 2
AGGRESSIVE_FRACTION = 0.15  # amskv-aggressive: 15% of layers demanding, window 1
AGGRESSIVE_WINDOW = 1


def choose_demanding_layers(fraction: float, depth: int, calibration: dict | None) -> tuple[int, ...]:
    """The round(fraction·depth) layers of lowest similarity; without calibration the first layers stand in
    (lower layers need more cache in PyramidKV and ScaleKV; the count, and so the memory, is the same)."""
    if calibration is None:
        return tuple(range(layer_count(fraction, depth)))
    return tuple(select_layers(calibration["scores"]["similarity"], fraction=fraction, lowest=True))


def _amskv(fraction: float, window: int) -> Callable[[VARConfig, dict | None], Policy]:
    def make(config: VARConfig, calibration: dict | None) -> Policy:
        layers = choose_demanding_layers(fraction, config.depth, calibration)
        return AMSKV(
            condensed_scales=2, local_window=0, demanding_layers=layers, demanding_window=window, depth=config.depth
        )

    return make


def _scale_budget(config: VARConfig, calibration: dict | None) -> Policy:
    """Drafters keep everything, refiners only the current scale; as many drafters as fit in the default AMS-KV's
    slots, so the two compare at equal (at most the default's) memory."""
    budget = sum(POLICIES[DEFAULT_POLICY](config, calibration).layout(config).capacities)
    count = min(config.depth, budget // sum(config.patch_nums[s] ** 2 for s in range(config.num_scales - 1)))
    if calibration is None:
        drafters = tuple(range(count))
    else:
        dispersion = calibration["scores"]["dispersion"]
        drafters = tuple(select_layers(dispersion, fraction=count / config.depth, lowest=False))
    return ScaleBudget(drafter_layers=drafters, drafter_window=None, refiner_window=0, depth=config.depth)


POLICIES: dict[str, Callable[[VARConfig, dict | None], Policy]] = {
    "full": lambda config, calibration: FullCache(),
    "amskv": _amskv(DEMANDING_FRACTION, DEMANDING_WINDOW),
    "amskv-aggressive": _amskv(AGGRESSIVE_FRACTION, AGGRESSIVE_WINDOW),
    "sliding": lambda config, calibration: SlidingWindow(window=1),
    "condensed": lambda config, calibration: CondensedOnly(condensed_scales=2),
    "scalebudget": _scale_budget,
}
DEFAULT_POLICY = "amskv"


def policy_from_name(name: str, config: VARConfig, calibration: str | Path | dict | None = None) -> Policy:
    """The named setting for a model (`config`: its depth and ladder); `calibration` (a file or its contents)
    picks the demanding / drafter layers, else the first layers stand in."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; known policies: {', '.join(POLICIES)}")
    if isinstance(calibration, (str, Path)):
        calibration = read_calibration(calibration)
    if calibration is not None and calibration["depth"] != config.depth:
        raise ValueError(f"the calibration is for a model of depth {calibration['depth']}, not {config.depth}")
    return POLICIES[name](config, calibration)
