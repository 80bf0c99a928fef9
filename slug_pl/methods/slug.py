"""SLUG: one gradient-only pass, then one layer edited by one step (docs/design.md §1).

Two pieces, the Lightning shape of the method:

- :class:`SlugModule`, the gradient pass (``fit``): one epoch over the forget batches, then the
  retain batches (see :mod:`slug_pl.data.pairs`), with manual optimization and *no optimizer
  step*: gradients accumulate locally in ``.grad`` (DDP's per-batch all-reduce is switched off),
  each set's sums are set aside after its last batch, and at the end of the epoch each set's
  gradient sums and loss sums are all-reduced once (the exact integer counts and the skipped
  samples gathered once), divided by the global counts, checked to be finite, and written by rank
  0 to ``<run>/gradients/{forget,retain}.safetensors`` (skipped samples beside them:
  :mod:`slug_pl.skip_list`).
- :class:`SlugSearch`, a thin Callback that, after the pass, hands the gradients to the step
  search (:mod:`slug_pl.step_search`: ranking, doubling + bisection, the choice, several
  concepts), applies the chosen edit(s) and writes the run record (:mod:`slug_pl.record`).

Reliability:

- *Checks before the pass*: the model's weights are finite (after an ``edit``); at least one
  tensor is rankable; none of the run's artifacts exists yet (:class:`FileExistsError`);
  gradients given with ``gradients_from`` belong to this model, these concepts and this data.
- *Checks after the pass*: NaN/inf in a set's averaged gradients or loss raises
  :class:`FloatingPointError` naming the set and tensors; nothing is written. A set whose every
  sample was skipped raises :class:`ValueError`.
- *Resume* (``checkpoint_every`` / ``resume_from``): see :mod:`slug_pl.resume`. Example::

      slug-pl fit --config run.yaml --model.checkpoint_every 500      # killed after batch 1234
      slug-pl fit --config run.yaml --model.resume_from lightning_logs/version_0
      # resumes at batch 1000 in lightning_logs/version_1; same gradients as one pass

- *Reproducibility*: gradient files hold no timestamps or paths of the run, and name data by paths
  relative to the working folder; the same config and seed give byte-identical files on the same
  hardware and software, also from two checkouts in different folders. The metadata records the
  weights' SHA-256, the concepts, data fingerprints and package versions.
"""

from __future__ import annotations

import time
from dataclasses import replace
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.nn.parallel import DistributedDataParallel

from slug_pl import resume
from slug_pl.atomic import file_slug
from slug_pl.data.datamodule import portable_path
from slug_pl.departures import RunOptions, run_departures
from slug_pl.distributed_search import coordinating, serve
from slug_pl.edit import apply_edit, merge_edits
from slug_pl.evaluation.evaluator import Evaluator
from slug_pl.evaluation.group import EvalGroup
from slug_pl.families.base import ModelFamily
from slug_pl.gradients import (
    RETAIN_LOSS,
    GradientFileError,
    check_data_identity,
    check_matches_model,
    check_model_identity,
    contrastive_loss,
    forget_gradient,
    forget_loss,
    forget_similarity_sum,
    load_tensors,
    non_finite,
    weights_fingerprint,
)
from slug_pl.methods.base import UnlearningModule, on_run_device
from slug_pl.methods import slug_report
from slug_pl.ranking import has_candidates
from slug_pl.record import RunRecord, check_free
from slug_pl.resources import package_versions
from slug_pl.retain_projection import RetainProjection
from slug_pl.skip_list import read_skip_list
from slug_pl.step_search import DEFAULT_KEPT, ForgetTarget, Outcome, SearchSettings, StepEvaluation, StepSearch
from slug_pl.targets.base import DownstreamTarget

SETS = ("forget", "retain")


