"""What the baselines share: the forget target and the selection rule, the original weights, the
global batch, the optimizer and schedule, per-epoch validation and the run record.

- :class:`BaselineModule`: a method that produces candidate models and reports one of them by the
  rule of :mod:`slug_pl.methods.selection` (every baseline). It keeps the original weights on the
  CPU, scores each candidate on validation with SLUG's judge
  (:meth:`~slug_pl.evaluation.evaluator.Evaluator.for_concepts`), keeps a CPU copy of the one the
  rule prefers, and at the end restores it, takes every tensor that changed as the patch
  (:func:`slug_pl.edit.changed_tensors`) and writes the common run record.
- :class:`TrainedModule`: a baseline trained with ``Trainer.fit`` (FT, GA, GAFT, SalUn): one AdamW
  step per global batch of the sets it streams (:meth:`pass_sets`, in that order, the same
  batches every epoch), a cosine schedule over all steps, validation after every epoch, and a stop
  at the first epoch that meets the target. A subclass says which sets it streams and what each
  batch's loss is (:meth:`TrainedModule.loss`).

What is trained: every parameter of the two towers (that a downstream target reads; with
``model.protect_retained``, GA and GAFT change only the tensors the retain projection covers, and
their change stays off what the retained inputs feed them: :class:`TrainedModule`). Shared
tensors outside both towers (the logit scale) stay fixed: the forget objective does not reach
them, and fixing them keeps every step's gradient on the same parameters, so plain DDP works.

Losses are computed on the *global* batch: under DDP each rank's features are gathered (with
gradients), so the update does not depend on the number of devices (as in SLUG's pass).
"""

from __future__ import annotations

import math
import time

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from slug_pl.edit import changed_tensors
from slug_pl.evaluation.evaluator import Evaluator
from slug_pl.families.base import ModelFamily
from slug_pl.gradients import contrastive_loss, forget_similarity_sum
from slug_pl.methods.base import UnlearningModule, on_run_device
from slug_pl.methods.selection import RULE, Checkpoint, checkpoint, preferred
from slug_pl.markdown import pct, table
from slug_pl.record import SELECTION_FILE, RunRecord, check_free, core_metrics, format_metrics
from slug_pl.retain_projection import InputProjection, RetainProjection, report_lines
from slug_pl.step_search import ForgetTarget
from slug_pl.targets.base import DownstreamTarget

FORGET_METRICS = ("forget_top1", "forget_top5")
#: Files a baseline run writes (besides config.yaml and logger files); an existing one stops the
#: run before any work.


