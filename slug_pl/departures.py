"""Where slug_pl's defaults depart from the authors' code, and which of them a run switched off.

The authors' code is CSIPlab/SLUG (``src/clip/unlearn/calc_grad.py`` for the gradients,
``src/clip/unlearn_slug.py`` for the ranking and the step search). Each departure is one option;
the reference preset (``configs/reference.yaml``) sets every one to the authors' value, and a
run's report lists each with the value the run used. Why each default differs, and what it changes
on the demo, is in docs/reference.md.

Not an option: the final choice. The authors' code searches every candidate and leaves the choice
to the reader of its logs; slug_pl always also chooses (the smallest step meeting the target with
the most kept), and a run with the reference preset reports that choice as slug_pl's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from slug_pl.families.base import AUTHORS_EXCLUDE
from slug_pl.retain_projection import RetainProjection
from slug_pl.step_search import SearchSettings

#: The authors' iterations per candidate (their ``MAX_ITERATIONS``).
AUTHORS_ITERATIONS = 10


@dataclass(frozen=True)
class RunOptions:
    """The options of a run that decide each departure (what :func:`run_departures` reads).

    Attributes:
        exclude / include: the family's ranking filter (regular expressions on parameter names).
        forget_averaging: ``per_sample`` or ``per_batch`` (``model.forget_averaging``).
        forget_batch_size: global batch size of the forget set (``data.batch_size``).
        retain_batches: ``in_order`` or ``reference`` (``data.retain_batches``).
        eval_mode: whether the gradient pass ran in eval mode (``model.eval_mode``).
        search: the step search's settings.
        protect_retained: the retain projection (``model.protect_retained``), None when off.
    """

    exclude: Sequence[str]
    include: Sequence[str]
    forget_averaging: str
    forget_batch_size: int
    retain_batches: str
    eval_mode: bool
    search: SearchSettings
    protect_retained: RetainProjection | None = None


def run_departures(run: RunOptions) -> list[dict]:
    """Each departure: ``name``, ``option``, ``value`` (this run's), ``authors`` (their code's) and
    ``follows_authors`` (whether this run computes it as the authors' code does)."""
    s = run.search
    authors_filter = set(run.exclude) == set(AUTHORS_EXCLUDE) and not run.include
    rows = [
        ("ranked tensors", "model.family.init_args.exclude / include",
         "authors' filter" if authors_filter else f"{len(run.exclude)} exclude pattern(s)"
         + (f", {len(run.include)} include pattern(s)" if run.include else ""),
         f"every tensor but names containing {', '.join(AUTHORS_EXCLUDE)} (exclude {list(AUTHORS_EXCLUDE)})",
         authors_filter),
        ("forget averaging", "model.forget_averaging",
         run.forget_averaging + (f" (batches of {run.forget_batch_size})" if run.forget_averaging == "per_batch" else ""),
         "per_batch: mean of the batch means (their scripts: batches of 16)", run.forget_averaging == "per_batch"),
        ("retain batches", "data.retain_batches", run.retain_batches,
         "reference: shuffled shards and samples, partial batch dropped and the epoch topped up from a second "
         "pass, training augmentation", run.retain_batches == "reference"),
        ("candidates", "search.top_k / search.fronts",
         f"top_k {s.top_k if s.top_k is not None else 'null'}, fronts {s.fronts}",
         "every layer of the first Pareto front of each tower (top_k null, fronts 1)",
         s.top_k is None and s.fronts == 1),
        ("iterations", "search.iterations / search.max_evals", f"{s.iterations}, max_evals {s.max_evals}",
         f"fixed, max_evals {AUTHORS_ITERATIONS}: doubling then bisection with no stopping rule",
         s.iterations == "fixed" and s.max_evals == AUTHORS_ITERATIONS),
        ("utility guard and step margin", "search.utility_guard / search.step_margin",
         f"guard {s.utility_guard if s.utility_guard is not None else 'null'}, margin {s.step_margin:g}",
         "none (null, 1)", s.utility_guard is None and s.step_margin == 1.0),
        ("pass mode", "model.eval_mode", "eval" if run.eval_mode else "train",
         "train (model.train(); the same numbers on models without dropout)", not run.eval_mode),
        ("retain projection", "model.protect_retained", _projection_value(run.protect_retained),
         "none: SLUG's plain forget gradient (null)", run.protect_retained is None),
    ]
    return [{"name": n, "option": o, "value": v, "authors": a, "follows_authors": bool(f)} for n, o, v, a, f in rows]


def _projection_value(option: RetainProjection | None) -> str:
    if option is None:
        return "off (null)"
    tolerance = "the inputs' recommended" if option.tolerance is None else f"{option.tolerance:g}"
    return f"the forget gradient projected off the retained inputs (tolerance {tolerance}, limit {option.limit})"


def is_reference(departures: Sequence[dict]) -> bool:
    """Whether a run switched every departure off (the reference preset)."""
    return all(d["follows_authors"] for d in departures)
