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
"""

from __future__ import annotations

import csv
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from slug_pl.edit import apply_edit, make_edit, revert_edit, save_edits, stepped
from slug_pl.evaluation.evaluator import Evaluator
from slug_pl.gradients import save_tensors
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
    evaluate: Callable[[float], tuple[dict[str, float], bool, bool]],
    initial_step: float,
    max_evals: int,
    tolerance: float,
) -> tuple[list[tuple[float, dict, bool, bool]], int | None]:
    """Doubling then bisection on λ. ``evaluate(λ)`` returns ``(metrics, target_met, guard_ok)``.

    Returns every evaluation ``(λ, metrics, target_met, guard_ok)`` in order and the index of the
    smallest λ that met the target (None if no evaluation met it).
    """
    if initial_step <= 0:
        raise ValueError(f"the initial step must be positive, got {initial_step}")
    records: list[tuple[float, dict, bool, bool]] = []
    lo, hi, hi_index = 0.0, None, None
    step = initial_step
    for _ in range(max_evals):
        metrics, hit, guard_ok = evaluate(step)
        records.append((step, metrics, hit, guard_ok))
        if hit:
            hi, hi_index = step, len(records) - 1
        else:
            lo = step
        if hi is None:
            step *= 2.0
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
        save_checkpoint: bool = True,
    ):
        """
        Args:
            top_k: candidates per tower: the Pareto front by importance, capped at ``top_k``.
            towers: towers whose layers may be edited.
            target_metric / target_value: the forget target, ``metric <= value`` on validation.
            max_evals: evaluations per candidate layer.
            initial_step_fraction: λ₀ as a fraction of ‖θ_l‖ / ‖g_f,l‖.
            tolerance: stop bisecting when the bracket is below this fraction of λ.
            utility_guard: reject steps whose retain or utility top-1 drops by more than this
                (a fraction, e.g. 0.05 = 5 points); None disables the guard.
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
        self.top_k = top_k
        self.towers = list(towers)
        self.target = Target(target_metric, target_value)
        self.max_evals = max_evals
        self.initial_step_fraction = initial_step_fraction
        self.tolerance = tolerance
        self.utility_guard = utility_guard
        self.save_checkpoint = save_checkpoint
        self.summary: dict | None = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._t_fit = time.perf_counter()

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # on_fit_end (not on_train_end) also runs when the pass is skipped (model.gradients_from)
        if not trainer.is_global_zero:  # rank 0 searches alone; no collective calls below
            return
        t0 = time.perf_counter()
        run_dir = pl_module.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        model, family, datamodule = pl_module.clip, pl_module.family, trainer.datamodule
        grads = pl_module.gradients

        # 1. ranking
        params = {n: p.detach().cpu() for n, p in model.named_parameters()}
        scores = layer_scores(family, params, grads["forget"], grads["retain"])
        scores = [s for s in scores if s.tower in self.towers]
        if not scores:
            raise ValueError(
                "no candidate layers after filtering: every rankable tensor was excluded or has a zero "
                "forget gradient; check model.family.init_args.exclude/include and search.towers"
            )
        write_ranking_csv(scores, run_dir / "ranking.csv")

        # 2. evaluation before any edit
        forget_concepts = datamodule.concepts
        val = Evaluator(family, datamodule.loaded_sets("validation")["concepts"], forget_concepts,
                        datamodule.loaded_sets("validation").get("utility"), datamodule.eval_batch_size)
        before_val = val.evaluate(model)
        rank_zero_info(f"before: {_fmt(before_val)}")
        if self.target.met(before_val):
            rank_zero_warn(f"the unedited model already meets the target {self.target}: nothing to unlearn")

        # 3. search each candidate
        results: list[CandidateResult] = []
        evaluations: list[Evaluation] = []
        tb = _tensorboard(trainer)
        for tower in self.towers:
            for cand in candidates(scores, tower, self.top_k):
                results.append(self._search_layer(model, cand, grads["forget"][cand.name], val,
                                                  before_val, evaluations, tb))
        if not results:
            raise ValueError(f"no candidate layers in towers {self.towers}")
        chosen, target_met = self._choose(results)

        # 4. the edit, applied to the model for good
        edit = make_edit(model, chosen.layer, grads["forget"][chosen.layer], chosen.step,
                         tower=chosen.tower, concepts=forget_concepts)
        apply_edit(model, edit)
        t_search = time.perf_counter() - t0

        # 5. before/after on held-out test sets (or validation when there are none)
        if datamodule.has_stage("test"):
            test = Evaluator(family, datamodule.loaded_sets("test")["concepts"], forget_concepts,
                             datamodule.loaded_sets("test").get("utility"), datamodule.eval_batch_size)
            revert_edit(model, edit)
            before = test.evaluate(model)
            apply_edit(model, edit)
            after = test.evaluate(model)
            report_on = "test"
        else:
            before, after, report_on = before_val, chosen.metrics, "validation"

        # 6. artifacts
        meta = {"model": family.describe(), "concepts": forget_concepts, "target": str(self.target)}
        save_edits(run_dir / "edit.safetensors", [edit], meta)
        if self.save_checkpoint:
            save_tensors(run_dir / "edited_model.safetensors", model.state_dict(),
                         {**meta, "edited_layer": chosen.layer, "step": chosen.step})
        _write_search_csv(evaluations, run_dir / "search.csv")
        for tower in ("vision", "text"):
            if any(s.tower == tower for s in scores):
                fig = pareto_figure(scores, tower, chosen.layer)
                _save_figure(fig, run_dir / f"pareto_{tower}.png")
                if tb is not None:
                    tb.add_figure(f"pareto/{tower}", fig)
                import matplotlib.pyplot as plt

                plt.close(fig)
        timings = {
            "gradients": pl_module.timings.get("gradients", 0.0),
            "search": t_search,
            "total": time.perf_counter() - getattr(self, "_t_fit", t0),
        }
        self.summary = {
            "concepts": forget_concepts,
            "model": family.describe().get("model_name", family.family_name),
            "chosen": {"layer": chosen.layer, "tower": chosen.tower, "step": chosen.step},
            "search": {"target": str(self.target), "target_met": target_met,
                       "validation": _core(chosen.metrics)},
            "before": _core(before),
            "after": _core(after),
            "evaluations": len(evaluations),
            "timings_s": timings,
        }
        write_report(run_dir, self.summary, before_val=before_val, chosen=chosen, results=results,
                     scores=scores, report_on=report_on, before_full=before, after_full=after,
                     pass_stats=pl_module.pass_stats, gradient_files=pl_module.gradient_files)
        if tb is not None:
            metrics = {f"after/{k}": v for k, v in after.items()} | {f"before/{k}": v for k, v in before.items()}
            trainer.logger.log_hyperparams(
                {"chosen_layer": chosen.layer, "chosen_tower": chosen.tower, "step": chosen.step,
                 "target": str(self.target), "top_k": self.top_k, "max_evals": self.max_evals},
                metrics | {"target_met": float(target_met)},
            )
        verdict = "met" if target_met else "NOT met"
        rank_zero_info(f"chosen {chosen.layer} (step {chosen.step:.4g}); target {self.target} {verdict}; "
                       f"after ({report_on}): {_fmt(after)}; report: {run_dir / 'report.md'}")

    # -- per-layer search ----------------------------------------------------------------------
    def _search_layer(self, model, cand: LayerScore, forget_grad: torch.Tensor, val: Evaluator,
                      before: dict, evaluations: list[Evaluation], tb) -> CandidateResult:
        scale = cand.forget_grad_norm / cand.param_norm

        def evaluate(step: float):
            with stepped(model, cand.name, forget_grad, step):
                metrics = val.evaluate(model, edited=cand.name)
            hit = self.target.met(metrics)
            ok = self._guard_ok(before, metrics)
            ev = Evaluation(len(evaluations), cand.name, cand.tower, step, step * scale, hit, ok, metrics)
            evaluations.append(ev)
            if tb is not None:
                for k, v in metrics.items():
                    tb.add_scalar(f"search/{k}", v, ev.index)
                tb.add_scalar("search/step_fraction", ev.step_fraction, ev.index)
            return metrics, hit, ok

        start = len(evaluations)
        records, best = binary_step_search(evaluate, self.initial_step_fraction / scale,
                                           self.max_evals, self.tolerance)
        mine = evaluations[start:]
        result = CandidateResult(cand.name, cand.tower, mine, mine[best] if best is not None else None)
        status = f"step {result.best.step:.4g}" if result.best else "target not reached"
        rank_zero_info(f"  {cand.tower:6s} {cand.name}: {len(mine)} evaluations, {status}")
        return result

    def _guard_ok(self, before: dict, after: dict) -> bool:
        if self.utility_guard is None:
            return True
        return all(before[k] - after[k] <= self.utility_guard
                   for k in ("retain_top1", "utility_top1") if k in before and k in after)

    def _choose(self, results: list[CandidateResult]) -> tuple[Evaluation, bool]:
        def utility(ev: Evaluation) -> float:
            return ev.metrics.get("retain_top1", 0.0) + ev.metrics.get("utility_top1", 0.0)

        good = [r.best for r in results if r.succeeded]
        if good:
            return max(good, key=utility), True
        every = [ev for r in results for ev in r.evaluations]
        closest = min(every, key=lambda ev: (ev.metrics[self.target.metric], -utility(ev)))
        rank_zero_warn(f"no candidate met the target {self.target}; reporting the closest step")
        return closest, False


# -- helpers -----------------------------------------------------------------------------------

CORE = ("forget_top1", "forget_top5", "retain_top1", "utility_top1")


def _core(metrics: dict[str, float]) -> dict[str, float]:
    return {k: metrics[k] for k in CORE if k in metrics}


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.3f}" for k, v in metrics.items())


def _tensorboard(trainer: Trainer):
    logger = trainer.logger
    exp = getattr(logger, "experiment", None)
    return exp if exp is not None and hasattr(exp, "add_scalar") else None


def _save_figure(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp)
    os.replace(tmp, path)


def _write_search_csv(evaluations: list[Evaluation], path: Path) -> None:
    metric_names = sorted({k for ev in evaluations for k in ev.metrics})
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "layer", "tower", "step", "step_fraction", "target_met", "guard_ok", *metric_names])
        for ev in evaluations:
            row = asdict(ev)
            writer.writerow([row["index"], ev.layer, ev.tower, repr(ev.step), f"{ev.step_fraction:.6g}",
                             ev.target_met, ev.guard_ok, *(f"{ev.metrics.get(m, float('nan')):.6f}" for m in metric_names)])
    os.replace(tmp, path)