class SlugModule(UnlearningModule):
    """The SLUG gradient pass (``fit``) for one model of a :class:`ModelFamily`; validate / test
    score the model (with an optional ``edit``) zero-shot."""

    method_name = "slug"
    no_retain_projection = None
    projected = "the forget gradient of every covered tensor is projected"

    def __init__(
        self,
        family: ModelFamily,
        gradients_from: str | None = None,
        edit: str | None = None,
        eval_mode: bool = True,
        checkpoint_every: int | None = None,
        resume_from: str | None = None,
        activation_checkpointing: bool = False,
        target: DownstreamTarget | None = None,
        forget_averaging: str = "per_sample",
        forget_target: ForgetTarget = ForgetTarget(),  # noqa: B008 (frozen)
        protect_retained: RetainProjection | None = None,
    ):
        """
        Args:
            family: the model adapter (e.g. ``slug_pl.families.OpenClip``).
            gradients_from: a folder holding ``forget.safetensors`` and ``retain.safetensors`` of an
                earlier run, with its skip lists (its ``gradients/`` folder, :mod:`slug_pl.skip_list`):
                the pass is skipped and the search runs on
                these gradients (refused when they were computed for another model, other
                concepts or other data).
            edit: an ``edit.safetensors`` patch applied to the model after loading (validate/test).
            eval_mode: run the pass in eval mode (no dropout).
            checkpoint_every: save the pass's partial state every this many global batches to
                ``<run>/gradients/partial/`` (None: never); see :mod:`slug_pl.resume`.
            resume_from: continue an interrupted pass from its partial state: the interrupted
                run's directory, its ``gradients/partial`` folder or one partial file.
            activation_checkpointing: recompute block activations in backward instead of
                keeping them (less memory for large models, ~30 % more compute); the gradients
                are the same.
            target: a downstream model that embeds one tower of this CLIP (Stable Diffusion's text
                encoder, LLaVA's vision tower): only tensors it reads are candidates, and the edit
                is transplanted into it and judged there (see :mod:`slug_pl.targets`).
            forget_averaging: ``per_sample`` (default): the forget gradient is the mean over
                pairs, whatever the batch size; ``per_batch``: the mean over forget batches of
                ``data.batch_size`` pairs of each batch's mean, as the authors' code (their scripts:
                batches of 16); see docs/reference.md.
            forget_target: the forget target (the config's top-level ``forget_target:``; the
                search finds the smallest step meeting it, see :class:`SlugSearch`).
            protect_retained: the retain projection, ``{tolerance, limit}``
                (:class:`~slug_pl.retain_projection.RetainProjection`): the forget gradient is
                projected off what the retained inputs feed each tensor (what the target protects;
                without one, the retain set's pairs, both towers), and only the tensors it covers
                are candidates. A departure from SLUG's plain gradient, recorded by name; None
                (the default): off, SLUG's plain gradient.
        """
        super().__init__(family, edit, target, forget_target, protect_retained)
        forget_loss(forget_averaging)  # checks the name
        if checkpoint_every is not None and (isinstance(checkpoint_every, bool) or checkpoint_every < 1):
            raise ValueError(f"model.checkpoint_every must be a positive number of batches or null, "
                             f"got {checkpoint_every}")
        if resume_from and gradients_from:
            raise ValueError("model.resume_from and model.gradients_from exclude each other: resume "
                             "an interrupted pass, or skip the pass with finished gradients")
        self.automatic_optimization = False
        self.gradients_from = gradients_from
        self.eval_mode = eval_mode
        self.checkpoint_every = checkpoint_every
        self.resume_from = resume_from
        self.activation_checkpointing = activation_checkpointing
        self.forget_averaging = forget_averaging
        #: after the pass: "forget"/"retain" -> {parameter name: averaged gradient (CPU, fp32)}, held
        #: by rank 0 alone (the rank that ranks, searches and writes); empty on the other ranks
        self.gradients: dict[str, dict[str, torch.Tensor]] = {}
        #: after the pass: per set, {"samples", "batches", "loss", "skipped"} (global values)
        self.pass_stats: dict[str, dict[str, float]] = {}
        #: after the pass: per set, the skipped samples (dicts set/index/shard/key/reason)
        self.skipped: dict[str, list[dict]] = {}
        self.gradient_files: dict[str, Path] = {}
        #: global batch position the pass starts at (> 0 when resuming; given to the data in setup)
        self.resume_position = 0
        self._resume_state: resume.PartialState | None = None
        self._resume_file: Path | None = None
        self._weights_sha256: str | None = None
        self._compat_cache: dict | None = None

    def prepare_model(self, model) -> None:
        if self.activation_checkpointing:
            self.family.enable_activation_checkpointing(model)

    def configure_optimizers(self):
        return None  # a gradient-only pass: no optimizer, no step

    def pass_sets(self) -> list[str]:
        return [] if self.gradients_from else list(SETS)

    @property
    def partial_dir(self) -> Path:
        return self.run_dir / "gradients" / resume.PARTIAL_DIR

    # -- checks before the pass ----------------------------------------------------------------
    def on_fit_start(self) -> None:
        self._check_rankable()
        self._check_outputs_free()
        self.check_target()
        self._weights_sha256 = weights_fingerprint(self.clip)
        if self.gradients_from:
            self._load_gradients(Path(self.gradients_from), {s: self._data_identity(s) for s in SETS})
        elif self.resume_from:
            self._find_resume_state()

    def _check_rankable(self) -> None:
        if not has_candidates(self.family, self.clip.named_parameters(), readable=self.readable):
            read = f" and read by the target {self.target.describe()}" if self.target is not None else ""
            raise ValueError(
                f"no candidate layers: no tensor of {self.family.describe().get('model_name')} is "
                f"rankable under model.family.init_args.exclude {list(self.family.exclude)} and "
                f"include {list(self.family.include)}{read}; loosen these patterns"
            )

    def _check_outputs_free(self) -> None:
        check_free(self.run_dir, reusing_gradients=bool(self.gradients_from))

    def _load_gradients(self, folder: Path, data_identity: dict[str, dict] | None = None) -> None:
        """Gradients of an earlier run, checked against this model and (``data_identity``: per set,
        what :meth:`_data_identity` gives) this run's concepts and data."""
        if not folder.is_dir():
            raise FileNotFoundError(f"model.gradients_from: {folder} is not a folder; give the gradients/ folder "
                                    f"of an earlier run (it holds forget.safetensors and retain.safetensors)")
        for name in SETS:
            path = folder / f"{name}.safetensors"
            grads, meta = load_tensors(path)
            check_model_identity(meta, self.family.describe(), self._weights_sha256, path)
            if "loss" in meta and meta["loss"] != self._loss_definition(name):
                raise GradientFileError(f"{path} holds the gradient of another {name} loss ({meta['loss']}) than this "
                                        f"run's ({self._loss_definition(name)}); recompute the gradients or set "
                                        f"model.forget_averaging and data.batch_size as that run")
            if data_identity is not None:
                check_data_identity(meta, data_identity[name], path)
            check_matches_model(grads, self.clip, path, require_all=True)
            self.gradients[name] = grads
            self.pass_stats[name] = dict(meta.get("counts", {}))
            self.skipped[name] = read_skip_list(folder, meta.get("skipped", []), path)
            self.gradient_files[name] = path
        self.timings["gradients"] = 0.0
        rank_zero_info(f"re-using gradients from {folder}; the pass is skipped")

    def _loss_definition(self, name: str) -> str:
        """The objective of set ``name`` as gradient files record it."""
        if name == "retain":
            return RETAIN_LOSS
        return forget_loss(self.forget_averaging, self.trainer.datamodule.global_batch_size("forget"))

    def _data_identity(self, name: str) -> dict:
        """What a gradient file of set ``name`` must have been computed from: this run's concepts
        (they define the forget set) and the set's data fingerprint."""
        datamodule = self.trainer.datamodule
        return {"concepts": list(datamodule.concepts), "data": datamodule.fingerprint(name)}

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
            "data": {s: datamodule.fingerprint(s) for s in SETS},
            "global_batch_size": {s: datamodule.global_batch_size(s) for s in SETS},
            "bad_samples": datamodule.bad_samples,
            "eval_mode": self.eval_mode,
            "precision": str(self.trainer.precision),
            "forget_loss": self._loss_definition("forget"),
        }

    def start_batch(self) -> int:
        """With ``resume_from``: the global batch at which the interrupted pass saved its partial
        state (this rank's file found now; loaded and checked in :meth:`on_fit_start`)."""
        if not self.resume_from:
            return 0
        self.resume_position, self._resume_file = resume.find_partial(self.resume_from)
        return self.resume_position

    def _find_resume_state(self) -> None:
        path = self._resume_file
        state = resume.load_partial(path, self.trainer.world_size)
        resume.check_compatible(state.compat, self._compat(), path)
        self._resume_state = state
        rank_zero_info(f"resuming the gradient pass at batch {self.resume_position} from {path.parent}")

    def _restore(self, state: resume.PartialState) -> None:
        """Rank 0 takes the saved sums (every rank's, added at the checkpoint); another rank
        starts from zero sums, with the same global batch counts and its own RNG state."""
        device, rank = self.device, self.trainer.global_rank
        params = dict(self.clip.named_parameters())
        self._stashed = {s: {n: (g if rank == 0 else torch.zeros_like(g)).to(device) for n, g in grads.items()}
                         for s, grads in state.stashed.items()}
        if rank == 0:
            for name, grad in state.grads.items():
                params[name].grad = grad.to(device)
            self._sums = {s: dict(v) for s, v in state.sums.items()}
            self._skipped_local = list(state.skipped)
        else:
            self._sums = {s: {"loss": torch.zeros((), dtype=torch.float64), "samples": 0, "batches": v["batches"]}
                          for s, v in state.sums.items()}
            self._skipped_local = []
        resume.restore_rng(state.rng_of(rank))
        self._position, self._elapsed_before = state.position, state.elapsed_s

    def _save_partial(self) -> None:
        """Save the pass's partial state: under DDP every rank's sums are first added into rank
        0's (:meth:`_sums_into_rank_zero`), then rank 0 writes the one file and drops the previous."""
        world = self.trainer.world_size
        rngs = [resume.rng_state()]
        if world > 1:
            self._sums_into_rank_zero()
            rngs = [None] * world
            dist.all_gather_object(rngs, resume.rng_state())
        if not self.trainer.is_global_zero:
            return
        state = resume.PartialState(
            position=self._position,
            stashed={s: {n: g.detach().cpu() for n, g in grads.items()} for s, grads in self._stashed.items()},
            grads={n: p.grad.detach().cpu() for n, p in self.clip.named_parameters() if p.grad is not None},
            sums={s: dict(v) for s, v in self._sums.items()},
            skipped=list(self._skipped_local),
            rng=rngs[0],
            other_rng=rngs[1:],
            compat=self._compat(),
            elapsed_s=self._elapsed(),
        )
        resume.save_partial(self.partial_dir, state)
        resume.drop_older(self.partial_dir, self._position)

    @torch.no_grad()
    def _sums_into_rank_zero(self) -> None:
        """Under DDP, at a checkpoint: every rank's gradient sums (finished sets and the set in
        progress, one all-reduce), loss sums, sample counts and skipped samples added into rank
        0's; the other ranks go on from zero. The pass's arithmetic is then the same whether it
        is interrupted there or not."""
        rank = self.trainer.global_rank
        params = [(n, p) for n, p in self.clip.named_parameters() if p.requires_grad]
        pieces = [g for grads in self._stashed.values() for g in grads.values()]
        pieces += [p.grad if p.grad is not None else torch.zeros_like(p) for _, p in params]
        totals = iter(summed_over_ranks(self.trainer.strategy, pieces))
        for grads in self._stashed.values():
            for g in grads.values():
                total = next(totals)
                g.copy_(total if rank == 0 else torch.zeros_like(g))
        for _, p in params:
            total = next(totals)
            p.grad = total.clone() if rank == 0 else None
        parts = [None] * self.trainer.world_size
        local = ({s: (float(v["loss"]), v["samples"]) for s, v in self._sums.items()}, list(self._skipped_local))
        dist.all_gather_object(parts, local)
        for s, stats in self._sums.items():
            if rank == 0:
                stats["loss"] = sum((torch.tensor(sums[s][0], dtype=torch.float64) for sums, _ in parts),
                                    torch.zeros((), dtype=torch.float64))
                stats["samples"] = sum(sums[s][1] for sums, _ in parts)
            else:
                stats["loss"], stats["samples"] = torch.zeros((), dtype=torch.float64), 0
        self._skipped_local = [r for _, skipped in parts for r in skipped] if rank == 0 else []

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
        self.phase_memory.start(self.device)
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
            if self.forget_averaging == "per_batch":  # this rank's share of the global batch's mean
                n_batch = self._global_count(valid)
                counted = n_batch > 0
                loss = loss / max(n_batch, 1)
                reported = loss.detach()
            else:
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

    def _global_count(self, valid: torch.Tensor) -> int:
        """The valid rows of the global batch (every rank's ``valid``, summed)."""
        count = valid.sum()
        if self.trainer.world_size > 1:
            count = self.trainer.strategy.reduce(count.to(self.device), reduce_op="sum")
        return int(count)

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
        skipped, counts = self._gather_records()
        for name in SETS:
            grads = self._stashed.get(name)
            if grads is None:
                raise RuntimeError(f"the gradient pass saw no {name} batches: check data.{name}")
            stats = self._sums[name]
            # the counts ride along in float32 (kept, so that the reduction's layout and sums stay
            # as they were); the exact integers come from _gather_records
            *totals, stat_totals = summed_over_ranks(self.trainer.strategy, list(grads.values()) + [
                torch.tensor([stats["loss"].item(), stats["samples"], stats["batches"]],
                             device=next(iter(grads.values())).device, dtype=torch.float32)
            ])  # one all-reduce per set for the whole pass
            loss_sum = float(stat_totals[0].double())
            samples, batches = counts[name]["samples"], counts[name]["batches"]
            self.skipped[name] = [r for r in skipped if r["set"] == name]
            self._check_not_all_skipped(name, samples if name == "forget" else batches)
            if name == "forget":
                denominator = samples if self.forget_averaging == "per_sample" else batches
                mean_loss = loss_sum / denominator
            else:  # each rank's grads hold world × its share of every global-batch loss
                denominator, mean_loss = batches * world, loss_sum / (batches * world)
            summed = dict(zip(grads, totals))  # views into the reduced sums, on the device
            self._check_finite(name, summed, mean_loss)  # every rank: the same reduced numbers
            del self._stashed[name]  # the device copy is spent
            if self.trainer.is_global_zero:  # the one rank that ranks, searches and writes holds
                # the one host copy (the others would keep 8 bytes per parameter each for nothing)
                self.gradients[name] = {k: (v / denominator).cpu() for k, v in summed.items()}
            self.pass_stats[name] = {"samples": samples, "batches": batches, "loss": mean_loss,
                                     "skipped": len(self.skipped[name])}
        self.clip.zero_grad(set_to_none=True)
        self.timings["gradients"] = self._elapsed()
        self.phase_memory.end("gradients", self.device)
        for name in SETS:
            self.log(f"pass/{name}_mean_loss", self.pass_stats[name]["loss"], rank_zero_only=True)
        if self.trainer.is_global_zero:
            self._write_gradient_files()
            resume.remove_all(self.partial_dir)

    def _gather_records(self) -> tuple[list[dict], dict[str, dict[str, int]]]:
        """Every rank's skipped-sample records, in (set, global index) order, and each set's exact
        counts: ``samples`` (valid rows over all ranks) and ``batches`` (global batches counted,
        the same on every rank), integers of any size. One all_gather_object under DDP."""
        local = {s: {"samples": int(self._sums[s]["samples"]), "batches": int(self._sums[s]["batches"])} for s in SETS}
        parts = [(list(self._skipped_local), local)]
        if self.trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            parts = [None] * self.trainer.world_size
            dist.all_gather_object(parts, (list(self._skipped_local), local))
        records = sorted((r for part, _ in parts for r in part), key=lambda r: (SETS.index(r["set"]), r["index"]))
        counts = {s: {"samples": sum(c[s]["samples"] for _, c in parts), "batches": parts[0][1][s]["batches"]}
                  for s in SETS}
        return records, counts

    def _check_not_all_skipped(self, name: str, count: int) -> None:
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
        record = RunRecord(self.run_dir)
        for name in SETS:
            meta = {
                "set": name,
                "concepts": list(datamodule.concepts),
                "model": self.family.describe(),
                "model_sha256": self._weights_sha256,
                "loss": self._loss_definition(name),
                "sign": "gradient of the loss; an edit theta - step * grad (step > 0) lowers it",
                "counts": self.pass_stats[name],
                "global_batch_size": datamodule.global_batch_size(name),
                "world_size": self.trainer.world_size,
                "eval_mode": self.eval_mode,
                "precision": str(self.trainer.precision),
                "data": datamodule.fingerprint(name),
                "bad_samples": datamodule.bad_samples,
                "skipped": record.skip_list(name, self.skipped[name]),  # the records beside the file
                "shapes": {k: list(v.shape) for k, v in self.gradients[name].items()},
                "versions": package_versions(),
            }
            if self._resume_file is not None:
                meta["resumed"] = {"from": portable_path(str(self._resume_file.parent)), "batch": self.resume_position}
            path = record.gradients(name, self.gradients[name], meta)
            self.gradient_files[name] = path
        self._write_skipped()
        rank_zero_info(f"gradients written to {folder}")

    def _write_skipped(self) -> None:
        """``<run>/skipped_samples.json``: the policy, per-set counts and every skipped sample."""
        RunRecord(self.run_dir).skipped({
            "policy": self.trainer.datamodule.bad_samples,
            "counts": {s: len(self.skipped[s]) for s in SETS},
            "samples": {s: self.skipped[s] for s in SETS},
        })



