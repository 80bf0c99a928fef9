"""The one selection rule of every baseline: which of its candidate models it reports.

A baseline produces a sequence of candidate models, ordered from the mildest change to the
strongest: a method that trains (FT, GA, GAFT, SalUn) after each epoch; SSD for each λ of its
sweep, largest λ (least dampening) first. Each candidate is scored on the validation sets by the
same judge SLUG's step search uses, and the rule is SLUG's forget target:

1. the *first* candidate whose validation metrics meet the target (``metric <= value``): the
   mildest change that forgets, as SLUG reports the smallest step that does;
2. if none does, the *closest*: the lowest value of the target metric; a tie goes to the one that
   keeps more (:func:`slug_pl.step_search.kept`: retain + utility top-1), then to the earlier.

A *broken* candidate (the model's outputs were NaN/inf) is never preferred over one that is not.
The rule is plain functions over :class:`Checkpoint`, so a test (or a reader) can check it
without a Trainer.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from slug_pl.step_search import ForgetTarget, kept

RULE = ("the first checkpoint (mildest change first) whose validation metrics meet the forget target; "
        "if none does, the one with the lowest target metric (ties: more retain + utility top-1, then earlier)")


@dataclass(frozen=True)
class Checkpoint:
    """One candidate model of a baseline, scored on validation.

    Attributes:
        index: position in the method's order (1-based epoch, or position in the λ sweep).
        label: what it is, for reports (``"epoch 3"``, ``"λ = 0.644"``).
        metrics: validation accuracies (fractions); every value NaN when the model broke.
        target_met: whether ``metrics`` meet the forget target.
        info: method-specific values (e.g. ``{"epoch": 3}`` or ``{"lambda": 0.644}``).
    """

    index: int
    label: str
    metrics: dict[str, float]
    target_met: bool
    info: dict = field(default_factory=dict)

    @property
    def broken(self) -> bool:
        return any(math.isnan(v) for v in self.metrics.values())


def checkpoint(index: int, label: str, metrics: dict[str, float], target: ForgetTarget, **info) -> Checkpoint:
    """A scored candidate; a broken model (NaN metrics) never meets the target."""
    met = not any(math.isnan(v) for v in metrics.values()) and target.met(metrics)
    return Checkpoint(index, label, dict(metrics), bool(met), dict(info))


def preferred(candidate: Checkpoint, incumbent: Checkpoint | None, target: ForgetTarget) -> bool:
    """Whether the rule reports ``candidate`` (later in the order) rather than ``incumbent``."""
    if incumbent is None:
        return True
    if incumbent.target_met or candidate.broken:
        return False  # the first that meets stays; a broken model never replaces anything
    if candidate.target_met or incumbent.broken:
        return True
    gap_new = candidate.metrics[target.metric] - target.value
    gap_old = incumbent.metrics[target.metric] - target.value
    if gap_new != gap_old:
        return gap_new < gap_old
    return kept(candidate.metrics) > kept(incumbent.metrics)


def select(checkpoints: Iterable[Checkpoint], target: ForgetTarget) -> Checkpoint | None:
    """The checkpoint the rule reports (None for none)."""
    chosen = None
    for c in checkpoints:
        if preferred(c, chosen, target):
            chosen = c
    return chosen
