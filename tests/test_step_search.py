"""The step search's rules on a synthetic model whose metrics are known functions of the step, so
every right answer is computed by hand: doubling then bisection, the smallest hit, the relative
stopping rule, the evaluation budget, the guard, the final choice, the margin, the closest-step
fallback, and summed steps of a shared tensor."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slug_pl.edit import make_edit, merge_edits
from slug_pl.step_search import ForgetTarget, SearchSettings, StepSearch

THETA = 100.0  # every parameter starts at 100, its forget gradient is 1: λ₀ = 0.1 · 100 / 1 = 10


class Synthetic(nn.Module):
    """One scalar parameter per layer; editing layer l by λ moves it from 100 to 100 − λ."""

    def __init__(self, names):
        super().__init__()
        self.layers = nn.ParameterDict({n: nn.Parameter(torch.tensor([THETA])) for n in names})


class Family:
    """The two things the search asks a family: rankable tensors and their tower."""

    def is_rankable(self, name, param):
        return True

    def tower_of(self, name):
        return "text" if name.startswith("layers.t") else "vision"


class Judge:
    """For layer l edited by λ = 100 − θ_l: the forget target is met once λ >= threshold[l]
    (``continuous``: forget_top5 = max(0, 1 − λ / threshold) instead of 0/1); retain and utility
    top-1 fall linearly with λ at the layer's rates."""

    def __init__(self, threshold, retain_rate, utility_rate=None, continuous=False):
        self.threshold, self.retain_rate = threshold, retain_rate
        self.utility_rate = utility_rate or {n: 0.0 for n in threshold}
        self.continuous = continuous

    def evaluate(self, model, edited=None):
        steps = {n.split(".", 1)[1] if "." in n else n: THETA - p.item() for n, p in model.named_parameters()}
        steps = {k.replace("layers.", ""): v for k, v in steps.items()}
        forget = 1.0
        for layer, step in steps.items():
            if step > 0:
                forget = (max(0.0, 1 - step / self.threshold[layer]) if self.continuous
                          else (0.0 if step >= self.threshold[layer] - 1e-9 else 1.0))
        retain = 1.0 - sum(self.retain_rate[k] * s for k, s in steps.items())
        utility = 1.0 - sum(self.utility_rate[k] * s for k, s in steps.items())
        return {"forget_top1": forget, "forget_top5": forget, "retain_top1": retain, "utility_top1": utility}


def run(names, judge, **settings):
    model = Synthetic(names)
    grads = {f"layers.{n}": torch.ones(1) for n in names}
    retain = {f"layers.{n}": torch.ones(1) * (i + 1) for i, n in enumerate(names)}  # all equally aligned
    search = StepSearch(SearchSettings(**{"top_k": 5, **settings}), log=lambda m: None, warn=lambda m: None)
    outcomes = search.search_concept(model, Family(), judge, "c", grads, retain)
    return search, outcomes, model


def _per_layer(search, layer):
    return [ev for ev in search.evaluations if ev.layer == f"layers.{layer}"]


def test_doubling_then_bisection_with_a_relative_stopping_rule():
    """Threshold 130, λ₀ = 10, tolerance 5 % of λ: 10, 20, 40, 80 miss, 160 hits; bisection 120
    (miss), 140, 130 (hits), 125 (miss); the bracket [125, 130] is 5 ≤ 0.05 · 130 = 6.5: stop.
    An absolute rule (bracket ≤ 0.05) would go on to the budget."""
    search, (outcome,), _ = run(["va"], Judge({"va": 130.0}, {"va": 0.0}), max_evals=20, tolerance=0.05)
    steps = [ev.step for ev in _per_layer(search, "va")]
    assert steps == pytest.approx([10, 20, 40, 80, 160, 120, 140, 130, 125])
    assert outcome.chosen.step == pytest.approx(130) and outcome.edit.step == pytest.approx(130)  # the smallest hit
    assert outcome.target_met and outcome.validation["forget_top5"] == 0.0


def test_the_result_is_the_smallest_hit_not_the_last_evaluation():
    """The last evaluation (125) missed; the hits were 160, 140, 130: the result is 130."""
    search, (outcome,), _ = run(["va"], Judge({"va": 130.0}, {"va": 0.0}), max_evals=20, tolerance=0.05)
    last = _per_layer(search, "va")[-1]
    assert not last.target_met and outcome.found.step == pytest.approx(130)


def test_the_evaluation_budget_is_exactly_max_evals():
    search, (outcome,), _ = run(["va"], Judge({"va": 1e9}, {"va": 0.0}), max_evals=6)
    assert [ev.step for ev in search.evaluations] == pytest.approx([10, 20, 40, 80, 160, 320])
    assert not outcome.target_met


