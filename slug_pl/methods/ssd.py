"""SSD: selective synaptic dampening (Foster et al., AAAI 2024), on SLUG's data and objectives.

1. **Importances** (``fit``: one epoch over the forget batches, then the retain batches, no
   optimizer step). For each global batch b of a set, the gradient of the batch's loss (forget:
   mean cos(image, caption), SLUG's forget objective; retain: the contrastive loss), squared
   elementwise; averaged over the set's batches: I_f and I_r, one value per weight. (So, unlike
   SLUG's gradients, they depend on the batch sizes ``data.batch_size`` / ``retain_batch_size``.)
2. **Dampening** (after ``fit``), for each λ of the sweep, *starting from the original weights*:
   every weight with I_f > α · I_r is scaled by β = min(λ · I_r / I_f, 1); every other weight is
   unchanged. Tensors with a single element (the logit scale) are left out, as in the reference.
   A larger λ dampens less, so the sweep runs from the largest λ to the smallest (the mildest
   change first), and the selection rule (:mod:`slug_pl.methods.selection`) reports the first λ
   that meets the forget target, else the closest.

Defaults (the reference work's): α = 10, λ in linspace(0.1, 5, 10).
"""

from __future__ import annotations

import time

import torch

from slug_pl.families.base import ModelFamily
from slug_pl.methods.base import on_run_device
from slug_pl.methods.trained import BaselineModule
from slug_pl.markdown import table
from slug_pl.retain_projection import RetainProjection
from slug_pl.targets.base import DownstreamTarget
from slug_pl.step_search import ForgetTarget

SETS = ("forget", "retain")


def dampen(weights: dict[str, torch.Tensor], forget_importance: dict[str, torch.Tensor],
           retain_importance: dict[str, torch.Tensor], alpha: float, lam: float) -> dict[str, torch.Tensor]:
    """The dampened weights for one λ (a pure function of its inputs; nothing is modified).

    Where ``I_f > alpha · I_r``: ``w · min(lam · I_r / I_f, 1)``; elsewhere, and for tensors with
    one element or without importances, ``w``.
    """
    out = {}
    for name, w in weights.items():
        if w.numel() <= 1 or name not in forget_importance:
            out[name] = w.clone()
            continue
        f = forget_importance[name].to(w.device, torch.float32)
        r = retain_importance[name].to(w.device, torch.float32)
        selected = f > alpha * r  # implies f > 0
        beta = torch.clamp(lam * r / torch.where(selected, f, torch.ones_like(f)), max=1.0)
        out[name] = torch.where(selected, (w.float() * beta).to(w.dtype), w)
    return out


