"""The run context: the one object the parts after a method's pass receive.

A method (:class:`~slug_pl.methods.base.UnlearningModule`) builds it once, after its model is
loaded, and hands it to the search's judges, the downstream target's judge and the run record.
It carries what those parts may know of the run: the model family and the model (as it is now:
the search edits it in place and reverts), the concepts, the run folder, the method's timings,
and the data's offer (evaluation sets by stage, forget and retain sources, membership-inference
pairs). Nothing of the run reaches them any other way: no part looks up the trainer, the
LightningModule or the data module on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from torch import nn

from slug_pl.data.labelled import LoadedSet
from slug_pl.data.limits import InputRules
from slug_pl.data.pairs import PairBatches
from slug_pl.families.base import ModelFamily


class RunData(Protocol):
    """What a run's data offers the parts after the pass (``SlugDataModule`` implements it)."""

    eval_batch_size: int
    input_rules: InputRules

    def has_stage(self, stage: str) -> bool: ...

    def loaded_sets(self, stage: str, part: tuple[int, int] = (0, 1)) -> dict[str, LoadedSet]: ...

    def eval_suite(self, stage: str): ...

    def concept_forget_urls(self, concept: str) -> tuple[str, ...]: ...

    def concept_batches(self, concept: str) -> PairBatches: ...

    def retain_urls(self) -> tuple[str, ...]: ...

    def mia_pairs(self): ...


@dataclass
class RunContext:
    """One run, as the search, the downstream target and the record see it.

    Attributes:
        family: the model adapter (encoders, tokenizer, image transform, tower of a name).
        model: the CLIP as it is now (edits are applied to it in place and reverted).
        concepts: the concepts the run forgets, in order.
        data: the data's offer (:class:`RunData`); a target that needs more of its data module
            (UnlearnCanvas' prompt grid) checks for it there and says what it needs.
        run_dir: ``lightning_logs/version_N`` (None outside a run).
        method: the method's short name (``"slug"``, ``"ga"``, ...).
        timings: the method's phase timings so far, in seconds (the method keeps adding to it).
    """

    family: ModelFamily
    model: nn.Module
    concepts: list[str]
    data: RunData
    run_dir: Path | None = None
    method: str = "slug"
    timings: dict[str, float] = field(default_factory=dict)

    # -- evaluation sets -------------------------------------------------------------------------
    def has_stage(self, stage: str) -> bool:
        """Whether the data has labelled sets for ``stage`` ("validation" or "test")."""
        return self.data.has_stage(stage)

    @property
    def report_stage(self) -> str:
        """Where the final before/after is measured: the held-out ``test`` sets when the data has
        them, else ``validation``."""
        return "test" if self.has_stage("test") else "validation"

    def eval_sets(self, stage: str, part: tuple[int, int] = (0, 1)) -> dict[str, LoadedSet]:
        """The decoded sets of ``stage`` (``concepts``, and ``utility`` when configured),
        preprocessed by the family's image transform; with ``part`` ``(r, W)`` only samples
        ``r::W`` of each (one rank's part of a shared evaluation)."""
        return self.data.loaded_sets(stage, part)

    def eval_suite(self, stage: str):
        """The specs of ``stage``'s sets (:class:`~slug_pl.data.datamodule.EvalSuite`, or None):
        for a target that decodes them with its own preprocessing."""
        return self.data.eval_suite(stage)

    @property
    def eval_batch_size(self) -> int:
        return self.data.eval_batch_size

    @property
    def input_rules(self) -> InputRules:
        """The limits every file the run reads is held to (:mod:`slug_pl.data.limits`): a part
        that reads the run's shards itself reads them under these."""
        return self.data.input_rules

    # -- pairs -------------------------------------------------------------------------------------
    def forget_urls(self, concept: str) -> tuple[str, ...]:
        """The forget-set shards of one concept."""
        return self.data.concept_forget_urls(concept)

    def forget_batches(self, concept: str) -> PairBatches:
        """One concept's forget pairs as single-process batches (its own forget gradient)."""
        return self.data.concept_batches(concept)

    def retain_urls(self) -> tuple[str, ...]:
        """The retain-set shards."""
        return self.data.retain_urls()

    def mia_pairs(self):
        """Member / non-member pairs for membership inference, or None (see
        :meth:`~slug_pl.data.datamodule.SlugDataModule.mia_pairs`)."""
        return self.data.mia_pairs()
