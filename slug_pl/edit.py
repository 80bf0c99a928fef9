"""Single-layer edits: θ_l ← θ_l − λ · g_f,l, as reversible patches.

An edit file (``edit.safetensors``) holds, for each edited parameter ``name``, the edited tensor
under ``name`` and the original under ``original/<name>``. Applying checks that the model still
holds the original (bit for bit) before replacing it; reverting checks the edited value. So a
patch can never be applied to the wrong weights, and reverting restores them exactly.

An edit file may come from someone else, so reading one trusts nothing in it: its size is bounded
(:data:`MAX_EDIT_BYTES`), every tensor must belong to a listed edit (an edited value and its
original, the same shape and floating dtype, finite) and every name must look like a parameter
name; a refusal names the file and the entry. Whether the names exist in a model, with those
shapes, is checked when the edit is applied.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from slug_pl.gradients import load_tensors, save_tensors

ORIGINAL_PREFIX = "original/"
#: The largest edit file read (bytes): twice the largest single tensor of the supported CLIPs (a
#: ViT-bigG token embedding, 253 MB in float32) several times over.
MAX_EDIT_BYTES = 4 * 2**30
#: A parameter name: dot-separated words of letters, digits and underscores.
PARAMETER_NAME = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*")
MAX_NAME_CHARS = 300


class EditMismatchError(ValueError):
    """An edit does not fit the model it is applied to."""


@dataclass
class LayerEdit:
    """One edited parameter: for SLUG ``edited = original − step · forget_grad`` (``step`` λ > 0
    unlearns); for a method that trains (a baseline) ``step`` is None and ``edited`` is simply the
    tensor it ended with."""

    name: str
    original: torch.Tensor
    edited: torch.Tensor
    step: float | None
    info: dict = field(default_factory=dict)

    @property
    def relative_change(self) -> float:
        """‖edited − original‖ / ‖original‖ (Frobenius): for SLUG, ‖λ·g_f‖ / ‖θ‖."""
        delta = (self.edited.double() - self.original.double()).norm().item()
        norm = self.original.double().norm().item()
        return delta / norm if norm > 0 else float("inf")

    @property
    def nbytes(self) -> int:
        """Bytes a user must store to keep this edit: the edited tensor (the original is in the model)."""
        return self.edited.numel() * self.edited.element_size()


def make_edit(model: nn.Module, name: str, forget_grad: torch.Tensor, step: float, **info) -> LayerEdit:
    param = dict(model.named_parameters())[name]
    original = param.detach().clone().cpu()
    edited = (original.double() - step * forget_grad.detach().cpu().double()).to(original.dtype)
    return LayerEdit(name, original, edited, float(step), dict(info))


def _param(model: nn.Module, name: str) -> nn.Parameter:
    params = dict(model.named_parameters())
    if name not in params:
        raise EditMismatchError(f"the model has no parameter {name!r}: the edit belongs to another model")
    return params[name]


@torch.no_grad()
def _swap(model: nn.Module, name: str, expected: torch.Tensor, new: torch.Tensor, what: str) -> None:
    param = _param(model, name)
    if param.shape != new.shape:
        raise EditMismatchError(f"{name}: edit has shape {tuple(new.shape)}, model {tuple(param.shape)}")
    if not torch.equal(param.detach().cpu(), expected.to(param.dtype)):
        raise EditMismatchError(
            f"{name}: the model does not hold the {what} weights this edit expects (was it already "
            f"applied, or computed for other weights?)"
        )
    param.copy_(new.to(param.device, param.dtype))


def apply_edit(model: nn.Module, edit: LayerEdit) -> None:
    _swap(model, edit.name, edit.original, edit.edited, "original")


def revert_edit(model: nn.Module, edit: LayerEdit) -> None:
    _swap(model, edit.name, edit.edited, edit.original, "edited")


@contextmanager
def stepped(model: nn.Module, name: str, forget_grad: torch.Tensor, step: float) -> Iterator[LayerEdit]:
    """Temporarily apply θ_l − step·g_f,l (for the search); restores θ_l exactly on exit."""
    edit = make_edit(model, name, forget_grad, step)
    apply_edit(model, edit)
    try:
        yield edit
    finally:
        revert_edit(model, edit)


@contextmanager
def applied(model: nn.Module, edits: Sequence[LayerEdit]) -> Iterator[nn.Module]:
    """The edits applied (in order) inside the block, reverted on exit."""
    for e in edits:
        apply_edit(model, e)
    try:
        yield model
    finally:
        for e in reversed(edits):
            revert_edit(model, e)


@contextmanager
def reverted(model: nn.Module, edits: Sequence[LayerEdit]) -> Iterator[nn.Module]:
    """The model without the (applied) edits inside the block; re-applied (in order) on exit."""
    for e in reversed(edits):
        revert_edit(model, e)
    try:
        yield model
    finally:
        for e in edits:
            apply_edit(model, e)


class GradientEdit(Protocol):
    """What :func:`restep_edit` changes: an applied edit and the forget gradient it steps along
    (a :class:`~slug_pl.step_search.Outcome` is one)."""

    edit: LayerEdit
    forget_grad: torch.Tensor


def restep_edit(model: nn.Module, outcomes: Sequence[GradientEdit], index: int, step: float) -> None:
    """Change the step of ``outcomes[index]``'s edit to ``step`` on a model that carries every
    outcome's edit, applied in order. Later edits of the same tensor were computed on top of this
    one, so every edit from ``index`` on is reverted and rebuilt in order (same gradients, the same
    steps but the new one); each outcome's ``edit`` is replaced."""
    for o in reversed(outcomes[index:]):
        revert_edit(model, o.edit)
    for i, o in enumerate(outcomes[index:], start=index):
        e = o.edit
        o.edit = make_edit(model, e.name, o.forget_grad, step if i == index else e.step, **e.info)
        apply_edit(model, o.edit)