def test_fixed_iterations_run_the_whole_budget_and_keep_the_last_iterate():
    """The authors' loop (``iterations: fixed``): threshold 130, λ₀ = 10, exactly 10 evaluations,
    no stopping rule: 10, 20, 40, 80 miss, 160 hits, then bisection 120 (miss), 140, 130 (hits),
    125 (miss), 127.5 (miss) — where the tolerance rule stopped after 9. The last iterate, 127.5,
    misses; the result is still the smallest hit, 130."""
    search, (outcome,), _ = run(["va"], Judge({"va": 130.0}, {"va": 0.0}), max_evals=10, iterations="fixed")
    steps = [ev.step for ev in _per_layer(search, "va")]
    assert steps == pytest.approx([10, 20, 40, 80, 160, 120, 140, 130, 125, 127.5])
    (result,) = outcome.results
    assert result.final.step == pytest.approx(127.5) and not result.final.target_met
    assert result.best.step == pytest.approx(130) and outcome.found.step == pytest.approx(130)


def test_top_k_none_searches_every_front_layer():
    """Four vision layers on the front (their alignments are all 1, and a layer is dominated only
    by one of strictly lower alignment): top_k 3 searches the three most important, None all four."""
    names = ["v1", "v2", "v3", "v4"]
    model = Synthetic(names)
    grads = {f"layers.{n}": torch.ones(1) * (i + 1) for i, n in enumerate(names)}  # importance rises
    retain = {f"layers.{n}": torch.ones(1) for n in names}
    judge = Judge({n: 1.0 for n in names}, {n: 0.0 for n in names})
    searched = {}
    for top_k in (3, None):
        search = StepSearch(SearchSettings(top_k=top_k, max_evals=1), log=lambda m: None, warn=lambda m: None)
        search.search_concept(model, Family(), judge, "c", grads, retain)
        searched[top_k] = sorted({ev.layer for ev in search.evaluations})
    assert searched[None] == [f"layers.{n}" for n in names]
    assert searched[3] == ["layers.v2", "layers.v3", "layers.v4"]  # the three most important


def test_the_final_choice_keeps_the_most_retain_plus_utility():
    """Both layers meet the target at λ = 40; "vb" costs less retain + utility: it is chosen even
    though "va" comes first and has the higher importance."""
    judge = Judge({"va": 40.0, "vb": 40.0}, {"va": 0.004, "vb": 0.001}, {"va": 0.0, "vb": 0.001})
    search, (outcome,), _ = run(["va", "vb"], judge, max_evals=3)
    assert outcome.edit.name == "layers.vb"
    kept = {ev.layer: ev.metrics["retain_top1"] + ev.metrics["utility_top1"] for ev in search.evaluations if ev.target_met}
    assert kept["layers.vb"] > kept["layers.va"]


def test_the_utility_guard_rejects_a_costly_result():
    """"va" forgets at λ = 40 with a retain drop of 0.22 (beyond the 0.2 guard) and no utility
    cost: retain + utility 1.78. "vb" needs λ = 80 and drops retain 0.08 and utility 0.16 (each
    within the guard): 1.76. Without the guard "va" keeps more and is chosen; with it, "va"'s result
    is rejected and "vb" is chosen."""
    judge = Judge({"va": 40.0, "vb": 80.0}, {"va": 0.0055, "vb": 0.001}, {"va": 0.0, "vb": 0.002})
    guarded, (outcome,), _ = run(["va", "vb"], judge, max_evals=4, utility_guard=0.2)
    assert outcome.edit.name == "layers.vb"
    va = [r for r in outcome.results if r.layer == "layers.va"][0]
    assert va.best is not None and not va.best.guard_ok and not va.succeeded
    _, (free,), _ = run(["va", "vb"], judge, max_evals=4)
    assert free.edit.name == "layers.va"


def test_the_margin_scales_the_applied_step():
    """step_margin 1.5: the found step 130 is applied as 195, evaluated and recorded; the patch and
    the outcome carry 195, ``found`` keeps 130."""
    search, (outcome,), model = run(["va"], Judge({"va": 130.0}, {"va": 0.001}), max_evals=20, tolerance=0.05,
                                    step_margin=1.5)
    assert outcome.found.step == pytest.approx(130)
    assert outcome.chosen.step == pytest.approx(195) and outcome.edit.step == pytest.approx(195)
    assert search.evaluations[-1].step == pytest.approx(195)  # the margin's step was evaluated
    assert outcome.validation["retain_top1"] == pytest.approx(1 - 0.001 * 195)
    assert outcome.edit.edited.item() == pytest.approx(THETA - 195)
    assert model.layers["va"].item() == THETA  # the search leaves the model unchanged


