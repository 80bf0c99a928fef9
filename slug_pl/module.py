"""The SLUG LightningModule: a gradient-only pass (``fit``) and zero-shot evaluation
(``validate`` / ``test``) of one model family.

``fit`` runs one epoch over the forget batches, then the retain batches (see
:mod:`slug_pl.data.pairs`), with manual optimization and *no optimizer step*: gradients
accumulate locally in ``.grad`` (DDP's per-batch all-reduce is switched off), each set's sums are
set aside after its last batch, and at the end of the epoch each set's gradient sums, loss
sums and counts are all-reduced once, divided by the global counts, checked to be finite, and
written by rank 0 to ``<run>/gradients/{forget,retain}.safetensors`` (with the skipped samples,
if any, in ``<run>/skipped_samples.json``). The ranking and step search then run in the
:class:`slug_pl.search.SlugSearch` callback.

Reliability:

- *Checks before the pass*: the model's weights are finite (after an ``edit``); at least one
  tensor is rankable under the family's include/exclude filter; none of the run's artifacts
  exists yet (nothing is ever overwritten: :class:`FileExistsError`).
- *Checks after the pass*: NaN/inf in a set's averaged gradients or loss raises
  :class:`FloatingPointError` naming the set and tensors; nothing is written. A set whose every
  sample was skipped raises :class:`ValueError`.
- *Resume* (``checkpoint_every`` / ``resume_from``): see :mod:`slug_pl.resume`. Example::

      slug-pl fit --config run.yaml --model.checkpoint_every 500      # killed after batch 1234
      slug-pl fit --config run.yaml --model.resume_from lightning_logs/version_0
      # resumes at batch 1000 in lightning_logs/version_1; same gradients as one pass

- *Reproducibility*: gradient files hold no timestamps or paths of the run; the same config and
  seed give bit-identical files on the same hardware and software. The metadata records the
  weights' SHA-256, data fingerprints and package versions.
"""

from __future__ import annotations

import json
import os
import platform
import time
from contextlib import nullcontext
from importlib import metadata as importlib_metadata
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from slug_pl import resume
from slug_pl.atomic import refuse_existing, write_text
from slug_pl.edit import apply_edit, load_edits
from slug_pl.evaluation.metrics import ZeroShotAccuracy, concept_summary, utility_summary
from slug_pl.evaluation.zeroshot import class_embeddings
from slug_pl.families.base import ModelFamily
from slug_pl.gradients import (
    FORGET_LOSS,
    RETAIN_LOSS,
    check_matches_model,
    check_model_identity,
    contrastive_loss,
    forget_similarity_sum,
    load_tensors,
    non_finite,
    save_tensors,
    weights_fingerprint,
)

SETS = ("forget", "retain")
SKIPPED_FILE = "skipped_samples.json"
#: Files a fit run writes into its run directory (besides config.yaml and logger files); an
#: existing one stops the run before any work.
RUN_ARTIFACTS = ("ranking.csv", "search.csv", "edit.safetensors", "edited_model.safetensors",
                 "report.md", "summary.json", "pareto_vision.png", "pareto_text.png", "similarity.png",
                 SKIPPED_FILE)


