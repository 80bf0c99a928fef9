"""Where an untrusted file may lead: paths it names, links it holds, programs it would run.

Every downloaded file (a shard, an identity list, a model or classifier folder, a classifier's
JSON) is data. The rules here keep it from reaching beyond itself:

- **A name stays inside its folder.** A path a data file names (an identity list's image, a
  classifier JSON's weights, a tar member) is resolved against the folder it belongs to,
  symbolic links followed, and must land inside that folder: :func:`resolve_inside`,
  :func:`member_name_problem`. A refusal (:class:`UnsafePathError`) names the file and the entry.
- **An output never follows a link out.** :func:`links_under` lists the symbolic links of a
  folder (an output folder that holds one is refused); :func:`link_target` tells where a link
  of a model folder leads, for copies that must not carry a foreign file along.
- **A shard spec runs nothing unless the user says so.** webdataset opens ``pipe:`` specs with a
  shell and ``http://`` / ``gs://`` ... specs with ``curl`` / ``gsutil``; :func:`command_of`
  names what a spec would run, and the readers refuse it without the opt-in option.
- **A descriptor is small.** :func:`read_descriptor` reads a JSON descriptor (a classifier's
  ``classifier.json``) only when it is below a size that no honest one reaches.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path, PurePosixPath

#: Largest classifier descriptor (JSON) read, in bytes: 51 class names take ~2 KB.
MAX_DESCRIPTOR_BYTES = 1 << 20

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")

#: What webdataset runs to open a shard spec of each scheme (the rest it cannot open at all).
_RUNS = {"pipe": "a shell command", "http": "curl", "https": "curl", "sftp": "curl", "ftps": "curl",
         "scp": "curl", "htgs": "curl", "gs": "gsutil", "ais": "the AIStore client"}


class UnsafePathError(ValueError):
    """A data file names a path outside its folder, or an output would be written through a link."""


def resolve_inside(folder: str | os.PathLike, name: str, source: str, what: str = "entry") -> Path:
    """The path that ``name`` (read from the file ``source``) names inside ``folder``, resolved.

    ``name`` must be relative, free of ``..`` and, after every symbolic link is followed, still
    inside ``folder`` (itself resolved); else :class:`UnsafePathError` naming ``source`` and the
    ``what`` (e.g. ``"line 3"``, ``"weights"``). The path need not exist.
    """
    root = Path(folder).expanduser().resolve()
    problem = member_name_problem(name)
    if problem is None:
        resolved = (root / name).resolve()
        if resolved != root and root not in resolved.parents:
            problem = f"resolves to {resolved}, outside {root} (through a symbolic link)"
    if problem is not None:
        raise UnsafePathError(f"{source}: {what} {name!r} {problem}; a data file may only name "
                              f"files inside its folder {root}")
    return resolved


def member_name_problem(name: str) -> str | None:
    """Why ``name`` (a relative path from a data file, e.g. a tar member) could leave its folder:
    empty, absolute, or with a ``..`` part; None when it stays inside."""
    if not name or not name.strip():
        return "is empty"
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "is an absolute path"
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        return "climbs out with '..'"
    return None


def links_under(folder: str | os.PathLike) -> list[Path]:
    """The symbolic links in ``folder`` (recursively; the folder itself included when it is one),
    dangling ones too, sorted. Links to folders are listed, not entered."""
    folder = Path(folder)
    if folder.is_symlink():
        return [folder]
    if not folder.is_dir():
        return []
    found = []
    for parent, dirs, files in os.walk(folder):  # does not enter linked folders
        found += [Path(parent) / n for n in dirs + files if (Path(parent) / n).is_symlink()]
    return sorted(found)


def link_target(path: Path, roots: tuple[Path, ...]) -> Path | None:
    """Where the link ``path`` leads when that is inside one of ``roots`` (resolved), else None."""
    target = path.resolve()
    for root in roots:
        root = root.resolve()
        if target == root or root in target.parents:
            return target
    return None


def command_of(url: str) -> str | None:
    """What webdataset would run to open the shard spec ``url`` (``"a shell command"`` for
    ``pipe:``, ``"curl"`` for ``http://`` ...), ``"an unknown opener"`` for another scheme, or
    None for a local path."""
    if url.startswith("pipe:"):
        return _RUNS["pipe"]
    match = _SCHEME.match(url)
    if match is None:
        return None
    return _RUNS.get(match.group(1).lower(), "an unknown opener")


#: The options that let shard specs run programs (the config's and ``slug-pl mine``'s).
SHARD_COMMANDS_OPT_IN = "data.allow_shard_commands: true (slug-pl mine: --allow-shard-commands)"


def refuse_command(url: str, source: str) -> None:
    """Raise :class:`UnsafePathError` when the shard spec ``url`` (from ``source``, e.g.
    ``"data.forget"``) would run a program; the message names the opt-in options."""
    runs = command_of(url)
    if runs is not None:
        raise UnsafePathError(
            f"{source}: shard {url!r} would run {runs} to open it (webdataset's URL schemes); slug_pl "
            f"runs nothing named in a shard list unless you opt in with {SHARD_COMMANDS_OPT_IN}. Or "
            f"download the shard and give its local path")


def read_descriptor(path: str | os.PathLike, what: str, limit: int = MAX_DESCRIPTOR_BYTES) -> dict:
    """The JSON object in the small file ``path`` (a ``what``, e.g. ``"classifier config"``).
    ValueError when it is larger than ``limit`` bytes (nothing more is read), not JSON, or not an
    object."""
    path = Path(path)
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{what} {path} is larger than {limit} bytes: not a descriptor slug_pl "
                         f"reads (a real one holds a few KB)")
    try:
        record = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{what} {path} is not valid JSON: {err}") from err
    if not isinstance(record, dict):
        raise ValueError(f"{what} {path} must hold a JSON object, got {type(record).__name__}")
    return record
