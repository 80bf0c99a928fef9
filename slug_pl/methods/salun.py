"""SalUn: GAFT restricted to the weights that matter most for the forget set (weight saliency).

The saliency mask holds, in every tensor that may change, the ``ceil(mask_fraction · n)`` entries
with the largest |g_f| (ties: the lower flat index first), g_f the forget gradient: SLUG's, the
gradient of the mean cos(image, caption) over all forget pairs. It is read from a SLUG run's saved
gradient file when ``gradients_from`` is given (its gradient pass is then not counted again, and
the record says so), else computed at the start of ``fit`` (counted in ``gradient_evals``).

Training is :mod:`GAFT <slug_pl.methods.gaft>` with every step confined to the mask: the gradient
is zeroed outside the mask before the optimizer step (so AdamW's moments stay zero there), and
after the step every weight outside the mask is put back to its original value, which undoes
AdamW's decoupled weight decay there too. Weights outside the mask stay bit-identical.

The reference work ranks |g_f| over the whole model at once; here the fraction holds per tensor,
so every tensor keeps the same share of its weights trainable.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from slug_pl.data.pairs import PairBatches
from slug_pl.families.base import ModelFamily
from slug_pl.gradients import (
    check_data_identity,
    check_matches_model,
    check_model_identity,
    forget_gradient,
    load_tensors,
    weights_fingerprint,
)
from slug_pl.methods.gaft import GaftModule
from slug_pl.retain_projection import RetainProjection
from slug_pl.targets.base import DownstreamTarget
from slug_pl.step_search import ForgetTarget


def saliency_mask(gradients: dict[str, torch.Tensor], fraction: float) -> dict[str, torch.Tensor]:
    """Per tensor, a bool mask of its ``ceil(fraction · numel)`` entries of largest |gradient|
    (ties: the lower flat index first); same shapes as ``gradients``."""
    if not 0 < fraction <= 1:
        raise ValueError(f"the saliency mask fraction must lie in (0, 1], got {fraction}")
    masks = {}
    for name, g in gradients.items():
        flat = g.detach().abs().flatten().cpu()
        k = math.ceil(fraction * flat.numel())
        order = torch.argsort(flat, descending=True, stable=True)
        mask = torch.zeros(flat.numel(), dtype=torch.bool)
        mask[order[:k]] = True
        masks[name] = mask.view(g.shape)
    return masks


class SalunModule(GaftModule):
    """GAFT confined to a saliency mask of the forget gradient (see the module docstring)."""

    method_name = "salun"
    no_retain_projection = ("it confines every step to a saliency mask of single weights, and a projected change "
                            "moves whole rows, so both cannot hold (GAFT takes model.protect_retained)")

    def __init__(self, family: ModelFamily, lr: float = 1e-7, weight_decay: float = 0.1,
                 betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-6, warmup_steps: int = 0,
                 forget_weight: float = 1.0, retain_weight: float = 1.0, mask_fraction: float = 0.5,
                 gradients_from: str | None = None, stop_when_met: bool = True,
                 forget_target: ForgetTarget = ForgetTarget(), similarity_concepts: int = 8,  # noqa: B008
                 edit: str | None = None,
                 target: DownstreamTarget | None = None, protect_retained: RetainProjection | None = None):
        """
        Args:
            mask_fraction: share of each tensor's weights that may change (the largest |g_f|).
            gradients_from: a SLUG run's ``gradients/`` folder: the mask comes from its
                ``forget.safetensors`` (refused if computed for another model, other concepts or
                other data); None: the forget gradient is computed here.
            (other arguments: see :class:`~slug_pl.methods.gaft.GaftModule`)
        """
        super().__init__(family, lr, weight_decay, betas, eps, warmup_steps, forget_weight, retain_weight,
                         stop_when_met, forget_target, similarity_concepts, edit, target, protect_retained)
        if not 0 < mask_fraction <= 1:
            raise ValueError(f"model.mask_fraction must lie in (0, 1], got {mask_fraction}")
        self.mask_fraction = mask_fraction
        self.gradients_from = gradients_from
        self.masks: dict[str, torch.Tensor] = {}
        self._masked: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.mask_source = ""

    def on_fit_start(self) -> None:
        super().on_fit_start()
        masks = None
        if self.trainer.is_global_zero:
            masks = saliency_mask(self._forget_gradient(), self.mask_fraction)
        masks = self.trainer.strategy.broadcast(masks, src=0)  # every rank trains the same weights
        params = self.changeable_parameters()
        self.masks = {n: masks[n].to(params[n].device) for n in params}
        # (parameter, mask, the values it keeps outside the mask)
        self._masked = [(p, self.masks[n], p.detach().clone()) for n, p in params.items()]

    def _forget_gradient(self) -> dict[str, torch.Tensor]:
        """g_f of every changeable tensor: from ``gradients_from``, else computed (counted)."""
        names = list(self.changeable_parameters())
        datamodule = self.trainer.datamodule
        if self.gradients_from:
            path = Path(self.gradients_from) / "forget.safetensors"
            grads, meta = load_tensors(path)
            check_model_identity(meta, self.family.describe(), weights_fingerprint(self.clip), path)
            check_data_identity(meta, {"concepts": list(datamodule.concepts), "data": datamodule.fingerprint("forget")},
                                path)
            check_matches_model(grads, self.clip, path)
            missing = [n for n in names if n not in grads]
            if missing:
                raise ValueError(f"{path} lacks the forget gradient of {len(missing)} tensor(s) (e.g. {missing[:3]}); "
                                 f"give the gradients/ folder of a complete SLUG run, or drop model.gradients_from")
            self.mask_source = f"the saved forget gradient {path} (its gradient pass is not counted here)"
            return {n: grads[n] for n in names}
        batches = PairBatches([datamodule.pair_set("forget")], self.family.image_transform(), self.family.tokenize,
                              bad_samples=datamodule.bad_samples)
        grads, count = forget_gradient(self.family, self.clip, batches)
        self.gradient_evals += count
        self.mask_source = f"the forget gradient computed at the start ({count} forget pairs, counted)"
        return {n: grads[n] for n in names}

    def on_before_optimizer_step(self, optimizer) -> None:
        for p, mask, _ in self._masked:
            if p.grad is not None:
                p.grad.mul_(mask)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        with torch.no_grad():  # outside the mask nothing moves, weight decay included
            for p, mask, kept in self._masked:
                p.copy_(torch.where(mask, p, kept))

    def method_block(self) -> dict:
        block = super().method_block()
        trainable = sum(int(m.sum()) for m in self.masks.values())
        total = sum(m.numel() for m in self.masks.values())
        block["mask"] = {"fraction": self.mask_fraction, "per": "tensor", "source": self.mask_source,
                         "trainable_weights": trainable, "weights": total}
        return block

    def settings_section(self, method: dict) -> list[str]:
        m = method["mask"]
        return super().settings_section(method) + [
            f"Saliency mask: the top {100 * m['fraction']:g} % of |g_f| in every tensor ({m['trainable_weights']} of "
            f"{m['weights']} weights may change), from {m['source']}; weights outside the mask stay bit-identical.", ""]
