"""In-memory evaluation of a model on forget / retain / utility sets, as used by the step search.

The search edits one tensor at a time, so the tower it does not touch gives the same features for
every candidate step. :meth:`Evaluator.evaluate` takes the tower being edited and re-uses cached
features of the other one (text class embeddings when a vision tensor is edited, image embeddings
when a text tensor is edited). The caches belong to the *unedited* model: call
:meth:`Evaluator.reset_cache` after the base model changes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from slug_pl.data.labelled import LoadedSet
from slug_pl.evaluation.metrics import ZeroShotAccuracy, concept_summary, utility_summary
from slug_pl.evaluation.zeroshot import class_embeddings, image_embeddings
from slug_pl.families.base import ModelFamily, Tower


class Evaluator:
    """Scores a model on a concept set (forget + retain concepts) and an optional utility set."""

    def __init__(
        self,
        family: ModelFamily,
        concepts: LoadedSet,
        forget_concepts: Sequence[str],
        utility: LoadedSet | None = None,
        batch_size: int = 256,
    ):
        missing = [c for c in forget_concepts if c not in concepts.classnames]
        if missing:
            raise ValueError(
                f"forget concept(s) {missing} are not in the class list of the concept set "
                f"{concepts.name!r} ({len(concepts.classnames)} names, e.g. "
                f"{concepts.classnames[:3]}); names must match exactly"
            )
        self.family = family
        self.sets = {"concepts": concepts} | ({"utility": utility} if utility is not None else {})
        self.forget_ids = [concepts.classnames.index(c) for c in forget_concepts]
        self.batch_size = batch_size
        self._image_cache: dict[str, torch.Tensor] = {}
        self._text_cache: dict[str, torch.Tensor] = {}

    def reset_cache(self) -> None:
        self._image_cache.clear()
        self._text_cache.clear()

    def _features(self, model: nn.Module, name: str, edited: Tower | None):
        data = self.sets[name]
        if edited == "text" and name in self._image_cache:
            images = self._image_cache[name]
        else:
            images = image_embeddings(self.family, model, data.images, self.batch_size)
            if edited is None:
                self._image_cache[name] = images
        if edited == "vision" and name in self._text_cache:
            classes = self._text_cache[name]
        else:
            classes = class_embeddings(self.family, model, data.classnames, data.templates, self.batch_size)
            if edited is None:
                self._text_cache[name] = classes
        return images, classes

    @torch.no_grad()
    def logits(self, model: nn.Module, name: str, edited: Tower | None = None) -> torch.Tensor:
        """Zero-shot logits ``(N, C)`` (cosine similarities, no scale) of set ``name``."""
        images, classes = self._features(model, name, edited)
        return images @ classes.T

    @torch.no_grad()
    def evaluate(self, model: nn.Module, edited: Tower | None = None) -> dict[str, float]:
        """Accuracies (fractions) ``forget_top1/5``, ``retain_top1/5``, ``utility_top1/5``.

        ``edited``: the tower that differs from the unedited model (None: the unedited model
        itself, whose features fill the caches).
        """
        was_training = model.training
        model.eval()
        out: dict[str, float] = {}
        for name, data in self.sets.items():
            metric = ZeroShotAccuracy(len(data.classnames), sync_on_compute=False)
            logits = self.logits(model, name, edited)
            if not torch.isfinite(logits).all():
                raise FloatingPointError(f"non-finite logits on set {data.name!r}: the model is broken")
            metric.update(logits.cpu(), data.labels)
            result = metric.compute()
            out |= concept_summary(result, self.forget_ids) if name == "concepts" else utility_summary(result)
        model.train(was_training)
        return out
