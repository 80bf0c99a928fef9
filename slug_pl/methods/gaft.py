"""GAFT: gradient ascent on forget batches and fine-tuning on retain batches, in the same epoch.

Interleaving: each epoch streams every forget batch, then every retain batch (the order of
:meth:`pass_sets`, as in the reference work); every batch is one optimizer step of the one AdamW
(shared moments), so an epoch is ``ceil(N_f / B_f)`` ascent steps followed by ``ceil(N_r / B_r)``
fine-tuning steps.

Weighting: a forget step lowers ``forget_weight`` × mean cos(image, caption) of its batch (GA's
loss), a retain step lowers ``retain_weight`` × the contrastive loss of its batch (FT's loss);
both weights are 1 by default, as in the reference work, so the balance between forgetting and
keeping is set by the number of steps of each kind and the learning rate.
"""

from __future__ import annotations

import torch

from slug_pl.families.base import ModelFamily
from slug_pl.methods.trained import TrainedModule
from slug_pl.retain_projection import RetainProjection
from slug_pl.targets.base import DownstreamTarget
from slug_pl.step_search import ForgetTarget


class GaftModule(TrainedModule):
    """GA on the forget set and FT on the retain set in every epoch (see the module docstring)."""

    method_name = "gaft"

    def __init__(self, family: ModelFamily, lr: float = 1e-7, weight_decay: float = 0.1,
                 betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-6, warmup_steps: int = 0,
                 forget_weight: float = 1.0, retain_weight: float = 1.0, stop_when_met: bool = True,
                 forget_target: ForgetTarget = ForgetTarget(), similarity_concepts: int = 8,  # noqa: B008
                 edit: str | None = None, target: DownstreamTarget | None = None,
                 protect_retained: RetainProjection | None = None):
        """
        Args:
            forget_weight / retain_weight: factors on the forget and the retain loss (> 0).
            protect_retained: the retain projection (see
                :class:`~slug_pl.methods.trained.TrainedModule`). The fine-tuning steps learn from
                retain pairs, whose inputs lie largely in the protected span: with it, they change
                little, and the projection does most of their work of keeping the others.
            (other arguments: see :class:`~slug_pl.methods.trained.TrainedModule`)
        """
        super().__init__(family, lr, weight_decay, betas, eps, warmup_steps, stop_when_met, forget_target,
                         similarity_concepts, edit, target, protect_retained)
        if forget_weight <= 0 or retain_weight <= 0:
            raise ValueError(f"model.forget_weight and model.retain_weight must be > 0, got {forget_weight} "
                             f"and {retain_weight}")
        self.forget_weight, self.retain_weight = forget_weight, retain_weight

    def pass_sets(self) -> list[str]:
        return ["forget", "retain"]

    def loss(self, name: str, u: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        if name == "forget":
            return self.forget_weight * self.forget_loss(u, v, valid)
        return self.retain_weight * self.retain_loss(u, v, valid)

    def objective(self) -> str:
        return (f"on a forget batch, minimise {self.forget_weight:g} × mean cos(image, caption); on a retain batch, "
                f"{self.retain_weight:g} × the contrastive loss (all forget batches first, then all retain batches)")

    def method_block(self) -> dict:
        block = super().method_block()
        block["training"] |= {"forget_weight": self.forget_weight, "retain_weight": self.retain_weight}
        return block
