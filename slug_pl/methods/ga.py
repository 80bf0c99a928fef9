"""GA: gradient ascent on the forget pairs.

Each step lowers the mean cos(image, caption) over the valid pairs of one global forget batch,
i.e. ascends 1 − cos (the reference work's cosine-embedding loss, negated). It is SLUG's forget
objective, followed by an optimizer over all parameters instead of one step on one layer.
Nothing holds the rest of the model in place: GA forgets fast and damages what it should keep.
"""

from __future__ import annotations

import torch

from slug_pl.methods.trained import TrainedModule


class GaModule(TrainedModule):
    """Gradient ascent on the forget set (see the module docstring and :class:`TrainedModule`)."""

    method_name = "ga"

    def pass_sets(self) -> list[str]:
        return ["forget"]

    def loss(self, name: str, u: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return self.forget_loss(u, v, valid)

    def objective(self) -> str:
        return "minimise the mean cos(image, caption) of a forget batch (gradient ascent on 1 − cos)"