def merge_edits(edits: list[LayerEdit]) -> list[LayerEdit]:
    """One patch entry per tensor: edits of the same tensor (applied in order) become one, from
    the first edit's original to the last edit's result, with the *sum* of their steps (the step
    the tensor carries: θ − Σ λ_i g_i when each edit used its own gradient) and each step listed
    in ``info["steps"]``."""
    merged: dict[str, LayerEdit] = {}
    for e in edits:
        if e.name not in merged:
            merged[e.name] = e
            continue
        m = merged[e.name]
        steps = list(m.info.get("steps", [m.step])) + [e.step]
        total = None if any(s is None for s in steps) else float(sum(steps))
        concepts = list(m.info.get("concepts", [])) + list(e.info.get("concepts", []))
        merged[e.name] = LayerEdit(e.name, m.original, e.edited, total,
                                   {**m.info, "concepts": concepts, "steps": steps})
    return list(merged.values())


def changed_tensors(model: nn.Module, original: Mapping[str, torch.Tensor], **info) -> list[LayerEdit]:
    """Every parameter of ``model`` that differs from ``original`` (name -> tensor), as edits
    with ``step`` None: the patch of a method that trains (changed tensors only, old and new)."""
    edits = []
    for name, param in model.named_parameters():
        old = original[name]
        new = param.detach().cpu()
        if not torch.equal(new, old.to(new.dtype)):
            edits.append(LayerEdit(name, old.clone(), new.clone(), None, dict(info)))
    return edits


def edit_layers(edits: list[LayerEdit]) -> dict[str, dict]:
    """The ``layers`` metadata of an edit file: per edited tensor its step, relative change and
    the edit's ``info``."""
    return {e.name: {"step": e.step, "relative_change": e.relative_change, **e.info} for e in edits}


def save_edits(path: str | os.PathLike, edits: list[LayerEdit], metadata: Mapping[str, object]) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for e in edits:
        tensors[e.name] = e.edited
        tensors[ORIGINAL_PREFIX + e.name] = e.original
    save_tensors(path, tensors, {**metadata, "layers": edit_layers(edits)})


def load_edits(path: str | os.PathLike, max_bytes: int = MAX_EDIT_BYTES) -> tuple[list[LayerEdit], dict]:
    """The edits of an edit file and its metadata, every entry checked (see the module docstring);
    raises :class:`EditMismatchError` naming the file and the first entry that is not an edit."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"edit file not found: {path}; give the edit.safetensors a fit run wrote "
                                f"(lightning_logs/version_N/edit.safetensors)")
    size = path.stat().st_size
    if size > max_bytes:
        raise EditMismatchError(f"{path} is {size} bytes, more than an edit file may hold ({max_bytes}); "
                                f"an edit holds a few tensors of one model, old and new")
    tensors, meta = load_tensors(path)
    layers = meta.get("layers", {})
    if not isinstance(layers, dict):
        raise EditMismatchError(f"{path}: its 'layers' metadata is not a table of edits; the file is not an edit")
    if not layers:
        raise EditMismatchError(f"{path} holds no edits (no 'layers' metadata)")
    stray = sorted(set(tensors) - {n for name in layers for n in (name, ORIGINAL_PREFIX + name)})
    if stray:
        raise EditMismatchError(f"{path}: tensor {stray[0]!r} belongs to no edit its metadata lists; the file "
                                f"is not an edit")
    edits = []
    for name, info in layers.items():
        _check_entry(path, name, info, tensors)
        info = dict(info)
        step = info.pop("step")
        info.pop("relative_change", None)  # derived from the tensors
        edits.append(LayerEdit(name, tensors[ORIGINAL_PREFIX + name], tensors[name], step, info))
    return edits, meta


def _check_entry(path: Path, name: str, info: object, tensors: Mapping[str, torch.Tensor]) -> None:
    """Raise :class:`EditMismatchError` naming ``path`` and ``name`` unless the entry is an edit:
    a parameter name, its metadata a table with a finite ``step`` (or null), and an edited value
    and an original of the same shape and floating dtype, both finite."""
    if len(name) > MAX_NAME_CHARS or not PARAMETER_NAME.fullmatch(name):
        raise EditMismatchError(f"{path}: entry {name[:80]!r} is not a parameter name; the file is not an edit")
    step = info.get("step", "missing") if isinstance(info, dict) else "missing"
    if step is not None and not (isinstance(step, (int, float)) and math.isfinite(step)):
        raise EditMismatchError(f"{path}: entry {name!r} has no finite step (got {step!r}); the file is not an edit")
    if name not in tensors or ORIGINAL_PREFIX + name not in tensors:
        raise EditMismatchError(f"{path}: tensors for {name!r} are missing; the file is not an edit")
    edited, original = tensors[name], tensors[ORIGINAL_PREFIX + name]
    if edited.shape != original.shape or edited.dtype != original.dtype or not edited.is_floating_point():
        raise EditMismatchError(
            f"{path}: entry {name!r} holds an edited value of {edited.dtype} {tuple(edited.shape)} for an original "
            f"of {original.dtype} {tuple(original.shape)}; an edit keeps one floating tensor's shape and dtype")
    if not (torch.isfinite(edited).all() and torch.isfinite(original).all()):
        raise EditMismatchError(f"{path}: entry {name!r} holds NaN or inf; the file is not a usable edit")
