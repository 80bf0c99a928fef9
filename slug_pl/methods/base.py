"""What every unlearning method shares: the model family and its model, the data streams it asks
for, zero-shot validate / test loops, and the run record (method-agnostic).

A method is a :class:`UnlearningModule` subclass in its own file of this package (``slug.py``,
``ga.py``, ...) plus a config that names it (``model.class_path``). It decides how the model
changes; this base loads the model, evaluates it and writes the record the same way for every
method (:meth:`UnlearningModule.write_record`), so methods are compared on identical data, the
same evaluation code and the same record.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from slug_pl.context import RunContext
from slug_pl.edit import LayerEdit, apply_edit, load_edits
from slug_pl.evaluation.final import BeforeAfter, evaluate_before_after
from slug_pl.evaluation.metrics import ZeroShotAccuracy, concept_summary, utility_summary
from slug_pl.evaluation.similarity import similarity_figure
from slug_pl.evaluation.zeroshot import class_embeddings
from slug_pl.families.base import ModelFamily
from slug_pl.gradients import non_finite
from slug_pl.patch import patch_metadata
from slug_pl.record import RunRecord, build_summary, held_out_verdict, verdict_line
from slug_pl.resources import PhaseMemory, peak_mem_mb
from slug_pl.retain_projection import InputProjection, RetainProjection, build_projection, retain_pair_inputs
from slug_pl.step_search import ForgetTarget
from slug_pl.targets.base import DownstreamTarget


@contextmanager
def on_run_device(trainer, module: "UnlearningModule") -> Iterator[torch.device]:
    """The work that follows a method's pass (SLUG's step search, a baseline's selection, the
    before/after evaluation, the downstream model's judgement), on the device and in the
    precision the pass ran in.

    Lightning's teardown moves the LightningModule to the host *before* ``on_fit_end`` runs
    (``Strategy.teardown`` calls ``lightning_module.cpu()``), so without this every evaluation
    after a GPU pass ran on the CPU. Inside the block the module is back on
    ``trainer.strategy.root_device`` and forward passes run in the precision plugin's context
    (autocast for ``16-mixed`` / ``bf16-mixed``: the weights, and so every edit, stay float32; only
    the matrix products run in half precision, as in the pass). On exit the module goes back to
    the host and the accelerator's cache is freed, as Lightning's teardown intended.
    """
    device = trainer.strategy.root_device
    module.to(device)
    module.devices["after_pass"] = str(device)
    try:
        with trainer.precision_plugin.forward_context():
            yield device
    finally:
        module.cpu()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def agreed_on_rank_zero(trainer, check: Callable[[], None]) -> None:
    """Run ``check`` on rank 0 alone and raise its error, if any, on every rank.

    A collective call under DDP: every rank must make it (one ``broadcast`` of rank 0's error, or
    of None). Rank 0 raises the error itself, with its traceback; the other ranks raise a copy
    (the same type and message; a :class:`RuntimeError` naming both when the error cannot be
    pickled)."""
    error = None
    if trainer.is_global_zero:
        try:
            check()
        except Exception as err:  # every rank must reach the broadcast below
            error = err
    if trainer.world_size > 1:
        shared = trainer.strategy.broadcast(_picklable(error), src=0)
        if error is None and shared is not None:
            raise shared
    if error is not None:
        raise error


def _picklable(error: Exception | None) -> Exception | None:
    """``error``, or when it does not pickle, a :class:`RuntimeError` with its type and message."""
    if error is None:
        return None
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


class UnlearningModule(LightningModule):
    """Shared base of every method: ``self.clip`` is the family's model (an ``edit`` patch
    applied after loading), ``validate`` / ``test`` score it zero-shot on the data module's sets,
    and :meth:`write_record` writes the run record."""

    #: The method's short name in configs, records and comparisons.
    method_name = "base"
    #: Why the method cannot keep its change off the retained inputs (``model.protect_retained``
    #: is then refused), or None when it can.
    no_retain_projection: str | None = "it does not say how its change would be projected"
    #: With ``model.protect_retained``: what the method projects, in words (for the record).
    projected = ""

    def __init__(self, family: ModelFamily, edit: str | None = None, target: DownstreamTarget | None = None,
                 forget_target: ForgetTarget = ForgetTarget(),  # noqa: B008 (frozen)
                 protect_retained: RetainProjection | None = None):
        """
        Args:
            family: the model adapter (e.g. ``slug_pl.families.OpenClip``).
            edit: an ``edit.safetensors`` patch applied to the model after loading (validate/test).
            target: a downstream model that embeds one tower of this CLIP and consumes the edit
                (e.g. ``slug_pl.targets.StableDiffusion``); None: the CLIP itself.
            forget_target: the forget target on validation, ``metric <= value``: the config's
                top-level ``forget_target:`` section, linked here for every method (SLUG's search
                and every baseline's selection judge by it).
            protect_retained: the retain projection (:mod:`slug_pl.retain_projection`): keep the
                change off what the retained inputs feed each tensor — what the downstream target
                protects, or without one the retain set's pairs. A departure from the method's
                plain gradient, recorded by name; None (the default): off. Refused, with the
                reason, by a method that cannot apply it (:attr:`no_retain_projection`).
        """
        super().__init__()
        if protect_retained is not None and self.no_retain_projection is not None:
            raise ValueError(f"model.protect_retained: {self.method_name} cannot keep its change off the retained "
                             f"inputs: {self.no_retain_projection}; set it null")
        self.protect_retained = protect_retained
        #: what the retain projection protected (``method.retain_projection`` of the summary), once built
        self.protection: dict | None = None
        self.family = family
        self.forget_target = forget_target
        self.edit = edit
        self.target = target
        self.clip: nn.Module | None = None
        #: the method's phases (e.g. ``gradients``, ``search``), in seconds: disjoint, so their sum
        #: is the method's time (what the run context shows a downstream target)
        self.timings: dict[str, float] = {}
        #: peak memory of each phase (summary ``memory.phases``)
        self.phase_memory = PhaseMemory()
        #: where each phase ran: ``{"pass": "cuda:0", "after_pass": "cuda:0", ...}`` (summary ``devices``)
        self.devices: dict[str, str] = {}
        self.last_eval: dict[str, float] = {}
        self._context: RunContext | None = None

    # -- model ---------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.clip is not None:
            return
        self.clip = self.family.load()
        self.prepare_model(self.clip)
        if self.edit:
            edits, _ = load_edits(self.edit)
            for e in edits:
                apply_edit(self.clip, e)
            rank_zero_info(f"applied edit {self.edit}: {', '.join(e.name for e in edits)}")
        bad = non_finite(dict(self.clip.named_parameters()))
        if bad:
            edit = f" with the edit {self.edit}" if self.edit else ""
            raise FloatingPointError(
                f"the model {self.family.describe()}{edit} has NaN/inf "
                f"weights in {len(bad)} tensor(s) (e.g. {bad[:3]}): the checkpoint is broken; use "
                f"another checkpoint"
            )

    def prepare_model(self, model: nn.Module) -> None:
        """Hook for a method to adapt the freshly loaded model (e.g. activation checkpointing)."""

    def check_target(self) -> None:
        """Before any work, refuse a CLIP that is not the one the downstream target embeds; a no-op
        without a target.

        Every rank learns the run's device (the target runs there unless its config names one),
        but only rank 0, where the judges that use the downstream model run, checks the pair, and
        so loads the model: the other ranks never hold it (LLaVA-1.5-7B in bfloat16: 14 GB on each
        rank's device, read through its host memory). Every adapter loads at first use, so a part
        that needs the model on another rank loads it there. Under DDP every rank raises rank 0's error
        (:func:`agreed_on_rank_zero`), so that none waits for the others at the pass's first
        collective call."""
        if self.target is None:
            return
        self.target.use_run_device(self.trainer.strategy.root_device)
        agreed_on_rank_zero(self.trainer, lambda: self.target.check_pair(self.family, self.clip))

    def readable(self, name: str) -> bool:
        """Whether the model that consumes the edit reads CLIP parameter ``name`` (every
        parameter without a downstream target)."""
        return self.target is None or self.target.reads(name)

    def retain_projection(self, towers: Sequence[str] = ("vision", "text")) -> InputProjection | None:
        """With ``model.protect_retained``: the retain projection, built now on the model as it is,
        off what the downstream target protects
        (:meth:`~slug_pl.targets.base.DownstreamTarget.protected_inputs`) or, without a target, the
        retain set's pairs of ``towers`` (:func:`~slug_pl.retain_projection.retain_pair_inputs`);
        its record in :attr:`protection`. None when off: the method's plain gradient."""
        option = self.protect_retained
        if option is None:
            return None
        context = self.context
        sources = (self.target.protected_inputs(context, option.limit) if self.target is not None
                   else retain_pair_inputs(context, option.limit, towers))
        projection, self.protection = build_projection(self.clip, option, sources, self.readable,
                                                       self.method_name.upper(), self.projected)
        rank_zero_info(f"retain projection (model.protect_retained): {self.projected}, off what "
                       f"{projection.prompts} protected inputs feed it; {self.protection['editable']} covered tensors "
                       f"may change")
        return projection

    def setup(self, stage: str) -> None:
        # trainer.log_dir is a collective call under DDP: resolve it here, on every rank, so that
        # rank-0-only code (writing files) never calls it
        self._run_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        self._context = None
        datamodule = self.trainer.datamodule
        if datamodule is not None:  # the data's side of the contract: what it serves, for which model
            datamodule.attach(self.family, self.pass_sets() if stage == "fit" else (),
                              self.start_batch() if stage == "fit" else 0, self.target)

    def start_batch(self) -> int:
        """The global batch ``fit``'s stream starts at (> 0 when a method resumes its pass)."""
        return 0

    @property
    def context(self) -> RunContext:
        """The run as the search's judges, the downstream target and the record see it
        (:class:`~slug_pl.context.RunContext`), built once the model is loaded."""
        if self._context is None:
            datamodule = self.trainer.datamodule
            self._context = RunContext(self.family, self.clip, list(datamodule.concepts), datamodule, self.run_dir,
                                       self.method_name, self.timings)
        return self._context

    def on_train_start(self) -> None:
        self.devices["pass"] = str(self.device)

    @property
    def run_dir(self) -> Path:
        """This run's ``lightning_logs/version_N`` (resolved on every rank in ``setup``)."""
        return self._run_dir

    # -- the data a method's fit streams -------------------------------------------------------
    def pass_sets(self) -> list[str]:
        """The pair sets (``"forget"``, ``"retain"``) ``fit`` streams, in order; [] for none."""
        return []

    # -- zero-shot evaluation (validate / test) ------------------------------------------------
    # The loops only spread batches over devices; scoring is slug_pl.evaluation's (one definition).
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

    # -- the run record ------------------------------------------------------------------------
    def write_record(self, *, edits: Sequence[LayerEdit], method: dict, target: ForgetTarget,
                     validation: dict, validation_met: bool, cost: dict, sections: Sequence[str] = (),
                     remedy: str | None = None, similarity_concepts: int = 8, edit_metadata: dict | None = None,
                     extra: dict | None = None, t_start: float | None = None, sub_timings: dict | None = None,
                     artifacts: Callable[[RunRecord, dict, dict], None] | None = None) -> dict:
        """Measure before/after (held-out sets) and write the run record through one
        :class:`~slug_pl.record.RunRecord` (rank 0 only; the model carries ``edits``): figures,
        the downstream target's files, ``edit.safetensors``, the method's own ``artifacts(record,
        summary, edit metadata)`` (SLUG: the final ranking, the edited model), the edited
        downstream model, and last ``summary.json`` and ``report.md``, so a run folder holding a
        summary holds a complete record.

        ``cost`` holds what the method knows (``gradient_evals``, ``evaluations``); wall time,
        peak memory and edit size are added here. ``timings_s`` holds the method's phases
        (:attr:`timings`), ``sub_timings`` (parts of those phases, e.g. SLUG's ``ranking`` inside
        its ``search``), the ``final_evaluation`` (before/after) and ``downstream`` (the target's
        transplant and evaluation) measured here, and ``total`` (since ``t_start``); ``memory``
        the process's peaks and each phase's (:class:`~slug_pl.resources.PhaseMemory`).
        ``remedy``: what to change when forgetting does not hold on held-out images. Returns the
        summary (the CLI reads the verdict from ``summary.json``: :func:`~slug_pl.record.read_verdict`).
        """
        trainer, context = self.trainer, self.context
        concepts = list(context.concepts)
        record = RunRecord(self.run_dir, trainer.logger)
        timings = dict(self.timings) | dict(sub_timings or {})
        t0 = time.perf_counter()
        self.phase_memory.start(self.device)
        result: BeforeAfter = evaluate_before_after(context, edits, similarity_concepts)
        self.phase_memory.end("final_evaluation", self.device)
        timings["final_evaluation"] = time.perf_counter() - t0
        sim_before, sim_after, shown = result.similarity
        record.figure(similarity_figure(sim_before, sim_after, shown), "similarity.png",
                      "Image–text similarity of concepts, before and after", "similarity")
        sections, held_out, downstream = list(sections), None, None
        self.devices["evaluation"] = str(next(self.clip.parameters()).device)
        if self.target is not None:  # the downstream model with the edit, judged its own way
            self.devices["downstream"] = str(self.target.resolved_device())
            t0 = time.perf_counter()
            self.phase_memory.start(self.target.resolved_device())
            self.target.transplant(self.clip, edits)
            downstream = self.target.evaluate(context, edits)
            self.phase_memory.end("downstream", self.target.resolved_device())
            timings["downstream"] = time.perf_counter() - t0
            for caption, file, figure in downstream.figures:
                record.figure(figure, file, caption, tag=f"{downstream.key}/{Path(file).stem}")
            for file, (header, rows) in downstream.tables.items():
                record.csv(file, header, rows)
            if self.target.save_edited:
                downstream.block["saved_to"] = f"edited_{self.target.name}"
                downstream.sections += [f"The edited {self.target.name} model: `edited_{self.target.name}/` (its "
                                        f"library's own folder, with a model card).", ""]
            sections = list(downstream.sections) + sections
            extra = (extra or {}) | {downstream.key: downstream.block}
            held_out = held_out_verdict(target, result, downstream.after, downstream.forget_images)
        meta = {"model": self.family.describe(), "concepts": concepts, "method": method["name"], "target": str(target),
                **patch_metadata(self.clip, edits)} | (edit_metadata or {})  # the base's SHA-256: SlugPatch checks it
        edit_bytes = record.edit_patch(edits, meta)
        memory = self.phase_memory.record(self.device)
        total = time.perf_counter() - t_start if t_start is not None else None
        cost = {"wall_s": total, **cost, "peak_mem_mb": peak_mem_mb(memory), "edit_bytes": edit_bytes}
        summary = build_summary(method=method, concepts=concepts, model=self.family.describe(), target=target,
                                validation=validation, validation_met=validation_met, result=result, cost=cost,
                                timings=timings | ({"total": total} if total is not None else {}),
                                memory=memory, extra=extra, held_out=held_out,
                                devices=dict(self.devices) | {"precision": str(trainer.precision)})
        if artifacts is not None:
            artifacts(record, summary, meta)
        if downstream is not None and self.target.save_edited:
            record.downstream_model(self.target, summary, meta)
        record.write(summary, sections, remedy=remedy, result=result)
        rank_zero_info(f"{method['name']}: {verdict_line(summary)}; report: {self.run_dir / 'report.md'}")
        return summary
