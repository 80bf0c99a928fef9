"""The before/after measurement every method's run record reports (method-agnostic).

After a method has changed the model (a patch of edits, see :mod:`slug_pl.edit`), the same code
measures, on the held-out test sets when the data module has them (else on validation):

- zero-shot forget / retain / utility accuracy before (edits reverted) and after, for all the
  run's concepts together and for each concept alone;
- membership inference (forget pairs vs unseen pairs) before and after, when the data module
  provides the pairs (``mia_pairs()``);
- the concept similarity matrix before and after (for the figure).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from slug_pl.edit import LayerEdit, reverted
from slug_pl.evaluation.evaluator import Evaluator
from slug_pl.evaluation.mia import model_membership_inference
from slug_pl.evaluation.similarity import concept_similarity_matrix


@dataclass
class BeforeAfter:
    """What a run reports.

    Attributes:
        evaluated_on: "test" (held-out sets) or "validation" (when the config has no test sets).
        before / after: accuracies (fractions) of all the run's concepts together.
        per_concept_after: each concept's forget metrics alone (retain leaves out the others).
        forget_images: images of the forgotten concepts behind the forget accuracies.
        mia: ``{"before": {...}, "after": {...}}`` (accuracy in %), or None without MIA pairs.
        similarity: ``(before (K, K), after (K, K), concept names)`` for the figure.
    """

    evaluated_on: str
    before: dict[str, float]
    after: dict[str, float]
    per_concept_after: dict[str, dict[str, float]]
    forget_images: int
    mia: dict | None = None
    similarity: tuple[torch.Tensor, torch.Tensor, list[str]] | None = None
    extra: dict = field(default_factory=dict)


def evaluate_before_after(context, edits: Sequence[LayerEdit], similarity_concepts: int = 8) -> BeforeAfter:
    """Measure the run's model (``context``: a :class:`~slug_pl.context.RunContext`) with
    ``edits`` applied (as it is) and without them (reverted inside), for the run's concepts.

    ``similarity_concepts``: concepts shown in the similarity matrix (the forgotten ones first).
    """
    family, model, concepts = context.family, context.model, list(context.concepts)
    stage = context.report_stage
    every = Evaluator.for_concepts(context, stage, concepts)
    with reverted(model, edits):
        before = every.evaluate(model)
    results = every.results(model)  # one evaluation: every concept's metrics read from its counts
    after = every.summary(results)
    per_concept = {c: every.summary(results, [c], [o for o in concepts if o != c]) for c in concepts}
    data = every.sets["concepts"]
    forget_images = int(sum((data.labels == i).sum().item() for i in every.forget_ids))

    pairs = context.mia_pairs()
    mia = None
    if pairs is not None:
        with reverted(model, edits):
            mia_before = model_membership_inference(family, model, pairs)
        mia = {"before": mia_before, "after": model_membership_inference(family, model, pairs)}

    present = [data.classnames[i] for i in sorted(set(data.labels.tolist()))]
    shown = (concepts + [c for c in present if c not in concepts])[: max(len(concepts), similarity_concepts)]
    args = (family, model, data.images, data.labels, data.classnames, data.templates, shown)
    with reverted(model, edits):
        sim_before = concept_similarity_matrix(*args)
    sim_after = concept_similarity_matrix(*args)
    return BeforeAfter(stage, before, after, per_concept, forget_images, mia, (sim_before, sim_after, shown))