class SsdModule(BaselineModule):
    """Selective synaptic dampening: an importance pass (``fit``), then a λ sweep (see the module docstring)."""

    method_name = "ssd"
    no_retain_projection = ("it scales single weights by their importance ratio and takes no gradient step, and a "
                            "projected change would no longer be a dampening")

    def __init__(self, family: ModelFamily, alpha: float = 10.0, lambdas: list[float] | None = None,
                 stop_when_met: bool = True, forget_target: ForgetTarget = ForgetTarget(),  # noqa: B008
                 similarity_concepts: int = 8, edit: str | None = None, target: DownstreamTarget | None = None,
                 protect_retained: RetainProjection | None = None):
        """
        Args:
            alpha: selection weighting α: a weight is dampened where I_f > α · I_r.
            lambdas: the dampening constants λ of the sweep (each > 0; run from the largest to the
                smallest); None: linspace(0.1, 5, 10).
            stop_when_met: stop the sweep at the first λ whose model meets the target.
            (other arguments: see :class:`~slug_pl.methods.trained.BaselineModule`)
        """
        super().__init__(family, forget_target, similarity_concepts, edit, target, protect_retained)
        lambdas = [float(x) for x in (torch.linspace(0.1, 5.0, 10).tolist() if lambdas is None else lambdas)]
        if alpha <= 0:
            raise ValueError(f"model.alpha must be > 0, got {alpha}")
        if not lambdas or any(x <= 0 for x in lambdas):
            raise ValueError(f"model.lambdas must be a non-empty list of values > 0, got {lambdas}")
        self.automatic_optimization = False
        self.alpha = alpha
        self.lambdas = sorted(set(lambdas), reverse=True)  # the mildest dampening first
        self.stop_when_met = stop_when_met
        #: after the pass: "forget"/"retain" -> {parameter name: mean squared batch gradient}
        self.importances: dict[str, dict[str, torch.Tensor]] = {}
        self.pass_stats: dict[str, dict[str, int]] = {}

    def configure_optimizers(self):
        return None  # the importance pass takes no optimizer step

    def pass_sets(self) -> list[str]:
        return list(SETS)

    # -- importances ---------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        if self.trainer.max_epochs != 1:
            raise ValueError(f"ssd makes one importance pass: set trainer.max_epochs to 1, got {self.trainer.max_epochs}")
        super().on_fit_start()

    def on_train_epoch_start(self) -> None:
        params = self.changeable_parameters()
        self._sums = {s: {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()} for s in SETS}
        self.pass_stats = {s: {"batches": 0, "samples": 0} for s in SETS}
        self.clip.zero_grad(set_to_none=True)

    def training_step(self, batch: dict, batch_idx: int) -> None:
        name = batch["set"]
        u, v, valid = self.global_features(batch)
        n = int(valid.sum())
        if n == 0:  # every sample of this global batch was skipped (the same on every rank)
            return
        loss = self.forget_loss(u, v, valid) if name == "forget" else self.retain_loss(u, v, valid)
        self.manual_backward(loss)  # under DDP, the gradient of the global batch on every rank
        for pname, p in self.changeable_parameters().items():
            if p.grad is not None:
                self._sums[name][pname] += p.grad.float() ** 2
        self.clip.zero_grad(set_to_none=True)
        self.pass_stats[name]["batches"] += 1
        self.pass_stats[name]["samples"] += n
        self.gradient_evals += n
        self.log(f"pass/{name}_loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=False)

    def on_train_epoch_end(self) -> None:
        for name in SETS:
            batches = self.pass_stats[name]["batches"]
            if batches == 0:
                raise ValueError(f"ssd: the importance pass saw no valid {name} batch; check data.{name}")
            self.importances[name] = {n: (s / batches).cpu() for n, s in self._sums[name].items()}
        del self._sums
        self.timings["importances"] = time.perf_counter() - self._t_fit

    # -- the λ sweep ---------------------------------------------------------------------------
    @torch.no_grad()
    def _load(self, weights: dict[str, torch.Tensor]) -> None:
        params = dict(self.clip.named_parameters())
        for name, w in weights.items():
            params[name].copy_(w.to(params[name].device))

    def dampened(self, lam: float) -> dict[str, torch.Tensor]:
        """The changeable weights for ``lam``, from the original weights (CPU)."""
        original = {n: self._original[n] for n in self.changeable_parameters()}
        return dampen(original, self.importances["forget"], self.importances["retain"], self.alpha, lam)

    def on_fit_end(self) -> None:
        if not self.trainer.is_global_zero:  # rank 0 sweeps alone, like SLUG's search
            return
        with on_run_device(self.trainer, self):
            t0 = time.perf_counter()
            for i, lam in enumerate(self.lambdas, 1):
                weights = self.dampened(lam)
                self._load(weights)
                changed = sum(int((weights[n] != self._original[n]).sum()) for n in weights)
                self.consider(i, f"λ = {lam:.4g}", **{"lambda": lam, "dampened_weights": changed})
                if self.stop_when_met and self.done:
                    break
            self.timings["sweep"] = time.perf_counter() - t0
            self.finish()

    # -- the record ----------------------------------------------------------------------------
    def method_block(self) -> dict:
        block = super().method_block()
        block["ssd"] = {"alpha": self.alpha, "lambdas": self.lambdas, "order": "largest λ (mildest) first",
                        "importance": "mean over global batches of the squared batch-loss gradient",
                        "pass": self.pass_stats, "stop_when_met": self.stop_when_met,
                        "global_batch_size": {s: self.trainer.datamodule.global_batch_size(s) for s in SETS}}
        return block

    def settings_section(self, method: dict) -> list[str]:
        s = method["ssd"]
        rows = [[name, st["samples"], st["batches"], s["global_batch_size"][name]] for name, st in s["pass"].items()]
        return ["## Dampening", "",
                f"Importances: {s['importance']} (forget: mean cos(image, caption); retain: contrastive loss). "
                f"Weights with I_f > {s['alpha']:g} · I_r are scaled by min(λ · I_r / I_f, 1), every λ from the "
                f"original weights; λ swept {s['order']}: {', '.join(f'{x:.4g}' for x in s['lambdas'])}.", "",
                *table(["set", "samples", "batches", "global batch size"], rows), ""]
