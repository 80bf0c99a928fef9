"""Concept similarity matrices and the before/after figure."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from slug_pl.evaluation.similarity import (
    concept_similarity_matrix,
    similarity_figure,
)

CLASSNAMES = ["alice", "bob", "carol", "dave"]
TEMPLATES = ["a photo of {}.", "{} smiling."]


@pytest.fixture(scope="module")
def tiny():
    from slug_pl.families.open_clip import OpenClip

    family = OpenClip(model_name="slug-tiny-vit")
    torch.manual_seed(0)
    return family, family.load()


@pytest.fixture(scope="module")
def labelled():
    torch.manual_seed(2)
    return torch.randn(6, 3, 32, 32), torch.tensor([0, 0, 1, 2, 2, 2])


def test_matrix_equals_a_naive_loop(tiny, labelled):
    family, model = tiny
    images, labels = labelled
    concepts = ["carol", "alice", "bob"]
    matrix = concept_similarity_matrix(family, model, images, labels, CLASSNAMES, TEMPLATES,
                                       concepts, batch_size=2)
    assert matrix.shape == (3, 3) and matrix.dtype == torch.float32
    with torch.no_grad():
        texts = []
        for c in concepts:
            per_template = [F.normalize(model.encode_text(family.tokenize([t.format(c)])), dim=-1)[0]
                            for t in TEMPLATES]
            texts.append(F.normalize(torch.stack(per_template).mean(0), dim=0))
        naive = torch.zeros(3, 3)
        for i, ci in enumerate(concepts):
            idx = [n for n in range(len(labels)) if CLASSNAMES[labels[n]] == ci]
            for j in range(3):
                naive[i, j] = sum(F.cosine_similarity(model.encode_image(images[n : n + 1]),
                                                      texts[j][None])[0] for n in idx) / len(idx)
    torch.testing.assert_close(matrix, naive, atol=1e-5, rtol=1e-5)


def test_matrix_errors(tiny, labelled):
    family, model = tiny
    images, labels = labelled
    with pytest.raises(ValueError, match="not in the class list"):
        concept_similarity_matrix(family, model, images, labels, CLASSNAMES, TEMPLATES, ["eve"])
    with pytest.raises(ValueError, match="no images"):
        concept_similarity_matrix(family, model, images, labels, CLASSNAMES, TEMPLATES, ["dave"])


def test_figure():
    before = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    after = torch.tensor([[0.1, 0.1], [0.2, 0.8]])
    fig = similarity_figure(before, after, ["alice", "bob"])
    titles = [ax.get_title() for ax in fig.axes[:2]]
    assert titles == ["before", "after"]
    images = [ax.images[0] for ax in fig.axes[:2]]
    assert images[0].get_clim() == images[1].get_clim() == pytest.approx((0.1, 0.9))  # shared scale
    assert "0.90" in [t.get_text() for t in fig.axes[0].texts]
    with pytest.raises(ValueError, match=r"\(3, 3\)"):
        similarity_figure(before, after, ["a", "b", "c"])
