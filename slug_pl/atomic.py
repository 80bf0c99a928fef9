"""Writing artifacts so that nothing is ever half-written or overwritten.

Every artifact of a run is written to a temporary file beside its final path and moved into place
in one step, so a reader (or a crash) sees either no file or the complete file:

- :func:`atomic_output` yields the temporary path to write to; on success the file is *linked*
  to its final name, which fails with :class:`FileExistsError` if that name exists (no
  check-then-write race), and the temporary name is removed. On a file system without hard links
  it falls back to an existence check and ``os.replace``.
- :func:`atomic_folder` does the same for a whole folder (a ``save_pretrained`` model, a set of
  shards): written under a temporary name beside it and renamed into place, never over an existing
  folder; :func:`rebuilt_folder` (built the same way, then :func:`swap_into_place`) replaces a stale
  *cache* folder.
- Temporary names are unpredictable (:func:`temp_folder_beside`, ``tempfile``): a folder shared
  with others cannot hold a link planted in advance at the name a run will write to.
- ``overwrite=True`` is only for scratch state that is meant to be replaced (the partial sums of
  an interrupted gradient pass, :mod:`slug_pl.resume`): ``os.replace`` swaps it atomically.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


def refuse_existing(path: Path) -> None:
    """Raise :class:`FileExistsError` naming ``path`` if it exists."""
    if path.exists():
        raise FileExistsError(
            f"refusing to overwrite {path}: slug_pl never overwrites an artifact. Choose a new run "
            f"directory (a new trainer.default_root_dir or logger version) or move the file away"
        )


@contextmanager
def atomic_output(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; when the block succeeds, move it to ``path``.

    Never overwrites an existing ``path`` unless ``overwrite``; on any error the temporary file
    is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not overwrite:
        refuse_existing(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if overwrite:
            os.replace(tmp, path)
        else:
            _link_new(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _link_new(tmp: Path, path: Path) -> None:
    try:
        os.link(tmp, path)  # atomic, and fails if ``path`` appeared meanwhile
    except FileExistsError:
        refuse_existing(path)
        raise
    except OSError:  # no hard links here (some network / FUSE file systems)
        refuse_existing(path)
        os.replace(tmp, path)


@contextmanager
def atomic_folder(folder: str | os.PathLike, empty_ok: bool = False) -> Iterator[Path]:
    """Yield a new empty temporary folder beside ``folder``; when the block succeeds, rename it to
    ``folder``. An existing ``folder`` is refused (:class:`FileExistsError`, before any work and
    again at the rename, when something else made it meanwhile); ``empty_ok``: an existing empty
    folder is taken (replaced by the new one). On any error the temporary folder is removed."""
    folder = Path(folder)
    if folder.exists() and not (empty_ok and folder.is_dir() and not any(folder.iterdir())):
        raise FileExistsError(f"refusing to overwrite {folder}: choose a new folder or move it away")
    tmp = temp_folder_beside(folder)
    try:
        yield tmp
        try:
            if empty_ok and folder.is_dir():
                folder.rmdir()  # still empty, or this fails: nothing is overwritten
            os.rename(tmp, folder)  # fails if a non-empty ``folder`` appeared meanwhile
        except OSError as err:
            if folder.exists():
                raise FileExistsError(f"{folder} appeared while it was being written and is not empty; "
                                      f"choose a new folder") from err
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class Rebuild:
    """A folder being rebuilt by :func:`rebuilt_folder`."""

    #: where the block writes the new folder's content (beside the folder, private).
    path: Path
    #: after the block: True when the new folder was swapped into place, False when ``keep``
    #: kept a folder that another process built meanwhile (the new one is discarded).
    swapped: bool = False


@contextmanager
def rebuilt_folder(folder: str | os.PathLike, *, made: bool = True,
                   keep: Callable[[], bool] | None = None) -> Iterator[Rebuild]:
    """Build a cache ``folder`` anew beside it and swap it into place (:func:`swap_into_place`:
    readers see the stale folder or the new one, never a mix).

    Yields a :class:`Rebuild` whose ``path`` is, with ``made``, a new empty private folder (a
    :func:`temp_folder_beside` one); without it, a name not yet taken inside such a folder, for a
    writer that refuses an existing folder and creates its own. When the block succeeds the new
    folder replaces ``folder`` unless ``keep()`` (asked then) says the ``folder`` there now is to
    be kept (built meanwhile by another process). Whatever happens, nothing temporary is left.
    """
    folder = Path(folder)
    staging = temp_folder_beside(folder)
    build = Rebuild(staging if made else staging / folder.name)
    try:
        yield build
        if keep is None or not keep():
            swap_into_place(build.path, folder)
            build.swapped = True
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def temp_folder_beside(folder: str | os.PathLike) -> Path:
    """A new empty folder beside ``folder`` (created exclusively, readable by its owner only, with
    an unpredictable name ``.<name>.<random>.tmp``): where an artifact or a cache is written before
    it is renamed into place. A name nobody can guess is one nobody can plant a link at."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))


def swap_into_place(new: str | os.PathLike, folder: str | os.PathLike) -> None:
    """Rename the folder ``new`` to ``folder``, moving a stale ``folder`` (a cache being rebuilt)
    aside first (to a :func:`temp_folder_beside` name) and deleting it after: readers see the old
    or the new folder, never a mix."""
    new, folder = Path(new), Path(folder)
    old = temp_folder_beside(folder)
    try:
        if folder.exists():
            os.rename(folder, old)  # onto the empty folder just made
        os.rename(new, folder)
    finally:
        shutil.rmtree(old, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str, overwrite: bool = False) -> Path:
    """Write ``text`` (UTF-8) atomically; never overwrites unless ``overwrite``."""
    with atomic_output(path, overwrite=overwrite) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def file_slug(name: str) -> str:
    """``name`` as a file-name part: lower case, runs of anything but a–z and 0–9 as one ``_``
    (``"Alice Abara"`` -> ``"alice_abara"``)."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
