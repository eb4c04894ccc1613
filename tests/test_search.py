"""The budgeted search: optimal for separable scores, never past its bound, deterministic, sharing its scores, and
the command line's file loaded back; bad budgets refused in one line."""
from __future__ import annotations

import dataclasses
import functools
import itertools
import re

import numpy as np
import pytest

from amskv_jax import calibrate, checkpoint, nll, search
from amskv_jax.config import get_preset
from amskv_jax.policies import (
    AMSKV, DEFAULT_POLICY, FullCache, budget_levels, default_policy_name, policy_from_name, read_calibration,
)
from amskv_jax.search import check_budget, search_budgets
from amskv_jax.train.data import load_image_folder
from conftest import random_model

CONFIG = dataclasses.replace(get_preset("tiny-ladder256").var, depth=3, patch_nums=(1, 2, 3, 4, 5, 6))
LEVELS = budget_levels(CONFIG.patch_nums)  # 5 14 21 30 41 46 55
WEIGHTS = np.array([3.0, 1.0, 2.0])  # layer 0 gains most from cache, layer 1 least


def separable(policy: AMSKV) -> float:
    """A score that falls with every layer's budget, at a different rate per layer, with diminishing returns."""
    return float(sum(w * np.exp(-b / 20) for w, b in zip(WEIGHTS, policy.budgets, strict=True)))


def brute_force(score, bound: int) -> float:
    return min(score(AMSKV(budgets=combo)) for combo in itertools.product(LEVELS, repeat=3) if sum(combo) <= bound)


@pytest.mark.parametrize("budget", [0.15, 0.3, 0.55, 1.0])
def test_a_separable_score_gets_the_optimum_within_the_bound(budget):
    result = search_budgets(CONFIG, separable, budget, progress=False)
    full = sum(FullCache().layout(CONFIG).capacities)
    assert result.bound == int(budget * full) and result.slots <= result.bound
    assert sum(AMSKV(budgets=result.budgets).layout(CONFIG).capacities) == result.slots  # as memory counts them
    assert result.nll == pytest.approx(brute_force(separable, result.bound))
    assert result.full_nll == pytest.approx(separable(AMSKV(budgets=(LEVELS[-1],) * 3)))


def test_local_moves_correct_what_the_marginal_table_misses():
    """Layer 1's cache helps only beside a large one in layer 0: from the base its table entry is zero, so the
    knapsack gives everything to layer 0; a move of one level from layer 0 to layer 1 then pays."""

    def coupled(policy: AMSKV) -> float:
        b = policy.budgets
        return float(np.exp(-b[0] / 30) - 0.5 * (b[0] >= 41 and b[1] >= 14))

    result = search_budgets(CONFIG, coupled, 0.4, progress=False)
    assert result.steps[0] == {"step": "knapsack", "budgets": [55, 5, 5], "nll": pytest.approx(np.exp(-55 / 30))}
    assert result.budgets == (46, 14, 5) and result.nll == pytest.approx(np.exp(-46 / 30) - 0.5)


def test_a_uniform_seed_finds_what_needs_every_layer_at_once():
    """The cache pays only when every layer holds 30 slots or more: no layer alone moves the score, so the table is
    blind to it, and one-level moves from the knapsack's choice never reach it; the uniform seed does."""

    def together(policy: AMSKV) -> float:
        return separable(policy) - 5.0 * (min(policy.budgets) >= 30)

    result = search_budgets(CONFIG, together, 90 / sum(FullCache().layout(CONFIG).capacities), progress=False)
    assert [s["step"] for s in result.steps[:2]] == ["knapsack", "uniform"]
    assert result.budgets == (30, 30, 30) and result.nll == pytest.approx(together(AMSKV(budgets=(30, 30, 30))))


def test_the_search_is_deterministic_and_shares_its_scores_between_bounds():
    calls = []

    def counted(policy):
        calls.append(policy.budgets)
        return separable(policy)

    memo = {}
    first = search_budgets(CONFIG, counted, 0.3, progress=False, memo=memo)
    table_calls = len(calls)
    again = search_budgets(CONFIG, counted, 0.3, progress=False, memo=memo)
    assert again == first and len(calls) == table_calls  # nothing scored twice
    search_budgets(CONFIG, counted, 0.5, progress=False, memo=memo)
    assert len(calls) - table_calls < 3 * len(LEVELS)  # the table is shared: only the new bound's moves
    assert len(set(calls)) == len(calls)


@pytest.mark.parametrize("budget", [0, -0.1, 1.5, float("nan"), "0.25", True])
def test_budgets_outside_0_1_are_refused(budget):
    with pytest.raises(ValueError, match=r"budget must be a fraction of the full cache in \(0, 1\]"):
        check_budget(budget)


def test_a_budget_below_the_condensed_scales_names_the_smallest_allowed():
    with pytest.raises(ValueError, match=r"condensed scales alone need 15 .* allowed budgets are >= 0\.0909"):
        search_budgets(CONFIG, separable, 0.05, progress=False)


def folder_images(model, folder):
    """(images, labels) of an emoji folder at the model's image size."""
    c = model.config
    return load_image_folder(folder, c.vqvae.image_size, c.var.num_classes)


@pytest.fixture(scope="module")
def searched(tmp_path_factory, emoji_folder):
    """`calibrate --search` on the tiny random model over four emoji (16 px)."""
    out = tmp_path_factory.mktemp("search") / "search.json"
    with pytest.MonkeyPatch.context() as patch:  # fast random weights instead of running the initialisers
        patch.setattr(checkpoint, "load_model", lambda spec, verify=None: random_model(spec))
        # the emoji stand in for the held-out split (a preset has none): the file records the held-out NLL
        patch.setattr(nll, "split_images", lambda model, split: (*folder_images(model, emoji_folder), "4 emoji"))
        argv = ["--model", "tiny", "--search", "--budget", "0.7", "--images", str(emoji_folder),
                "--samples", "3", "--batch", "3", "--out", str(out)]
        assert calibrate.main(argv) == 0
    return out


