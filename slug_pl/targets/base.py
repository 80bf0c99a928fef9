"""Downstream targets: models that embed one tower of a CLIP and consume SLUG's edit.

Stable Diffusion embeds a CLIP *text* tower as its text encoder; LLaVA embeds a CLIP *vision*
tower. SLUG computes the gradients on the CLIP pair (same weights), chooses a layer only among
the tensors the downstream model actually reads, searches the step, and copies the one edited
tensor into the downstream model. A target is two parts:

- an **adapter** (:class:`DownstreamAdapter`, one file per kind of model in this package): loads
  the model, says which CLIP tensors it reads, holds the CLIP's edited tensors (``mirror``,
  ``transplant``; every other tensor keeps its loaded value), saves itself, and draws or answers
  for a judge;
- a **judge** (:class:`TargetJudge`, in :mod:`slug_pl.evaluation`): decides what the search
  measures, orders the found edits, and writes the target's report, through the adapter only.

:class:`DownstreamTarget` is what a config names (``model.init_args.target``) and what the core
calls; it builds its adapter and its judge from its arguments::

    model:
      class_path: slug_pl.methods.SlugModule
      init_args:
        family: {class_path: slug_pl.families.HfClip, init_args: {model_name: ...}}
        target: {class_path: slug_pl.targets.StableDiffusion, init_args: {pipeline: ...}}

What the run does with a target (see :class:`slug_pl.methods.slug.SlugSearch`):

1. before the pass: ``use_run_device`` on every rank, then ``check_pair`` on rank 0 (refuses a
   CLIP whose embedded tower differs from the downstream model's, naming the first tensor that
   differs; every rank raises it). The adapter loads the model at its first use (here, rank 0's
   pair check): ranks that never use it never load it;
2. ranking: only tensors for which ``reads`` is true can be candidates; with the method's
   ``model.protect_retained``, the method projects the forget gradient off ``protected_inputs``
   (what this downstream model must keep, :mod:`slug_pl.retain_projection`);
3. step search: on ``search_judge`` (the target's own judge, e.g. a VLM's name accuracy) or,
   when it returns None, on the CLIP's zero-shot metrics;
4. final choice among the candidates that met the target: ``rank_candidates`` (e.g. by
   generations), else the CLIP-side rule;
5. after the edit: ``transplant``, ``evaluate`` before/after (a summary block such as
   ``"generation"`` or ``"vqa"``, report sections, figures), ``save_pretrained``.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from slug_pl.context import RunContext
from slug_pl.edit import EditMismatchError, LayerEdit
from slug_pl.evaluation.target_judge import TargetJudge, TargetReport
from slug_pl.retain_projection import ProtectedInputs
from slug_pl.targets.saved_copy import TensorChange, same_weights

__all__ = ["DownstreamAdapter", "DownstreamTarget", "TargetJudge", "TargetMismatchError", "TargetReport"]


class TargetMismatchError(ValueError):
    """The CLIP's tower is not the one the downstream model embeds (or cannot be mapped to it)."""


