"""Partial state of an interrupted gradient pass: save every N batches, find, check, restore.

A gradient pass over a large set can take hours. With ``model.checkpoint_every: N`` the
:class:`~slug_pl.methods.slug.SlugModule` saves, after every N-th global batch (counted across the sets,
forget batches first), the pass's state to one file, written by rank 0:

    <run>/gradients/partial/rank0-batch<position>.pt

holding the gradient sums of the finished sets, the ``.grad`` sums of the set in progress (fp32),
the loss sums (float64) and sample / batch counts, the skipped samples so far, every rank's RNG
states, and what must match for a resume (model id and weights fingerprint, data fingerprints and
batch sizes, world size, precision, eval mode, bad-sample policy). Under DDP the ranks first add
their sums into rank 0's (one all-reduce of the gradient sums per checkpoint) and go on from zero,
so one file holds the pass, not one per rank: 3.4 GB for ViT-L/14 on any number of ranks. The file
is written atomically (temp file + rename) before the previous one is dropped, so at any moment
one position is complete.

``model.resume_from: <run dir | its gradients/ or gradients/partial/ folder | one partial file>``
picks the latest position, checks it matches the run (the same world size among the rest), gives
rank 0 the saved sums and every other rank zero sums and its own RNG state, and the data stream
starts at that position (:class:`~slug_pl.data.pairs.PairBatches` ``start_batch``; earlier samples
are not decoded). The arithmetic is that of the uninterrupted pass, checkpoints included, so the
final gradients equal those of an uninterrupted pass with the same ``checkpoint_every`` bit for bit
on the same hardware and software. Under DDP the sums added at each checkpoint make the result
differ from a pass without checkpoints by float rounding (as a different device count does); on
one process a checkpoint changes nothing. The resumed run writes into its own new run directory;
the interrupted run's files are left as they are. A completed pass deletes its own partial files
once the gradient files are written.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from slug_pl.atomic import atomic_output

PARTIAL_DIR = "partial"
_NAME = re.compile(r"^rank(\d+)-batch(\d+)\.pt$")


class ResumeError(ValueError):
    """No usable partial state, or partial state from another run setup."""


@dataclass
class PartialState:
    """The pass's state after ``position`` global batches, every rank's sums added (tensors on the CPU).

    Attributes:
        position: global batches done (across sets, forget first); the next one to run.
        stashed: finished sets' gradient sums, ``set -> {parameter: tensor}``.
        grads: the ``.grad`` sums of the set in progress (parameters without a gradient absent).
        sums: per set, ``{"loss": float64 0-dim tensor, "samples": int, "batches": int}``.
        skipped: every rank's skipped-sample records so far.
        rng: rank 0's ``{"cpu": ByteTensor, "cuda": [ByteTensor per device]}``.
        other_rng: the same of ranks 1, 2, ... (empty on one process).
        compat: what must equal the resuming run (see :func:`check_compatible`).
        elapsed_s: seconds the pass had run.
    """

    position: int
    stashed: dict[str, dict[str, torch.Tensor]]
    grads: dict[str, torch.Tensor]
    sums: dict[str, dict]
    skipped: list[dict] = field(default_factory=list)
    rng: dict = field(default_factory=dict)
    other_rng: list[dict] = field(default_factory=list)
    compat: dict = field(default_factory=dict)
    elapsed_s: float = 0.0

    def rng_of(self, rank: int) -> dict:
        return self.rng if rank == 0 else self.other_rng[rank - 1]


def partial_path(folder: Path, position: int) -> Path:
    return Path(folder) / f"rank0-batch{position:09d}.pt"


def save_partial(folder: Path, state: PartialState) -> Path:
    """Write the state atomically (replacing a file of the same position, if any)."""
    path = partial_path(folder, state.position)
    with atomic_output(path, overwrite=True) as tmp:
        torch.save({f.name: getattr(state, f.name) for f in fields(state)}, tmp)  # no deep copy
    return path


def drop_older(folder: Path, position: int) -> None:
    """Delete the partial files of positions before ``position`` (also an older version's other
    ranks' files)."""
    for _, p, path in _scan(Path(folder)):
        if p < position:
            path.unlink(missing_ok=True)


def remove_all(folder: Path) -> None:
    """Delete every partial file in ``folder`` and the folder if it is then empty."""
    folder = Path(folder)
    for _, _, path in _scan(folder):
        path.unlink(missing_ok=True)
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def rng_state() -> dict:
    cuda = [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def restore_rng(state: dict) -> None:
    if "cpu" in state:
        torch.set_rng_state(state["cpu"])
    for i, s in enumerate(state.get("cuda", [])):
        if i < torch.cuda.device_count():
            torch.cuda.set_rng_state(s, i)


# -- finding and loading -----------------------------------------------------------------------

def _scan(folder: Path) -> list[tuple[int, int, Path]]:
    """``(rank, position, path)`` of the partial files in ``folder``."""
    if not folder.is_dir():
        return []
    out = []
    for path in folder.iterdir():
        m = _NAME.match(path.name)
        if m:
            out.append((int(m.group(1)), int(m.group(2)), path))
    return out


def _partial_folder(spec: Path) -> tuple[Path, int | None]:
    """The folder of partial files ``spec`` points at, and the position if it names one file."""
    if spec.is_file():
        m = _NAME.match(spec.name)
        if not m:
            raise ResumeError(f"{spec} is not a partial-state file (expected rank0-batch<n>.pt)")
        return spec.parent, int(m.group(2))
    for folder in (spec / "gradients" / PARTIAL_DIR, spec / PARTIAL_DIR, spec):
        if _scan(folder):
            return folder, None
    raise ResumeError(
        f"no partial gradient-pass state in {spec}: expected rank0-batch<n>.pt files in "
        f"{spec / 'gradients' / PARTIAL_DIR} (written with model.checkpoint_every). Give the "
        f"interrupted run's directory, or start the pass anew without model.resume_from"
    )


def find_partial(spec: str | os.PathLike) -> tuple[int, Path]:
    """The latest position saved under ``spec`` (or the one file it names), and its file."""
    spec = Path(spec).expanduser()
    if not spec.exists():
        raise ResumeError(f"model.resume_from: {spec} does not exist")
    folder, wanted = _partial_folder(spec)
    saved = {p: path for r, p, path in _scan(folder) if r == 0 and (wanted is None or p == wanted)}
    if not saved:
        raise ResumeError(f"no partial state of rank 0 in {folder}" + (f" at batch {wanted}" if wanted is not None
                                                                         else "") + "; start the pass anew")
    position = max(saved)
    return position, saved[position]


def load_partial(path: Path, world_size: int = 1) -> PartialState:
    """Read a partial state for a run of ``world_size`` processes (it must hold each one's RNG)."""
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
        state = PartialState(**raw)
    except Exception as err:
        raise ResumeError(f"cannot read partial state {path}: {type(err).__name__}: {err}") from err
    if world_size > 1 and len(state.other_rng) != world_size - 1:
        raise ResumeError(
            f"{path} holds the state of {len(state.other_rng) + 1} rank(s), not {world_size}: it was saved by "
            f"another world size, or by an earlier slug_pl that wrote one file per rank; resume with the "
            f"interrupted run's devices, or start the pass anew")
    return state


def check_compatible(saved: dict, current: dict, path: Path) -> None:
    """Raise :class:`ResumeError` naming every field of ``compat`` that differs."""
    keys = sorted(set(saved) | set(current))
    differ = [k for k in keys if saved.get(k) != current.get(k)]
    if differ:
        detail = "; ".join(f"{k}: saved {saved.get(k)!r}, now {current.get(k)!r}" for k in differ)
        raise ResumeError(
            f"{path} belongs to a different pass setup ({detail}); resume with the interrupted "
            f"run's config (model, data, batch sizes, devices, precision), or start anew"
        )
