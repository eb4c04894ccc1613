"""Budgeted policy search: each layer's AMS-KV budget chosen to minimise teacher-forced NLL under a memory bound.

A candidate is one budget per layer, each one of the ladder's FIFO levels (`policies.budget_levels`: the distinct
capacities an AMS-KV layer can have, from the condensed scales alone to the full cache). Its cost is the sum of
the layers' slots (as `amskv_jax.memory` counts them: the in-flight scale excluded), which must stay within
`budget` × the full cache's. Its score is the mean unguided NLL per token of calibration images, teacher-forced
under the candidate's layout (exactly what cached generation under that layout computes, `VAR.__call__`); the
per-layer masks are an argument of one compiled program (`nll.unguided_nll`), so no candidate compiles.

The search, deterministic (ties go to the lower layer and level):

1. marginal table: from the base (every layer at the lowest level, the condensed scales alone), the NLL change of
   raising one layer to each level, the others at the base (depth × (levels − 1) scores, shared by every bound);
2. knapsack: the per-layer levels minimising the sum of those changes within the bound (exact, by dynamic
   programming over slot totals): the optimum if the layers' effects added up;
3. uniform seeds: for each storage, every layer at the highest level that fits the bound; the lowest of these
   and the knapsack's choice is where the moves start (the table's sums miss effects that need every layer's
   cache at once, which a uniform choice has: on emoji16l at a quarter of the bytes, the search without seeds
   chose a policy at +0.76% held-out NLL where every layer's full cache in int2 is at +0.03%);
4. local moves, scored for real (they correct the interactions the table ignores): raise one layer one level if it
   fits, or move one level from one layer to another (every ordered pair), taking each move that lowers the NLL,
   until a pass finds none (at most `passes` passes).

Every distinct candidate is scored once: pass one `memo` dict to searches at several bounds to share the scores.

With `precisions` (KVTuner's idea, judged by the NLL instead of a proxy), a layer's option is a level *and* a
storage dtype (the compute dtype or a quantised one, `PerLayerPrecision`), the cost its bytes and the bound a
fraction of the full cache's bytes; the table adds each layer's precision cost (that layer alone quantised in the
full cache) to its level's, and the moves also step one layer's precision. The storages are an argument of the
same compiled program (`nll.unguided_nll(choices=...)`).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from amskv_jax import quant
from amskv_jax.cache import layer_bytes
from amskv_jax.config import VARConfig
from amskv_jax.errors import UserError
from amskv_jax.policies import AMSKV, FullCache, PerLayerPrecision, Policy, budget_levels


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """The chosen per-layer budgets (slots) and, when precision was searched, storage dtypes (None: the compute
    dtype), their cost and NLL, the bound, the full cache's cost and NLL, the levels searched and the condensed
    scales every layer keeps (what `AMSKV` needs to rebuild the policy), how many candidates were scored, and the
    accepted steps (for the record). Cost: slots, or with precision bytes per image row as a bfloat16-compute
    cache stores them (`cache.layer_bytes`)."""

    budgets: tuple[int, ...]
    slots: int
    nll: float
    bound: int
    full_slots: int
    full_nll: float
    levels: tuple[int, ...]
    condensed_scales: int
    evaluations: int
    steps: tuple[dict, ...]
    kv_dtypes: tuple[str | None, ...] | None = None
    bytes: int | None = None
    byte_bound: int | None = None
    full_bytes: int | None = None

    def policy(self, patch_nums: tuple[int, ...]) -> Policy:
        """The searched policy: AMS-KV with these budgets (and `PerLayerPrecision` with these storages)."""
        return _policy(self.budgets, self.kv_dtypes, self.condensed_scales, patch_nums)


def check_budget(budget: float) -> float:
    """The budget as a fraction of the full cache, refused outside (0, 1]."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
        raise UserError(f"budget must be a fraction of the full cache in (0, 1], got {budget!r}")
    return float(budget)


def check_precisions(precisions, head_dim: int | None = None) -> tuple[str | None, ...]:
    """The storage dtypes a search may give a layer: the compute dtype (None) first, then the quantised ones named,
    finest first as given; anything else is refused in one line."""
    allowed = [k for k in quant.KV_DTYPES if quant.is_quantized(k)]
    out = [None]
    for kv_dtype in precisions:
        if kv_dtype is None:
            continue
        if kv_dtype not in allowed:
            raise UserError(f"precision {kv_dtype!r}: a search chooses among quantised storage dtypes; allowed: "
                             f"{', '.join(allowed)}")
        quant.check_kv_dtype(kv_dtype, head_dim)
        if kv_dtype not in out:
            out.append(kv_dtype)
    return tuple(out)


