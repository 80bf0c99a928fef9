"""In-memory evaluation of a model on forget / retain / utility sets, as used by the step search.

The search edits one tensor at a time, so most of the network computes the same thing for every
candidate step. :meth:`Evaluator.evaluate` takes the name of the edited parameter and re-uses:

1. the *other* tower's features, computed once on the unedited model (text class embeddings
   when a vision tensor is edited, image embeddings when a text tensor is edited);
2. within the edited tower, the hidden states entering the edited block, computed once per
   (set, tower, block): blocks before the edited one do not depend on it, so only the blocks from
   there on and the head are recomputed (when the family provides
   :meth:`~slug_pl.families.base.ModelFamily.tower_stages` and the cache fits ``cache_bytes``).

The caches belong to the *unedited* model, the one last evaluated with ``edited=None``: every
such call declares the model as it is the new reference, so it recomputes everything and refills
the caches (a model changed in place, e.g. after an edit was applied, is never scored from stale
features).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from slug_pl.data.labelled import LoadedSet
from slug_pl.evaluation.metrics import ZeroShotAccuracy, concept_summary, utility_summary
from slug_pl.evaluation.zeroshot import group_by_class, prompts
from slug_pl.families.base import ModelFamily, TowerStages

DEFAULT_CACHE_BYTES = 4 * 2**30


class Evaluator:
    """Scores a model on a concept set (forget + retain concepts) and an optional utility set."""

    def __init__(
        self,
        family: ModelFamily,
        concepts: LoadedSet,
        forget_concepts: Sequence[str],
        utility: LoadedSet | None = None,
        batch_size: int = 256,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        exclude_from_retain: Sequence[str] = (),
    ):
        """``exclude_from_retain``: concepts left out of the retain accuracy (other concepts the
        same run forgets)."""
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
        self.exclude_ids = [concepts.classnames.index(c) for c in exclude_from_retain if c in concepts.classnames]
        self.batch_size = batch_size
        self.cache_bytes = cache_bytes
        self._tokens = {
            name: family.tokenize(prompts(s.classnames, s.templates))
            for name, s in self.sets.items()
        }
        self._features: dict[tuple[str, str], torch.Tensor] = {}  # (set, tower) -> unedited unit features
        self._hidden: dict[tuple[str, str, int], list[torch.Tensor]] = {}  # (set, tower, block) -> batches

    @classmethod
    def for_concepts(cls, context, stage: str, concepts: Sequence[str]) -> "Evaluator":
        """The judge of ``concepts`` on the run's ``stage`` ("validation" or "test") sets
        (``context``: a :class:`~slug_pl.context.RunContext`): forget metrics over ``concepts``,
        retain over the concepts the run does not forget."""
        sets = context.eval_sets(stage)
        others = [c for c in context.concepts if c not in concepts]
        return cls(context.family, sets["concepts"], concepts, sets.get("utility"), context.eval_batch_size,
                   exclude_from_retain=others)

    def reset_cache(self) -> None:
        self._features.clear()
        self._hidden.clear()

    # -- features ------------------------------------------------------------------------------
    def _inputs(self, name: str, tower: str) -> torch.Tensor:
        return self.sets[name].images if tower == "vision" else self._tokens[name]

    def _encode(self, model: nn.Module, tower: str, batch: torch.Tensor) -> torch.Tensor:
        encode = self.family.encode_image if tower == "vision" else self.family.encode_text
        return encode(model, batch)

    def _tower_features(self, model: nn.Module, name: str, tower: str, edited: str | None) -> torch.Tensor:
        """Unit features ``(N, D)`` of one tower for set ``name`` (images, or one row per prompt)."""
        unedited = edited is None or self.family.tower_of(edited) != tower
        if unedited and (name, tower) in self._features:
            return self._features[(name, tower)]
        device = next(model.parameters()).device
        inputs = self._inputs(name, tower)
        stages = self.family.tower_stages(model, tower) if not unedited else None
        start = stages.first_block(edited) if stages is not None else 0
        out = []
        for i, b in enumerate(range(0, inputs.shape[0], self.batch_size)):
            batch = inputs[b : b + self.batch_size].to(device)
            if stages is not None and start > 0:
                hidden = self._hidden_batch(stages, name, tower, start, i, batch, inputs.shape[0])
                feats = stages.run(batch, start, hidden)
            else:
                feats = self._encode(model, tower, batch)
            out.append(F.normalize(feats.float(), dim=-1))
        features = torch.cat(out)
        if edited is None:
            self._features[(name, tower)] = features
        return features

    def _hidden_batch(self, stages: TowerStages, name: str, tower: str, start: int, i: int,
                      batch: torch.Tensor, n: int) -> torch.Tensor | None:
        """Batch ``i`` of the hidden state entering block ``start`` (cached; None if over budget)."""
        key = (name, tower, start)
        cached = self._hidden.setdefault(key, [])
        if i < len(cached):
            return cached[i]
        hidden = stages.hidden_before(batch, start)
        if hidden.numel() * hidden.element_size() * n / batch.shape[0] + self._cached_bytes() <= self.cache_bytes:
            cached.append(hidden)
        return hidden

    def _cached_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for v in self._hidden.values() for t in v)

    # -- scores --------------------------------------------------------------------------------
    @torch.no_grad()
    def logits(self, model: nn.Module, name: str, edited: str | None = None) -> torch.Tensor:
        """Zero-shot logits ``(N, C)`` (cosine similarities, no scale) of set ``name``.

        ``edited``: the name of the one parameter that differs from the unedited model, or None
        for the unedited model itself (whose features fill the caches).
        """
        data = self.sets[name]
        images = self._tower_features(model, name, "vision", edited)
        texts = self._tower_features(model, name, "text", edited)
        return images @ group_by_class(texts, len(data.classnames), len(data.templates)).T

    @torch.no_grad()
    def evaluate(self, model: nn.Module, edited: str | None = None) -> dict[str, float]:
        """Accuracies (fractions) ``forget_top1/5``, ``retain_top1/5``, ``utility_top1/5``."""
        was_training = model.training
        model.eval()
        out: dict[str, float] = {}
        if edited is None:  # the model as it is becomes the reference: nothing cached is valid
            self.reset_cache()
        try:
            for name, data in self.sets.items():
                metric = ZeroShotAccuracy(len(data.classnames), sync_on_compute=False)
                logits = self.logits(model, name, edited)
                if not torch.isfinite(logits).all():
                    raise FloatingPointError(
                        f"non-finite logits on set {data.name!r}"
                        + (f" with {edited} edited" if edited else "") + ": the model is broken"
                    )
                metric.update(logits.cpu(), data.labels)
                result = metric.compute()
                out |= concept_summary(result, self.forget_ids, self.exclude_ids) if name == "concepts" else utility_summary(result)
        finally:
            model.train(was_training)
        return out