def test_the_search_file_is_a_calibration_that_amskv_loads(searched):
    data = read_calibration(searched)
    config = get_preset("tiny").var
    found = data["search"]
    assert data["samples"] == 3 and data["method"]["metric"] == "l2" and found["budget"] == 0.7
    assert found["slots"] <= found["bound"] == int(0.7 * 2 * 14) and sorted(found["budgets"]) == [5, 14]
    policy = AMSKV.from_calibration(searched)
    assert policy.budgets == tuple(found["budgets"]) and sum(policy.layout(config).capacities) == found["slots"]
    assert policy_from_name("amskv", config, searched) == policy  # --policy amskv --calibration F
    with pytest.raises(ValueError, match="calibration is for the ladder"):
        policy_from_name("amskv", dataclasses.replace(config, patch_nums=(1, 2, 4)), searched)
    with pytest.raises(ValueError, match="calibration is for a model of depth 2, not 16"):
        policy_from_name("amskv", get_preset("d16").var, searched)
    with pytest.raises(ValueError, match="made for a model of depth 2, not 16"):
        policy.layout(get_preset("d16").var)


def test_the_search_file_records_the_held_out_nll_and_the_default_follows_it(searched, emoji_folder):
    """The file's held-out figures are those of the searched policy against the full cache on the held-out images
    (here the 4 emoji); a full-size "search" scores exactly the full cache's NLL; the command lines' default is
    amskv exactly when the recorded ΔNLL is at most 5%."""
    data = read_calibration(searched)
    held = data["held_out"]
    assert (held["images"], held["source"]) == (4, "4 emoji") and held["delta_nll"] == (held["nll"] - held["full_nll"]) / held["full_nll"]
    assert held["delta_nll"] > 1e-5 and held["share"] < 1  # [5, 14] of 2×14 slots loses something (random weights: a little)
    model = random_model("tiny")
    images, labels = folder_images(model, emoji_folder)
    whole = {**data, "search": {**data["search"], "budgets": [14, 14]}}  # every layer keeps every scale
    same = calibrate.held_out_record(model, whole, images, labels, "4 emoji", batch=3, progress=False)
    assert same["nll"] == same["full_nll"] == held["full_nll"] and same["delta_nll"] == 0 and same["share"] == 1
    assert default_policy_name(whole | {"held_out": same})[0] == DEFAULT_POLICY
    for delta, name in [(0.05, DEFAULT_POLICY), (-0.01, DEFAULT_POLICY), (0.0501, "full")]:
        picked, why = default_policy_name(data | {"held_out": {**held, "delta_nll": delta}})
        assert picked == name and f"{delta:+.2%}" in why
    assert default_policy_name({k: v for k, v in data.items() if k != "held_out"})[0] == "full"
    assert default_policy_name({k: v for k, v in data.items() if k != "search"})[0] == "full"
    assert default_policy_name(None)[0] == "full"


def test_the_search_records_the_condensed_scales_it_searched_with(emoji_folder, monkeypatch):
    model = random_model("tiny")
    images, labels = folder_images(model, emoji_folder)
    monkeypatch.setattr(search, "search_budgets", functools.partial(search.search_budgets, condensed_scales=1))
    (data,) = calibrate.search_calibrations(model, images, labels, [0.7], samples=3, batch=3, progress=False)
    assert data["search"]["condensed_scales"] == 1 and data["search"]["levels"][0] == 1  # scale 0 alone
    assert AMSKV.from_calibration(data).condensed_scales == 1


def error_line(err: str, usage: bool) -> str:
    """stderr's one line: alone, or after argparse's usage (its first line "usage: ...", the rest indented) when
    `usage` (an error in the command line itself)."""
    lines = err.splitlines()
    assert len(lines) >= 1 and (len(lines) > 1) == usage, err
    assert not usage or lines[0].startswith("usage: ") and all(line.startswith(" ") for line in lines[1:-1]), err
    return lines[-1]


@pytest.mark.parametrize(
    "extra, message, usage",
    [
        (["--budget", "0"], r"--budget: budget must be a fraction of the full cache in \(0, 1\], got 0.0", True),
        (["--budget", "1.5"], r"--budget: budget must be a fraction of the full cache in \(0, 1\], got 1.5", True),
        (["--budget", "x"], r"--budget: could not convert string to float: 'x'", True),
        ([], r"--search needs --budget, a fraction of the full cache in \(0, 1\]", True),
        (["--budget", "0.7", "--images", "EMPTY"], "no images", False),
        (["--budget", "0.3", "--images", "EMOJI"], r"budget 0.3 leaves 8 slots; the condensed scales alone need 10",
         False),
    ],
)
def test_bad_input_fails_in_one_line_and_writes_nothing(tmp_path, capsys, emoji_folder, extra, message, usage):
    empty = tmp_path / "empty"
    (empty / "faces").mkdir(parents=True)
    out = tmp_path / "out.json"
    argv = ["--model", "tiny", "--search", "--samples", "2", "--out", str(out)]
    argv += [{"EMPTY": str(empty), "EMOJI": str(emoji_folder)}.get(x, x) for x in extra]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(checkpoint, "load_model", lambda spec, verify=None: random_model(spec))
        try:
            code = calibrate.main(argv)
        except SystemExit as exit_:  # argparse's errors in the command line itself
            code = exit_.code
    line = error_line(capsys.readouterr().err, usage)
    assert code == 2 and line.startswith("python -m amskv_jax.calibrate: error:")
    assert re.search(message, line), line
    assert not out.exists()