def _policy(budgets, kv_dtypes, condensed_scales, patch_nums) -> Policy:
    policy = AMSKV(budgets=tuple(budgets), condensed_scales=condensed_scales, patch_nums=patch_nums)
    if kv_dtypes is None or all(s is None for s in kv_dtypes):
        return policy
    return PerLayerPrecision(policy, tuple(kv_dtypes))


BYTE_UNITS = 10_000  # with precision, the knapsack counts bytes in 1/BYTE_UNITS of the full cache's (rounded up)


def search_budgets(
    config: VARConfig, score: Callable[[Policy], float], budget: float, *, condensed_scales: int = 2,
    passes: int = 3, progress: bool = True, memo: dict | None = None, precisions: tuple[str | None, ...] = (),
) -> SearchResult:
    """Per-layer AMS-KV budgets within `budget` × the full cache's slots that minimise `score(policy)` (the
    calibration NLL; `nll_score` builds it). `memo`: {(per-layer budgets, storages): score}, read and filled.

    `precisions` (quantised storage dtypes, finest first, e.g. ("int8", "int4", "int2")): each layer also gets a
    storage dtype, the compute dtype or one of these, and the bound is `budget` × the full cache's bytes (compute
    in bfloat16; `cache.layer_bytes` per image row, float32 scales included). The marginal table then adds, per
    layer, the NLL change of storing that layer (alone, at the full cache) in each precision; the local moves also
    change one layer's precision one step."""
    budget = check_budget(budget)
    depth, patch_nums = config.depth, config.patch_nums
    storages = check_precisions(precisions, config.head_dim)
    levels = budget_levels(patch_nums, condensed_scales)
    full_slots = sum(FullCache().layout(config).capacities)
    slot_bound = math.floor(budget * full_slots + 1e-9)
    if depth * levels[0] > slot_bound:
        floor = depth * levels[0]
        raise UserError(f"budget {budget} leaves {slot_bound} slots; the condensed scales alone need {floor} "
                         f"({depth} layers × {levels[0]}): allowed budgets are >= {floor / full_slots:.4f}")
    mixed = len(storages) > 1
    top = len(levels) - 1
    if mixed:
        plans = [AMSKV(budgets=(level,) * depth, condensed_scales=condensed_scales).layout(config).layers[0]
                 for level in levels]
        layer_cost = [[layer_bytes(dataclasses.replace(plan, kv_dtype=s), 1, config.num_heads, config.head_dim,
                                   jnp.bfloat16) for s in storages] for plan in plans]
        full_bytes = depth * layer_cost[top][0]
        byte_bound = math.floor(budget * full_bytes + 1e-9)
        unit = full_bytes / BYTE_UNITS
        cost = [[math.ceil(b / unit - 1e-9) for b in row] for row in layer_cost]
        bound = math.floor(budget * BYTE_UNITS + 1e-9)
        if depth * cost[0][-1] > bound:
            raise UserError(f"budget {budget}: the condensed scales alone in {storages[-1]} need "
                             f"{depth * layer_cost[0][-1]} of the full cache's {full_bytes} bytes per row")
    else:
        cost, bound = [[level] for level in levels], slot_bound
    memo = {} if memo is None else memo
    bar = tqdm(desc=f"search at {budget:g} of the full cache", unit=" candidates", disable=not progress)

    def key(state) -> tuple:
        return tuple(levels[j] for j, _ in state), tuple(storages[p] for _, p in state)

    def nll(state) -> float:
        budgets, kinds = key(state)
        if (budgets, kinds) not in memo:
            memo[budgets, kinds] = float(score(_policy(budgets, kinds, condensed_scales, patch_nums)))
            bar.update(1)
        return memo[budgets, kinds]

    def total(state) -> int:
        return sum(cost[j][p] for j, p in state)

    def with_option(state, layer: int, option) -> tuple:
        return state[:layer] + (option,) + state[layer + 1 :]

    def moves(option, up: bool) -> list:
        """One step up (a level more, or a finer storage) or down from a layer's option."""
        j, p = option
        out = [(j + 1, p), (j, p - 1)] if up else [(j - 1, p), (j, p + 1)]
        return [(a, b) for a, b in out if 0 <= a <= top and 0 <= b < len(storages)]

    def raising(state, up: int):
        """The candidates that raise layer `up` one step, alone or lowering one other layer one step, in order."""
        for raised in moves(state[up], True):
            candidate = with_option(state, up, raised)
            yield candidate
            for down in range(depth):
                if down != up:
                    yield from (with_option(candidate, down, lowered) for lowered in moves(state[down], False))

    full_nll = nll(((top, 0),) * depth)
    base = ((0, 0),) * depth
    options = [(j, p) for j in range(top + 1) for p in range(len(storages))]
    table = []
    for layer in range(depth):
        capacity = [nll(with_option(base, layer, (j, 0))) - nll(base) if j else 0.0 for j in range(top + 1)]
        precision = [nll(with_option(((top, 0),) * depth, layer, (top, p))) - full_nll if p else 0.0
                     for p in range(len(storages))]
        table.append([(capacity[j] + precision[p], cost[j][p]) for j, p in options])
    state = tuple(options[i] for i in _knapsack(table, bound))
    steps = [{"step": "knapsack", **_record(*key(state), mixed), "nll": nll(state)}]
    for p in range(len(storages)):  # the uniform seeds: every layer alike, at the highest level that fits
        fits = [j for j in range(top + 1) if depth * cost[j][p] <= bound]
        if fits and nll(uniform := ((fits[-1], p),) * depth) < nll(state):
            state = uniform
            steps.append({"step": "uniform", **_record(*key(state), mixed), "nll": nll(state)})
    for _ in range(passes):
        improved = False
        for up in range(depth):  # each layer takes the first raise that fits and lowers the NLL
            better = next((c for c in raising(state, up) if total(c) <= bound and nll(c) < nll(state)), None)
            if better is not None:
                state, improved = better, True
                steps.append({"step": "move", **_record(*key(state), mixed), "nll": nll(state)})
        if not improved:
            break
    bar.close()
    budgets, kinds = key(state)
    return SearchResult(
        budgets=budgets, slots=sum(budgets), nll=nll(state), bound=slot_bound,
        full_slots=full_slots, full_nll=full_nll, levels=levels, condensed_scales=condensed_scales,
        evaluations=len(memo), steps=tuple(steps), kv_dtypes=kinds if mixed else None,
        bytes=sum(layer_cost[j][p] for j, p in state) if mixed else None,
        byte_bound=byte_bound if mixed else None, full_bytes=full_bytes if mixed else None,
    )


