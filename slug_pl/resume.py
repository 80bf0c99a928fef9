"""Partial state of an interrupted gradient pass: save every N batches, find, check, restore.

A gradient pass over a large set can take hours. With ``model.checkpoint_every: N`` the
:class:`~slug_pl.methods.slug.SlugModule` saves, after every N-th global batch (counted across the sets,
forget batches first), each rank's state to

    <run>/gradients/partial/rank<r>-batch<position>.pt

holding the gradient sums of the finished sets, the current ``.grad`` sums of the set in progress
(fp32, exactly as accumulated), the loss sums (float64) and sample / batch counts, the skipped
samples so far, the RNG states, and what must match for a resume (model id and weights
fingerprint, data fingerprints and batch sizes, world size, precision, eval mode, bad-sample
policy). Files are written atomically (temp file + rename). Under DDP all ranks wait for each
other before and after writing (two barriers per checkpoint, no all-reduce) and only then drop
their previous file, so at any moment some position is complete on every rank.

``model.resume_from: <run dir | its gradients/ or gradients/partial/ folder | one partial file>``
picks the latest position saved by every rank of the same world size, checks it matches the run,
restores the sums in each rank, and the data stream starts at that position
(:class:`~slug_pl.data.pairs.PairBatches` ``start_batch``; earlier samples are not decoded).
Accumulation continues in the same order, so the final gradients equal those of an uninterrupted
pass bit for bit on the same hardware and software. The resumed run writes into its own new run
directory; the interrupted run's files are left as they are. A completed pass deletes its own
partial files once the gradient files are written.
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
    """One rank's state after ``position`` global batches of the pass (tensors on the CPU).

    Attributes:
        position: global batches done (across sets, forget first); the next one to run.
        stashed: finished sets' gradient sums, ``set -> {parameter: tensor}``.
        grads: the ``.grad`` sums of the set in progress (parameters without a gradient absent).
        sums: per set, ``{"loss": float64 0-dim tensor, "samples": int, "batches": int}``.
        skipped: this rank's skipped-sample records so far.
        rng: ``{"cpu": ByteTensor, "cuda": [ByteTensor per device]}``.
        compat: what must equal the resuming run (see :func:`check_compatible`).
        elapsed_s: seconds the pass had run.
    """

    position: int
    stashed: dict[str, dict[str, torch.Tensor]]
    grads: dict[str, torch.Tensor]
    sums: dict[str, dict]
    skipped: list[dict] = field(default_factory=list)
    rng: dict = field(default_factory=dict)
    compat: dict = field(default_factory=dict)
    elapsed_s: float = 0.0


def partial_path(folder: Path, rank: int, position: int) -> Path:
    return Path(folder) / f"rank{rank}-batch{position:09d}.pt"


def save_partial(folder: Path, rank: int, state: PartialState) -> Path:
    """Write one rank's state atomically (replacing a file of the same position, if any)."""
    path = partial_path(folder, rank, state.position)
    with atomic_output(path, overwrite=True) as tmp:
        torch.save({f.name: getattr(state, f.name) for f in fields(state)}, tmp)  # no deep copy
    return path


def drop_older(folder: Path, rank: int, position: int) -> None:
    """Delete ``rank``'s partial files of positions before ``position``."""
    for r, p, path in _scan(Path(folder)):
        if r == rank and p < position:
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
            raise ResumeError(f"{spec} is not a partial-state file (expected rank<r>-batch<n>.pt)")
        return spec.parent, int(m.group(2))
    for folder in (spec / "gradients" / PARTIAL_DIR, spec / PARTIAL_DIR, spec):
        if _scan(folder):
            return folder, None
    raise ResumeError(
        f"no partial gradient-pass state in {spec}: expected rank<r>-batch<n>.pt files in "
        f"{spec / 'gradients' / PARTIAL_DIR} (written with model.checkpoint_every). Give the "
        f"interrupted run's directory, or start the pass anew without model.resume_from"
    )


def find_partial(spec: str | os.PathLike, rank: int, world_size: int) -> tuple[int, Path]:
    """The latest position saved by all ``world_size`` ranks under ``spec``, and ``rank``'s file."""
    spec = Path(spec).expanduser()
    if not spec.exists():
        raise ResumeError(f"model.resume_from: {spec} does not exist")
    folder, wanted = _partial_folder(spec)
    by_position: dict[int, dict[int, Path]] = {}
    for r, p, path in _scan(folder):
        by_position.setdefault(p, {})[r] = path
    complete = sorted(p for p, ranks in by_position.items() if set(range(world_size)) <= set(ranks))
    if wanted is not None:
        complete = [p for p in complete if p == wanted]
    if not complete:
        found = {p: sorted(ranks) for p, ranks in sorted(by_position.items())}
        raise ResumeError(
            f"no position in {folder} was saved by all {world_size} rank(s) of this run (found "
            f"position: ranks {found}); resume with the world size of the interrupted run"
        )
    position = complete[-1]
    return position, by_position[position][rank]


def load_partial(path: Path) -> PartialState:
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
        return PartialState(**raw)
    except Exception as err:
        raise ResumeError(f"cannot read partial state {path}: {type(err).__name__}: {err}") from err


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
