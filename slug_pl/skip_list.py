"""The skipped samples of a gradient pass: a JSON Lines file beside each gradient file.

Under ``data.bad_samples: skip`` every skipped sample is recorded (``set``, ``index``, ``shard``,
``key``, ``reason``). A LAION-sized pass may skip hundreds of thousands, more than the 100 MB a
safetensors header may hold, so the records do not go into the gradient file's metadata. They go
to ``gradients/skipped_<set>.jsonl``, one JSON object per line in stream order, and the metadata
holds only ``skipped: {"count": n, "file": "skipped_<set>.jsonl", "sha256": ...}`` (count 0: no
file). :func:`read_skip_list` reads them back for ``model.gradients_from``: a file of another
pass (another hash) or a malformed one is refused, and its size is bounded by the count before it
is read. Gradient files of earlier versions, with the records themselves under ``skipped``, still
read.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path

from slug_pl.atomic import atomic_output

#: What each record holds.
RECORD_KEYS = frozenset({"set", "index", "shard", "key", "reason"})
#: The most bytes one record may take when read back (a shard path, a key and a reason).
MAX_RECORD_BYTES = 64 << 10


class SkipListError(ValueError):
    """A skip list that does not belong to its gradient file, or is malformed."""


def skip_list_name(set_name: str) -> str:
    return f"skipped_{set_name}.jsonl"


def write_skip_list(folder: Path, set_name: str, records: Iterable[Mapping]) -> dict[str, object]:
    """Write the records of set ``set_name`` to ``folder/skipped_<set>.jsonl`` (none: no file;
    never overwrites) and return the gradient file's metadata entry for them."""
    lines = [json.dumps(dict(r), sort_keys=True, ensure_ascii=False) + "\n" for r in records]
    if not lines:
        return {"count": 0}
    data = "".join(lines).encode("utf-8")
    name = skip_list_name(set_name)
    with atomic_output(Path(folder) / name) as tmp:
        tmp.write_bytes(data)
    return {"count": len(lines), "file": name, "sha256": hashlib.sha256(data).hexdigest()}


def read_skip_list(folder: Path, entry: object, source: str | Path) -> list[dict]:
    """The skipped records a gradient file's metadata ``entry`` (its ``skipped`` value; ``source``
    names the gradient file) points to, in ``folder``. Raises :class:`SkipListError` naming the
    file when it is missing, larger than its count allows, of another hash, or malformed."""
    if isinstance(entry, list):  # before the records moved out of the metadata
        return [dict(r) for r in entry]
    if not isinstance(entry, Mapping) or type(entry.get("count")) is not int or entry["count"] < 0:
        raise SkipListError(f"{source}: its metadata 'skipped' is neither a count nor a list of records")
    count = entry["count"]
    if count == 0:
        return []
    path = Path(folder) / str(entry.get("file", ""))
    if path.parent != Path(folder) or not path.is_file():
        raise SkipListError(f"{source} lists {count} skipped samples in {path}, which is not there: keep the "
                            f"gradient file and its skip list together")
    limit = count * MAX_RECORD_BYTES
    if path.stat().st_size > limit:
        raise SkipListError(f"{path} holds more than {limit} bytes, too many for {count} skipped samples")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        raise SkipListError(f"{path} is not the skip list {source} was written with (another SHA-256)")
    records = [json.loads(line) for line in data.decode("utf-8").splitlines()]
    if len(records) != count or not all(isinstance(r, dict) and set(r) == RECORD_KEYS for r in records):
        raise SkipListError(f"{path}: expected {count} records with keys {sorted(RECORD_KEYS)}")
    return records
