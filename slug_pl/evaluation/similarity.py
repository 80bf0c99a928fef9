"""Concept similarity matrices: the "this identity is gone, the others are intact" picture.

``M[i, j]`` = mean over the images of concept ``i`` of ``cos(u(x), c_j)``, where ``c_j`` is the
zero-shot class embedding of concept ``j`` (normalized mean of the normalized text embeddings over
the templates, docs/design.md §2). Before unlearning the diagonal stands out; after a successful edit
the forgotten concept's diagonal entry drops while the other rows stay as they were.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from slug_pl.evaluation.zeroshot import class_embeddings, image_embeddings
from slug_pl.families.base import ModelFamily

#: Matrices larger than this are drawn without the value in each cell (it would not be legible).
ANNOTATE_MAX = 20


@torch.no_grad()
def concept_similarity_matrix(
    family: ModelFamily,
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    classnames: Sequence[str],
    templates: Sequence[str],
    concepts: Sequence[str],
    batch_size: int = 256,
) -> torch.Tensor:
    """Mean image–text cosine similarity of every (image concept, text concept) pair.

    Args:
        images / labels: a labelled set (``LoadedSet.images`` / ``.labels``), labels over
            ``classnames``.
        templates: prompt templates of the text side.
        concepts: the K concept names (rows: images of that concept; columns: its text).

    Returns:
        ``(K, K)`` float32 on the CPU. Only the images of the K concepts are encoded. The model runs
        in eval mode (its mode is restored).
    """
    if not concepts:
        raise ValueError("concept_similarity_matrix needs at least one concept")
    unknown = [c for c in concepts if c not in classnames]
    if unknown:
        raise ValueError(f"concept(s) {unknown} are not in the class list ({len(classnames)} names, "
                         f"e.g. {list(classnames[:3])})")
    ids = [list(classnames).index(c) for c in concepts]
    labels = labels.cpu()
    masks = [labels == i for i in ids]
    empty = [c for c, m in zip(concepts, masks) if not m.any()]
    if empty:
        raise ValueError(f"concept(s) {empty} have no images in the set")
    was_training = model.training
    model.eval()
    try:
        texts = class_embeddings(family, model, list(concepts), list(templates), batch_size).cpu()
        rows = []
        for mask in masks:
            feats = image_embeddings(family, model, images[mask], batch_size).cpu()
            rows.append((feats @ texts.T).mean(dim=0))
    finally:
        model.train(was_training)
    return torch.stack(rows)


def similarity_figure(before: torch.Tensor, after: torch.Tensor, concepts: Sequence[str]):
    """Two heat maps side by side ("before", "after") on one colour scale, each cell annotated
    with its value (up to :data:`ANNOTATE_MAX` concepts). Returns a matplotlib ``Figure`` (not
    registered with pyplot: no global state, nothing to close)."""
    from matplotlib.figure import Figure

    before = torch.as_tensor(before, dtype=torch.float32).cpu()
    after = torch.as_tensor(after, dtype=torch.float32).cpu()
    k = len(concepts)
    if before.shape != (k, k) or after.shape != (k, k):
        raise ValueError(f"similarity matrices must be ({k}, {k}) for {k} concepts, got "
                         f"{tuple(before.shape)} and {tuple(after.shape)}")
    vmin = float(torch.minimum(before.min(), after.min()))
    vmax = float(torch.maximum(before.max(), after.max()))
    if vmax <= vmin:
        vmax = vmin + 1e-6
    side = max(3.0, 0.55 * k + 1.5)
    fig = Figure(figsize=(2 * side + 1.2, side), dpi=110, layout="constrained")
    axes = fig.subplots(1, 2)
    image = None
    for ax, matrix, title in zip(axes, (before, after), ("before", "after")):
        image = ax.imshow(matrix.numpy(), cmap="viridis", vmin=vmin, vmax=vmax)
        ax.set_title(title)
        ax.set_xticks(range(k), labels=list(concepts), rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(k), labels=list(concepts), fontsize=8)
        ax.set_xlabel("text concept")
        ax.set_ylabel("image concept")
        if k <= ANNOTATE_MAX:
            mid = (vmin + vmax) / 2
            for i in range(k):
                for j in range(k):
                    value = float(matrix[i, j])
                    ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                            color="black" if value > mid else "white")
    fig.colorbar(image, ax=list(axes), shrink=0.8, label="mean cosine similarity")
    return fig
