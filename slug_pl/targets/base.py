"""Downstream targets: models that embed one tower of a CLIP and consume SLUG's edit.

Stable Diffusion embeds a CLIP *text* tower as its text encoder; LLaVA embeds a CLIP *vision*
tower. SLUG computes the gradients on the CLIP pair (same weights), chooses a layer only among
the tensors the downstream model actually reads, searches the step, and copies the one edited
tensor into the downstream model. A target is one file in this package, a subclass of
:class:`DownstreamTarget`; the core (step search, run record) only calls the methods below.

In a config a target is the ``target`` argument of the method (``model.init_args.target``)::

    model:
      class_path: slug_pl.methods.SlugModule
      init_args:
        family: {class_path: slug_pl.families.HfClip, init_args: {model_name: ...}}
        target: {class_path: slug_pl.targets.StableDiffusion, init_args: {pipeline: ...}}

What the run does with a target (see :class:`slug_pl.methods.slug.SlugSearch`):

1. before the pass: :meth:`load`, then :meth:`check_pair` (refuses a CLIP whose embedded tower
   differs from the downstream model's, naming the first tensor that differs);
2. ranking: only tensors for which :meth:`reads` is true can be candidates;
3. step search: on :meth:`search_judge` (the target's own judge, e.g. a VLM's name accuracy) or,
   when it returns None, on the CLIP's zero-shot metrics;
4. final choice among the candidates that met the target: :meth:`rank_candidates`
   (e.g. by generations), else the CLIP-side rule;
5. after the edit: :meth:`transplant`, :meth:`evaluate` before/after (a summary block such as
   ``"generation"`` or ``"vqa"``, report sections, figures), :meth:`save_pretrained`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from slug_pl.context import RunContext
from slug_pl.edit import LayerEdit


class TargetMismatchError(ValueError):
    """The CLIP's tower is not the one the downstream model embeds (or cannot be mapped to it)."""


@dataclass
class TargetReport:
    """What a target adds to a run's record.

    Attributes:
        key: the summary.json block name (e.g. ``"generation"``, ``"vqa"``).
        block: that block's content (``{"before": {...}, "after": {...}, ...}``; fractions).
        sections: report.md lines (markdown).
        figures: ``(caption, file name, matplotlib figure or PIL image)`` to save in the run folder.
        after: the downstream metrics after the edit on the held-out images (test, else validation),
            named as the target's search judge names them (e.g. ``forget_name_accuracy``): the
            run's forget target is checked on fresh images with them when the CLIP's own zero-shot
            metrics do not hold the target metric.
        forget_images: images of the forgotten concept(s) behind ``after``'s forget metrics.
        tables: CSV files for the run folder, ``{file name: (header, rows)}`` (the record writes
            them, e.g. UnlearnCanvas' ``unlearncanvas.csv``).
    """

    key: str
    block: dict
    sections: list[str] = field(default_factory=list)
    figures: list[tuple[str, str, object]] = field(default_factory=list)
    after: dict[str, float] = field(default_factory=dict)
    forget_images: int | None = None
    tables: dict[str, tuple[list[str], list[list]]] = field(default_factory=dict)


