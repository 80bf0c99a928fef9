"""Shard indexes: where each sample of a plain tar shard starts, so a reader can read only its own.

A reader of the gradient pass (one rank, one data-loader worker) decodes only its own samples of
each global batch (:mod:`slug_pl.data.pairs`). To *read* only those too, it must know where each
sample lies in its shard without reading the samples before it. A :class:`ShardIndex` says so:

- ``keys[i]``: the key of the shard's i-th sample (samples in tar order, consecutive members with
  one key forming a sample, as :func:`~slug_pl.data.shards.samples_of_tar` groups them);
- ``starts[i]``: the byte offset of that sample's first tar header (a multiple of 512);
- ``end``: the byte offset of the end-of-archive marker (a zero block) after the last member.

Sample i is the *window* ``[starts[i], starts[i+1])`` (the last one ends at ``end``); its count is
``len(keys)``. An index is built once from the tar headers alone (:func:`build_index`: one
512-byte header per member is read, no member data) and kept in a file
(:class:`IndexStore`): in a cache folder under a name derived from the shard's real path, size and
modification time, or, where the user allows it (``data.index_beside_shards``), beside the shard.

**An index file is data, never trusted over its shard.** It is read only below a bounded size
(:func:`decode_index`: compressed and expanded, relative to the shard's size), its structure is
checked (offsets block-aligned, strictly increasing, inside the shard; neighbouring samples with
different keys), and it is used only when the size and modification time it records are the
shard's now; any failure means the index is built anew from the shard. Beyond that, every read
checks the part of the index it uses (:func:`~slug_pl.data.shards.read_window`): a window must
hold exactly the members of its key, ending exactly where the next sample starts; the reader of
sample 0 checks that nothing but non-sample members precede it, and the reader of the last sample
that the end-of-archive marker follows it. A pass that reads every sample has therefore checked
the whole index against the shard.

Only plain tar files on a local file system are indexed: a compressed shard (``.tar.gz`` ...) or
a shard spec that runs a program (``pipe:``, ``http://``) has no index (:meth:`IndexStore.index`
gives None) and is streamed whole by every reader, as before.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

from slug_pl.atomic import atomic_output
from slug_pl.data.shards import ShardError, member_key, unreadable_shard_message
from slug_pl.safety import command_of

BLOCK = tarfile.BLOCKSIZE  # 512 bytes: tar headers start on block boundaries
FORMAT = "slug_pl shard index 1"
#: The suffix of an index file kept beside its shard (``data.index_beside_shards``).
BESIDE_SUFFIX = ".slug-index"
#: Compressed formats whose magic bytes open a shard that cannot be read at an offset.
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd", b"\x04\x22\x4d\x18")


class IndexWarning(UserWarning):
    """An index could not be written where it belongs; readers then build it again."""


@dataclass(frozen=True)
class ShardIndex:
    """Where the samples of one shard lie (see the module docstring); offsets in bytes.

    ``size`` and ``mtime_ns`` are the shard's size and modification time (nanoseconds) when the
    index was built: it describes the shard only while both are unchanged.
    """

    shard: str
    size: int
    mtime_ns: int
    keys: tuple[str, ...]
    starts: tuple[int, ...]
    end: int

    def __len__(self) -> int:
        return len(self.keys)

    def window(self, i: int) -> tuple[int, int]:
        """``(start, stop)``: the bytes of sample ``i`` (its members and any non-sample members
        that follow it)."""
        stop = self.starts[i + 1] if i + 1 < len(self.starts) else self.end
        return self.starts[i], stop


def shard_stamp(url: str) -> tuple[int, int]:
    """``(size in bytes, modification time in ns)`` of a local shard."""
    st = os.stat(url)
    return st.st_size, st.st_mtime_ns


def is_compressed(url: str) -> bool:
    """Whether the local file ``url`` starts with the magic bytes of a compression format."""
    with open(url, "rb", buffering=0) as f:
        head = f.read(6)
    return head.startswith(_COMPRESSED_MAGIC)


def build_index(url: str) -> ShardIndex:
    """The index of the plain tar shard ``url`` from its headers (no member data is read).

    Raises :class:`ShardError` naming the shard when it cannot be read, is not a tar archive, holds
    a member name that leaves it, or lacks the end-of-archive marker (cut off at a file boundary).
    """
    keys: list[str] = []
    starts: list[int] = []
    try:
        size, mtime_ns = shard_stamp(url)
        with open(url, "rb", buffering=0) as raw, tarfile.open(fileobj=raw, mode="r:") as tar:
            for member in tar:
                tar.members = []  # keep no headers
                found = member_key(url, member)  # refuses a name that leaves the shard
                if found is not None and (not keys or found[0] != keys[-1]):
                    keys.append(found[0])
                    starts.append(member.offset)
            end = tar.offset
            marker = os.pread(raw.fileno(), BLOCK, end)
        if len(marker) < BLOCK or marker.count(0) != BLOCK:
            raise tarfile.ReadError(f"no end-of-archive marker after {len(keys)} samples: truncated "
                                    f"or followed by data that is no tar header")
    except ShardError:
        raise
    except (OSError, tarfile.TarError) as err:
        raise ShardError(unreadable_shard_message(url, err)) from err
    return ShardIndex(url, size, mtime_ns, tuple(keys), tuple(starts), end)


def encode_index(index: ShardIndex) -> bytes:
    """The file bytes of ``index``: zlib-compressed JSON, offsets as block-count differences."""
    blocks = [s // BLOCK for s in index.starts]
    steps = [b - a for a, b in zip([0, *blocks], blocks)]
    end_step = index.end // BLOCK - (blocks[-1] if blocks else 0)
    record = {"format": FORMAT, "size": index.size, "mtime_ns": index.mtime_ns, "keys": list(index.keys),
              "steps": steps, "end_step": end_step}
    return zlib.compress(json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8"), 6)


def max_index_bytes(shard_size: int) -> int:
    """The most bytes an index of a shard of ``shard_size`` bytes may take, compressed or expanded:
    twice the shard plus 1 MiB (an honest index takes some 20 bytes per sample, of 512 or more)."""
    return 2 * shard_size + (1 << 20)


def decode_index(data: bytes, url: str, stamp: tuple[int, int]) -> ShardIndex:
    """The index in ``data`` for shard ``url`` whose ``(size, mtime_ns)`` is ``stamp`` now; raises
    ValueError when it is above :func:`max_index_bytes`, malformed, or describes another version
    of the shard."""
    limit = max_index_bytes(stamp[0])
    if len(data) > limit:
        raise ValueError(f"{len(data)} bytes, more than {limit}")
    inflate = zlib.decompressobj()
    text = inflate.decompress(data, limit)
    if inflate.unconsumed_tail or not inflate.eof:
        raise ValueError(f"expands beyond {limit} bytes or is cut off")
    record = json.loads(text)
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT!r} file")
    if (record.get("size"), record.get("mtime_ns")) != stamp:
        raise ValueError("made for another version of the shard (its size or modification time changed)")
    keys, steps, end_step = record.get("keys"), record.get("steps"), record.get("end_step")
    if not (isinstance(keys, list) and isinstance(steps, list) and len(keys) == len(steps)
            and all(isinstance(k, str) and k for k in keys)
            and all(type(s) is int and s >= (0 if i == 0 else 1) for i, s in enumerate(steps))
            and type(end_step) is int and end_step >= (1 if keys else 0)):
        raise ValueError("malformed keys or offsets")
    if any(a == b for a, b in zip(keys, keys[1:])):
        raise ValueError("two neighbouring samples with one key")
    starts, block = [], 0
    for step in steps:
        block += step
        starts.append(block * BLOCK)
    end = (block + end_step) * BLOCK
    if end + BLOCK > stamp[0]:
        raise ValueError("offsets beyond the end of the shard")
    return ShardIndex(url, stamp[0], stamp[1], tuple(keys), tuple(starts), end)


def default_index_folder() -> Path:
    """``$SLUG_PL_CACHE/shard_index``; without that variable ``$XDG_CACHE_HOME/slug_pl/shard_index``
    (``~/.cache/slug_pl/shard_index``)."""
    root = os.environ.get("SLUG_PL_CACHE")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "slug_pl"
    return Path(root) / "shard_index"


@dataclass(frozen=True)
class IndexStore:
    """Where shard indexes are kept and found (picklable: data-loader workers get a copy).

    ``folder``: the cache folder (None: :func:`default_index_folder`); an index there is named
    after the SHA-256 of the shard's real path, size and modification time. ``beside_shards``: also
    look for ``<shard>.slug-index`` beside the shard, and write it there when the shard's folder is
    writable (else in ``folder``).
    """

    folder: str | None = None
    beside_shards: bool = False

    def cache_path(self, url: str, stamp: tuple[int, int]) -> Path:
        name = hashlib.sha256(f"{os.path.realpath(url)}\0{stamp[0]}\0{stamp[1]}".encode()).hexdigest()
        return Path(self.folder or default_index_folder()) / f"{name[:40]}.idx"

    def _places(self, url: str, stamp: tuple[int, int]) -> list[Path]:
        cache = self.cache_path(url, stamp)
        return [Path(url + BESIDE_SUFFIX), cache] if self.beside_shards else [cache]

    def load(self, url: str) -> ShardIndex | None:
        """The stored index of ``url`` if one is valid for the shard as it is now, else None."""
        stamp = shard_stamp(url)
        for path in self._places(url, stamp):
            try:
                if path.stat().st_size > max_index_bytes(stamp[0]):
                    continue
                return decode_index(path.read_bytes(), url, stamp)
            except (OSError, ValueError, RecursionError, zlib.error):
                continue  # absent, unreadable, stale or malformed: built anew
        return None

    def index(self, url: str) -> ShardIndex | None:
        """The index of shard ``url``: the stored one, else built from the shard and stored. None
        for a shard that cannot be indexed (a spec with a scheme, a compressed file): read it as a
        stream. Raises :class:`ShardError` naming a shard that cannot be read as a tar archive."""
        if command_of(url) is not None:
            return None
        try:
            if is_compressed(url):
                return None
            found = self.load(url)
        except OSError as err:
            raise ShardError(unreadable_shard_message(url, err)) from err
        if found is not None:
            return found
        built = build_index(url)
        self._store(built)
        return built

    def _store(self, index: ShardIndex) -> None:
        places = self._places(index.shard, (index.size, index.mtime_ns))
        if self.beside_shards and not os.access(places[0].parent, os.W_OK):
            places = places[1:]
        data = encode_index(index)
        for path in places:
            try:
                with atomic_output(path, overwrite=True) as tmp:
                    tmp.write_bytes(data)
                    tmp.chmod(0o644)  # readable by whoever may read the shard (temp files start private)
                return
            except OSError as err:
                problem = err
        warnings.warn(f"cannot keep the index of {index.shard} in {places[-1].parent} ({problem}); every "
                      f"reader builds it again from the tar headers: set data.index_dir to a writable "
                      f"folder", IndexWarning, stacklevel=3)
