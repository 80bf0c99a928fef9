"""Step search (DESIGN.md §1) and the Callback that runs ranking + search after the gradient pass.

For a candidate layer l the edit is θ_l ← θ_l − λ·g_f,l. Starting from
λ₀ = ``initial_step_fraction`` · ‖θ_l‖ / ‖g_f,l‖ (a step of 10 % of the layer's norm by default),
λ doubles until the edited model meets the forget target, then bisects between the last miss and
the first hit, for at most ``max_evals`` evaluations or until the bracket is narrower than
``tolerance`` · λ. The result is the smallest evaluated λ that met the target. An optional
utility guard rejects it when retain or utility top-1 fell by more than the guard.

Final choice: among candidates whose result meets the target and the guard, the one with the best
retain top-1 + utility top-1 on the validation sets. If none does, the candidate that came
closest to the target is reported, and the run says the target was not met.

Several concepts (DESIGN.md §1) get one edit each, searched jointly: concepts are edited one
after another, each step searched on the model that already carries the earlier concepts' edits
(retain excludes every concept of the run). A greedy order of choices is fragile: the best edit
for the first concept can leave the second only costly edits. So the search keeps a beam: the
``beam_width`` best partial edit sets (all targets met first, then retain + utility top-1 on the
combined model) are each extended by the next concept's ``beam_width`` best candidates, and the
final choice is the complete set with every target met and the best retain + utility on the
combined model. All targets are re-checked on that model; a concept that misses gets a larger
step.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from slug_pl.atomic import atomic_output, file_slug
from slug_pl.edit import apply_edit, make_edit, revert_edit, save_edits, stepped
from slug_pl.evaluation.evaluator import Evaluator
from slug_pl.gradients import forget_similarity_sum, save_tensors
from slug_pl.ranking import LayerScore, candidates, layer_scores, pareto_figure, write_ranking_csv
from slug_pl.report import write_report


@dataclass
class Target:
    """The forget target: ``metric <= value`` (accuracies are fractions)."""

    metric: str = "forget_top5"
    value: float = 0.0

    def met(self, metrics: dict[str, float]) -> bool:
        return metrics[self.metric] <= self.value

    def __str__(self) -> str:
        return f"{self.metric} <= {self.value:g}" if self.value else f"{self.metric} == 0"


@dataclass
class Evaluation:
    """One evaluated edit: layer, step λ, its validation metrics and verdicts."""

    index: int
    layer: str
    tower: str
    step: float
    step_fraction: float  # λ · ‖g_f,l‖ / ‖θ_l‖: the relative size of the edit
    target_met: bool
    guard_ok: bool
    metrics: dict[str, float] = field(default_factory=dict)
    concept: str = ""  # the concept whose forget target this evaluation searched


@dataclass
class CandidateResult:
    layer: str
    tower: str
    evaluations: list[Evaluation]
    best: Evaluation | None  # smallest evaluated step meeting the target

    @property
    def succeeded(self) -> bool:
        return self.best is not None and self.best.guard_ok


def binary_step_search(
    evaluate: Callable[[float], tuple[dict[str, float], bool, bool, bool]],
    initial_step: float,
    max_evals: int,
    tolerance: float,
    lower: float = 0.0,
) -> tuple[list[tuple[float, dict, bool, bool]], int | None]:
    """Doubling then bisection on λ. ``evaluate(λ)`` returns ``(metrics, target_met, guard_ok,
    broken)``; ``broken`` (non-finite outputs) caps λ: the search bisects below it instead of
    doubling past it. ``lower``: a step known to miss the target (bisection never goes below it).

    Returns every evaluation ``(λ, metrics, target_met, guard_ok)`` in order and the index of the
    smallest λ that met the target (None if no evaluation met it).
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
        if hi is None:
            step = step * 2.0 if cap is None else (lo + cap) / 2.0
        else:
            if hi - lo <= tolerance * hi:
                break
            step = (lo + hi) / 2.0
    return records, hi_index


