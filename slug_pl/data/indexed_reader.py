"""Reading chosen samples of indexed shards: what one reader (a rank, a data-loader worker) reads.

:class:`IndexedReader` reads sample i of a shard through its window in the shard's index
(:mod:`slug_pl.data.shard_index`): the tar headers and member bytes of that sample, nothing else,
under the input limits (:func:`slug_pl.data.shards.read_window`). Each read checks the part of the
index it used: the window holds exactly the members of the key the index names; before sample 0
there is no sample; after the last sample comes the end-of-archive marker. A failed check raises
:class:`~slug_pl.data.shards.ShardError` naming the shard: the shard changed after it was indexed
(the set would no longer be the one counted), or its index file is wrong.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping

from slug_pl.data.limits import DEFAULT_RULES, InputRules
from slug_pl.data.shard_index import BLOCK, IndexStore, ShardIndex
from slug_pl.data.shards import RawSample, ShardError, read_window, unreadable_shard_message


class IndexedReader:
    """Samples of indexed shards by ``(shard, number in the shard)``, tar order counted from 0.

    ``expected``: the number of samples each shard held when the set was counted (a shard whose
    index now counts otherwise changed since: :class:`ShardError`). At most ``keep`` shards are
    held open at a time (their descriptors and indexes; the authors' shuffled retain batches
    draw from the few shards their 5000-sample buffer spans). Use as a context manager, or
    :meth:`close` it.
    """

    def __init__(self, store: IndexStore, rules: InputRules = DEFAULT_RULES,
                 expected: Mapping[str, int] | None = None, keep: int = 8):
        self.store, self.rules, self.expected, self.keep = store, rules, dict(expected or {}), keep
        self._open: OrderedDict[str, tuple[int, ShardIndex]] = OrderedDict()

    def __enter__(self) -> IndexedReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        while self._open:
            fd, _ = self._open.popitem()[1]
            os.close(fd)

    def index_of(self, url: str) -> ShardIndex:
        """The index of shard ``url`` (loaded, or built, when the shard is first read)."""
        return self._shard(url)[1]

    def sample(self, url: str, i: int, fields: frozenset[str] | None = None) -> RawSample:
        """Sample ``i`` of shard ``url``, undecoded; with ``fields``, only those fields' bytes are
        read (e.g. ``frozenset({"txt"})`` for the caption alone)."""
        fd, index = self._shard(url)
        if not 0 <= i < len(index):
            raise IndexError(f"sample {i} of {url}, which holds {len(index)}")
        start, stop = index.window(i)
        if i == 0 and start > 0 and read_window(url, fd, 0, start, self.rules, frozenset()):
            self._mismatch(url, f"samples before byte {start}, where its index puts the first")
        found = read_window(url, fd, start, stop, self.rules, fields)
        if [s.key for s in found] != [index.keys[i]]:
            self._mismatch(url, f"bytes {start}-{stop} hold the samples {[s.key for s in found]}, its index "
                                f"names {index.keys[i]!r} there")
        if i == len(index) - 1:
            marker = os.pread(fd, BLOCK, index.end)
            if len(marker) < BLOCK or marker.count(0) != BLOCK:
                self._mismatch(url, f"no end-of-archive marker at byte {index.end}, after its last sample")
        return found[0]

    def _shard(self, url: str) -> tuple[int, ShardIndex]:
        if url in self._open:
            self._open.move_to_end(url)
            return self._open[url]
        index = self.store.index(url)
        if index is None:
            raise ShardError(f"shard {url} can no longer be read by its index (it changed into a compressed "
                             f"file?): the set changed while reading")
        if url in self.expected and len(index) != self.expected[url]:
            raise ShardError(f"shard {url} now holds {len(index)} samples, {self.expected[url]} when the set was "
                             f"counted: the shards changed while reading")
        try:
            fd = os.open(url, os.O_RDONLY)
        except OSError as err:
            raise ShardError(unreadable_shard_message(url, err)) from err
        self._open[url] = (fd, index)
        while len(self._open) > self.keep:
            os.close(self._open.popitem(last=False)[1][0])
        return fd, index

    @staticmethod
    def _mismatch(url: str, what: str) -> None:
        raise ShardError(f"shard {url}: {what}; the shard changed after it was indexed, or its index file is "
                         f"wrong: run again (a changed shard is indexed anew) or delete its index")
