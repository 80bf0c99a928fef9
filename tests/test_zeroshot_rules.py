"""Zero-shot rules of DESIGN.md §2 on hand-made cases: a class embedding is the normalized mean over
the class's *templates* of the normalized prompt embeddings (prompts ordered class by class), and
retain accuracy leaves out the run's other forgotten concepts.

The hand-made model is a :class:`~slug_pl.families.base.ModelFamily` whose text embedding of a
prompt is a row of a table and whose image embedding is the image's first pixels, so every
similarity is known in advance.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slug_pl.context import RunContext
from slug_pl.data.labelled import LoadedSet
from slug_pl.evaluation.evaluator import Evaluator
from slug_pl.evaluation.metrics import ZeroShotAccuracy, concept_summary
from slug_pl.evaluation.zeroshot import class_embeddings, fill_template
from slug_pl.families.base import ModelFamily

CLASSES = ["Ada", "Bo", "Cy"]
TEMPLATES = ["a photo of {}.", "{} smiling."]
#: prompt (class, template) -> unnormalized text embedding in R^3. Each class points along its own
#: axis e_k, with different lengths and a small tilt per template, so that normalizing each prompt
#: before the mean matters.
PROMPTS = {
    ("Ada", 0): [3.0, 0.0, 0.3], ("Ada", 1): [0.5, 0.05, 0.0],
    ("Bo", 0): [0.0, 2.0, 0.0], ("Bo", 1): [0.1, 0.8, 0.0],
    ("Cy", 0): [0.0, 0.0, 4.0], ("Cy", 1): [0.05, 0.0, 0.6],
}
#: one image per class, near its axis but leaning toward another class's axis: (image, label)
IMAGES = [([1.0, 0.0, 0.2], 0), ([0.2, 1.0, 0.0], 1), ([0.2, 0.0, 1.0], 2)]


class TableModel(nn.Module):
    def __init__(self):
        super().__init__()
        rows = [PROMPTS[(c, t)] for c in CLASSES for t in range(len(TEMPLATES))]
        self.text_table = nn.Parameter(torch.tensor(rows))


class TableFamily(ModelFamily):
    """Tokens are the row of the prompt in the table; images are ``(B, 3, 1, 1)`` embeddings."""

    family_name = "table"
    prompt_rows = {fill_template(t, c): i for i, (c, t) in enumerate((c, t) for c in CLASSES for t in TEMPLATES)}

    def load(self):
        return TableModel()

    def describe(self):
        return {"family": self.family_name}

    def tokenize(self, texts):
        return torch.tensor([[self.prompt_rows[t]] for t in texts])

    def image_transform(self):
        raise NotImplementedError

    def encode_image(self, model, images):
        return images.flatten(1)

    def encode_text(self, model, tokens):
        return model.text_table[tokens[:, 0]]

    def logit_scale(self, model):
        return torch.tensor(1.0)

    def tower_of(self, name):
        return "text"


def reference_class_embeddings(grouping: str) -> torch.Tensor:
    """Hand-built: for class k, the normalized mean over templates t of normalize(PROMPTS[k, t]).
    ``grouping="templates, classes"`` is the wrong reading of the class-major prompt list: row r of
    the list taken as (template r // C, class r % C)."""
    flat = [F.normalize(torch.tensor(PROMPTS[(c, t)]), dim=0) for c in CLASSES for t in range(len(TEMPLATES))]
    out = []
    for k in range(len(CLASSES)):
        if grouping == "classes, templates":
            members = [flat[k * len(TEMPLATES) + t] for t in range(len(TEMPLATES))]
        else:
            members = [flat[t * len(CLASSES) + k] for t in range(len(TEMPLATES))]
        out.append(F.normalize(torch.stack(members).mean(dim=0), dim=0))
    return torch.stack(out)


def images_and_labels():
    images = torch.tensor([x for x, _ in IMAGES]).view(-1, 3, 1, 1)
    return images, torch.tensor([y for _, y in IMAGES])


def top1(class_emb: torch.Tensor) -> float:
    images, labels = images_and_labels()
    logits = F.normalize(images.flatten(1), dim=-1) @ class_emb.T
    return (logits.argmax(dim=-1) == labels).float().mean().item()


def test_the_hand_made_case_tells_the_groupings_apart():
    """Every image is right with the class-major grouping and wrong with the template-major one."""
    assert top1(reference_class_embeddings("classes, templates")) == 1.0
    assert top1(reference_class_embeddings("templates, classes")) == 0.0


def test_class_embeddings_average_templates_within_each_class():
    family = TableFamily()
    emb = class_embeddings(family, family.load(), CLASSES, TEMPLATES, batch_size=4)  # two text batches
    torch.testing.assert_close(emb, reference_class_embeddings("classes, templates"), rtol=1e-6, atol=1e-6)


def test_evaluator_logits_and_accuracies_follow_the_class_major_grouping():
    family = TableFamily()
    images, labels = images_and_labels()
    concepts = LoadedSet("concepts", images, labels, CLASSES, TEMPLATES)
    evaluator = Evaluator(family, concepts, ["Ada"], batch_size=2)
    model = family.load()
    expected = F.normalize(images.flatten(1), dim=-1) @ reference_class_embeddings("classes, templates").T
    torch.testing.assert_close(evaluator.logits(model, "concepts"), expected, rtol=1e-6, atol=1e-6)
    metrics = evaluator.evaluate(model)
    assert metrics["forget_top1"] == 1.0 and metrics["retain_top1"] == 1.0  # 0.0 and 0.0 if grouped wrongly


def _accuracy_result() -> dict[str, torch.Tensor]:
    """5 classes; class 0 is the concept forgotten here, class 2 another concept of the run, class 4
    has no images. Logits put the top-1 on: class 0 images → 0, 0; class 1 → 1, 3; class 2 → 0, 0;
    class 3 → 3, 3."""
    metric = ZeroShotAccuracy(5)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    predicted = torch.tensor([0, 0, 1, 3, 0, 0, 3, 3])
    metric.update(F.one_hot(predicted, 5).float(), labels)
    return metric.compute()


def test_retain_accuracy_leaves_out_the_runs_other_concepts():
    """Per-class top-1: class 1 = 1/2, class 2 = 0, class 3 = 1. Retain over the classes that are
    neither forgotten here (0) nor by another edit of the run (2), with images: (1/2 + 1) / 2."""
    result = _accuracy_result()
    summary = concept_summary(result, forget_ids=[0], exclude_ids=[2])
    assert summary["forget_top1"] == 1.0
    assert summary["retain_top1"] == pytest.approx(0.75)
    assert concept_summary(result, forget_ids=[0])["retain_top1"] == pytest.approx(0.5)  # (1/2 + 0 + 1) / 3


def test_evaluator_leaves_the_runs_other_concepts_out_of_retain():
    family = TableFamily()
    images, labels = images_and_labels()
    # Bo's image, moved onto Ada's axis: Bo's retain accuracy 0, Cy's 1
    images = images.clone()
    images[1] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
    concepts = LoadedSet("concepts", images, labels, CLASSES, TEMPLATES)
    model = family.load()
    alone = Evaluator(family, concepts, ["Ada"]).evaluate(model)
    excluding = Evaluator(family, concepts, ["Ada"], exclude_from_retain=["Bo"]).evaluate(model)
    assert alone["retain_top1"] == pytest.approx(0.5) and excluding["retain_top1"] == 1.0


def test_a_concepts_judge_leaves_the_runs_other_forgotten_concepts_out_of_retain():
    """The search's judge of one concept of a several-concept run (``Evaluator.for_concepts``):
    the run's other forgotten concept is neither forgotten by this judge nor retained."""

    class TwoConceptRun:  # what for_concepts reads of a run's data
        eval_batch_size = 2

        def loaded_sets(self, stage, part=(0, 1)):
            images, labels = images_and_labels()
            images = images.clone()
            images[1] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)  # Bo's image on Ada's axis: Bo 0, Cy 1
            return {"concepts": LoadedSet("concepts", images, labels, CLASSES, TEMPLATES)}

    family = TableFamily()
    model = family.load()
    context = RunContext(family, model, ["Ada", "Bo"], TwoConceptRun())
    metrics = Evaluator.for_concepts(context, "validation", ["Ada"]).evaluate(model)
    assert metrics["forget_top1"] == 1.0
    assert metrics["retain_top1"] == 1.0  # Cy alone; counting Bo (0) as retained would give 0.5
    # the final evaluation reads every concept's metrics from one evaluation of the run's judge
    every = Evaluator.for_concepts(context, "validation", ["Ada", "Bo"])
    results = every.results(model)
    assert every.summary(results, ["Ada"], ["Bo"]) == metrics
    assert every.summary(results, ["Bo"], ["Ada"]) == Evaluator.for_concepts(context, "validation", ["Bo"]).evaluate(model)
    assert every.summary(results) == every.evaluate(model) != metrics  # both forgotten: Cy alone retained