class SlugSearch(Callback):
    """After the gradient pass: rank layers, search a step for each candidate, pick one, and write
    the run's artifacts (ranking.csv, pareto_*.png, search.csv, edit.safetensors, the edited
    checkpoint, report.md, summary.json)."""

    def __init__(
        self,
        top_k: int = 3,
        towers: list[str] = ("vision", "text"),
        target_metric: str = "forget_top5",
        target_value: float = 0.0,
        max_evals: int = 10,
        initial_step_fraction: float = 0.1,
        tolerance: float = 0.05,
        utility_guard: float | None = None,
        step_margin: float = 1.0,
        similarity_concepts: int = 8,
        concept_gradients: str = "original",
        beam_width: int = 3,
        fronts: int = 1,
        save_checkpoint: bool = True,
    ):
        """
        Args:
            top_k: candidates per tower: the Pareto front by importance, capped at ``top_k``.
            fronts: candidates come from the first ``fronts`` Pareto fronts of each tower (1: the
                front only; 2 adds the front of the remaining layers, ...), still capped at top_k.
            towers: towers whose layers may be edited.
            target_metric / target_value: the forget target, ``metric <= value`` on validation.
            max_evals: evaluations per candidate layer.
            initial_step_fraction: λ₀ as a fraction of ‖θ_l‖ / ‖g_f,l‖.
            tolerance: stop bisecting when the bracket is below this fraction of λ.
            utility_guard: reject steps whose retain or utility top-1 drops by more than this
                (a fraction, e.g. 0.05 = 5 points); None disables the guard.
            step_margin: multiply the chosen (smallest target-meeting) step by this factor
                (>= 1) so that forgetting also holds on fresh images of the concept, at some cost
                in retain accuracy (see benchmarks/results/robust_forgetting.md).
            similarity_concepts: concepts shown in the before/after similarity matrix (the
                forgotten ones first, then others of the concept set).
            concept_gradients: with several concepts, compute each concept's forget gradient on the
                ``original`` model or on the ``edited`` model (the earlier concepts' edits
                applied); either way its step is searched on the edited model and all targets are
                re-checked on the combined model.
            beam_width: with several concepts, partial edit sets kept after each concept, and
                candidates per concept tried on each (1: greedy, one concept after another).
            save_checkpoint: also write the full edited model (``edited_model.safetensors``).
        """
        if top_k < 1:
            raise ValueError(f"search top_k must be >= 1, got {top_k}")
        if max_evals < 1:
            raise ValueError(f"search max_evals must be >= 1, got {max_evals}")
        if initial_step_fraction <= 0:
            raise ValueError(f"search initial_step_fraction must be > 0, got {initial_step_fraction}")
        if not 0 < tolerance < 1:
            raise ValueError(f"search tolerance must be in (0, 1), got {tolerance}")
        bad = [t for t in towers if t not in ("vision", "text")]
        if bad or not towers:
            raise ValueError(f"search towers must be a non-empty subset of ['vision', 'text'], got {list(towers)}")
        if utility_guard is not None and utility_guard < 0:
            raise ValueError(f"search utility_guard must be >= 0, got {utility_guard}")
        if concept_gradients not in ("edited", "original"):
            raise ValueError(f"search concept_gradients must be 'edited' or 'original', got {concept_gradients!r}")
        if beam_width < 1:
            raise ValueError(f"search beam_width must be >= 1, got {beam_width}")
        if fronts < 1:
            raise ValueError(f"search fronts must be >= 1, got {fronts}")
        if step_margin < 1.0:
            raise ValueError(f"search step_margin must be >= 1 (a factor on the found step), got {step_margin}")
        self.top_k = top_k
        self.towers = list(towers)
        self.target = Target(target_metric, target_value)
        self.max_evals = max_evals
        self.initial_step_fraction = initial_step_fraction
        self.tolerance = tolerance
        self.utility_guard = utility_guard
        self.step_margin = step_margin
        self.similarity_concepts = similarity_concepts
        self.concept_gradients = concept_gradients
        self.beam_width = beam_width
        self.fronts = fronts
        self.save_checkpoint = save_checkpoint
        self.summary: dict | None = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._t_fit = time.perf_counter()
        family = pl_module.family
        if not any(family.is_rankable(n, p) and family.tower_of(n) in self.towers
                   for n, p in pl_module.clip.named_parameters()):
            raise ValueError(
                f"no candidate layers: no rankable tensor in towers {self.towers} after the "
                f"model.family.init_args exclude/include filters; widen them or search.towers"
            )

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # on_fit_end (not on_train_end) also runs when the pass is skipped (model.gradients_from)
        if not trainer.is_global_zero:  # rank 0 searches alone; no collective calls below
            return
        t0 = time.perf_counter()
        run_dir = pl_module.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        model, family, datamodule = pl_module.clip, pl_module.family, trainer.datamodule
        grads = pl_module.gradients
        concepts = list(datamodule.concepts)
        tb = _tensorboard(trainer)
        evaluations: list[Evaluation] = []

        # 1.-2. one layer and step per concept; several concepts are searched jointly (beam)
        outcomes = self._search_concepts(model, family, datamodule, concepts, grads, evaluations, tb)
        for o in outcomes:
            apply_edit(model, o["edit"])
        if len(concepts) > 1:
            self._joint_check(model, family, datamodule, outcomes, evaluations)
        for o in outcomes:
            self._write_concept_artifacts(o, run_dir, "" if len(concepts) == 1 else f"_{file_slug(o['concept'])}", tb)
        edits = [o["edit"] for o in outcomes]
        t_search = time.perf_counter() - t0

        # 3. before / after on held-out test sets (validation when there are none), MIA, figures
        report_on = "test" if datamodule.has_stage("test") else "validation"
        with _reverted(model, edits):
            before = _evaluator(family, datamodule, report_on, concepts).evaluate(model)
        final = _evaluator(family, datamodule, report_on, concepts)
        after = final.evaluate(model)
        per_concept_after = {c: _evaluator(family, datamodule, report_on, [c]).evaluate(model) for c in concepts}
        extras = _before_after_extras(family, model, edits, datamodule, final, concepts, run_dir, tb,
                                      self.similarity_concepts)

        # 4. artifacts
        meta = {"model": family.describe(), "concepts": concepts, "target": str(self.target)}
        save_edits(run_dir / "edit.safetensors", merge_edits(edits), meta)
        if self.save_checkpoint:
            save_tensors(run_dir / "edited_model.safetensors", model.state_dict(),
                         {**meta, "edited_layers": [e.name for e in edits], "steps": [e.step for e in edits]})
        _write_search_csv(evaluations, run_dir / "search.csv")
        first = outcomes[0]["chosen"]
        target_met = all(o["target_met"] for o in outcomes)
        self.summary = {
            "concepts": concepts,
            "model": family.describe().get("model_name", family.family_name),
            "chosen": {"layer": first.layer, "tower": first.tower, "step": first.step},
            "search": {"target": str(self.target), "target_met": target_met, "step_margin": self.step_margin,
                       "validation": _core(outcomes[0]["validation"])},
            "before": _core(before),
            "after": _core(after),
            "evaluations": len(evaluations),
            "timings_s": {"gradients": pl_module.timings.get("gradients", 0.0), "search": t_search,
                          "total": time.perf_counter() - getattr(self, "_t_fit", t0)},
            "memory": getattr(pl_module, "peak_memory", None),
        } | ({"mia": extras["mia"]} if "mia" in extras else {})
        if len(concepts) > 1:
            self.summary["per_concept"] = [
                {"concept": o["concept"], "layer": o["chosen"].layer, "tower": o["chosen"].tower,
                 "step": o["chosen"].step, "target_met": o["target_met"], "validation": _core(o["validation"]),
                 "after": _core(per_concept_after[o["concept"]])}
                for o in outcomes
            ]
            self.summary["joint"] = {
                "method": (f"concepts edited one after another, each forget gradient computed on the "
                           f"{'already-edited' if self.concept_gradients == 'edited' else 'original'} model, "
                           f"each step searched on the model carrying the earlier edits; beam of "
                           f"{self.beam_width} partial edit sets; all targets re-checked on the combined model"),
                "beam_width": self.beam_width,
                "concept_gradients": self.concept_gradients,
                "alternatives": self._alternatives,
            }
        write_report(run_dir, self.summary, before_val=outcomes[0]["before_val"], chosen=first,
                     results=[r for o in outcomes for r in o["results"]], scores=outcomes[0]["scores"],
                     report_on=report_on, before_full=before, after_full=after,
                     pass_stats=pl_module.pass_stats, gradient_files=pl_module.gradient_files,
                     figures=extras.get("figures", []), skipped=getattr(pl_module, "skipped", {}))
        if tb is not None:
            metrics = {f"after/{k}": v for k, v in after.items()} | {f"before/{k}": v for k, v in before.items()}
            trainer.logger.log_hyperparams(
                {"chosen_layer": first.layer, "chosen_tower": first.tower, "step": first.step,
                 "concepts": ", ".join(concepts), "target": str(self.target), "top_k": self.top_k,
                 "max_evals": self.max_evals, "step_margin": self.step_margin},
                metrics | {"target_met": float(target_met)},
            )
        verdict = "met" if target_met else "NOT met"
        rank_zero_info(f"edited {', '.join(e.name for e in edits)}; target {self.target} {verdict}; "
                       f"after ({report_on}): {_fmt(after)}; report: {run_dir / 'report.md'}")

    def _search_concepts(self, model, family, datamodule, concepts: list[str], grads: dict,
                         evaluations: list[Evaluation], tb) -> list[dict]:
        """One outcome (layer, step, edit) per concept; the model is left unchanged.

        Several concepts: a beam search over the concepts in order (see the module docstring).
        Each partial edit set is a list of outcomes applied in order."""
        self._alternatives = []
        if len(concepts) == 1:
            return self._search_concept(model, family, datamodule, concepts[0], grads["forget"], grads["retain"],
                                        evaluations, tb, width=1)
        original: dict[str, dict] = {}  # concept -> forget gradient on the original model
        beam: list[list[dict]] = [[]]
        for i, concept in enumerate(concepts):
            extended = []
            for b, path in enumerate(beam):
                earlier = [o["edit"] for o in path]
                with _applied(model, earlier):
                    if self.concept_gradients == "original" or not path:
                        if concept not in original:
                            with _reverted(model, earlier):
                                original[concept] = concept_forget_gradient(family, model, datamodule, concept)
                        forget_grad = original[concept]
                    else:
                        forget_grad = concept_forget_gradient(family, model, datamodule, concept)
                    rank_zero_info(f"concept {i + 1}/{len(concepts)} {concept!r}, partial edit set {b + 1}/"
                                   f"{len(beam)} ({', '.join(e.name for e in earlier) or 'no edits yet'})")
                    for option in self._search_concept(model, family, datamodule, concept, forget_grad,
                                                       grads["retain"], evaluations, tb, width=self.beam_width):
                        extended.append(path + [option])
            beam = sorted(extended, key=_path_score, reverse=True)[: self.beam_width]
        # the complete edit sets, scored on the combined model: every target, retain and utility
        scored = []
        for path in beam:
            with _applied(model, [o["edit"] for o in path]):
                per_concept = [_evaluator(family, datamodule, "validation", [o["concept"]]).evaluate(model)
                               for o in path]
            met = sum(self.target.met(m) for m in per_concept)
            value = retained(per_concept[0])
            scored.append((met, value, path, per_concept))
            self._alternatives.append({
                "edits": [{"concept": o["concept"], "layer": o["edit"].name, "step": o["edit"].step} for o in path],
                "targets_met": met, "validation": _core(per_concept[0]) | {
                    f"forget_top5[{o['concept']}]": m["forget_top5"] for o, m in zip(path, per_concept)},
            })
        best = max(scored, key=lambda x: (x[0], x[1]))
        rank_zero_info(f"joint search: {len(scored)} complete edit sets; chosen "
                       f"{', '.join(o['edit'].name for o in best[2])} (targets met {best[0]}/{len(concepts)}, "
                       f"retain + utility top-1 {best[1]:.3f})")
        return best[2]

    def _search_concept(self, model, family, datamodule, concept: str, forget_grad: dict, retain_grad: dict,
                        evaluations: list[Evaluation], tb, width: int = 1) -> list[dict]:
        """Rank, search every candidate and return up to ``width`` edits for one concept, best
        first (model unchanged). Searched on the model as it is (earlier edits applied)."""
        scores = self._rank(family, model, {"forget": forget_grad, "retain": retain_grad})
        val = _evaluator(family, datamodule, "validation", [concept])
        try:
            before_val = val.evaluate(model)
        except FloatingPointError as err:
            raise FloatingPointError(f"{err} (unedited model {family.describe()})") from err
        rank_zero_info(f"before ({concept}): {_fmt(before_val)}")
        if self.target.met(before_val):
            rank_zero_warn(f"the model already meets the target {self.target} for {concept!r}: nothing to unlearn")
        results = [
            self._search_layer(model, cand, forget_grad[cand.name], val, before_val, evaluations, tb, concept)
            for tower in self.towers for cand in candidates(scores, tower, self.top_k, self.fronts)
        ]
        ranked, target_met = self._choices(results)
        outcomes = []
        for chosen in ranked[:width]:
            chosen = self._with_margin(model, chosen, forget_grad[chosen.layer], val, before_val, evaluations)
            edit = make_edit(model, chosen.layer, forget_grad[chosen.layer], chosen.step, tower=chosen.tower,
                             concepts=[concept])
            outcomes.append({"concept": concept, "scores": scores, "before_val": before_val, "results": results,
                             "chosen": chosen, "target_met": target_met, "edit": edit,
                             "forget_grad": forget_grad[chosen.layer], "validation": chosen.metrics})
        return outcomes

    def _write_concept_artifacts(self, outcome: dict, run_dir: Path, suffix: str, tb) -> None:
        """ranking{suffix}.csv and pareto_<tower>{suffix}.png of one concept's chosen edit."""
        scores = outcome["scores"]
        write_ranking_csv(scores, run_dir / f"ranking{suffix}.csv")
        for tower in ("vision", "text"):
            if any(sc.tower == tower for sc in scores):
                _save_figure(pareto_figure(scores, tower, outcome["chosen"].layer),
                             run_dir / f"pareto_{tower}{suffix}.png", tb, f"pareto/{tower}{suffix}")

    def _joint_check(self, model, family, datamodule, outcomes: list[dict], evaluations: list[Evaluation]) -> None:
        """Re-check every concept's target on the combined model. A concept that misses gets its
        step searched again with the other edits in place (doubling from its step, then
        bisection, up to ``max_evals``; a step that breaks the model or fails the utility guard is
        not taken). If no step meets the target, the step stays as it was and the run reports the
        miss: a model wrecked by ever larger steps helps no one."""
        for i, o in enumerate(outcomes):
            val = _evaluator(family, datamodule, "validation", [o["concept"]])
            current = val.evaluate(model)
            if self.target.met(current):
                continue
            found, chosen = o["edit"].step, o["chosen"]
            mine: list[Evaluation] = []

            def evaluate(step: float):
                restep_edit(model, outcomes, i, step)
                ev, broken = self._evaluate_step(lambda: val.evaluate(model), current, evaluations, o["edit"].name,
                                                 chosen.tower, step, chosen.step_fraction * step / chosen.step,
                                                 o["concept"])
                mine.append(ev)
                return ev.metrics, ev.target_met, ev.guard_ok, broken

            _, best = binary_step_search(evaluate, 2.0 * found, self.max_evals, self.tolerance, lower=found)
            if best is not None and mine[best].guard_ok:
                restep_edit(model, outcomes, i, mine[best].step)
                o["chosen"] = mine[best]
                rank_zero_info(f"joint check {o['concept']!r}: missed on the combined model; step raised "
                               f"{found:.4g} -> {mine[best].step:.4g}")
            else:
                restep_edit(model, outcomes, i, found)
                rank_zero_warn(f"joint check {o['concept']!r}: misses the target {self.target} on the combined "
                               f"model and no larger step (of {len(mine)} tried) meets it within the guard; "
                               f"the step stays {found:.4g}")
        for o in outcomes:  # the verdicts, all edits final
            o["validation"] = _evaluator(family, datamodule, "validation", [o["concept"]]).evaluate(model)
            o["target_met"] = self.target.met(o["validation"])
            rank_zero_info(f"joint check {o['concept']!r}: {_fmt(o['validation'])}")

    def _rank(self, family, model, grads) -> list[LayerScore]:
        params = {n: p.detach().cpu() for n, p in model.named_parameters()}
        scores = [s for s in layer_scores(family, params, grads["forget"], grads["retain"]) if s.tower in self.towers]
        if not scores:
            raise ValueError(
                "no candidate layers after filtering: every rankable tensor was excluded or has a zero "
                "forget gradient; check model.family.init_args.exclude/include and search.towers"
            )
        return scores

    def _with_margin(self, model, chosen: Evaluation, forget_grad, val: Evaluator, before: dict,
                     evaluations: list[Evaluation]) -> Evaluation:
        """The chosen step times ``step_margin`` (re-evaluated and recorded), for forgetting that
        holds on fresh images; the margin-free step when the margin is 1."""
        if self.step_margin == 1.0:
            return chosen
        step = chosen.step * self.step_margin
        with stepped(model, chosen.layer, forget_grad, step):
            metrics = val.evaluate(model, edited=chosen.layer)
        ev = Evaluation(len(evaluations), chosen.layer, chosen.tower, step,
                        chosen.step_fraction * self.step_margin, self.target.met(metrics),
                        self._guard_ok(before, metrics), metrics, chosen.concept)
        evaluations.append(ev)
        return ev

    # -- per-layer search ----------------------------------------------------------------------
    def _search_layer(self, model, cand: LayerScore, forget_grad: torch.Tensor, val: Evaluator,
                      before: dict, evaluations: list[Evaluation], tb, concept: str = "") -> CandidateResult:
        scale = cand.forget_grad_norm / cand.param_norm

        def evaluate(step: float):
            with stepped(model, cand.name, forget_grad, step):
                ev, broken = self._evaluate_step(lambda: val.evaluate(model, edited=cand.name), before, evaluations,
                                                 cand.name, cand.tower, step, step * scale, concept)
            if tb is not None:
                for k, v in ev.metrics.items():
                    tb.add_scalar(f"search/{k}", v, ev.index)
                tb.add_scalar("search/step_fraction", ev.step_fraction, ev.index)
            return ev.metrics, ev.target_met, ev.guard_ok, broken

        start = len(evaluations)
        records, best = binary_step_search(evaluate, self.initial_step_fraction / scale,
                                           self.max_evals, self.tolerance)
        mine = evaluations[start:]
        result = CandidateResult(cand.name, cand.tower, mine, mine[best] if best is not None else None)
        status = f"step {result.best.step:.4g}" if result.best else "target not reached"
        rank_zero_info(f"  {cand.tower:6s} {cand.name}: {len(mine)} evaluations, {status}")
        return result

    def _evaluate_step(self, measure: Callable[[], dict[str, float]], before: dict, evaluations: list[Evaluation],
                       layer: str, tower: str, step: float, step_fraction: float,
                       concept: str) -> tuple[Evaluation, bool]:
        """One evaluation of a step: ``measure()``'s metrics (all NaN when the step broke the
        model: a miss), the target and guard verdicts against ``before``, appended to
        ``evaluations``. Returns the evaluation and whether the model broke."""
        try:
            metrics = measure()
        except FloatingPointError as err:
            self._broken_message = str(err)
            metrics = {k: float("nan") for k in before}
        broken = any(v != v for v in metrics.values())
        ev = Evaluation(len(evaluations), layer, tower, step, step_fraction,
                        not broken and self.target.met(metrics), not broken and self._guard_ok(before, metrics),
                        metrics, concept)
        evaluations.append(ev)
        return ev, broken

    def _guard_ok(self, before: dict, after: dict) -> bool:
        if self.utility_guard is None:
            return True
        return all(before[k] - after[k] <= self.utility_guard
                   for k in ("retain_top1", "utility_top1") if k in before and k in after)

    def _choices(self, results: list[CandidateResult]) -> tuple[list[Evaluation], bool]:
        """The candidates' results that meet the target and the guard, best retain + utility
        first, and True; or the one closest to the target and False when none does."""
        good = [r.best for r in results if r.succeeded]
        if good:
            return sorted(good, key=lambda ev: retained(ev.metrics), reverse=True), True
        every = [ev for r in results for ev in r.evaluations
                 if all(v == v for v in ev.metrics.values())]  # ignore broken (NaN) evaluations
        if not every:
            raise FloatingPointError(
                f"every evaluated step broke the model ({self._broken_message}); lower "
                f"search.initial_step_fraction or raise search.max_evals")
        closest = min(every, key=lambda ev: (ev.metrics[self.target.metric], -retained(ev.metrics)))
        rank_zero_warn(f"no candidate met the target {self.target}; reporting the closest step")
        return [closest], False


