"""The step search and the final joint re-check on a synthetic model whose metrics are a known
function of one weight, so the right answers are known in closed form."""

from __future__ import annotations

import pytest
import torch

from slug_pl.edit import apply_edit, make_edit
from slug_pl.step_search import Outcome, SearchSettings, StepEvaluation, StepSearch, binary_step_search


def _threshold_search(threshold, initial, lower=0.0, max_evals=20, tolerance=0.01, broken_above=None):
    calls = []

    def evaluate(step):
        calls.append(step)
        broken = broken_above is not None and step > broken_above
        hit = not broken and step >= threshold
        return {"forget_top5": 0.0 if hit else 1.0}, hit, True, broken

    records, best = binary_step_search(evaluate, initial, max_evals, tolerance, lower=lower)
    return records, best, calls


def test_binary_search_finds_the_smallest_step_within_tolerance():
    records, best, calls = _threshold_search(3.7, 0.5)
    step = records[best][0]
    assert 3.7 <= step <= 3.7 * 1.01 / 0.99
    assert calls[:4] == [0.5, 1.0, 2.0, 4.0]  # doubling until the first hit


def test_binary_search_never_goes_below_a_known_miss():
    _, best, calls = _threshold_search(3.7, 4.0, lower=2.0)
    assert min(calls) >= 2.0 and calls[1] == 3.0  # bisects between the known miss and the hit


def test_binary_search_bisects_below_a_broken_step():
    records, best, calls = _threshold_search(4.5, 1.0, broken_above=5.0)
    assert calls[:5] == [1.0, 2.0, 4.0, 8.0, 6.0]  # 8 broke the model: bisect below it, never double past it
    assert max(calls[4:]) < 8.0 and 4.5 <= records[best][0] <= 4.5 * 1.01 / 0.99


class _WeightEvaluator:
    """forget_top5 = 0 once weight[0, 0] <= -threshold; retain falls by 0.01 per unit below 0."""

    def __init__(self, threshold):
        self.threshold = threshold

    def evaluate(self, model, edited=None):
        w = model.weight[0, 0].item()
        return {"forget_top1": 0.0, "forget_top5": 0.0 if w <= -self.threshold else 1.0,
                "retain_top1": 1.0 + 0.01 * min(w, 0.0), "utility_top1": 1.0}


def _outcomes(model):
    """Two concepts' edits of the same weight (g = 1 at [0, 0]), steps 1 and 1, applied in order."""
    g = torch.zeros_like(model.weight)
    g[0, 0] = 1.0
    outcomes = []
    for concept in ("a", "b"):
        e = make_edit(model, "weight", g, 1.0, concepts=[concept])
        apply_edit(model, e)
        chosen = StepEvaluation(0, "weight", "vision", 1.0, 0.1, True, True, {}, concept)
        outcomes.append(Outcome(concept, [], {}, [], chosen, chosen, True, e, g, {}))
    return outcomes


@pytest.mark.parametrize("threshold, expect_met", [(3.5, True), (1e9, False)])
def test_joint_check_raises_a_missing_step_or_leaves_it(threshold, expect_met):
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    outcomes = _outcomes(model)  # weight[0, 0] = -2: both concepts miss a threshold above 2
    thresholds = {"a": threshold, "b": 0.5}  # b is met on the combined model, a is not
    search = StepSearch(SearchSettings(max_evals=8, tolerance=0.01))
    search.joint_check(model, outcomes, lambda concept: _WeightEvaluator(thresholds[concept]))
    evaluations = search.evaluations
    w = model.weight[0, 0].item()
    assert [o.target_met for o in outcomes] == [expect_met, True]
    assert all(ev.concept == "a" for ev in evaluations) and len(evaluations) <= 8
    if expect_met:  # a's step raised to the smallest meeting the target: 3.5 - 1 (b's step) = 2.5
        assert -3.5 * 1.03 <= w <= -3.5
        assert outcomes[0].edit.step == pytest.approx(-w - 1.0)
    else:  # no step could meet it: a's step stays 1, the model is not wrecked by doubling
        assert w == -2.0 and outcomes[0].edit.step == 1.0
    assert outcomes[1].edit.step == 1.0  # b's edit rebuilt on top, same step
