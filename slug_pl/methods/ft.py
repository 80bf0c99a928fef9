"""FT: fine-tune on the retain set with the CLIP contrastive loss.

Each step lowers the symmetric contrastive loss of one global retain batch (the model's logit
scale). The forget pairs are never seen: forgetting can only come from what training on other
data overwrites ("catastrophic forgetting"), the weakest of the baselines by design.
"""

from __future__ import annotations

import torch

from slug_pl.methods.trained import TrainedModule


class FtModule(TrainedModule):
    """Fine-tuning on the retain set (see the module docstring and :class:`TrainedModule`)."""

    method_name = "ft"
    no_retain_projection = ("it learns from the retain pairs alone, so its gradient lies in the span of their "
                            "inputs, and projected off that span nothing would change")

    def pass_sets(self) -> list[str]:
        return ["retain"]

    def loss(self, name: str, u: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return self.retain_loss(u, v, valid)

    def objective(self) -> str:
        return "minimise the contrastive loss of a retain batch"