# -- helpers -----------------------------------------------------------------------------------

CORE = ("forget_top1", "forget_top5", "retain_top1", "utility_top1")


def _core(metrics: dict[str, float]) -> dict[str, float]:
    return {k: metrics[k] for k in CORE if k in metrics}


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.3f}" for k, v in metrics.items())


def concept_forget_gradient(family, model, datamodule, concept: str) -> dict[str, torch.Tensor]:
    """The forget gradient of one concept's pairs on ``model`` as it is now (rank 0, one process):
    ∇ of the mean cos(image, caption), exact over all pairs (see :mod:`slug_pl.gradients`)."""
    sums = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    count = 0
    device = next(model.parameters()).device
    model.eval()
    with torch.enable_grad():
        for batch in datamodule.concept_batches(concept):
            model.zero_grad(set_to_none=True)
            u = family.encode_image(model, batch["images"].to(device))
            v = family.encode_text(model, batch["tokens"].to(device))
            forget_similarity_sum(u, v, batch["valid"].to(device)).backward()
            count += int(batch["valid"].sum())
            for n, p in model.named_parameters():
                if p.grad is not None:
                    sums[n] += p.grad
    model.zero_grad(set_to_none=True)
    if count == 0:
        raise ValueError(f"no forget pairs for concept {concept!r}")
    return {n: (g / count).cpu() for n, g in sums.items()}


