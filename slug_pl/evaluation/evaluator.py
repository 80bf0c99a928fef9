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

Under DDP the ranks of an :class:`~slug_pl.evaluation.group.EvalGroup` share each evaluation:
every rank encodes its part of the images and of the prompts (rows ``rank::world``), the prompt
features are gathered so that every rank holds every class embedding, each rank scores its own
images, and the hit counts are summed (one all-reduce per evaluation). Every rank gets the same
metrics, and they are those of one process: the counts are integers, and each image's and prompt's
features depend only on that image or prompt (bit for bit on the CPU; a GPU's kernels, chosen by
batch size, may round the last bits differently, which can flip an image on a tie). Each rank's
caches hold its part only. Every rank of the group must call
:meth:`Evaluator.evaluate` with the same model and ``edited``, in the same order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from slug_pl.data.labelled import LoadedSet
from slug_pl.evaluation.group import EvalGroup
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
        group: EvalGroup = EvalGroup(),
    ):
        """``exclude_from_retain``: concepts left out of the retain accuracy (other concepts the
        same run forgets); ``group``: the processes sharing each evaluation (one by default)."""
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
        self.group = group
        #: this rank's part of each set's images and labels
        self._images, self._labels = {}, {}
        for name, s in self.sets.items():
            self._images[name], self._labels[name] = self._part_of(s)
        #: the ranks sharing each set's prompts (every rank encodes all of them when they are
        #: fewer than the ranks), and this rank's prompts' tokens
        self._prompts = {name: len(s.classnames) * len(s.templates) for name, s in self.sets.items()}
        self._text_group = {name: group if n >= group.world else EvalGroup() for name, n in self._prompts.items()}
        self._tokens = {
            name: family.tokenize(prompts(s.classnames, s.templates)[self._text_group[name].part(self._prompts[name])])
            for name, s in self.sets.items()
        }
        self._features: dict[tuple[str, str], torch.Tensor] = {}  # (set, tower) -> unedited unit features
        self._hidden: dict[tuple[str, str, int], list[torch.Tensor]] = {}  # (set, tower, block) -> batches

    @classmethod
    def for_concepts(cls, context, stage: str, concepts: Sequence[str], group: EvalGroup = EvalGroup()) -> "Evaluator":
        """The judge of ``concepts`` on the run's ``stage`` ("validation" or "test") sets
        (``context``: a :class:`~slug_pl.context.RunContext`): forget metrics over ``concepts``,
        retain over the concepts the run does not forget; shared by ``group``'s ranks."""
        sets = context.eval_sets(stage, part=(group.rank, group.world))  # each rank decodes its part
        others = [c for c in context.concepts if c not in concepts]
        return cls(context.family, sets["concepts"], concepts, sets.get("utility"), context.eval_batch_size,
                   exclude_from_retain=others, group=group)

    def _part_of(self, data: LoadedSet) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's images and labels of ``data`` (the whole set, or already this rank's part)."""
        if data.part == (self.group.rank, self.group.world):
            return data.images, data.labels
        if data.part != (0, 1):
            raise ValueError(f"set {data.name!r} holds part {data.part} of its samples; rank {self.group.rank} "
                             f"of {self.group.world} scores another")
        part = self.group.part(len(data.labels))
        return data.images[part], data.labels[part]

    def reset_cache(self) -> None:
        self._features.clear()
        self._hidden.clear()

    # -- features ------------------------------------------------------------------------------
    def _inputs(self, name: str, tower: str) -> torch.Tensor:
        """This rank's part of set ``name``'s images or prompt tokens."""
        return self._images[name] if tower == "vision" else self._tokens[name]

    def _encode(self, model: nn.Module, tower: str, batch: torch.Tensor) -> torch.Tensor:
        encode = self.family.encode_image if tower == "vision" else self.family.encode_text
        return encode(model, batch)

    def _tower_features(self, model: nn.Module, name: str, tower: str, edited: str | None) -> torch.Tensor:
        """Unit features of one tower for set ``name``: ``(this rank's images, D)``, or
        ``(every prompt, D)`` (each rank encodes its part; the parts are gathered)."""
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
        features = torch.cat(out) if out else torch.empty(0, device=device)  # an empty part: no images here
        if tower == "text":
            features = self._text_group[name].gather_parts(features, self._prompts[name])
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
        """Zero-shot logits ``(N, C)`` (cosine similarities, no scale) of this rank's ``N`` images
        of set ``name``.

        ``edited``: the name of the one parameter that differs from the unedited model, or None
        for the unedited model itself (whose features fill the caches).
        """
        data = self.sets[name]
        texts = self._tower_features(model, name, "text", edited)
        images = self._tower_features(model, name, "vision", edited)
        if images.numel() == 0:
            images = texts.new_empty((0, texts.shape[1]))
        return images @ group_by_class(texts, len(data.classnames), len(data.templates)).T

    @torch.no_grad()
    def evaluate(self, model: nn.Module, edited: str | None = None) -> dict[str, float]:
        """Accuracies (fractions) ``forget_top1/5``, ``retain_top1/5``, ``utility_top1/5``."""
        return self.summary(self.results(model, edited))

    @torch.no_grad()
    def results(self, model: nn.Module, edited: str | None = None) -> dict[str, dict[str, torch.Tensor]]:
        """Per set, the :class:`ZeroShotAccuracy` result of every rank's images (hits and images
        per class, on the CPU): what :meth:`summary` reads, for this judge's concepts or others'."""
        was_training = model.training
        model.eval()
        if edited is None:  # the model as it is becomes the reference: nothing cached is valid
            self.reset_cache()
        try:
            metrics, broken = {}, []
            for name, data in self.sets.items():
                logits = self.logits(model, name, edited)
                metric = ZeroShotAccuracy(len(data.classnames), sync_on_compute=False).to(logits.device)
                metric.update(logits, self._labels[name].to(logits.device))
                metrics[name] = metric
                broken.append(int(not bool(torch.isfinite(logits).all())))
        finally:
            model.train(was_training)
        # every rank's counts summed in one call: hits and images per class, and non-finite parts
        counts = [m.counts.flatten() for m in metrics.values()]
        totals = self.group.sum(torch.cat(counts + [torch.tensor(broken, device=counts[0].device)]))
        for name, n_broken in zip(self.sets, totals[-len(broken):].tolist()):
            if n_broken:
                raise FloatingPointError(
                    f"non-finite logits on set {self.sets[name].name!r}"
                    + (f" with {edited} edited" if edited else "") + ": the model is broken"
                )
        out, offset = {}, 0
        for name, metric in metrics.items():
            size = metric.counts.numel()
            metric.counts = totals[offset : offset + size].view_as(metric.counts)
            offset += size
            out[name] = {k: v.cpu() for k, v in metric.compute().items()}
        return out

    def summary(self, results: dict[str, dict[str, torch.Tensor]], concepts: Sequence[str] | None = None,
                others: Sequence[str] = ()) -> dict[str, float]:
        """Forget / retain / utility accuracies from :meth:`results`: of this judge's concepts, or
        of ``concepts`` with ``others`` left out of retain (one evaluation judges every concept)."""
        classnames = self.sets["concepts"].classnames
        forget = self.forget_ids if concepts is None else [classnames.index(c) for c in concepts]
        exclude = self.exclude_ids if concepts is None else [classnames.index(c) for c in others if c in classnames]
        out = concept_summary(results["concepts"], forget, exclude)
        if "utility" in results:
            out |= utility_summary(results["utility"])
        return out
