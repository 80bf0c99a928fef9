"""Callbacks that let a multi-process test see inside each rank (each process writes what it
holds to a file; the test reads the files after the run)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from lightning.pytorch import Callback


class HostGradientProbe(Callback):
    """When the pass has ended (its averages made), each rank writes ``<folder>/host_gradients_rank<r>.json``:
    ``{"rank": r, "elements": number of gradient elements the method holds in host memory}``
    (``pl_module.gradients``, every set and tensor)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    def on_train_end(self, trainer, pl_module) -> None:
        elements = sum(t.numel() for grads in pl_module.gradients.values() for t in grads.values())
        rank = trainer.global_rank
        (self.folder / f"host_gradients_rank{rank}.json").write_text(json.dumps({"rank": rank, "elements": elements}))
