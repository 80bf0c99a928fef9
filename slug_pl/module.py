"""The SLUG LightningModule: a gradient-only pass (``fit``) and zero-shot evaluation
(``validate`` / ``test``) of one model family.

``fit`` runs one epoch over the forget batches, then the retain batches (see
:mod:`slug_pl.data.pairs`), with manual optimization and *no optimizer step*: gradients
accumulate locally in ``.grad`` (DDP's per-batch all-reduce is switched off), each set's sums are
set aside after its last batch, and at the end of the epoch each set's gradient sums, loss
sums and counts are all-reduced once, divided by the global counts, and written by rank 0 to
``<run>/gradients/{forget,retain}.safetensors``. The ranking and step search then run in the
:class:`slug_pl.search.SlugSearch` callback.
"""

from __future__ import annotations

import os
import time
from contextlib import nullcontext
from importlib import metadata as importlib_metadata
from pathlib import Path

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from slug_pl.edit import apply_edit, load_edits
from slug_pl.evaluation.metrics import ZeroShotAccuracy, concept_summary, utility_summary
from slug_pl.evaluation.zeroshot import class_embeddings
from slug_pl.families.base import ModelFamily
from slug_pl.gradients import (
    FORGET_LOSS,
    RETAIN_LOSS,
    check_matches_model,
    contrastive_loss,
    forget_similarity_sum,
    load_tensors,
    save_tensors,
)

SETS = ("forget", "retain")


def package_versions() -> dict[str, str]:
    out = {}
    for pkg in ("slug_pl", "torch", "lightning", "open_clip_torch", "torchmetrics", "webdataset",
                "safetensors", "transformers", "diffusers"):
        try:
            out[pkg] = importlib_metadata.version(pkg)
        except importlib_metadata.PackageNotFoundError:
            pass
    return out