class DownstreamAdapter(ABC):
    """A model built on one tower of a CLIP, as the run handles it: loaded once, holding the
    CLIP's edited tensors when asked, saved with only those changed.

    The adapter remembers every tensor it ever wrote: its value as loaded and the CLIP's float32
    value it holds now (:attr:`written`), so :meth:`mirror` can restore the loaded values and
    :meth:`save_pretrained` can rewrite exactly those tensors in a copy of the model's folder.
    """

    #: Short name for records and folders ("stable_diffusion", "llava").
    name: str = "downstream"
    #: The CLIP tower the downstream model embeds: "text" or "vision".
    tower: str = "text"
    #: Where the downstream model runs, as configured (a torch device string); ``None`` or
    #: ``"auto"``: the device of the run's CLIP pass (:meth:`use_run_device`), else CUDA when
    #: available.
    device: str | None = None

    def __init__(self):
        self._loaded: dict[str, torch.Tensor] = {}  # downstream name -> value as loaded (tensors ever written)
        self.written: dict[str, TensorChange] = {}  # downstream name -> (loaded, the CLIP's value it holds)

    # -- where it runs ------------------------------------------------------------------------
    def use_run_device(self, device: torch.device | str) -> None:
        """The device the run's CLIP pass runs on: the downstream model runs there too unless its
        config names a device (called before :meth:`load`); a configured CPU under a run on an
        accelerator is kept, with a warning (generation or VQA there is slow)."""
        if self.device in (None, "auto"):
            self.device = str(device)
        elif torch.device(self.device).type == "cpu" and torch.device(device).type != "cpu":
            warnings.warn(f"the {self.name} model runs on the CPU as its config says (device: {self.device}) "
                          f"while the run is on {device}: drop the target's device (or set it to auto) "
                          f"to run it there", stacklevel=2)

    def resolved_device(self) -> torch.device:
        """The device the downstream model runs on (see :attr:`device`)."""
        if self.device in (None, "auto"):
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    # -- the model ------------------------------------------------------------------------------
    @abstractmethod
    def source(self) -> str:
        """The folder (or hub id) the downstream model is loaded from, as configured."""

    def describe(self) -> str:
        return f"the {self.name} model {self.source()}"

    @abstractmethod
    def load(self) -> None:
        """Load the downstream model (idempotent) on :meth:`resolved_device`. Every method that
        needs the model calls it first, so nothing has to load it ahead of its first use."""

    @property
    @abstractmethod
    def loaded(self) -> bool:
        """Whether the downstream model is loaded. Naming, configuring and asking what it reads
        (:meth:`source`, :meth:`describe`, :meth:`use_run_device`, :meth:`reads`) never load it."""

    @abstractmethod
    def downstream_name(self, clip_name: str) -> str | None:
        """The name in the downstream model of the CLIP parameter ``clip_name`` (None: the
        downstream model has no such tensor, e.g. the other tower or a projection)."""

    @abstractmethod
    def reads(self, clip_name: str) -> bool:
        """Whether changing the CLIP parameter ``clip_name`` can change the downstream model's
        outputs (e.g. SD's UNet reads the text encoder's hidden states, never ``text_projection``;
        LLaVA reads vision hidden states at ``vision_feature_layer``, so later layers, the
        ``post_layernorm`` and the projection can never matter)."""

    @abstractmethod
    def downstream_parameters(self) -> dict[str, torch.Tensor]:
        """The downstream model's parameters (name -> tensor) that mirror the CLIP tower (loaded)."""

    def stored_dtype(self) -> torch.dtype | None:
        """The dtype the downstream model's checkpoint stores the tower in, when it is coarser than
        the one it runs in (a float16 checkpoint loaded as float32); None: as it runs."""
        return None

    def same(self, clip_value: torch.Tensor, theirs: torch.Tensor) -> bool:
        """Whether a CLIP tensor and the downstream model's copy hold the same weights, at the
        coarsest precision either passed through (:func:`~slug_pl.targets.saved_copy.same_weights`)."""
        return same_weights(clip_value, theirs, self.stored_dtype())

    def check_pair(self, family, clip: nn.Module) -> None:
        """Raise :class:`TargetMismatchError` naming the first tensor of the embedded tower that the
        downstream model reads and whose CLIP weights differ from the downstream model's (or that
        the downstream model lacks)."""
        mirror = self.downstream_parameters()
        model = family.describe().get("model_name")
        for name, param in clip.named_parameters():
            theirs = self.downstream_name(name) if family.tower_of(name) == self.tower else None
            if theirs is None:
                continue
            if theirs not in mirror:
                raise TargetMismatchError(
                    f"{self.describe()} has no tensor {theirs!r} (the CLIP's {name!r}): the CLIP ({model}) is not the "
                    f"one this {self.name} model embeds; {self.pairing_hint()}")
            if not self.same(param, self._loaded.get(theirs, mirror[theirs])):
                raise TargetMismatchError(
                    f"the CLIP's {name!r} differs from {self.describe()}'s {theirs!r}: the CLIP ({model}) is not the "
                    f"one this {self.name} model embeds; {self.pairing_hint()}")

    def pairing_hint(self) -> str:
        """What to pair the model with (appended to a mismatch)."""
        return f"use the CLIP its {self.tower} tower comes from"

    # -- holding the CLIP's edits ----------------------------------------------------------------
    def differing(self, clip: nn.Module) -> list[str]:
        """The CLIP tensors the downstream model reads whose values differ from the downstream
        model's as loaded (the edits the CLIP carries)."""
        params = self.downstream_parameters()
        out = []
        for name, param in clip.named_parameters():
            theirs = self.downstream_name(name) if self.reads(name) else None
            if theirs is not None and theirs in params and not self.same(param, self._loaded.get(theirs, params[theirs])):
                out.append(name)
        return out

    @torch.no_grad()
    def mirror(self, clip: nn.Module, clip_names: Sequence[str] | None = None) -> list[str]:
        """Make the downstream model hold the CLIP's current values of ``clip_names`` (None: every
        tensor the CLIP differs in, :meth:`differing`), cast to its dtype and device, and its
        loaded values everywhere else. Returns the downstream names now holding CLIP values.
        ``mirror(clip, [])`` restores the model as loaded."""
        names = self.differing(clip) if clip_names is None else list(clip_names)
        clip_params = dict(clip.named_parameters())
        wanted = {}
        for name in names:
            theirs = self.downstream_name(name)
            if theirs is None or not self.reads(name):
                raise TargetMismatchError(
                    f"the edit of {name!r} cannot reach {self.describe()}: it does not read this tensor; edit a "
                    f"tensor it reads (search.towers [{self.tower}])")
            wanted[theirs] = clip_params[name]
        params = self.downstream_parameters()
        for theirs in [t for t in self.written if t not in wanted]:
            params[theirs].copy_(self._loaded[theirs])
            del self.written[theirs]
        for theirs, value in wanted.items():
            self.write(theirs, value)
        return sorted(wanted)

    def transplant(self, clip: nn.Module, edits: Sequence[LayerEdit]) -> list[str]:
        """Copy the edited tensors of ``clip`` (as it is now) into the downstream model; every
        other downstream tensor stays as loaded. Returns the downstream names changed."""
        return self.mirror(clip, [e.name for e in edits])

    @torch.no_grad()
    def write(self, theirs: str, value: torch.Tensor) -> None:
        """Set the downstream tensor ``theirs`` to ``value`` (cast to its device and dtype),
        remembering its loaded value and the float32 value written (:attr:`written`)."""
        target = self.downstream_parameters()[theirs]
        loaded = self._loaded.setdefault(theirs, target.detach().clone())
        target.copy_(value.detach().to(target.device, target.dtype))
        self.written[theirs] = TensorChange(loaded, value.detach().to("cpu", torch.float32).clone())

    def apply_edit_file(self, edits: Sequence[LayerEdit], source: str = "the edit") -> list[str]:
        """Write a saved patch's edited tensors into the downstream model without the CLIP (``slug-pl
        transplant``): each edited tensor must map to a tensor the model reads, and its original
        (the patch's ``original/<name>``) must be the model's as loaded, so a patch computed on
        another CLIP is refused (:class:`~slug_pl.edit.EditMismatchError`). Returns the downstream
        names changed."""
        self.load()
        params = self.downstream_parameters()
        changed = []
        for e in edits:
            theirs = self.downstream_name(e.name)
            if theirs is None or theirs not in params or not self.reads(e.name):
                raise EditMismatchError(f"{source}: {e.name!r} has no counterpart that {self.describe()} reads "
                                        f"(it embeds the CLIP's {self.tower} tower)")
            if not self.same(e.original, self._loaded.get(theirs, params[theirs])):
                raise EditMismatchError(f"{source}: {self.describe()}'s {theirs!r} is not the original {e.name!r} the "
                                        f"edit was computed on: the edit belongs to another CLIP (or was applied "
                                        f"already)")
            self.write(theirs, e.edited)
            changed.append(theirs)
        return changed

    @abstractmethod
    def save_pretrained(self, folder: str | Path) -> Path:
        """Write the downstream model (as it is now) into the new folder ``folder``, loadable by its
        plain library: a copy of its folder in which only the :attr:`written` tensors change."""

    @classmethod
    def recognizes(cls, folder: Path) -> bool:
        """Whether the model folder ``folder`` is one this adapter loads (``slug-pl transplant``
        picks the adapter this way)."""
        return False


