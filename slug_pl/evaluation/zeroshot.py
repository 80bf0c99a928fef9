"""Zero-shot classification, defined once (docs/design.md §2).

- class embedding = normalize(mean over templates of normalize(encode_text(template(class))));
- logits = normalized image embedding @ class embeddings.T, shape ``(N, C)``;
- top-k hit = the true class is among the k largest logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from slug_pl.families.base import ModelFamily


def fill_template(template: str, classname: str) -> str:
    """Templates use ``{}`` (open_clip style) or ``{c}`` as the class placeholder."""
    return template.replace("{c}", classname).replace("{}", classname)


def prompts(classnames: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every (class, template) prompt, ordered class-major: prompt ``c · T + t`` is template ``t``
    of class ``c`` (the order :func:`group_by_class` expects)."""
    return [fill_template(t, c) for c in classnames for t in templates]


def group_by_class(prompt_features: torch.Tensor, n_classes: int, n_templates: int) -> torch.Tensor:
    """Unit class embeddings ``(C, D)`` from unit prompt embeddings ``(C · T, D)`` ordered as
    :func:`prompts` orders them: the normalized mean over each class's T templates."""
    per_prompt = prompt_features.view(n_classes, n_templates, -1)
    return F.normalize(per_prompt.mean(dim=1), dim=-1)


@torch.no_grad()
def class_embeddings(
    family: ModelFamily,
    model: nn.Module,
    classnames: Sequence[str],
    templates: Sequence[str],
    batch_size: int = 256,
) -> torch.Tensor:
    """Unit class embeddings, shape ``(C, D)``, in float32 on the model's device."""
    if not classnames:
        raise ValueError("zero-shot classification needs at least one class name")
    if not templates:
        raise ValueError("zero-shot classification needs at least one prompt template")
    device = next(model.parameters()).device
    texts = prompts(classnames, templates)
    feats = []
    for start in range(0, len(texts), batch_size):
        tokens = family.tokenize(texts[start : start + batch_size]).to(device)
        feats.append(F.normalize(family.encode_text(model, tokens).float(), dim=-1))
    return group_by_class(torch.cat(feats), len(classnames), len(templates))


@torch.no_grad()
def image_embeddings(
    family: ModelFamily, model: nn.Module, images: torch.Tensor, batch_size: int = 256
) -> torch.Tensor:
    """Unit image embeddings ``(N, D)`` in float32 for preprocessed images ``(N, 3, H, W)``."""
    device = next(model.parameters()).device
    feats = []
    for start in range(0, images.shape[0], batch_size):
        batch = images[start : start + batch_size].to(device)
        feats.append(F.normalize(family.encode_image(model, batch).float(), dim=-1))
    return torch.cat(feats)


def topk_hits(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Bool ``(N,)``: whether ``labels[i]`` is among the top-``k`` logits of row ``i``.

    ``k`` is clipped to the number of classes.
    """
    k = min(k, logits.shape[-1])
    top = logits.topk(k, dim=-1).indices
    return (top == labels.view(-1, 1)).any(dim=-1)