class SlugModule(LightningModule):
    """Gradient pass and zero-shot evaluation for one model of a :class:`ModelFamily`."""

    def __init__(
        self,
        family: ModelFamily,
        gradients_from: str | None = None,
        edit: str | None = None,
        eval_mode: bool = True,
    ):
        """
        Args:
            family: the model adapter (e.g. ``slug_pl.families.OpenClip``).
            gradients_from: a folder holding ``forget.safetensors`` and ``retain.safetensors`` of an
                earlier run (its ``gradients/`` folder): the pass is skipped and the search runs on
                these gradients.
            edit: an ``edit.safetensors`` patch applied to the model after loading (validate/test).
            eval_mode: run the pass in eval mode (no dropout), as DESIGN.md prescribes.
        """
        super().__init__()
        self.automatic_optimization = False
        self.family = family
        self.gradients_from = gradients_from
        self.edit = edit
        self.eval_mode = eval_mode
        self.clip: nn.Module | None = None
        #: after the pass: "forget"/"retain" -> {parameter name: averaged gradient (CPU, fp32)}
        self.gradients: dict[str, dict[str, torch.Tensor]] = {}
        #: after the pass: per set, {"samples", "batches", "loss"} (global values)
        self.pass_stats: dict[str, dict[str, float]] = {}
        self.timings: dict[str, float] = {}
        self.gradient_files: dict[str, Path] = {}

    # -- model ---------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.clip is not None:
            return
        self.clip = self.family.load()
        if self.edit:
            edits, _ = load_edits(self.edit)
            for e in edits:
                apply_edit(self.clip, e)
            rank_zero_info(f"applied edit {self.edit}: {', '.join(e.name for e in edits)}")

    def configure_optimizers(self):
        return None  # a gradient-only pass: no optimizer, no step

    def setup(self, stage: str) -> None:
        # trainer.log_dir is a collective call under DDP: resolve it here, on every rank, so that
        # rank-0-only code (writing files, the search) never calls it
        self._run_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)

    @property
    def run_dir(self) -> Path:
        """This run's ``lightning_logs/version_N`` (resolved on every rank in ``setup``)."""
        return self._run_dir

    # -- the gradient pass ---------------------------------------------------------------------
    def on_fit_start(self) -> None:
        if self.gradients_from:
            self._load_gradients(Path(self.gradients_from))

    def _load_gradients(self, folder: Path) -> None:
        for name in SETS:
            path = folder / f"{name}.safetensors"
            grads, meta = load_tensors(path)
            check_matches_model(grads, self.clip, path)
            self.gradients[name] = grads
            self.pass_stats[name] = dict(meta.get("counts", {}))
            self.gradient_files[name] = path
        self.timings["gradients"] = 0.0
        rank_zero_info(f"re-using gradients from {folder}; the pass is skipped")

    def on_train_epoch_start(self) -> None:
        if self.gradients_from:
            return
        if self.eval_mode:
            self.clip.eval()
        self.clip.zero_grad(set_to_none=True)
        self._stashed: dict[str, dict[str, torch.Tensor]] = {}
        self._sums = {s: {"loss": torch.zeros((), dtype=torch.float64), "samples": 0, "batches": 0} for s in SETS}
        self._t_start = time.perf_counter()
        self._t_last = self._t_start

    def training_step(self, batch: dict, batch_idx: int) -> None:
        name = batch["set"]
        images, tokens, valid = batch["images"], batch["tokens"], batch["valid"]
        image_features = self.family.encode_image(self.clip, images)
        text_features = self.family.encode_text(self.clip, tokens)
        if name == "forget":
            loss = forget_similarity_sum(image_features, text_features, valid)
            n_local = int(valid.sum())
            reported = loss.detach() / max(n_local, 1)
        else:
            if self.trainer.world_size > 1:  # the contrastive loss of the *global* batch
                image_features = self.all_gather(image_features, sync_grads=True).flatten(0, 1)
                text_features = self.all_gather(text_features, sync_grads=True).flatten(0, 1)
                valid = self.all_gather(valid.to(torch.uint8)).flatten(0, 1).bool()
            loss = contrastive_loss(image_features, text_features, self.family.logit_scale(self.clip), valid)
            n_local = int(batch["valid"].sum())
            reported = loss.detach()
        with self._local_accumulation():
            self.manual_backward(loss)
        stats = self._sums[name]
        stats["loss"] += loss.detach().double().cpu()
        stats["samples"] += n_local
        stats["batches"] += 1
        now = time.perf_counter()
        self.log(f"pass/{name}_loss", reported, prog_bar=True, on_step=True, on_epoch=False)
        self.log("pass/samples_per_s", n_local * self.trainer.world_size / max(now - self._t_last, 1e-9),
                 prog_bar=True, on_step=True, on_epoch=False)
        self._t_last = now
        if batch["last"]:
            self._stash(name)

    def _local_accumulation(self):
        """Under DDP, backward without DDP's per-batch all-reduce (its ``no_sync``); the pass
        reduces once at the end. A no-op on one device."""
        wrapper = self.trainer.strategy.model
        return wrapper.no_sync() if isinstance(wrapper, DistributedDataParallel) else nullcontext()

    def _stash(self, name: str) -> None:
        """Move the accumulated ``.grad`` of a finished set aside and zero ``.grad``."""
        self._stashed[name] = {
            n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in self.clip.named_parameters() if p.requires_grad
        }
        self.clip.zero_grad(set_to_none=True)

    def on_train_epoch_end(self) -> None:
        if self.gradients_from:
            return
        world = self.trainer.world_size
        for name in SETS:
            grads = self._stashed.get(name)
            if grads is None:
                raise RuntimeError(f"the gradient pass saw no {name} batches: check data.{name}")
            stats = self._sums[name]
            flat = torch.cat([g.flatten().float() for g in grads.values()] + [
                torch.tensor([stats["loss"].item(), stats["samples"], stats["batches"]],
                             device=next(iter(grads.values())).device, dtype=torch.float32)
            ])
            if world > 1:  # one all-reduce per set for the whole pass
                flat = self.trainer.strategy.reduce(flat, reduce_op="sum")
            loss_sum, samples, batches_all = flat[-3:].double().tolist()
            batches = batches_all / world  # every rank sees every global batch
            if name == "forget":
                denominator, mean_loss = samples, loss_sum / max(samples, 1)
            else:  # each rank's grads hold world × its share of every global-batch loss
                denominator, mean_loss = batches * world, loss_sum / max(batches * world, 1)
            averaged, offset = {}, 0
            for pname, g in grads.items():
                n = g.numel()
                averaged[pname] = (flat[offset : offset + n] / denominator).view_as(g).cpu()
                offset += n
            self.gradients[name] = averaged
            self.pass_stats[name] = {"samples": int(samples), "batches": int(batches), "loss": mean_loss}
        self.clip.zero_grad(set_to_none=True)
        self.timings["gradients"] = time.perf_counter() - self._t_start
        for name in SETS:
            self.log(f"pass/{name}_mean_loss", self.pass_stats[name]["loss"], rank_zero_only=True)
        if self.trainer.is_global_zero:
            self._write_gradient_files()

    def _write_gradient_files(self) -> None:
        folder = self.run_dir / "gradients"
        datamodule = self.trainer.datamodule
        for name in SETS:
            meta = {
                "set": name,
                "model": self.family.describe(),
                "loss": FORGET_LOSS if name == "forget" else RETAIN_LOSS,
                "sign": "gradient of the loss; an edit theta - step * grad (step > 0) lowers it",
                "counts": self.pass_stats[name],
                "global_batch_size": getattr(datamodule, "global_batch_size", lambda s: None)(name),
                "world_size": self.trainer.world_size,
                "eval_mode": self.eval_mode,
                "precision": str(self.trainer.precision),
                "data": getattr(datamodule, "fingerprint", lambda s: {})(name),
                "shapes": {k: list(v.shape) for k, v in self.gradients[name].items()},
                "versions": package_versions(),
            }
            path = save_tensors(folder / f"{name}.safetensors", self.gradients[name], meta)
            self.gradient_files[name] = path
        rank_zero_info(f"gradients written to {folder}")

    # -- zero-shot evaluation (validate / test) ------------------------------------------------
    def _eval_start(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        self._eval_sets = datamodule.loaded_sets(stage)
        self._eval_forget_ids = datamodule.forget_ids(stage)
        self._class_emb = {
            name: class_embeddings(self.family, self.clip, s.classnames, s.templates)
            for name, s in self._eval_sets.items()
        }
        self._metrics = nn.ModuleDict({
            name: ZeroShotAccuracy(len(s.classnames)) for name, s in self._eval_sets.items()
        }).to(self.device)

    def _eval_step(self, batch: dict) -> None:
        name = batch["set"]
        u = torch.nn.functional.normalize(self.family.encode_image(self.clip, batch["images"]).float(), dim=-1)
        self._metrics[name].update(u @ self._class_emb[name].T, batch["labels"])

    def _eval_end(self, stage: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, metric in self._metrics.items():
            result = metric.compute()
            out |= concept_summary(result, self._eval_forget_ids) if name == "concepts" else utility_summary(result)
            metric.reset()
        prefix = "val" if stage == "validation" else "test"
        self.log_dict({f"{prefix}/{k}": v for k, v in out.items()}, rank_zero_only=True)
        self.last_eval = out
        return out

    def on_validation_epoch_start(self) -> None:
        self._eval_start("validation")

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_end("validation")

    def on_test_epoch_start(self) -> None:
        self._eval_start("test")

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