class DownstreamTarget(ABC):
    """A model built on one tower of a CLIP, which consumes a SLUG edit of that tower."""

    #: Short name for records ("stable_diffusion", "llava").
    name: str = "target"
    #: The CLIP tower the downstream model embeds: "text" or "vision".
    tower: str = "text"
    #: Whether the run writes the edited downstream model into its folder (``edited_<name>/``,
    #: :meth:`save_pretrained`); a subclass sets it from its config.
    save_edited: bool = False
    #: Where the downstream model runs, as configured (a torch device string); ``None`` or
    #: ``"auto"``: the device of the run's CLIP pass (:meth:`use_run_device`), else CUDA when
    #: available.
    device: str | None = None

    def use_run_device(self, device: torch.device | str) -> None:
        """The device the run's CLIP pass runs on: the downstream model runs there too unless its
        config names a device (called before :meth:`load`)."""
        if self.device in (None, "auto"):
            self.device = str(device)

    def resolved_device(self) -> torch.device:
        """The device the downstream model runs on (see :attr:`device`)."""
        if self.device in (None, "auto"):
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    # -- the downstream model ------------------------------------------------------------------
    @abstractmethod
    def load(self) -> None:
        """Load the downstream model (idempotent), on the CPU unless configured otherwise."""

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
        """The downstream model's parameters (name -> tensor) that mirror the CLIP tower."""

    def check_pair(self, family, clip: nn.Module) -> None:
        """Raise :class:`TargetMismatchError` naming the first tensor of the embedded tower whose
        CLIP weights differ from the downstream model's (or that the downstream model lacks)."""
        mirror = self.downstream_parameters()
        for name, param in clip.named_parameters():
            if family.tower_of(name) != self.tower:
                continue
            theirs = self.downstream_name(name)
            if theirs is None:
                continue
            if theirs not in mirror:
                raise TargetMismatchError(
                    f"{self.describe()} has no tensor {theirs!r} (the CLIP's {name!r}): the CLIP is not the "
                    f"one this {self.name} model embeds; pair it with the CLIP its {self.tower} tower comes from")
            other = mirror[theirs]
            if other.shape != param.shape or not torch.equal(other.detach().cpu().float(), param.detach().cpu().float()):
                raise TargetMismatchError(
                    f"the CLIP's {name!r} differs from {self.describe()}'s {theirs!r}: the CLIP "
                    f"({family.describe().get('model_name')}) is not the one this {self.name} model embeds; "
                    f"use the CLIP its {self.tower} tower comes from")

    @abstractmethod
    def transplant(self, clip: nn.Module, edits: Sequence[LayerEdit]) -> list[str]:
        """Copy the edited tensors of ``clip`` (as it is now) into the downstream model; every
        other downstream tensor stays bit-identical. Returns the downstream names changed.
        Calling it with the unedited CLIP restores the downstream model."""

    @abstractmethod
    def save_pretrained(self, folder: str | Path) -> Path:
        """Write the downstream model (as it is now) as a normal Hugging Face / diffusers folder."""

    def describe(self) -> str:
        return self.name

    @abstractmethod
    def source(self) -> str:
        """The folder (or hub id) the downstream model is loaded from, as configured."""

    # -- the search and the verdict ------------------------------------------------------------
    def forget_gradient_projection(self, context: RunContext):
        """A projection of the forget gradient that keeps the edit off what the downstream model
        must keep (:class:`slug_pl.retain_projection.InputProjection`: only the tensors it covers
        are then candidates), or None: the method's forget gradient as it is."""
        return None

    def search_judge(self, context: RunContext, concept: str):
        """A judge (``evaluate(model, edited) -> metrics``) for the step search of ``concept``,
        measured on the downstream model with the CLIP's edit transplanted, or None to search
        on the CLIP's own zero-shot metrics."""
        return None

    @property
    def reorders_candidates(self) -> bool:
        """Whether :meth:`rank_candidates` re-orders the found edits by the downstream model's own
        judgement (then the search must find every candidate's edit: no ``stop_dominated``)."""
        return False

    def rank_candidates(self, context: RunContext, concept: str, edits: Sequence[LayerEdit]) -> list[int] | None:
        """Order (best first) of the candidate edits that met the target on the CLIP side, judged
        downstream (each ``edits[i]`` applied alone); None keeps the CLIP-side order."""
        return None

    @abstractmethod
    def evaluate(self, context: RunContext, edits: Sequence[LayerEdit]) -> TargetReport:
        """Before (edits reverted) and after measurements of the downstream model, for the run's
        concepts (the CLIP, ``context.model``, carries ``edits`` on entry and on return)."""