class DownstreamTarget:
    """A downstream model and its judge, as a config names them: the core calls this, which hands
    each call to its :attr:`adapter` (the model) or its :attr:`judge` (the verdict).

    A target file defines a subclass whose ``__init__`` takes the config's arguments and calls
    ``super().__init__(adapter, judge, save_edited)``.
    """

    def __init__(self, adapter: DownstreamAdapter, judge: TargetJudge, save_edited: bool = False,
                 name: str | None = None):
        """
        Args:
            adapter: the downstream model.
            judge: how the run is judged on it.
            save_edited: also write the edited downstream model into the run folder
                (``edited_<name>/``, :meth:`save_pretrained`).
            name: the target's short name in records and folders (default: the adapter's).
        """
        self.adapter, self.judge, self.save_edited = adapter, judge, save_edited
        self.name = name or adapter.name

    @property
    def tower(self) -> str:
        return self.adapter.tower

    # -- the model (the adapter's) ----------------------------------------------------------------
    def source(self) -> str:
        return self.adapter.source()

    def describe(self) -> str:
        return self.adapter.describe()

    def use_run_device(self, device: torch.device | str) -> None:
        self.adapter.use_run_device(device)

    def resolved_device(self) -> torch.device:
        return self.adapter.resolved_device()

    def load(self) -> None:
        self.adapter.load()

    def reads(self, clip_name: str) -> bool:
        return self.adapter.reads(clip_name)

    def check_pair(self, family, clip: nn.Module) -> None:
        self.adapter.check_pair(family, clip)

    def transplant(self, clip: nn.Module, edits: Sequence[LayerEdit]) -> list[str]:
        return self.adapter.transplant(clip, edits)

    def save_pretrained(self, folder: str | Path) -> Path:
        return self.adapter.save_pretrained(folder)

    # -- the verdict (the judge's) ----------------------------------------------------------------
    def protected_inputs(self, context: RunContext, limit: int) -> list[ProtectedInputs]:
        """What this downstream model must keep when the method's ``model.protect_retained`` is set:
        at most ``limit`` inputs per tower (the judge's, which knows what it measures); the method
        projects its change off what they feed each tensor (:mod:`slug_pl.retain_projection`)."""
        return self.judge.protected_inputs(context, limit)

    def search_judge(self, context: RunContext, concept: str):
        return self.judge.search_judge(context, concept)

    @property
    def reorders_candidates(self) -> bool:
        return self.judge.reorders_candidates

    def rank_candidates(self, context: RunContext, concept: str, edits: Sequence[LayerEdit]) -> list[int] | None:
        return self.judge.rank_candidates(context, concept, edits)

    def evaluate(self, context: RunContext, edits: Sequence[LayerEdit]) -> TargetReport:
        return self.judge.evaluate(context, edits)
