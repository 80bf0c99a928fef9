"""The SLUG step search, as plain functions over a judge (no Lightning; see docs/design.md §1).

For a candidate layer l the edit is θ_l ← θ_l − λ·g_f,l (λ > 0 always unlearns). The search,
read top to bottom:

1. **Rank** (:mod:`slug_pl.ranking`): the candidates are each tower's Pareto front (high
   importance ‖g_f‖/‖θ‖, low alignment |cos(g_f, g_r)|), by importance, capped at ``top_k``.
2. **Search one layer** (:func:`binary_step_search`): from λ₀ = ``initial_step_fraction`` ·
   ‖θ_l‖ / ‖g_f,l‖ (a step of 10 % of the layer's norm by default), λ doubles until the edited
   model meets the forget target, then bisects between the last miss and the first hit, for at
   most ``max_evals`` evaluations or until the bracket is narrower than ``tolerance`` · λ. The
   layer's result is the *smallest* evaluated λ that met the target. An optional utility guard
   rejects it when retain or utility fell by more than the guard.
3. **Choose** (:meth:`StepSearch.choose`): among the candidates whose result meets the target
   and the guard, the one that keeps the most (retain top-1 + utility top-1 on validation). If
   none does, the evaluation closest to the target is reported and the run says so.
4. **Margin**: the chosen λ is multiplied by ``step_margin`` (≥ 1) for forgetting that also holds
   on fresh images; the margin's λ is re-evaluated and recorded, and it is the λ applied.

Several concepts get one edit each, searched jointly (:meth:`StepSearch.search_concepts`):
concepts are edited one after another, each step searched on the model that already carries the
earlier concepts' edits. A beam keeps the ``beam_width`` best partial edit sets (targets met, then
what they keep) and extends each with the next concept's ``beam_width`` best candidates; the
complete sets are scored on the combined model. :meth:`StepSearch.joint_check` then re-checks
every target on the combined model and searches a larger step for a concept that misses.

A *judge* (:class:`SearchJudge`) measures a model: ``judge.evaluate(model, edited) -> metrics``. The
CLIP's own zero-shot :class:`~slug_pl.evaluation.evaluator.Evaluator` is one; a downstream
consumer (a VLM asked for names) can be another. ``edited`` names the one parameter that differs
from the judge's unedited model (a hint for caching), or None.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from slug_pl.edit import LayerEdit, applied, make_edit, restep_edit, reverted, stepped
from slug_pl.ranking import LayerScore, candidates, layer_scores
from slug_pl.record import core_metrics, format_metrics

#: Metrics whose sum an edit should keep as high as possible (fractions; missing ones count 0).
DEFAULT_KEPT = ("retain_top1", "utility_top1")
#: How many evaluations a candidate gets: until the bracket is within ``tolerance`` (at most
#: ``max_evals``), or exactly ``max_evals`` (the authors' code).
ITERATIONS = ("until_tolerance", "fixed")


class SearchJudge(Protocol):
    """Measures a model on validation data: ``{metric name: value}`` (accuracies as fractions)."""

    def evaluate(self, model: nn.Module, edited: str | None = None) -> dict[str, float]: ...


@dataclass(frozen=True)
class ForgetTarget:
    """The forget target: ``metric <= value`` (accuracies are fractions)."""

    metric: str = "forget_top5"
    value: float = 0.0

    def met(self, metrics: dict[str, float]) -> bool:
        return metrics[self.metric] <= self.value

    def __str__(self) -> str:
        return f"{self.metric} <= {self.value:g}"


@dataclass
class StepEvaluation:
    """One evaluated step: layer, λ, its metrics and verdicts (``index``: order in the run)."""

    index: int
    layer: str
    tower: str
    step: float
    step_fraction: float  # λ · ‖g_f,l‖ / ‖θ_l‖: the relative size of the edit
    target_met: bool
    guard_ok: bool
    metrics: dict[str, float] = field(default_factory=dict)
    concept: str = ""  # the concept whose forget target this evaluation searched

    @property
    def broken(self) -> bool:
        """Whether the step broke the model (non-finite outputs: every metric NaN)."""
        return any(v != v for v in self.metrics.values())


@dataclass
class CandidateResult:
    """All evaluations of one candidate layer and its result: the smallest step meeting the target."""

    layer: str
    tower: str
    evaluations: list[StepEvaluation]
    best: StepEvaluation | None
    stopped: bool = False  # given up: a miss already kept less than an earlier candidate's edit

    @property
    def succeeded(self) -> bool:
        return self.best is not None and self.best.guard_ok

    @property
    def final(self) -> StepEvaluation | None:
        """The last evaluated step (with ``iterations: fixed``, the ``max_evals``-th iterate: the
        step at which the authors' code leaves the model, hit or miss)."""
        return self.evaluations[-1] if self.evaluations else None


@dataclass
class Outcome:
    """The search's answer for one concept: the applied edit and how it was found.

    ``chosen`` is the evaluation of the applied step (with the margin, when there is one);
    ``found`` the smallest step meeting the target before the margin; ``validation`` the
    concept's metrics with the edit (on the combined model after a joint check).
    """

    concept: str
    scores: list[LayerScore]
    before: dict[str, float]
    results: list[CandidateResult]
    chosen: StepEvaluation
    found: StepEvaluation
    target_met: bool
    edit: LayerEdit
    forget_grad: torch.Tensor
    validation: dict[str, float]


@dataclass
class SearchSettings:
    """Every setting of the search (the ``search:`` section of a config).

    Attributes:
        target: the forget target on validation.
        top_k: candidates per tower (the Pareto front by importance, capped at ``top_k``; None:
            every layer of the first ``fronts`` fronts, as the authors' code searches).
        fronts: candidates come from the first ``fronts`` Pareto fronts.
        towers: towers whose layers may be edited.
        max_evals: evaluations per candidate layer.
        initial_step_fraction: λ₀ as a fraction of ‖θ_l‖ / ‖g_f,l‖.
        tolerance: stop bisecting when the bracket is below this fraction of λ (``iterations``
            ``until_tolerance`` only).
        iterations: ``until_tolerance`` (default): stop at ``tolerance`` or after ``max_evals``;
            ``fixed``: exactly ``max_evals`` evaluations of doubling then bisection, with no
            stopping rule, as the authors' code (10 iterations; its tolerance constant is never
            used). Excludes ``stop_dominated``.
        utility_guard: reject steps whose kept metrics each drop by more than this (fraction).
        step_margin: factor (≥ 1) on the found step, for forgetting that holds on fresh images.
        beam_width: several concepts: partial edit sets kept, and candidates tried per set.
        concept_gradients: several concepts: forget gradients on the ``original`` or ``edited`` model.
        kept: the metrics whose sum a choice maximises (retain and utility top-1 by default).
        stop_dominated: give up a candidate as soon as one of its steps misses the target while
            keeping less than the best edit an earlier candidate found: every step that could
            still meet the target is larger and, as long as what is kept falls with the step (as
            in every measured trace), keeps less still, so it cannot win. Saves evaluations where
            each is expensive (generations, a VLM's answers); off by default. Never applied when a
            downstream model re-orders the found edits (``StepSearch.rank_found``): it needs every
            candidate's found edit.
    """

    target: ForgetTarget = field(default_factory=ForgetTarget)
    top_k: int | None = 3
    fronts: int = 1
    towers: tuple[str, ...] = ("vision", "text")
    max_evals: int = 10
    initial_step_fraction: float = 0.1
    tolerance: float = 0.05
    utility_guard: float | None = None
    step_margin: float = 1.0
    beam_width: int = 3
    concept_gradients: str = "original"
    kept: tuple[str, ...] = DEFAULT_KEPT
    stop_dominated: bool = False
    iterations: str = "until_tolerance"

    def __post_init__(self):
        checks = [
            (self.top_k is None or self.top_k >= 1, f"search top_k must be >= 1 or null (every front layer), "
                                                    f"got {self.top_k}"),
            (self.fronts >= 1, f"search fronts must be >= 1, got {self.fronts}"),
            (self.max_evals >= 1, f"search max_evals must be >= 1, got {self.max_evals}"),
            (self.initial_step_fraction > 0, f"search initial_step_fraction must be > 0, got {self.initial_step_fraction}"),
            (0 < self.tolerance < 1, f"search tolerance must be in (0, 1), got {self.tolerance}"),
            (self.utility_guard is None or self.utility_guard >= 0,
             f"search utility_guard must be >= 0, got {self.utility_guard}"),
            (self.step_margin >= 1.0, f"search step_margin must be >= 1 (a factor on the found step), got {self.step_margin}"),
            (self.beam_width >= 1, f"search beam_width must be >= 1, got {self.beam_width}"),
            (self.concept_gradients in ("edited", "original"),
             f"search concept_gradients must be 'edited' or 'original', got {self.concept_gradients!r}"),
            (bool(self.towers) and all(t in ("vision", "text") for t in self.towers),
             f"search towers must be a non-empty subset of ['vision', 'text'], got {list(self.towers)}"),
            (bool(self.kept) and all(isinstance(k, str) for k in self.kept),
             f"search kept must name at least one validation metric, got {list(self.kept)}"),
            (self.iterations in ITERATIONS, f"search iterations must be one of {list(ITERATIONS)}, got "
                                            f"{self.iterations!r}"),
            (not (self.iterations == "fixed" and self.stop_dominated),
             "search iterations: fixed runs every one of max_evals evaluations; it excludes stop_dominated"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


def kept(metrics: dict[str, float], keys: Sequence[str] = DEFAULT_KEPT) -> float:
    """What an edit keeps, the quantity every choice maximises: the sum of ``keys`` (fractions;
    a missing one counts 0)."""
    return sum(metrics.get(k, 0.0) for k in keys)


def binary_step_search(
    evaluate: Callable[[float], tuple[dict[str, float], bool, bool, bool]],
    initial_step: float,
    max_evals: int,
    tolerance: float | None,
    lower: float = 0.0,
    give_up: Callable[[dict[str, float]], bool] | None = None,
) -> tuple[list[tuple[float, dict, bool, bool]], int | None]:
    """Doubling then bisection on λ.

    ``evaluate(λ)`` returns ``(metrics, target_met, guard_ok, broken)``. While no step has met the
    target, λ doubles; once one has, λ bisects between the largest miss (``lower`` at first: a
    step known to miss) and the smallest hit, until ``hi − lo <= tolerance · hi`` or ``max_evals``
    evaluations (``tolerance`` None: exactly ``max_evals``, no stopping rule). A ``broken`` step (non-finite outputs) caps λ: the search bisects below it
    instead of doubling past it. ``give_up(metrics)``, asked after each (unbroken) miss, ends the
    search when it returns True.

    Returns every evaluation ``(λ, metrics, target_met, guard_ok)`` in order and the index of the
    smallest λ that met the target (None if none did).
    """
    if initial_step <= 0:
        raise ValueError(f"the initial step must be positive, got {initial_step}")
    records: list[tuple[float, dict, bool, bool]] = []
    lo, hi, hi_index, cap = lower, None, None, None
    step = initial_step
    for _ in range(max_evals):
        metrics, hit, guard_ok, broken = evaluate(step)
        records.append((step, metrics, hit, guard_ok))
        if hit:
            hi, hi_index = step, len(records) - 1
        elif broken:
            cap = step if cap is None else min(cap, step)
        else:
            lo = step
            if give_up is not None and give_up(metrics):
                break
        if hi is None:
            step = step * 2.0 if cap is None else (lo + cap) / 2.0
        else:
            if tolerance is not None and hi - lo <= tolerance * hi:
                break
            step = (lo + hi) / 2.0
    return records, hi_index


class StepSearch:
    """The search of one run: settings, every evaluation so far, and the algorithm's steps.

    ``on_evaluation(ev)`` is called after every evaluation (e.g. to log it to TensorBoard),
    ``on_ranked(concept, scores)`` after each ranking (e.g. to write it to disk at once).
    ``rank_found(concept, edits) -> order | None`` may re-order the candidates that met the
    target (each found edit alone, best first), e.g. by a downstream model's own judgement.
    """

    def __init__(self, settings: SearchSettings,
                 on_evaluation: Callable[[StepEvaluation], None] | None = None,
                 on_ranked: Callable[[str, list[LayerScore]], None] | None = None,
                 log: Callable[[str], None] = print, warn: Callable[[str], None] = print):
        self.settings = settings
        self.evaluations: list[StepEvaluation] = []
        self.alternatives: list[dict] = []  # several concepts: the complete edit sets compared
        self.on_evaluation = on_evaluation
        self.on_ranked = on_ranked
        self.rank_found: Callable[[str, list[LayerEdit]], list[int] | None] | None = None
        self.log, self.warn = log, warn
        self._broken_message = ""
        #: seconds spent ranking, over every concept ranked (:meth:`rank`)
        self.ranking_s = 0.0

    @property
    def target(self) -> ForgetTarget:
        return self.settings.target

    @property
    def stop_tolerance(self) -> float | None:
        """The bisection's stopping tolerance; None with ``iterations: fixed`` (no stopping rule)."""
        return None if self.settings.iterations == "fixed" else self.settings.tolerance

    # -- one evaluation --------------------------------------------------------------------------
    def guard_ok(self, before: dict[str, float], after: dict[str, float]) -> bool:
        """The utility guard: no kept metric fell by more than ``utility_guard``."""
        guard = self.settings.utility_guard
        if guard is None:
            return True
        return all(before[k] - after[k] <= guard for k in self.settings.kept if k in before and k in after)

    def evaluate_step(self, measure: Callable[[], dict[str, float]], before: dict[str, float], layer: str,
                      tower: str, step: float, step_fraction: float, concept: str) -> StepEvaluation:
        """Measure one step (``measure()``; all metrics NaN when it raises FloatingPointError: the
        step broke the model, a miss), judge target and guard against ``before``, record it."""
        try:
            metrics = measure()
        except FloatingPointError as err:
            self._broken_message = str(err)
            metrics = {k: float("nan") for k in before}
        broken = any(v != v for v in metrics.values())
        ev = StepEvaluation(len(self.evaluations), layer, tower, step, step_fraction,
                            not broken and self.target.met(metrics), not broken and self.guard_ok(before, metrics),
                            metrics, concept)
        self.evaluations.append(ev)
        if self.on_evaluation is not None:
            self.on_evaluation(ev)
        return ev

    def check_metric_names(self, measured: dict[str, float]) -> None:
        """The forget target must be a metric the judge measures (else ValueError naming those it
        does); a kept metric it does not measure would count 0 in every choice (a warning)."""
        if self.target.metric not in measured:
            raise ValueError(f"forget_target.metric {self.target.metric!r} is not measured by this run's judge; "
                             f"it measures {sorted(measured)}")
        missing = [k for k in self.settings.kept if k not in measured]
        if missing:
            self.warn(f"search.kept names {missing}, which this run's judge does not measure (it measures "
                      f"{sorted(measured)}); they count 0 in the choice")

    # -- 2. one layer ------------------------------------------------------------------------------
    def search_layer(self, model: nn.Module, judge: SearchJudge, cand: LayerScore, forget_grad: torch.Tensor,
                     before: dict[str, float], concept: str = "", best_kept: float | None = None) -> CandidateResult:
        """Doubling then bisection of λ for one candidate layer (model restored after each step).

        ``best_kept``: what the best edit of the earlier candidates keeps; the search gives up on a
        miss that keeps no more than that (None: it never gives up).
        """
        scale = cand.forget_grad_norm / cand.param_norm  # step_fraction = λ · scale

        def evaluate(step: float):
            with stepped(model, cand.name, forget_grad, step):
                ev = self.evaluate_step(lambda: judge.evaluate(model, edited=cand.name), before, cand.name,
                                        cand.tower, step, step * scale, concept)
            return ev.metrics, ev.target_met, ev.guard_ok, ev.broken

        stopped = False

        def give_up(metrics: dict[str, float]) -> bool:
            nonlocal stopped
            stopped = kept(metrics, self.settings.kept) <= best_kept
            return stopped

        start = len(self.evaluations)
        _, best = binary_step_search(evaluate, self.settings.initial_step_fraction / scale,
                                     self.settings.max_evals, self.stop_tolerance,
                                     give_up=give_up if best_kept is not None else None)
        mine = self.evaluations[start:]
        result = CandidateResult(cand.name, cand.tower, mine, mine[best] if best is not None else None,
                                 stopped=stopped)
        if result.stopped:
            status = (f"stopped: a miss kept {kept(mine[-1].metrics, self.settings.kept):.3f}, no more than "
                      f"the best edit so far ({best_kept:.3f})")
        else:
            status = f"step {result.best.step:.4g}" if result.best else "target not reached"
        self.log(f"  {cand.tower:6s} {cand.name}: {len(mine)} evaluations, {status}")
        return result

    # -- 3. the choice -----------------------------------------------------------------------------
    def choose(self, results: Sequence[CandidateResult]) -> tuple[list[StepEvaluation], bool]:
        """The candidates' results that meet the target and the guard, the one keeping the most
        first, and True; or [the evaluation closest to the target] and False when none does
        (closest: lowest target metric, then the most kept; broken steps never count)."""
        good = [r.best for r in results if r.succeeded]
        if good:
            return sorted(good, key=lambda ev: kept(ev.metrics, self.settings.kept), reverse=True), True
        every = [ev for r in results for ev in r.evaluations if not ev.broken]
        if not every:
            raise FloatingPointError(
                f"every evaluated step broke the model ({self._broken_message}); lower "
                f"search.initial_step_fraction or raise search.max_evals")
        closest = min(every, key=lambda ev: (ev.metrics[self.target.metric], -kept(ev.metrics, self.settings.kept)))
        self.warn(f"no candidate met the target {self.target}; reporting the closest step")
        return [closest], False

    # -- 4. the margin -----------------------------------------------------------------------------
    def with_margin(self, model: nn.Module, judge: SearchJudge, chosen: StepEvaluation, forget_grad: torch.Tensor,
                    before: dict[str, float]) -> StepEvaluation:
        """The chosen step times ``step_margin``, evaluated and recorded (the margin-free
        evaluation itself when the margin is 1)."""
        margin = self.settings.step_margin
        if margin == 1.0:
            return chosen
        step = chosen.step * margin
        with stepped(model, chosen.layer, forget_grad, step):
            return self.evaluate_step(lambda: judge.evaluate(model, edited=chosen.layer), before, chosen.layer,
                                      chosen.tower, step, chosen.step_fraction * margin, chosen.concept)

    # -- one concept -------------------------------------------------------------------------------
    def rank(self, family, model: nn.Module, forget_grad: dict, retain_grad: dict,
             readable: Callable[[str], bool] | None = None) -> list[LayerScore]:
        """Ranking of the model's rankable tensors in the searched towers (see :mod:`slug_pl.ranking`)."""
        t0 = time.perf_counter()
        params = {n: p.detach().cpu() for n, p in model.named_parameters()}
        scores = [s for s in layer_scores(family, params, forget_grad, retain_grad, readable)
                  if s.tower in self.settings.towers]
        if not any(s.front for s in scores):
            raise ValueError(
                "no candidate layers: every rankable tensor was excluded, is not read by the target "
                "model, or has a zero forget gradient; check model.family.init_args.exclude/include "
                "and search.towers"
            )
        self.ranking_s += time.perf_counter() - t0
        return scores

    def search_concept(self, model: nn.Module, family, judge: SearchJudge, concept: str, forget_grad: dict,
                       retain_grad: dict, width: int = 1,
                       readable: Callable[[str], bool] | None = None) -> list[Outcome]:
        """Rank, search every candidate, choose: up to ``width`` outcomes for one concept, best
        first. Searched on the model as it is (earlier edits applied); the model is unchanged."""
        scores = self.rank(family, model, forget_grad, retain_grad, readable)
        if self.on_ranked is not None:
            self.on_ranked(concept, scores)
        try:
            before = judge.evaluate(model)
        except FloatingPointError as err:
            raise FloatingPointError(f"{err} (the model before any edit of this run)") from err
        self.log(f"before ({concept}): {format_metrics(before)}")
        self.check_metric_names(before)
        if self.target.met(before):
            self.warn(f"the model already meets the target {self.target} for {concept!r}: nothing to unlearn")
        # a candidate can be given up only when the choice is by what is kept; a downstream
        # re-ordering (rank_found) judges every found edit by other measures
        may_give_up = self.settings.stop_dominated and self.rank_found is None
        results: list[CandidateResult] = []
        for tower in self.settings.towers:
            for cand in candidates(scores, tower, self.settings.top_k, self.settings.fronts):
                found = [kept(r.best.metrics, self.settings.kept) for r in results if r.succeeded]
                results.append(self.search_layer(model, judge, cand, forget_grad[cand.name], before, concept,
                                                 best_kept=max(found) if may_give_up and found else None))
        ranked, target_met = self.choose(results)
        if target_met and self.rank_found is not None and len(ranked) > 1:
            found_edits = [make_edit(model, ev.layer, forget_grad[ev.layer], ev.step) for ev in ranked]
            order = self.rank_found(concept, found_edits)
            if order is not None:
                ranked = [ranked[i] for i in order]
        outcomes = []
        for found in ranked[:width]:
            grad = forget_grad[found.layer]
            chosen = self.with_margin(model, judge, found, grad, before)
            edit = make_edit(model, chosen.layer, grad, chosen.step, tower=chosen.tower, concepts=[concept])
            outcomes.append(Outcome(concept, scores, before, results, chosen, found,
                                    target_met and chosen.target_met, edit, grad, chosen.metrics))
        return outcomes

    # -- several concepts --------------------------------------------------------------------------
    def search_concepts(self, model: nn.Module, family, judge_for: Callable[[str], SearchJudge], concepts: Sequence[str],
                        forget_gradient: Callable[[str], dict], retain_grad: dict,
                        readable: Callable[[str], bool] | None = None,
                        run_forget_grad: dict | None = None) -> list[Outcome]:
        """One outcome per concept; the model is left unchanged.

        ``judge_for(concept)`` judges one concept's target (retain leaving out every concept of the
        run); ``forget_gradient(concept)`` computes a concept's forget gradient on the model as it
        is; ``run_forget_grad`` (one concept): the pass's forget gradient, used as it is.
        """
        self.alternatives = []
        if len(concepts) == 1:
            grad = run_forget_grad if run_forget_grad is not None else forget_gradient(concepts[0])
            return self.search_concept(model, family, judge_for(concepts[0]), concepts[0], grad, retain_grad,
                                       readable=readable)
        original: dict[str, dict] = {}  # concept -> forget gradient on the original model
        beam: list[list[Outcome]] = [[]]
        for i, concept in enumerate(concepts):
            extended = []
            for b, path in enumerate(beam):
                earlier = [o.edit for o in path]
                with applied(model, earlier):
                    if self.settings.concept_gradients == "original" or not path:
                        if concept not in original:
                            with reverted(model, earlier):
                                original[concept] = forget_gradient(concept)
                        grad = original[concept]
                    else:
                        grad = forget_gradient(concept)
                    self.log(f"concept {i + 1}/{len(concepts)} {concept!r}, partial edit set {b + 1}/{len(beam)} "
                             f"({', '.join(e.name for e in earlier) or 'no edits yet'})")
                    for option in self.search_concept(model, family, judge_for(concept), concept, grad, retain_grad,
                                                      width=self.settings.beam_width, readable=readable):
                        extended.append(path + [option])
            beam = sorted(extended, key=self._path_score, reverse=True)[: self.settings.beam_width]
        # the complete edit sets, scored on the combined model: every target, then what they keep
        scored = []
        for path in beam:
            with applied(model, [o.edit for o in path]):
                per_concept = [judge_for(o.concept).evaluate(model) for o in path]
            met = sum(self.target.met(m) for m in per_concept)
            value = kept(per_concept[0], self.settings.kept)
            scored.append((met, value, path))
            self.alternatives.append({
                "edits": [{"concept": o.concept, "layer": o.edit.name, "step": o.edit.step} for o in path],
                "targets_met": met,
                "validation": core_metrics(per_concept[0]) | {
                    f"{self.target.metric}[{o.concept}]": m[self.target.metric] for o, m in zip(path, per_concept)},
            })
        best = max(scored, key=lambda x: (x[0], x[1]))
        self.log(f"joint search: {len(scored)} complete edit sets; chosen {', '.join(o.edit.name for o in best[2])} "
                 f"(targets met {best[0]}/{len(concepts)}, kept {best[1]:.3f})")
        return best[2]

    def _path_score(self, path: list[Outcome]) -> tuple[int, float]:
        """A partial edit set's rank in the beam: targets met, then what its last evaluation
        (made with every edit of the set applied) keeps."""
        return sum(o.target_met for o in path), kept(path[-1].chosen.metrics, self.settings.kept)

    def joint_check(self, model: nn.Module, outcomes: list[Outcome], judge_for: Callable[[str], SearchJudge]) -> None:
        """Re-check every concept's target on the combined model (every edit applied, in order).

        A concept that misses gets its step searched again with the other edits in place
        (doubling from its step, then bisection above it, up to ``max_evals``; a step that breaks
        the model or fails the guard is not taken). If no step meets the target, the step stays as
        it was and the miss is reported: a model wrecked by ever larger steps helps no one.
        Each outcome's ``validation`` and ``target_met`` are then measured on the combined model.
        """
        for i, o in enumerate(outcomes):
            judge = judge_for(o.concept)
            current = judge.evaluate(model)
            if self.target.met(current):
                continue
            found, chosen = o.edit.step, o.chosen
            mine: list[StepEvaluation] = []

            def evaluate(step: float):
                restep_edit(model, outcomes, i, step)
                ev = self.evaluate_step(lambda: judge.evaluate(model), current, o.edit.name, chosen.tower, step,
                                        chosen.step_fraction * step / chosen.step, o.concept)
                mine.append(ev)
                return ev.metrics, ev.target_met, ev.guard_ok, ev.broken

            _, best = binary_step_search(evaluate, 2.0 * found, self.settings.max_evals, self.settings.tolerance,
                                         lower=found)
            if best is not None and mine[best].guard_ok:
                restep_edit(model, outcomes, i, mine[best].step)
                o.chosen = mine[best]
                self.log(f"joint check {o.concept!r}: missed on the combined model; step raised "
                         f"{found:.4g} -> {mine[best].step:.4g}")
            else:
                restep_edit(model, outcomes, i, found)
                self.warn(f"joint check {o.concept!r}: misses the target {self.target} on the combined model "
                          f"and no larger step (of {len(mine)} tried) meets it within the guard; the step "
                          f"stays {found:.4g}")
        for o in outcomes:  # the verdicts, all edits final
            o.validation = judge_for(o.concept).evaluate(model)
            o.target_met = self.target.met(o.validation)
            self.log(f"joint check {o.concept!r}: {format_metrics(o.validation)}")