def peak_memory(device: torch.device) -> dict[str, object]:
    """Peak memory of this process so far: the accelerator's allocator on CUDA, else the
    resident set size (GiB)."""
    if device.type == "cuda":
        return {"device": torch.cuda.get_device_name(device),
                "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}
    import resource

    return {"device": "cpu", "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def package_versions() -> dict[str, str]:
    """Versions of Python and of the packages that can change the numbers (PIL decodes images)."""
    out = {"python": platform.python_version()}
    for pkg in ("slug_pl", "torch", "lightning", "open_clip_torch", "torchmetrics", "webdataset",
                "safetensors", "transformers", "diffusers", "pillow", "numpy"):
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
        checkpoint_every: int | None = None,
        resume_from: str | None = None,
        activation_checkpointing: bool = False,
    ):
        """
        Args:
            family: the model adapter (e.g. ``slug_pl.families.OpenClip``).
            gradients_from: a folder holding ``forget.safetensors`` and ``retain.safetensors`` of an
                earlier run (its ``gradients/`` folder): the pass is skipped and the search runs on
                these gradients.
            edit: an ``edit.safetensors`` patch applied to the model after loading (validate/test).
            eval_mode: run the pass in eval mode (no dropout), as DESIGN.md prescribes.
            checkpoint_every: save the pass's partial state every this many global batches to
                ``<run>/gradients/partial/`` (None: never); see :mod:`slug_pl.resume`.
            resume_from: continue an interrupted pass from its partial state: the interrupted
                run's directory, its ``gradients/partial`` folder or one partial file.
            activation_checkpointing: recompute block activations in backward instead of
                keeping them (less memory for large models, ~30 % more compute); the gradients
                are the same.
        """
        super().__init__()
        if checkpoint_every is not None and (isinstance(checkpoint_every, bool) or checkpoint_every < 1):
            raise ValueError(f"model.checkpoint_every must be a positive number of batches or null, "
                             f"got {checkpoint_every}")
        if resume_from and gradients_from:
            raise ValueError("model.resume_from and model.gradients_from exclude each other: resume "
                             "an interrupted pass, or skip the pass with finished gradients")
        self.automatic_optimization = False
        self.family = family
        self.gradients_from = gradients_from
        self.edit = edit
        self.eval_mode = eval_mode
        self.checkpoint_every = checkpoint_every
        self.resume_from = resume_from
        self.activation_checkpointing = activation_checkpointing
        self.clip: nn.Module | None = None
        #: after the pass: "forget"/"retain" -> {parameter name: averaged gradient (CPU, fp32)}
        self.gradients: dict[str, dict[str, torch.Tensor]] = {}
        #: after the pass: per set, {"samples", "batches", "loss", "skipped"} (global values)
        self.pass_stats: dict[str, dict[str, float]] = {}
        #: after the pass: per set, the skipped samples (dicts set/index/shard/key/reason)
        self.skipped: dict[str, list[dict]] = {}
        self.timings: dict[str, float] = {}
        self.gradient_files: dict[str, Path] = {}
        #: global batch position the pass starts at (> 0 when resuming; read by the DataModule)
        self.resume_position = 0
        self._resume_state: resume.PartialState | None = None
        self._resume_file: Path | None = None
        self._weights_sha256: str | None = None
        self._compat_cache: dict | None = None

    # -- model ---------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.clip is not None:
            return
        self.clip = self.family.load()
        if self.activation_checkpointing:
            self.family.enable_activation_checkpointing(self.clip)
        if self.edit:
            edits, _ = load_edits(self.edit)
            for e in edits:
                apply_edit(self.clip, e)
            rank_zero_info(f"applied edit {self.edit}: {', '.join(e.name for e in edits)}")
        self._check_weights_finite()

    def _check_weights_finite(self) -> None:
        bad = non_finite(dict(self.clip.named_parameters()))
        if bad:
            source = self.family.describe()
            edit = f" with the edit {self.edit}" if self.edit else ""
            raise FloatingPointError(
                f"the model {source.get('model_name')} from {source.get('pretrained')}{edit} has NaN/inf "
                f"weights in {len(bad)} tensor(s) (e.g. {bad[:3]}): the checkpoint is broken; use "
                f"another checkpoint"
            )

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

    @property
    def partial_dir(self) -> Path:
        return self.run_dir / "gradients" / resume.PARTIAL_DIR

    # -- checks before the pass ----------------------------------------------------------------
    def on_fit_start(self) -> None:
        self._check_rankable()
        self._check_outputs_free()
        self._weights_sha256 = weights_fingerprint(self.clip)
        if self.gradients_from:
            self._load_gradients(Path(self.gradients_from))
        elif self.resume_from:
            self._find_resume_state()

    def _check_rankable(self) -> None:
        if not any(self.family.is_rankable(n, p) for n, p in self.clip.named_parameters()):
            raise ValueError(
                f"no candidate layers: no tensor of {self.family.describe().get('model_name')} is "
                f"rankable under model.family.init_args.exclude {list(self.family.exclude)} and "
                f"include {list(self.family.include)}; loosen these patterns"
            )

    def _check_outputs_free(self) -> None:
        names = list(RUN_ARTIFACTS) + ([] if self.gradients_from else [f"gradients/{s}.safetensors" for s in SETS])
        for name in names:
            refuse_existing(self.run_dir / name)

    def _load_gradients(self, folder: Path) -> None:
        for name in SETS:
            path = folder / f"{name}.safetensors"
            grads, meta = load_tensors(path)
            check_model_identity(meta, self.family.describe(), self._weights_sha256, path)
            check_matches_model(grads, self.clip, path, require_all=True)
            self.gradients[name] = grads
            self.pass_stats[name] = dict(meta.get("counts", {}))
            self.skipped[name] = list(meta.get("skipped", []))
            self.gradient_files[name] = path
        self.timings["gradients"] = 0.0
        rank_zero_info(f"re-using gradients from {folder}; the pass is skipped")

    # -- resume --------------------------------------------------------------------------------
    def _compat(self) -> dict:
        """What a resumed pass must share with the interrupted one (see :mod:`slug_pl.resume`);
        computed once per run (the data fingerprints read every shard's head and tail)."""
        if self._compat_cache is None:
            self._compat_cache = self._compute_compat()
        return self._compat_cache

    def _compute_compat(self) -> dict:
        datamodule = self.trainer.datamodule
        return {
            "world_size": self.trainer.world_size,
            "model": self.family.describe(),
            "model_sha256": self._weights_sha256,
            "data": {s: getattr(datamodule, "fingerprint", lambda n: {})(s) for s in SETS},
            "global_batch_size": {s: getattr(datamodule, "global_batch_size", lambda n: None)(s) for s in SETS},
            "bad_samples": getattr(datamodule, "bad_samples", "stop"),
            "eval_mode": self.eval_mode,
            "precision": str(self.trainer.precision),
        }

    def _find_resume_state(self) -> None:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        position, path = resume.find_partial(self.resume_from, rank, world)
        state = resume.load_partial(path)
        resume.check_compatible(state.compat, self._compat(), path)
        self._resume_state, self._resume_file, self.resume_position = state, path, position
        rank_zero_info(f"resuming the gradient pass at batch {position} from {path.parent}")

    def _restore(self, state: resume.PartialState) -> None:
        device = self.device
        params = dict(self.clip.named_parameters())
        self._stashed = {s: {n: g.to(device) for n, g in grads.items()} for s, grads in state.stashed.items()}
        for name, grad in state.grads.items():
            params[name].grad = grad.to(device)
        self._sums = {s: dict(v) for s, v in state.sums.items()}
        self._skipped_local = list(state.skipped)
        resume.restore_rng(state.rng)
        self._position, self._elapsed_before = state.position, state.elapsed_s

    def _save_partial(self) -> None:
        """Save this rank's partial state; under DDP, all ranks write the same position before
        any rank drops its previous one."""
        world, rank = self.trainer.world_size, self.trainer.global_rank
        state = resume.PartialState(
            position=self._position,
            stashed={s: {n: g.detach().cpu() for n, g in grads.items()} for s, grads in self._stashed.items()},
            grads={n: p.grad.detach().cpu() for n, p in self.clip.named_parameters() if p.grad is not None},
            sums={s: dict(v) for s, v in self._sums.items()},
            skipped=list(self._skipped_local),
            rng=resume.rng_state(),
            compat=self._compat(),
            elapsed_s=self._elapsed(),
        )
        if world > 1:
            self.trainer.strategy.barrier("slug_partial_before")
        resume.save_partial(self.partial_dir, rank, state)
        if world > 1:
            self.trainer.strategy.barrier("slug_partial_after")
        resume.drop_older(self.partial_dir, rank, self._position)

    def _elapsed(self) -> float:
        return self._elapsed_before + time.perf_counter() - self._t_start

    # -- the gradient pass ---------------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        if self.gradients_from:
            return
        if self.eval_mode:
            self.clip.eval()
        self.clip.zero_grad(set_to_none=True)
        self._stashed: dict[str, dict[str, torch.Tensor]] = {}
        self._sums = {s: {"loss": torch.zeros((), dtype=torch.float64), "samples": 0, "batches": 0} for s in SETS}
        self._skipped_local: list[dict] = []
        self._position, self._elapsed_before = 0, 0.0
        self._t_start = time.perf_counter()
        self._t_last = self._t_start
        if self._resume_state is not None:
            self._restore(self._resume_state)
            self._resume_state = None  # free the CPU copies

    def training_step(self, batch: dict, batch_idx: int) -> None:
        name = batch["set"]
        images, tokens, valid = batch["images"], batch["tokens"], batch["valid"]
        self._skipped_local.extend(batch.get("skipped", []))
        image_features = self.family.encode_image(self.clip, images)
        text_features = self.family.encode_text(self.clip, tokens)
        n_local = int(valid.sum())
        counted = True  # whether the batch counts (a retain batch whose every sample was skipped does not)
        if name == "forget":
            loss = forget_similarity_sum(image_features, text_features, valid)
            reported = loss.detach() / max(n_local, 1)
        else:
            if self.trainer.world_size > 1:  # the contrastive loss of the *global* batch
                image_features = self.all_gather(image_features, sync_grads=True).flatten(0, 1)
                text_features = self.all_gather(text_features, sync_grads=True).flatten(0, 1)
                valid = self.all_gather(valid.to(torch.uint8)).flatten(0, 1).bool()
            counted = bool(valid.any())  # the same on every rank: ``valid`` is global here
            loss = contrastive_loss(image_features, text_features, self.family.logit_scale(self.clip), valid)
            reported = loss.detach()
        if counted:
            with self._local_accumulation():
                self.manual_backward(loss)
            stats = self._sums[name]
            stats["loss"] += loss.detach().double().cpu()
            stats["samples"] += n_local
            stats["batches"] += 1
            self.log(f"pass/{name}_loss", reported, prog_bar=True, on_step=True, on_epoch=False)
        now = time.perf_counter()
        self.log("pass/samples_per_s", n_local * self.trainer.world_size / max(now - self._t_last, 1e-9),
                 prog_bar=True, on_step=True, on_epoch=False)
        self._t_last = now
        if batch["last"]:
            self._stash(name)
        self._position += 1
        finished = batch["last"] and name == SETS[-1]
        if self.checkpoint_every and self._position % self.checkpoint_every == 0 and not finished:
            self._save_partial()

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
        skipped = self._gather_skipped()
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
            self.skipped[name] = [r for r in skipped if r["set"] == name]
            self._check_not_all_skipped(name, samples if name == "forget" else batches)
            if name == "forget":
                denominator, mean_loss = samples, loss_sum / samples
            else:  # each rank's grads hold world × its share of every global-batch loss
                denominator, mean_loss = batches * world, loss_sum / (batches * world)
            averaged, offset = {}, 0
            for pname, g in grads.items():
                n = g.numel()
                averaged[pname] = (flat[offset : offset + n] / denominator).view_as(g).cpu()
                offset += n
            self._check_finite(name, averaged, mean_loss)
            self.gradients[name] = averaged
            self.pass_stats[name] = {"samples": int(samples), "batches": int(batches), "loss": mean_loss,
                                     "skipped": len(self.skipped[name])}
        self.clip.zero_grad(set_to_none=True)
        self.timings["gradients"] = self._elapsed()
        self.peak_memory = peak_memory(self.device)
        for name in SETS:
            self.log(f"pass/{name}_mean_loss", self.pass_stats[name]["loss"], rank_zero_only=True)
        if self.trainer.is_global_zero:
            self._write_gradient_files()
            resume.remove_all(self.partial_dir)

    def _gather_skipped(self) -> list[dict]:
        """Every rank's skipped-sample records, in (set, global index) order."""
        records = list(self._skipped_local)
        if self.trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            gathered: list[list[dict]] = [[] for _ in range(self.trainer.world_size)]
            dist.all_gather_object(gathered, records)
            records = [r for part in gathered for r in part]
        return sorted(records, key=lambda r: (SETS.index(r["set"]), r["index"]))

    def _check_not_all_skipped(self, name: str, count: float) -> None:
        if count == 0:
            n = len(self.skipped[name])
            raise ValueError(
                f"every sample of the {name} set was skipped ({n} bad samples, e.g. "
                f"{self.skipped[name][:2]}): no gradient can be computed; fix the shards of data.{name}"
            )

    @staticmethod
    def _check_finite(name: str, averaged: dict[str, torch.Tensor], mean_loss: float) -> None:
        bad = non_finite(averaged)
        if bad or not torch.isfinite(torch.tensor(mean_loss)):
            raise FloatingPointError(
                f"the {name} gradients hold NaN/inf in {len(bad)} of {len(averaged)} tensors (e.g. "
                f"{bad[:5]}; mean {name} loss {mean_loss}); no gradient file was written. Check the "
                f"model weights, use trainer.precision 32 (half precision can overflow) and check "
                f"the {name} data"
            )

    def _write_gradient_files(self) -> None:
        folder = self.run_dir / "gradients"
        datamodule = self.trainer.datamodule
        for name in SETS:
            meta = {
                "set": name,
                "model": self.family.describe(),
                "model_sha256": self._weights_sha256,
                "loss": FORGET_LOSS if name == "forget" else RETAIN_LOSS,
                "sign": "gradient of the loss; an edit theta - step * grad (step > 0) lowers it",
                "counts": self.pass_stats[name],
                "global_batch_size": getattr(datamodule, "global_batch_size", lambda s: None)(name),
                "world_size": self.trainer.world_size,
                "eval_mode": self.eval_mode,
                "precision": str(self.trainer.precision),
                "data": getattr(datamodule, "fingerprint", lambda s: {})(name),
                "bad_samples": getattr(datamodule, "bad_samples", "stop"),
                "skipped": self.skipped[name],
                "shapes": {k: list(v.shape) for k, v in self.gradients[name].items()},
                "versions": package_versions(),
            }
            if self._resume_file is not None:
                meta["resumed"] = {"from": str(self._resume_file.parent), "batch": self.resume_position}
            path = save_tensors(folder / f"{name}.safetensors", self.gradients[name], meta)
            self.gradient_files[name] = path
        self._write_skipped()
        rank_zero_info(f"gradients written to {folder}")

    def _write_skipped(self) -> None:
        """``<run>/skipped_samples.json``: the policy, per-set counts and every skipped sample."""
        record = {
            "policy": getattr(self.trainer.datamodule, "bad_samples", "stop"),
            "counts": {s: len(self.skipped[s]) for s in SETS},
            "samples": {s: self.skipped[s] for s in SETS},
        }
        write_text(self.run_dir / SKIPPED_FILE, json.dumps(record, indent=2) + "\n")

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