def merge_edits(edits: list) -> list:
    """One patch entry per tensor: edits of the same tensor (applied in order) become one, from
    the first edit's original to the last edit's result."""
    merged: dict[str, object] = {}
    for e in edits:
        if e.name in merged:
            m = merged[e.name]
            concepts = list(m.info.get("concepts", [])) + list(e.info.get("concepts", []))
            merged[e.name] = type(e)(e.name, m.original, e.edited, m.step + e.step,
                                     {**m.info, "concepts": concepts, "steps": m.info.get("steps", [m.step]) + [e.step]})
        else:
            merged[e.name] = e
    return list(merged.values())


def _tensorboard(trainer: Trainer):
    logger = trainer.logger
    exp = getattr(logger, "experiment", None)
    return exp if exp is not None and hasattr(exp, "add_scalar") else None


def _evaluator(family, datamodule, stage: str, concepts: list[str]) -> Evaluator:
    """Forget metrics on ``concepts``; retain over the concepts the run does not forget."""
    sets = datamodule.loaded_sets(stage)
    others = [c for c in datamodule.concepts if c not in concepts]
    return Evaluator(family, sets["concepts"], concepts, sets.get("utility"), datamodule.eval_batch_size,
                     exclude_from_retain=others)


def restep_edit(model, outcomes: list[dict], index: int, step: float) -> None:
    """Change the step of ``outcomes[index]``'s edit to ``step`` on a model that carries every
    outcome's edit, applied in order. Later edits of the same tensor were computed on top of this
    one, so every edit from ``index`` on is reverted and rebuilt in order (same gradients, same
    steps but the new one); each outcome's ``edit`` is replaced."""
    for o in reversed(outcomes[index:]):
        revert_edit(model, o["edit"])
    for i, o in enumerate(outcomes[index:], start=index):
        e = o["edit"]
        o["edit"] = make_edit(model, e.name, o["forget_grad"], step if i == index else e.step, **e.info)
        apply_edit(model, o["edit"])


