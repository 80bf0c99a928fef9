"""Zero-shot accuracy as a torchmetrics ``Metric`` (sum states: correct under DDP), and the
forget / retain / utility summary of docs/design.md §2.

All accuracies are fractions in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric

from slug_pl.evaluation.zeroshot import topk_hits

TOPK = (1, 5)


class ZeroShotAccuracy(Metric):
    """Per-class top-1 / top-5 hit counts of zero-shot logits.

    ``update(logits (N, C), labels (N,))``; ``compute()`` returns a dict with ``top1``/``top5``
    (micro: over all images) and ``per_class_top1``/``per_class_top5`` (``(C,)``, NaN for classes
    without images) and ``count`` (``(C,)``).
    """

    full_state_update = False

    def __init__(self, num_classes: int, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = num_classes
        for k in TOPK:
            self.add_state(f"hits{k}", torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        labels = labels.long()
        ones = torch.ones_like(labels)
        self.count.index_add_(0, labels, ones)
        for k in TOPK:
            hits = getattr(self, f"hits{k}")
            hits.index_add_(0, labels, topk_hits(logits, labels, k).long())

    @property
    def counts(self) -> torch.Tensor:
        """The states as one long tensor ``(len(TOPK) + 1, C)``: hits at each k, then images per
        class (what ranks that score parts of one set sum, in one call)."""
        return torch.stack([getattr(self, f"hits{k}") for k in TOPK] + [self.count])

    @counts.setter
    def counts(self, value: torch.Tensor) -> None:
        for row, k in zip(value, TOPK):
            setattr(self, f"hits{k}", row.clone())
        self.count = value[len(TOPK)].clone()

    def compute(self) -> dict[str, torch.Tensor]:
        count = self.count.double()
        out = {"count": self.count}
        for k in TOPK:
            hits = getattr(self, f"hits{k}").double()
            out[f"top{k}"] = hits.sum() / count.sum().clamp(min=1)
            out[f"per_class_top{k}"] = torch.where(count > 0, hits / count.clamp(min=1), torch.nan)
        return out


def concept_summary(result: dict[str, torch.Tensor], forget_ids: Sequence[int],
                    exclude_ids: Sequence[int] = ()) -> dict[str, float]:
    """Forget and retain accuracies from a :class:`ZeroShotAccuracy` over the concept class list.

    - ``forget_topk``: over all images of the forgotten concepts (micro);
    - ``retain_topk``: mean over the other concepts that have images of their per-concept accuracy,
      leaving out ``exclude_ids`` (concepts forgotten by other edits of the same run).
    """
    count = result["count"]
    forget = torch.zeros_like(count, dtype=torch.bool)
    forget[list(forget_ids)] = True
    excluded = torch.zeros_like(forget)
    excluded[list(exclude_ids)] = True
    out: dict[str, float] = {}
    for k in TOPK:
        per_class = result[f"per_class_top{k}"]
        n_forget = count[forget].sum().item()
        if n_forget:
            hits = (per_class[forget].nan_to_num(0) * count[forget]).sum().item()
            out[f"forget_top{k}"] = hits / n_forget
        retain = ~forget & ~excluded & (count > 0)
        if retain.any():
            out[f"retain_top{k}"] = per_class[retain].mean().item()
    return out


def utility_summary(result: dict[str, torch.Tensor]) -> dict[str, float]:
    return {f"utility_top{k}": result[f"top{k}"].item() for k in TOPK}