def _record(budgets, kinds, mixed: bool) -> dict:
    out = {"budgets": list(budgets)}
    if mixed:
        out["kv_dtypes"] = list(kinds)
    return out


def _knapsack(table: list[list[tuple[float, int]]], bound: int) -> tuple[int, ...]:
    """Per-layer option indices minimising the sum of their table values (value, cost) with the costs' sum <= bound;
    ties go to the lower cost, then to the earlier options of the earlier layers."""
    best: dict[int, tuple[float, tuple[int, ...]]] = {0: (0.0, ())}  # cost used -> (sum, options so far)
    for row in table:
        nxt: dict[int, tuple[float, tuple[int, ...]]] = {}
        for used, (total, chosen) in sorted(best.items()):
            for j, (delta, cost) in enumerate(row):
                spent = used + cost
                if spent > bound:
                    continue
                value = (total + delta, chosen + (j,))
                if spent not in nxt or value[0] < nxt[spent][0]:
                    nxt[spent] = value
        best = nxt
    return min(best.items(), key=lambda item: (item[1][0], item[0]))[1][1]


def nll_score(model, gt_NL: np.ndarray, x_NLCv: np.ndarray, labels_N: np.ndarray, *, batch: int = 64,
              dtype: str = "float32", precisions: tuple[str | None, ...] = ()) -> Callable[[Policy], float]:
    """score(policy) = the mean unguided teacher-forced NLL per token of these images under the policy's layout
    and per-layer storage (`nll.unguided_nll`: the conditional rows only, one compiled program for every policy
    and every choice among `precisions`)."""
    from amskv_jax.nll import unguided_nll

    c = model.config.var
    choices = check_precisions(precisions, c.head_dim)
    return lambda policy: unguided_nll(model, policy.layout(c), gt_NL, x_NLCv, labels_N, batch=batch, dtype=dtype,
                                       choices=choices)
