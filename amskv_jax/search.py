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
3. local moves, scored for real (they correct the interactions the table ignores): raise one layer one level if it
   fits, or move one level from one layer to another (every ordered pair), taking each move that lowers the NLL,
   until a pass finds none (at most `passes` passes).

Every distinct candidate is scored once: pass one `memo` dict to searches at several bounds to share the scores.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
from tqdm import tqdm

from amskv_jax.config import VARConfig
from amskv_jax.errors import UserError
from amskv_jax.policies import AMSKV, FullCache, budget_levels


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """The chosen per-layer budgets (slots), their total and NLL, the bound, the full cache's slots and NLL, the
    levels searched and the condensed scales every layer keeps (what `AMSKV` needs to rebuild the policy), how many
    candidates were scored, and the accepted steps (for the record)."""

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


def check_budget(budget: float) -> float:
    """The budget as a fraction of the full cache, refused outside (0, 1]."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
        raise UserError(f"budget must be a fraction of the full cache in (0, 1], got {budget!r}")
    return float(budget)


def search_budgets(
    config: VARConfig, score: Callable[[AMSKV], float], budget: float, *, condensed_scales: int = 2,
    passes: int = 3, progress: bool = True, memo: dict | None = None,
) -> SearchResult:
    """Per-layer AMS-KV budgets within `budget` × the full cache's slots that minimise `score(policy)` (the
    calibration NLL; `nll_score` builds it). `memo`: {per-layer budgets: score}, read and filled."""
    budget = check_budget(budget)
    depth, patch_nums = config.depth, config.patch_nums
    levels = budget_levels(patch_nums, condensed_scales)
    full_slots = sum(FullCache().layout(config).capacities)
    bound = math.floor(budget * full_slots + 1e-9)
    if depth * levels[0] > bound:
        floor = depth * levels[0]
        raise UserError(f"budget {budget} leaves {bound} slots; the condensed scales alone need {floor} ({depth} "
                         f"layers × {levels[0]}): allowed budgets are >= {floor / full_slots:.4f}")
    memo = {} if memo is None else memo
    top = len(levels) - 1
    bar = tqdm(desc=f"search at {budget:g} of the full cache", unit=" candidates", disable=not progress)

    def nll(index: tuple[int, ...]) -> float:
        budgets = tuple(levels[i] for i in index)
        if budgets not in memo:
            memo[budgets] = float(score(AMSKV(budgets=budgets, condensed_scales=condensed_scales,
                                              patch_nums=patch_nums)))
            bar.update(1)
        return memo[budgets]

    def slots(index: tuple[int, ...]) -> int:
        return sum(levels[i] for i in index)

    def raised(index: tuple[int, ...], layer: int, by: int) -> tuple[int, ...]:
        return index[:layer] + (index[layer] + by,) + index[layer + 1 :]

    full_nll = nll((top,) * depth)
    base = (0,) * depth
    table = [[nll(raised(base, layer, j)) - nll(base) if j else 0.0 for j in range(top + 1)] for layer in range(depth)]
    state = _knapsack(table, levels, bound)
    steps = [{"step": "knapsack", "budgets": [levels[i] for i in state], "nll": nll(state)}]
    for _ in range(passes):
        improved = False
        for up in range(depth):
            if state[up] == top:
                continue
            for down in (None, *range(depth)):
                if down == up or (down is not None and state[down] == 0):
                    continue
                candidate = raised(state, up, 1) if down is None else raised(raised(state, up, 1), down, -1)
                if slots(candidate) <= bound and nll(candidate) < nll(state):
                    state, improved = candidate, True
                    steps.append({"step": "move", "budgets": [levels[i] for i in state], "nll": nll(state)})
                    break
        if not improved:
            break
    bar.close()
    return SearchResult(
        budgets=tuple(levels[i] for i in state), slots=slots(state), nll=nll(state), bound=bound,
        full_slots=full_slots, full_nll=full_nll, levels=levels, condensed_scales=condensed_scales,
        evaluations=len(memo), steps=tuple(steps),
    )


def _knapsack(table: list[list[float]], levels: tuple[int, ...], bound: int) -> tuple[int, ...]:
    """Per-layer level indices minimising sum(table[layer][level]) with sum(levels[level]) <= bound; ties go to
    fewer slots, then to the lower levels of the earlier layers."""
    best: dict[int, tuple[float, tuple[int, ...]]] = {0: (0.0, ())}  # slots used -> (sum, levels so far)
    for row in table:
        nxt: dict[int, tuple[float, tuple[int, ...]]] = {}
        for used, (total, chosen) in sorted(best.items()):
            for j, delta in enumerate(row):
                slots = used + levels[j]
                if slots > bound:
                    break
                value = (total + delta, chosen + (j,))
                if slots not in nxt or value[0] < nxt[slots][0]:
                    nxt[slots] = value
        best = nxt
    return min(best.items(), key=lambda item: (item[1][0], item[0]))[1][1]


def nll_score(model, gt_NL: np.ndarray, x_NLCv: np.ndarray, labels_N: np.ndarray, *, batch: int = 64,
              dtype: str = "float32") -> Callable[[AMSKV], float]:
    """score(policy) = the mean unguided teacher-forced NLL per token of these images under the policy's layout
    (`nll.unguided_nll`: the conditional rows only, one compiled program for every policy)."""
    from amskv_jax.nll import unguided_nll

    c = model.config.var
    return lambda policy: unguided_nll(model, policy.layout(c), gt_NL, x_NLCv, labels_N, batch=batch, dtype=dtype)