class BaselineModule(UnlearningModule):
    """A baseline: candidate models, one selection rule, the common record (see the module docstring)."""

    method_name = "baseline"

    def __init__(self, family: ModelFamily, forget_target: ForgetTarget = ForgetTarget(),  # noqa: B008 (frozen)
                 similarity_concepts: int = 8, edit: str | None = None, target: DownstreamTarget | None = None,
                 protect_retained: RetainProjection | None = None):
        """
        Args:
            family: the model adapter (e.g. ``slug_pl.families.OpenClip``).
            forget_target: the forget target on validation, ``metric <= value`` (the config's
                top-level ``forget_target:``, the same for every method).
            similarity_concepts: concepts shown in the before/after similarity matrix.
            edit: an ``edit.safetensors`` patch applied to the model after loading (validate/test).
            target: a downstream model that embeds one tower of this CLIP: only tensors it reads
                change (see :mod:`slug_pl.targets`).
            protect_retained: the retain projection (:mod:`slug_pl.retain_projection`): GA and
                GAFT keep their change off what the retained inputs feed each tensor (see
                :class:`TrainedModule`); the other baselines refuse it, saying why. None: off.
        """
        super().__init__(family, edit, target, forget_target, protect_retained)
        if forget_target.metric not in FORGET_METRICS:
            raise ValueError(f"forget_target.metric must be one of {list(FORGET_METRICS)} for a baseline (they are "
                             f"judged on the CLIP's zero-shot metrics), got {forget_target.metric!r}")
        self.similarity_concepts = similarity_concepts
        self.checkpoints: list[Checkpoint] = []
        self.selected: Checkpoint | None = None
        self._selected_weights: dict[str, torch.Tensor] | None = None
        self._original: dict[str, torch.Tensor] = {}
        #: sample forward+backward passes run so far (global, all devices)
        self.gradient_evals = 0

    # -- what changes --------------------------------------------------------------------------
    def changeable(self, name: str) -> bool:
        """Whether the method may change parameter ``name``: a tower's tensor that the downstream
        target (if any) reads."""
        return self.family.tower_of(name) is not None and self.readable(name)

    def changeable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.clip.named_parameters() if self.changeable(n)}

    def prepare_model(self, model: nn.Module) -> None:
        # before the strategy wraps the model (DDP registers the parameters that need gradients)
        for name, p in model.named_parameters():
            p.requires_grad_(self.changeable(name))
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError(f"{self.method_name}: no parameter of {self.family.describe().get('model_name')} can "
                             f"change (none lies in a tower read by the target)")

    # -- start ---------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = self.trainer.datamodule
        if stage == "fit" and not (datamodule.concepts and datamodule.has_stage("validation")):
            raise ValueError(f"{self.method_name} scores every candidate on validation: it needs data.concepts (the "
                             f"names to forget) and data.validation (the labelled sets); set both")

    def on_fit_start(self) -> None:
        self._t_fit = time.perf_counter()
        check_free(self.run_dir)
        self.check_target()
        # the original weights, on the CPU: the patch is taken against them at the end
        self._original = {n: p.detach().cpu().clone() for n, p in self.clip.named_parameters()}
        self.clip.train()  # as the reference trains (CLIP has no dropout: the same outputs as eval mode)

    # -- the global batch ----------------------------------------------------------------------
    def global_features(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Image and text features ``(B, D)`` and ``valid (B,)`` of the *global* batch: under DDP
        every rank's rows, gathered with their gradients; padding rows have ``valid`` False."""
        u = self.family.encode_image(self.clip, batch["images"])
        v = self.family.encode_text(self.clip, batch["tokens"])
        valid = batch["valid"]
        if self.trainer.world_size > 1:
            u = self.all_gather(u, sync_grads=True).flatten(0, 1)
            v = self.all_gather(v, sync_grads=True).flatten(0, 1)
            valid = self.all_gather(valid.to(torch.uint8)).flatten(0, 1).bool()
        return u, v, valid

    def forget_loss(self, u: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Mean cos(image, caption) over the valid pairs of a forget batch (SLUG's forget
        objective; lowering it is gradient *ascent* on 1 − cos)."""
        return forget_similarity_sum(u, v, valid) / valid.sum()

    def retain_loss(self, u: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The symmetric CLIP contrastive loss of a retain batch (the model's logit scale)."""
        return contrastive_loss(u, v, self.family.logit_scale(self.clip), valid)

    # -- candidates and the selection rule -----------------------------------------------------
    def judge(self) -> Evaluator:
        """SLUG's validation judge for this run's concepts (a fresh one: its caches belong to the
        model as it is now)."""
        return Evaluator.for_concepts(self.context, "validation", list(self.context.concepts))

    def consider(self, index: int, label: str, **info) -> Checkpoint:
        """Score the model as it is now on validation (rank 0) and keep a CPU copy of its weights
        when the selection rule prefers it."""
        t0 = time.perf_counter()
        try:
            metrics = self.judge().evaluate(self.clip)
        except FloatingPointError:  # the model's outputs are NaN/inf: a broken candidate
            metrics = {k: float("nan") for k in ("forget_top1", "forget_top5", "retain_top1", "utility_top1")}
        self.timings["validation"] = self.timings.get("validation", 0.0) + time.perf_counter() - t0
        cand = checkpoint(index, label, metrics, self.forget_target, **info)
        self.checkpoints.append(cand)
        if preferred(cand, self.selected, self.forget_target):
            self.selected = cand
            self._selected_weights = {n: p.detach().cpu().clone() for n, p in self.changeable_parameters().items()}
        rank_zero_info(f"{self.method_name} {label}: {format_metrics(core_metrics(metrics))}"
                       f"{' (target met)' if cand.target_met else ''}")
        return cand

    @property
    def done(self) -> bool:
        """Whether the rule has its answer (a candidate met the target: later ones cannot win)."""
        return self.selected is not None and self.selected.target_met

    @torch.no_grad()
    def restore_selected(self) -> None:
        """Put the selected candidate's weights back into the model."""
        if self._selected_weights is None:
            raise RuntimeError(f"{self.method_name}: no candidate was evaluated; nothing to report")
        params = dict(self.clip.named_parameters())
        for name, weights in self._selected_weights.items():
            params[name].copy_(weights.to(params[name].device))

    # -- the record ----------------------------------------------------------------------------
    def method_block(self) -> dict:
        """The ``method`` block of ``summary.json``; subclasses add their settings."""
        s = self.selected
        block = {"name": self.method_name,
                 "selection": {"rule": RULE, "selected": s.label, "index": s.index, "info": s.info,
                               "target_met": s.target_met},
                 "candidates": [{"index": c.index, "label": c.label, "target_met": c.target_met,
                                 "validation": core_metrics(c.metrics), **c.info} for c in self.checkpoints]}
        if self.protection is not None:
            block["retain_projection"] = self.protection
        return block

    def sections(self, method: dict) -> list[str]:
        """The method's sections of ``report.md``: its settings, the retain projection when used,
        then every candidate."""
        projection = report_lines(method["retain_projection"]) if "retain_projection" in method else []
        return self.settings_section(method) + projection + self.candidates_section()

    def settings_section(self, method: dict) -> list[str]:
        return []

    def candidates_section(self) -> list[str]:
        rows = [[c.label, pct(c.metrics.get("forget_top1")), pct(c.metrics.get("forget_top5")),
                 pct(c.metrics.get("retain_top1")), pct(c.metrics.get("utility_top1")),
                 "yes" if c.target_met else "no", "**selected**" if c is self.selected else ""]
                for c in self.checkpoints]
        return ["## Candidates (validation, %)", "", f"Selection rule: {RULE}.", "",
                *table(["candidate", "forget top-1", "forget top-5", "retain top-1", "utility top-1",
                        "target met", ""], rows), ""]

    def write_selection_csv(self) -> None:
        names = ["forget_top1", "forget_top5", "retain_top1", "utility_top1"]
        rows = [[c.index, c.label, c.target_met, c is self.selected,
                 *(f"{c.metrics.get(m, float('nan')):.6f}" for m in names)] for c in self.checkpoints]
        RunRecord(self.run_dir).csv(SELECTION_FILE, ["index", "label", "target_met", "selected", *names], rows)

    def finish(self, evaluations: int | None = None, cost_note: str | None = None) -> dict:
        """Restore the selected candidate and write the run record (rank 0 only); returns the summary."""
        self.restore_selected()
        edits = changed_tensors(self.clip, self._original, method=self.method_name)
        method = self.method_block()
        method["changed_tensors"] = len(edits)
        if cost_note:
            method["cost_note"] = cost_note
        self.write_selection_csv()
        summary = self.write_record(
            edits=edits, method=method, target=self.forget_target, validation=self.selected.metrics,
            validation_met=self.selected.target_met,
            cost={"gradient_evals": self.gradient_evals,
                  "evaluations": len(self.checkpoints) if evaluations is None else evaluations},
            sections=self.sections(method), similarity_concepts=self.similarity_concepts,
            edit_metadata={"target": str(self.forget_target), "selected": self.selected.label},
            t_start=getattr(self, "_t_fit", None))
        self.summary = summary
        return summary


class TrainedModule(BaselineModule):
    """A baseline trained with ``Trainer.fit``: AdamW, cosine schedule, validation every epoch.

    The number of epochs is the trainer's (``trainer.max_epochs``); training stops after the first
    epoch whose model meets the target (``stop_when_met``), since the rule would report it anyway.

    With ``model.protect_retained`` (the retain projection, :mod:`slug_pl.retain_projection`; built
    once at the start, off the original weights' inputs): every step's gradient of a covered
    tensor is projected before the optimizer step (AdamW's moments see only what may change), and
    after the step each covered tensor's change since the start is projected again,
    ``W ← W₀ + P(W − W₀)``, since AdamW's per-weight scaling and its weight decay leave the
    projected span; every tensor the projection does not cover is put back to ``W₀``. So no
    covered tensor's change moves what the protected inputs feed it, and no other tensor
    changes: the protected inputs' states stay as they were at every layer (up to the dropped
    singular directions).
    """

    no_retain_projection = None
    projected = ("every step's gradient of a covered tensor, and its change since the start, are projected "
                 "(every other tensor is held at its original value)")

    def __init__(self, family: ModelFamily, lr: float = 1e-7, weight_decay: float = 0.1,
                 betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-6, warmup_steps: int = 0,
                 stop_when_met: bool = True, forget_target: ForgetTarget = ForgetTarget(),  # noqa: B008
                 similarity_concepts: int = 8, edit: str | None = None, target: DownstreamTarget | None = None,
                 protect_retained: RetainProjection | None = None):
        """
        Args:
            lr / weight_decay / betas / eps: AdamW (decoupled weight decay on matrices, none on
                gains and biases). Defaults: the reference work's settings for real CLIP models.
            warmup_steps: linear warm-up steps before the cosine decay to 0 over all steps.
            stop_when_met: stop after the first epoch whose model meets the target.
            (other arguments: see :class:`BaselineModule`)
        """
        super().__init__(family, forget_target, similarity_concepts, edit, target, protect_retained)
        checks = [(lr > 0, f"model.lr must be > 0, got {lr}"),
                  (weight_decay >= 0, f"model.weight_decay must be >= 0, got {weight_decay}"),
                  (all(0 <= b < 1 for b in betas), f"model.betas must lie in [0, 1), got {list(betas)}"),
                  (eps > 0, f"model.eps must be > 0, got {eps}"),
                  (warmup_steps >= 0, f"model.warmup_steps must be >= 0, got {warmup_steps}")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self.lr, self.weight_decay, self.betas, self.eps = lr, weight_decay, tuple(betas), eps
        self.warmup_steps = warmup_steps
        self.stop_when_met = stop_when_met
        #: with model.protect_retained: the projection on the run's device, the tensors that may
        #: change and their values at the start (each step's change is held off the protected span)
        self._held: InputProjection | None = None
        self._held_params: dict[str, nn.Parameter] = {}
        self._start: dict[str, torch.Tensor] = {}

    # -- what a subclass defines ---------------------------------------------------------------
    def loss(self, name: str, u: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The loss one optimizer step lowers, for a global batch of set ``name``."""
        raise NotImplementedError

    def objective(self) -> str:
        """One line for the report: what each step minimises."""
        raise NotImplementedError

    # -- optimizer -----------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        max_epochs = self.trainer.max_epochs
        if max_epochs is None or max_epochs < 1:
            raise ValueError(f"{self.method_name} trains for trainer.max_epochs epochs; set it to a positive number "
                             f"(e.g. 10), got {max_epochs}")
        super().on_fit_start()
        if self.protect_retained is not None:
            self._hold_off_retained()

    def _hold_off_retained(self) -> None:
        """Build the retain projection (rank 0, every rank then holds the same) and keep, on the
        run's device, the values every changeable tensor starts from."""
        projection = self.retain_projection() if self.trainer.is_global_zero else None
        projection, self.protection = self.trainer.strategy.broadcast((projection, self.protection), src=0)
        self._held = projection.to(self.device)
        self._held_params = self.changeable_parameters()
        self._start = {n: p.detach().clone() for n, p in self._held_params.items()}

    def configure_optimizers(self):
        params = [(n, p) for n, p in self.clip.named_parameters() if self.changeable(n)]
        groups = [{"params": [p for _, p in params if p.ndim < 2], "weight_decay": 0.0},
                  {"params": [p for _, p in params if p.ndim >= 2], "weight_decay": self.weight_decay}]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=self.lr, betas=self.betas, eps=self.eps)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = min(self.warmup_steps, total)

        def factor(step: int) -> float:  # linear warm-up, then cosine from 1 to 0 over the remaining steps
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- training ------------------------------------------------------------------------------
    def on_before_optimizer_step(self, optimizer) -> None:
        """With the retain projection: each covered tensor's gradient projected, every other one
        zeroed (no moment builds up where nothing may change)."""
        if self._held is None:
            return
        for name, p in self._held_params.items():
            if p.grad is None:
                continue
            if self._held.covers(name):
                p.grad.copy_(self._held.apply({name: p.grad})[name])
            else:
                p.grad.zero_()

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if self._held is not None:
            self._hold_change()

    @torch.no_grad()
    def _hold_change(self) -> None:
        """``W ← W₀ + P(W − W₀)`` for every covered tensor, ``W ← W₀`` for every other one."""
        change = {n: p.detach() - self._start[n] for n, p in self._held_params.items() if self._held.covers(n)}
        projected = self._held.apply(change)
        for name, p in self._held_params.items():
            p.copy_(self._start[name] + projected[name] if name in projected else self._start[name])

    def on_train_epoch_start(self) -> None:
        self._t_epoch = time.perf_counter()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        u, v, valid = self.global_features(batch)
        n = int(valid.sum())
        if n == 0:  # every sample of this global batch was skipped (the same on every rank)
            return None
        loss = self.loss(batch["set"], u, v, valid)
        self.gradient_evals += n
        self.log(f"train/{batch['set']}_loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def on_train_epoch_end(self) -> None:
        epoch = self.current_epoch + 1
        stop = False
        if self.trainer.is_global_zero:
            cand = self.consider(epoch, f"epoch {epoch}", epoch=epoch,
                                 epoch_s=time.perf_counter() - self._t_epoch)
            self.log_dict({f"val/{k}": v for k, v in core_metrics(cand.metrics).items()}, rank_zero_only=True)
            stop = (self.stop_when_met and self.done) or cand.broken
        self.trainer.should_stop = bool(self.trainer.strategy.broadcast(stop, src=0))

    def on_fit_end(self) -> None:
        if not self.trainer.is_global_zero:  # rank 0 holds the candidates and writes the record
            return
        self.timings["training"] = time.perf_counter() - self._t_fit  # validation after each epoch included
        with on_run_device(self.trainer, self):
            self.finish()

    # -- the record ----------------------------------------------------------------------------
    def method_block(self) -> dict:
        block = super().method_block()
        block["training"] = {
            "objective": self.objective(), "sets": self.pass_sets(),
            "optimizer": {"name": "AdamW", "lr": self.lr, "weight_decay": self.weight_decay,
                          "betas": list(self.betas), "eps": self.eps},
            "schedule": {"name": "cosine", "warmup_steps": self.warmup_steps,
                         "steps": int(self.trainer.estimated_stepping_batches)},
            "max_epochs": self.trainer.max_epochs, "epochs_run": len(self.checkpoints),
            "stop_when_met": self.stop_when_met,
            "global_batch_size": {s: self.trainer.datamodule.global_batch_size(s) for s in self.pass_sets()},
        }
        return block

    def settings_section(self, method: dict) -> list[str]:
        t = method["training"]
        o = t["optimizer"]
        batches = ", ".join(f"{s} {b}" for s, b in t["global_batch_size"].items())
        return ["## Training", "",
                f"Each step: {t['objective']}. Sets streamed each epoch, in order: {', '.join(t['sets'])} "
                f"(global batch {batches}; the same batches every epoch).", "",
                f"AdamW (lr {o['lr']:g}, weight decay {o['weight_decay']:g} on matrices, betas {tuple(o['betas'])}, "
                f"eps {o['eps']:g}), cosine schedule over {t['schedule']['steps']} steps "
                f"({t['schedule']['warmup_steps']} warm-up); {t['epochs_run']} of at most {t['max_epochs']} epochs run"
                + (" (stops at the first epoch meeting the target)." if t["stop_when_met"] else "."), ""]

