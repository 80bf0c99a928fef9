"""The edited CLIP on disk, in its own library's format, with its model card.

A run that saves its edited model writes ``lightning_logs/version_N/edited_model/``: the CLIP as
its family's own library loads it without slug_pl (:meth:`~slug_pl.families.base.ModelFamily.save_edited`:
a Hugging Face CLIP as a ``save_pretrained`` folder, an open_clip model as a ``local-dir:``
folder), and a model card (:mod:`slug_pl.model_card`) made from the run's ``summary.json`` and
the metadata of its ``edit.safetensors``.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from slug_pl.edit import EditMismatchError
from slug_pl.families.base import ModelFamily
from slug_pl.model_card import write_model_card
from slug_pl.patch import SlugPatch
from slug_pl.record import EDIT_FILE

EDITED_MODEL = "edited_model"


def save_edited_model(family: ModelFamily, model: nn.Module, run_dir: str | os.PathLike) -> Path:
    """Write ``run_dir/edited_model/``: ``model`` (which must carry the edit of
    ``run_dir/edit.safetensors``) saved by ``family``, and its model card; returns the folder.
    Call it once the run's record (``edit.safetensors``, ``summary.json``) is written."""
    run_dir = Path(run_dir)
    patch = SlugPatch.from_run(run_dir)
    if not patch.is_applied(model):
        raise EditMismatchError(f"the model does not carry the edit of {run_dir / EDIT_FILE}: save the model the "
                                f"run edited")
    folder = family.save_edited(model, patch.edits, run_dir / EDITED_MODEL)
    write_model_card(folder, patch.summary, patch.config)
    return folder
