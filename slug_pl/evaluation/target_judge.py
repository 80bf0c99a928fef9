"""What a downstream target's judge is and what it hands the run record.

A target (:mod:`slug_pl.targets`) pairs an adapter (the downstream model) with a judge: the judge
decides what the step search measures on the downstream model, orders the found edits, and
writes the target's part of the report, through the adapter only. Judges live in this package
(:mod:`slug_pl.evaluation.generation_judge`, :mod:`slug_pl.evaluation.vqa`,
:mod:`slug_pl.evaluation.unlearncanvas`); this module is their common interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

from slug_pl.context import RunContext
from slug_pl.edit import LayerEdit
from slug_pl.retain_projection import ProtectedInputs


@dataclass
class TargetReport:
    """What a target adds to a run's record.

    Attributes:
        key: the summary.json block name (e.g. ``"generation"``, ``"vqa"``).
        block: that block's content (``{"before": {...}, "after": {...}, ...}``; fractions).
        sections: report.md lines (markdown).
        figures: ``(caption, file name, matplotlib figure or PIL image)`` to save in the run folder.
        after: the downstream metrics after the edit on the held-out images (test, else validation),
            named as the target's search judge names them (e.g. ``forget_name_accuracy``): the
            run's forget target is checked on fresh images with them when the CLIP's own zero-shot
            metrics do not hold the target metric.
        forget_images: images of the forgotten concept(s) behind ``after``'s forget metrics.
        tables: CSV files for the run folder, ``{file name: (header, rows)}`` (the record writes
            them, e.g. UnlearnCanvas' ``unlearncanvas.csv``).
    """

    key: str
    block: dict
    sections: list[str] = field(default_factory=list)
    figures: list[tuple[str, str, object]] = field(default_factory=list)
    after: dict[str, float] = field(default_factory=dict)
    forget_images: int | None = None
    tables: dict[str, tuple[list[str], list[list]]] = field(default_factory=dict)


class TargetJudge(ABC):
    """How a target judges the run, through its adapter: what the step search measures, how the
    found edits are ordered, the report. Lives in :mod:`slug_pl.evaluation`."""

    def protected_inputs(self, context: RunContext, limit: int) -> list[ProtectedInputs]:
        """What the retain projection (the method's ``model.protect_retained``) keeps the edit off
        on this downstream model: at most ``limit`` inputs (prompts or images) per tower, as
        :class:`slug_pl.retain_projection.ProtectedInputs`. A judge that does not say refuses."""
        raise ValueError(f"model.protect_retained: the target judged by {type(self).__name__} does not say what it "
                         f"protects; set model.protect_retained null")

    def search_judge(self, context: RunContext, concept: str):
        """A judge (``evaluate(model, edited) -> metrics``) for the step search of ``concept``,
        measured on the downstream model with the CLIP's edit transplanted, or None to search
        on the CLIP's own zero-shot metrics."""
        return None

    @property
    def reorders_candidates(self) -> bool:
        """Whether :meth:`rank_candidates` re-orders the found edits by the downstream model's own
        judgement (then the search must find every candidate's edit: no ``stop_dominated``)."""
        return False

    def rank_candidates(self, context: RunContext, concept: str, edits: Sequence[LayerEdit]) -> list[int] | None:
        """Order (best first) of the candidate edits that met the target on the CLIP side, judged
        downstream (each ``edits[i]`` applied alone); None keeps the CLIP-side order."""
        return None

    @abstractmethod
    def evaluate(self, context: RunContext, edits: Sequence[LayerEdit]) -> TargetReport:
        """Before (edits reverted) and after measurements of the downstream model, for the run's
        concepts (the CLIP, ``context.model``, carries ``edits`` on entry and on return)."""
