"""A finished run's folder, written without running a fit: for tests and for the documentation's
examples, which read what a run leaves.

:func:`write_run` writes what a SLUG fit leaves for the edits it is given, with the writers the
run itself uses: ``edit.safetensors`` with the metadata the run records (the base weights' SHA-256
included), ``summary.json`` and ``report.md`` (the before / after numbers it is given, as if
measured on held-out test sets) and the edited model with its card (``edited_model/``). The
numbers are the caller's, not measured: the folder says what a run writes, not what an edit does.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from slug_pl.edit import LayerEdit, apply_edit, make_edit, revert_edit
from slug_pl.edited_model import save_edited_model
from slug_pl.evaluation.final import BeforeAfter
from slug_pl.families.base import ModelFamily
from slug_pl.patch import patch_metadata
from slug_pl.record import RunRecord, build_summary
from slug_pl.step_search import ForgetTarget


def random_edit(model: nn.Module, name: str, relative_step: float = 0.05, seed: int = 0, **info) -> LayerEdit:
    """An edit of ``name`` along a seeded random direction, of relative size ``relative_step``
    (‖Δ‖/‖θ‖)."""
    param = dict(model.named_parameters())[name]
    direction = torch.randn(param.shape, generator=torch.Generator().manual_seed(seed))
    step = relative_step * param.detach().norm().item() / direction.norm().item()
    return make_edit(model, name, direction, step, **info)


def write_run(run_dir: str | os.PathLike, family: ModelFamily, model: nn.Module, edits: Sequence[LayerEdit],
              before: Mapping[str, float], after: Mapping[str, float], concepts: Sequence[str] = ("Alice Abara",),
              departures: Sequence[Mapping] = ()) -> Path:
    """Write ``run_dir`` as a SLUG fit of ``model`` (of ``family``; it does not carry ``edits``
    and is left as it was) leaves it; returns ``run_dir``."""
    run_dir = Path(run_dir)
    target = ForgetTarget()
    record = RunRecord(run_dir)
    for e in edits:
        apply_edit(model, e)
    try:
        meta = {"model": family.describe(), "concepts": list(concepts), "method": "slug", "target": str(target),
                **patch_metadata(model, edits)}
        edit_bytes = record.edit_patch(edits, meta)
        method = {"name": "slug", "departures": list(departures),
                  "edits": [{"layer": e.name, "step": e.step, "relative_step": e.relative_change} for e in edits]}
        result = BeforeAfter("test", dict(before), dict(after), {c: dict(after) for c in concepts}, forget_images=15)
        summary = build_summary(method=method, concepts=concepts, model=family.describe(), target=target,
                                validation=dict(after), validation_met=target.met(after), result=result,
                                cost={"edit_bytes": edit_bytes})
        record.write(summary)
        save_edited_model(family, model, run_dir)
    finally:
        for e in edits:
            revert_edit(model, e)
    return run_dir