def retained(metrics: dict[str, float]) -> float:
    """What an edit keeps, the quantity every choice of the search maximises: retain top-1 +
    utility top-1 (fractions; a missing set counts 0)."""
    return metrics.get("retain_top1", 0.0) + metrics.get("utility_top1", 0.0)


def _path_score(path: list[dict]) -> tuple[int, float]:
    """A partial edit set's rank in the beam: targets met, then retain + utility top-1 of its last
    evaluation (made with every edit of the set applied)."""
    return sum(o["target_met"] for o in path), retained(path[-1]["chosen"].metrics)


@contextmanager
def _applied(model, edits):
    """The edits applied (in order) inside the block, reverted on exit."""
    for e in edits:
        apply_edit(model, e)
    try:
        yield model
    finally:
        for e in reversed(edits):
            revert_edit(model, e)


@contextmanager
def _reverted(model, edits):
    """The unedited model inside the block; the edits re-applied (in order) on exit."""
    for e in reversed(edits):
        revert_edit(model, e)
    try:
        yield model
    finally:
        for e in edits:
            apply_edit(model, e)


def _before_after_extras(family, model, edits, datamodule, final: Evaluator, concepts, run_dir: Path,
                         tb, n_shown: int) -> dict:
    """The similarity-matrix figure and, when the data module provides member / non-member
    pairs, membership inference, each before and after the edit."""
    from slug_pl.evaluation.mia import membership_inference, pair_similarities
    from slug_pl.evaluation.similarity import concept_similarity_matrix, similarity_figure

    out: dict = {"figures": []}
    data = final.sets["concepts"]
    present = [data.classnames[i] for i in sorted(set(data.labels.tolist()))]
    shown = list(concepts) + [c for c in present if c not in concepts]
    shown = shown[: max(len(concepts), n_shown)]
    args = (family, model, data.images, data.labels, data.classnames, data.templates, shown)
    with _reverted(model, edits):
        sim_before = concept_similarity_matrix(*args)
    sim_after = concept_similarity_matrix(*args)
    _save_figure(similarity_figure(sim_before, sim_after, shown), run_dir / "similarity.png", tb, "similarity")
    out["figures"].append(("Image–text similarity of concepts, before and after", "similarity.png"))

    pairs = datamodule.mia_pairs() if hasattr(datamodule, "mia_pairs") else None
    if pairs is not None:
        (m_img, m_tok), (n_img, n_tok) = pairs
        result = {}
        for when, ctx in (("before", _reverted(model, edits)), ("after", nullcontext())):
            with ctx:
                members = pair_similarities(family, model, m_img, m_tok)
                nonmembers = pair_similarities(family, model, n_img, n_tok)
            mia = membership_inference(members, nonmembers)
            result[when] = {"mean": mia["mean"], "std": mia["std"], "n": mia["n"]}
        out["mia"] = result
    return out


def _save_figure(fig, path: Path, tb=None, tag: str | None = None) -> None:
    import matplotlib.pyplot as plt

    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png")
    if tb is not None and tag:
        tb.add_figure(tag, fig)
    plt.close(fig)


def _write_search_csv(evaluations: list[Evaluation], path: Path) -> None:
    metric_names = sorted({k for ev in evaluations for k in ev.metrics})
    with atomic_output(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "concept", "layer", "tower", "step", "step_fraction", "target_met", "guard_ok",
                         *metric_names])
        for ev in evaluations:
            writer.writerow([ev.index, ev.concept, ev.layer, ev.tower, repr(ev.step), f"{ev.step_fraction:.6g}",
                             ev.target_met, ev.guard_ok, *(f"{ev.metrics.get(m, float('nan')):.6f}" for m in metric_names)])