def test_stop_dominated_gives_up_a_candidate_that_can_no_longer_win():
    """"va" forgets at λ = 40 keeping retain + utility 0.84 + 1 = 1.84. "vb" (threshold 130, retain
    falls 0.0025 per unit) misses at 10, 20, 40 keeping 1.975, 1.95, 1.9 and at 80 keeps 1.8 ≤ 1.84:
    every step that could still forget is larger and keeps less, so with stop_dominated its search
    ends there (4 evaluations, not 9). "vc" (threshold 50, 0.001 per unit) misses at 10-40 keeping
    more than 1.84, so it goes on, forgets at 50 keeping 1.95 and is chosen, as without the rule."""
    judge = Judge({"va": 40.0, "vb": 130.0, "vc": 50.0}, {"va": 0.004, "vb": 0.0025, "vc": 0.001})
    full, (chosen_full,), _ = run(["va", "vb", "vc"], judge, max_evals=20, tolerance=0.05)
    fast, (chosen_fast,), _ = run(["va", "vb", "vc"], judge, max_evals=20, tolerance=0.05, stop_dominated=True)
    assert [ev.step for ev in _per_layer(fast, "vb")] == pytest.approx([10, 20, 40, 80])
    assert len(_per_layer(full, "vb")) == 9
    vb = [r for r in chosen_fast.results if r.layer == "layers.vb"][0]
    assert vb.stopped and vb.best is None
    assert [ev.step for ev in _per_layer(fast, "vc")] == [ev.step for ev in _per_layer(full, "vc")]
    assert not [r for r in chosen_fast.results if r.layer == "layers.vc"][0].stopped
    assert chosen_fast.edit.name == chosen_full.edit.name == "layers.vc"
    assert chosen_fast.found.step == pytest.approx(chosen_full.found.step) == pytest.approx(50, rel=0.05)
    # the first candidate has nothing to be compared with; off by default
    assert not [r for r in chosen_fast.results if r.layer == "layers.va"][0].stopped
    assert not any(r.stopped for r in chosen_full.results)


def test_stop_dominated_leaves_every_candidate_to_a_downstream_reordering():
    """With ``rank_found`` (a downstream model judges the found edits by its own measures) a
    candidate that keeps less on validation may still win: nothing is given up, and every
    candidate's found edit is offered to it."""
    judge = Judge({"va": 40.0, "vb": 130.0, "vc": 50.0}, {"va": 0.004, "vb": 0.0025, "vc": 0.001})
    model = Synthetic(["va", "vb", "vc"])
    grads = {f"layers.{n}": torch.ones(1) for n in ("va", "vb", "vc")}
    search = StepSearch(SearchSettings(top_k=5, max_evals=20, tolerance=0.05, stop_dominated=True),
                        log=lambda m: None, warn=lambda m: None)
    offered = []
    search.rank_found = lambda concept, edits: offered.extend(e.name for e in edits) or [
        [e.name for e in edits].index("layers.vb"), *[i for i, e in enumerate(edits) if e.name != "layers.vb"]]
    (outcome,) = search.search_concept(model, Family(), judge, "c", grads, dict(grads))
    assert len(_per_layer(search, "vb")) == 9 and not any(r.stopped for r in outcome.results)
    assert sorted(offered) == ["layers.va", "layers.vb", "layers.vc"]
    assert outcome.edit.name == "layers.vb"  # the downstream order decides


def test_without_a_hit_the_closest_evaluation_is_reported():
    """Nothing reaches the threshold (10⁶) within the budget; forget_top5 = 1 − λ/10⁶ falls with λ:
    the closest evaluation is the largest step of the layer that got furthest, not the farthest."""
    judge = Judge({"va": 1e6, "vb": 1e6}, {"va": 0.0, "vb": 0.0}, continuous=True)
    search, (outcome,), _ = run(["va", "vb"], judge, max_evals=5)
    assert not outcome.target_met
    closest = min(search.evaluations, key=lambda ev: ev.metrics["forget_top5"])
    assert outcome.chosen.step == pytest.approx(closest.step) == pytest.approx(160)
    assert outcome.chosen.metrics["forget_top5"] == min(ev.metrics["forget_top5"] for ev in search.evaluations)


def test_merged_edits_of_one_tensor_carry_the_sum_of_their_steps():
    model = nn.Linear(3, 2, bias=False)
    g1, g2 = torch.randn(2, 3), torch.randn(2, 3)
    first = make_edit(model, "weight", g1, 0.5, concepts=["a"])
    with torch.no_grad():
        model.weight.copy_(first.edited)
    second = make_edit(model, "weight", g2, 0.25, concepts=["b"])
    (merged,) = merge_edits([first, second])
    assert merged.step == pytest.approx(0.75) and merged.info["steps"] == [0.5, 0.25]
    assert merged.info["concepts"] == ["a", "b"]
    assert torch.equal(merged.original, first.original) and torch.equal(merged.edited, second.edited)
    assert merged.relative_change == pytest.approx(
        (second.edited - first.original).norm().item() / first.original.norm().item(), rel=1e-6)


def test_settings_are_checked():
    for kwargs, key in (({"top_k": 0}, "top_k"), ({"step_margin": 0.5}, "step_margin"),
                        ({"towers": ("audio",)}, "towers"), ({"tolerance": 1.5}, "tolerance"),
                        ({"iterations": "once"}, "iterations"),
                        ({"iterations": "fixed", "stop_dominated": True}, "stop_dominated")):
        with pytest.raises(ValueError, match=key):
            SearchSettings(**kwargs)
    assert str(ForgetTarget("forget_top5", 0.0)) == "forget_top5 <= 0"