def summed_over_ranks(strategy, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """``tensors`` summed over the ranks in one all-reduce of their float32 values flattened
    together; returns views of the result, each with its tensor's shape (one process: the values,
    as float32)."""
    flat = torch.cat([t.flatten().float() for t in tensors])
    if getattr(strategy, "world_size", 1) > 1:
        flat = strategy.reduce(flat, reduce_op="sum")
    views, offset = [], 0
    for t in tensors:
        views.append(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
    return views


class SlugSearch(Callback):
    """After the gradient pass: rank, search a step per candidate, choose, apply, record.

    A thin driver: the algorithm is :class:`slug_pl.step_search.StepSearch`; the record is
    :meth:`UnlearningModule.write_record`. Artifacts beyond the common record: ``ranking.csv`` and
    ``pareto_{vision,text}.png`` (written as soon as the ranking exists), ``search.csv`` (every
    evaluation), ``edited_model/`` (optional: the edited CLIP in its library's format, with a model card).
    """

    def __init__(
        self,
        top_k: int | None = 3,
        towers: list[str] = ("vision", "text"),
        max_evals: int = 10,
        initial_step_fraction: float = 0.1,
        tolerance: float = 0.05,
        utility_guard: float | None = None,
        step_margin: float = 1.0,
        similarity_concepts: int = 8,
        concept_gradients: str = "original",
        beam_width: int = 3,
        fronts: int = 1,
        save_checkpoint: bool = True,
        kept: list[str] = DEFAULT_KEPT,
        stop_dominated: bool = False,
        iterations: str = "until_tolerance",
        share_evaluations: bool = True,
    ):
        """
        Args:
            top_k: candidates per tower: the Pareto front by importance, capped at ``top_k``
                (null: every front layer, as the authors' code).
            towers: towers whose layers may be edited.
            max_evals: evaluations per candidate layer.
            initial_step_fraction: λ₀ as a fraction of ‖θ_l‖ / ‖g_f,l‖.
            tolerance: stop bisecting when the bracket is below this fraction of λ.
            iterations: ``until_tolerance`` (stop at ``tolerance``) or ``fixed`` (exactly
                ``max_evals`` evaluations, no stopping rule, as the authors' code; the report then
                shows each candidate's last iterate next to its smallest hit).
            utility_guard: reject steps whose retain or utility top-1 drops by more than this
                (a fraction, e.g. 0.05 = 5 points); None disables the guard.
            step_margin: multiply the found (smallest target-meeting) step by this factor (>= 1)
                so that forgetting also holds on fresh images of the concept, at some cost in
                retain accuracy (see benchmarks/results/robust_forgetting.md). The report and
                summary show the step applied, margin included.
            similarity_concepts: concepts shown in the before/after similarity matrix.
            concept_gradients: several concepts: each concept's forget gradient on the
                ``original`` model or on the ``edited`` model (earlier edits applied).
            beam_width: several concepts: partial edit sets kept after each concept, and
                candidates per concept tried on each (1: greedy).
            fronts: candidates come from the first ``fronts`` Pareto fronts of each tower.
            save_checkpoint: also write the full edited model (``edited_model/``: in its own library's format, with
                a model card).
            kept: the validation metrics whose sum the choice among candidates maximises (and
                that the utility guard watches): the CLIP's ``retain_top1`` and ``utility_top1`` by
                default; a downstream judge names its own (e.g. LLaVA's
                ``retain_name_accuracy`` and ``object_accuracy``).
            stop_dominated: give up a candidate once a step that misses the target keeps no more
                than the best edit already found (larger steps keep less still); fewer
                evaluations where each is expensive (generations, a VLM's answers).
            share_evaluations: under DDP, every rank takes its part of each evaluation
                (:mod:`slug_pl.distributed_search`; the same metrics as one process); False:
                rank 0 evaluates alone.
        """
        # the forget target is the run's (its forget_target: section, the method's): set in setup
        self.settings = SearchSettings(ForgetTarget(), top_k, fronts, tuple(towers),
                                       max_evals, initial_step_fraction, tolerance, utility_guard, step_margin,
                                       beam_width, concept_gradients, tuple(kept), stop_dominated, iterations)
        self.similarity_concepts = similarity_concepts
        self.save_checkpoint = save_checkpoint
        self.share_evaluations = share_evaluations
        self.summary: dict | None = None

    def setup(self, trainer: Trainer, pl_module: SlugModule, stage: str) -> None:
        self.settings = replace(self.settings, target=pl_module.forget_target)
        datamodule = trainer.datamodule
        if stage == "fit" and not (datamodule.concepts and datamodule.has_stage("validation")):
            raise ValueError("the step search needs data.concepts (the names to forget) and data.validation "
                             "(the labelled sets it measures forgetting on); set both")

    def on_fit_start(self, trainer: Trainer, pl_module: SlugModule) -> None:
        self._t_fit = time.perf_counter()
        if not has_candidates(pl_module.family, pl_module.clip.named_parameters(), towers=self.settings.towers):
            raise ValueError(
                f"no candidate layers: no rankable tensor in towers {list(self.settings.towers)} after the "
                f"model.family.init_args exclude/include filters; widen them or search.towers"
            )

    def evaluation_group(self, trainer: Trainer, pl_module: SlugModule) -> EvalGroup:
        """The ranks that share the search's evaluations (:mod:`slug_pl.distributed_search`):
        every rank of the run, unless ``share_evaluations`` is off or a downstream target judges
        the search (its model is on rank 0 alone), then rank 0 alone."""
        if not self.share_evaluations or trainer.world_size == 1 or pl_module.target is not None:
            return EvalGroup()
        return EvalGroup.of_default_process_group()

    def on_fit_end(self, trainer: Trainer, pl_module: SlugModule) -> None:
        # on_fit_end (not on_train_end) also runs when the pass is skipped (model.gradients_from)
        group = self.evaluation_group(trainer, pl_module)
        if not trainer.is_global_zero:  # rank 0 searches; the others take their part of each evaluation
            if not group.alone:
                with on_run_device(trainer, pl_module):
                    context = pl_module.context
                    serve(context.model, lambda concept: self.clip_judge(context, concept, group))
            return
        with on_run_device(trainer, pl_module):
            self._search(trainer, pl_module, group)

    @staticmethod
    def clip_judge(context, concept: str, group: EvalGroup) -> Evaluator:
        """The CLIP's zero-shot judge of one concept on validation: rank 0's search and every rank
        serving it build it here, so that their parts of each evaluation are of the same judge."""
        return Evaluator.for_concepts(context, "validation", [concept], group)

    def _search(self, trainer: Trainer, pl_module: SlugModule, group: EvalGroup) -> None:
        context = pl_module.context
        with coordinating(context.model, group) as coordinator:  # the other ranks stop serving on exit
            found = self._find_edits(trainer, pl_module, group, coordinator)
        self._finish(trainer, pl_module, *found)

    def _find_edits(self, trainer: Trainer, pl_module: SlugModule, group: EvalGroup, coordinator):
        """Rank, search, choose and apply one edit per concept (``coordinator``: the other ranks'
        orders, or None alone); returns what :meth:`_finish` records."""
        t0 = time.perf_counter()
        pl_module.phase_memory.start(pl_module.device)
        pl_module.devices["search_ranks"] = group.world
        if not group.alone:
            rank_zero_info(f"the search's evaluations are shared by {group.world} ranks")
        context = pl_module.context
        model, family, concepts = context.model, context.family, list(context.concepts)
        record = RunRecord(pl_module.run_dir, trainer.logger)
        search = StepSearch(self.settings, on_evaluation=self._logger(record), log=rank_zero_info,
                            warn=rank_zero_warn)
        extra_pairs = {"count": 0}

        target = pl_module.target

        def judge_for(concept: str):
            judge = target.search_judge(context, concept) if target is not None else None
            if judge is not None:
                return judge
            judge = self.clip_judge(context, concept, group)
            return coordinator.judge(concept, judge) if coordinator is not None else judge

        # model.protect_retained keeps the edit off what must stay: the forget gradient projected, and
        # only the tensors the projection covers as candidates (slug_pl.retain_projection)
        t_projection = time.perf_counter()
        projection = pl_module.retain_projection(self.settings.towers)
        sub_timings = {"projection": time.perf_counter() - t_projection} if projection is not None else {}
        readable, run_forget = pl_module.readable, pl_module.gradients["forget"]
        if projection is not None:
            run_forget = projection.apply(run_forget)
            readable = lambda name, base=readable: base(name) and projection.covers(name)  # noqa: E731

        def concept_gradient(concept: str) -> dict:
            grads, count = forget_gradient(family, model, context.forget_batches(concept),
                                           averaging=pl_module.forget_averaging)
            extra_pairs["count"] += count
            return projection.apply(grads) if projection is not None else grads

        def ranked(concept: str, scores) -> None:  # on disk as soon as it exists (kept if the search stops)
            if concept not in written:
                record.ranking(scores, ranking_suffix(concept, len(concepts)))
                written.add(concept)

        written: set[str] = set()
        search.on_ranked = ranked
        if target is not None and target.reorders_candidates:
            search.rank_found = lambda concept, edits: target.rank_candidates(context, concept, edits)
        outcomes = search.search_concepts(model, family, judge_for, concepts, concept_gradient,
                                          pl_module.gradients["retain"], readable=readable,
                                          run_forget_grad=run_forget)
        for o in outcomes:
            apply_edit(model, o.edit)
        if len(concepts) > 1:
            search.joint_check(model, outcomes, judge_for)
        pl_module.timings["search"] = time.perf_counter() - t0
        pl_module.phase_memory.end("search", pl_module.device)
        sub_timings["ranking"] = search.ranking_s
        return search, outcomes, record, extra_pairs["count"], sub_timings

    def _finish(self, trainer: Trainer, pl_module: SlugModule, search: StepSearch, outcomes: list[Outcome],
                record: RunRecord, extra_pairs: int, sub_timings: dict[str, float]) -> None:
        """The common run record plus SLUG's own artifacts and report sections; ``sub_timings``:
        the parts of the search timed on their own (``ranking``; ``projection`` with
        ``model.protect_retained``)."""
        edits = merge_edits([o.edit for o in outcomes])
        slug_report.write_search_csv(record, search.evaluations)
        first = outcomes[0]
        validation = first.validation if len(outcomes) == 1 else _joint_validation(outcomes)
        stats = pl_module.pass_stats
        gradient_evals = (int(stats.get("forget", {}).get("samples", 0)) + int(stats.get("retain", {}).get("samples", 0))
                          if pl_module.timings.get("gradients", 0.0) > 0 else 0) + extra_pairs
        datamodule = trainer.datamodule
        departures = run_departures(RunOptions(
            pl_module.family.exclude, pl_module.family.include, pl_module.forget_averaging, datamodule.batch_size,
            datamodule.retain_batches, pl_module.eval_mode, self.settings, pl_module.protect_retained))
        method = slug_report.method_block(self.settings, outcomes, edits, search.alternatives, departures)
        if pl_module.protection is not None:
            method["retain_projection"] = pl_module.protection
        def artifacts(record: RunRecord, summary: dict, edit_metadata: dict) -> None:
            for o in outcomes:  # the ranking of the applied edit set, the chosen layer starred
                record.ranking(o.scores, ranking_suffix(o.concept, len(outcomes)), o.chosen.layer, overwrite=True)
            if self.save_checkpoint:
                record.edited_model(pl_module.family, pl_module.clip, edits, summary, edit_metadata)

        self.summary = pl_module.write_record(
            edits=edits, method=method, target=self.settings.target, validation=validation,
            validation_met=all(o.target_met for o in outcomes),
            cost={"gradient_evals": gradient_evals, "evaluations": len(search.evaluations)},
            sections=slug_report.sections(method, outcomes, pl_module, self.settings),
            remedy=slug_report.REMEDY, similarity_concepts=self.similarity_concepts,
            edit_metadata={"target": str(self.settings.target)}, t_start=getattr(self, "_t_fit", None),
            sub_timings=sub_timings, artifacts=artifacts)

    @staticmethod
    def _logger(record: RunRecord):
        """Every search evaluation to TensorBoard (``search/<metric>`` against the evaluation index)."""
        tb = record.tb

        def log(ev: StepEvaluation) -> None:
            if tb is None:
                return
            for k, v in ev.metrics.items():
                tb.add_scalar(f"search/{k}", v, ev.index)
            tb.add_scalar("search/step_fraction", ev.step_fraction, ev.index)

        return log


def ranking_suffix(concept: str, n_concepts: int) -> str:
    """The file-name suffix of a concept's ranking files: none for one concept, ``_<concept>``
    for each of several."""
    return "" if n_concepts == 1 else f"_{file_slug(concept)}"


def _joint_validation(outcomes: list[Outcome]) -> dict:
    """Validation metrics of a joint edit set: the first concept's retain / utility (on the
    combined model every concept's evaluation sees the same edits) and the worst forget metrics."""
    out = dict(outcomes[0].validation)
    for key in ("forget_top1", "forget_top5"):
        values = [o.validation[key] for o in outcomes if key in o.validation]
        if values:
            out[key] = max(values)
    return out
