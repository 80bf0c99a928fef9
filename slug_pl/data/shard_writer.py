"""Writing webdataset shards: the one place that names, fills and rolls over ``.tar`` shards.

A set of shards is ``<prefix>-000000.tar``, ``<prefix>-000001.tar``, ... in one folder, each of at
most ``shard_size`` samples; a sample is a dict ``{"__key__": str, <extension>: bytes, ...}``
(already encoded: tar members are written as given). Every member has the fixed mtime 0, so equal
samples give byte-identical shards; the member owner and mode are the writer's :class:`TarOwner`.

- :class:`ShardWriter` takes samples one at a time and starts the next shard when one is full
  (mining, generation: the count is not known in advance);
- :func:`write_shards` writes a list of samples (the demo world, the canvas, the labelled sets);
- :func:`brace_pattern` names a set of shards as configs and ``--shards`` take it
  (``dir/val-{000000..000003}.tar``; :func:`~slug_pl.data.shards.expand_urls` expands it back).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import webdataset as wds

from slug_pl.atomic import atomic_output

T = TypeVar("T")


@dataclass(frozen=True)
class TarOwner:
    """The owner and permission bits written into every tar member's header."""

    user: str = "bigdata"  # webdataset's default
    group: str = "bigdata"
    mode: int = 0o444


#: webdataset's own defaults: the shards of ``mine``, ``generate`` and ``prepare``.
WEBDATASET_OWNER = TarOwner()
#: The demo world's and the canvas's shards (their bytes are in the demo caches' fingerprints).
SLUG_OWNER = TarOwner("slug", "slug", 0o644)


def shard_name(prefix: str, index: int) -> str:
    """The file name of shard ``index`` (from 0) of a set: ``<prefix>-000042.tar``."""
    return f"{prefix}-{index:06d}.tar"


def _tar_writer(fileobj, owner: TarOwner) -> wds.TarWriter:
    return wds.TarWriter(fileobj, encoder=False, mtime=0.0, user=owner.user, group=owner.group, mode=owner.mode)


class ShardWriter:
    """Samples written one at a time into ``folder/<prefix>-NNNNNN.tar``, ``shard_size`` per shard
    (a shard is opened by the first sample that goes into it: no samples, no shard).

    Attributes:
        names: the shard file names written so far, in order.
        counts: samples in each of them.

    Use as a context manager (closes the open shard) or call :meth:`close`.
    """

    def __init__(self, folder: str | os.PathLike, prefix: str, shard_size: int,
                 owner: TarOwner = WEBDATASET_OWNER):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.folder, self.prefix, self.shard_size, self.owner = Path(folder), prefix, shard_size, owner
        self.names: list[str] = []
        self.counts: list[int] = []
        self._writer: wds.TarWriter | None = None

    def write(self, sample: dict) -> str:
        """Write ``sample`` (encoded fields); return the name of the shard it went into."""
        if self._writer is None or self.counts[-1] >= self.shard_size:
            self.close()
            self.names.append(shard_name(self.prefix, len(self.names)))
            self.counts.append(0)
            self._writer = _tar_writer(str(self.folder / self.names[-1]), self.owner)
        self._writer.write(sample)
        self.counts[-1] += 1
        return self.names[-1]

    def close(self) -> None:
        """Finish the open shard, if any."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except Exception:  # noqa: BLE001 (the error already raised is the one to report)
            pass


def write_shards(folder: str | os.PathLike, prefix: str, items: Sequence[T], shard_size: int,
                 encode: Callable[[T], dict] | None = None, *, owner: TarOwner = WEBDATASET_OWNER,
                 at_least_one: bool = False, atomic: bool = False) -> list[Path]:
    """Write ``items`` in order as ``folder/<prefix>-000000.tar``, ... (``shard_size`` each);
    return the shard paths.

    ``encode(item)`` makes each item's sample when it is written (one at a time: the items may be
    file paths of a large set); None: the items are samples. ``at_least_one``: no items still
    write one (empty) shard. ``atomic``: each file is written beside its name and linked into place
    (:func:`~slug_pl.atomic.atomic_output`, never overwriting); otherwise written in place.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    folder = Path(folder)
    n_shards = -(-len(items) // shard_size)
    if at_least_one:
        n_shards = max(1, n_shards)
    paths = []
    for s in range(n_shards):
        path = folder / shard_name(prefix, s)
        with (atomic_output(path) if atomic else nullcontext(path)) as target, open(target, "wb") as f:
            writer = _tar_writer(f, owner)
            for item in items[s * shard_size : (s + 1) * shard_size]:
                writer.write(item if encode is None else encode(item))
            writer.close()
        paths.append(path)
    return paths


def brace_pattern(paths: Sequence[str | os.PathLike]) -> str:
    """A brace pattern that :func:`~slug_pl.data.shards.expand_urls` expands back to ``paths``
    (consecutive ``<prefix>-NNNNNN.tar`` files of one folder, as :func:`write_shards` names them):
    ``dir/val-{000000..000003}.tar``, or the one path itself."""
    if len(paths) == 1:
        return str(paths[0])
    first, last = Path(paths[0]), Path(paths[-1])
    prefix, lo = first.stem.rsplit("-", 1)
    hi = last.stem.rsplit("-", 1)[1]
    return str(first.parent / f"{prefix}-{{{lo}..{hi}}}.tar")
