"""Single-layer edits: θ_l ← θ_l − λ · g_f,l, as reversible patches.

An edit file (``edit.safetensors``) holds, for each edited parameter ``name``, the edited tensor
under ``name`` and the original under ``original/<name>``. Applying checks that the model still
holds the original (bit for bit) before replacing it; reverting checks the edited value. So a
patch can never be applied to the wrong weights, and reverting restores them exactly.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from slug_pl.gradients import load_tensors, save_tensors

ORIGINAL_PREFIX = "original/"


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


def save_edits(path: str | os.PathLike, edits: list[LayerEdit], metadata: Mapping[str, object]) -> None:
    tensors: dict[str, torch.Tensor] = {}
    layers = {}
    for e in edits:
        tensors[e.name] = e.edited
        tensors[ORIGINAL_PREFIX + e.name] = e.original
        layers[e.name] = {"step": e.step, "relative_change": e.relative_change, **e.info}
    save_tensors(path, tensors, {**metadata, "layers": layers})


def load_edits(path: str | os.PathLike) -> tuple[list[LayerEdit], dict]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"edit file not found: {path}; give the edit.safetensors a fit run wrote "
                                f"(lightning_logs/version_N/edit.safetensors)")
    tensors, meta = load_tensors(path)
    layers = meta.get("layers", {})
    edits = []
    for name, info in layers.items():
        if name not in tensors or ORIGINAL_PREFIX + name not in tensors:
            raise EditMismatchError(f"{path}: tensors for {name!r} are missing; the file is not an edit")
        info = dict(info)
        step = info.pop("step")
        info.pop("relative_change", None)  # derived from the tensors
        edits.append(LayerEdit(name, tensors[ORIGINAL_PREFIX + name], tensors[name], step, info))
    if not edits:
        raise EditMismatchError(f"{path} holds no edits (no 'layers' metadata)")
    return edits, meta
