"""Image–caption pair streams for the gradient pass, exact under DDP and data-loader workers.

The gradient pass needs *exact* averages (docs/design.md §1): every sample counted once, and, for the
contrastive retain loss, every global batch holding the same samples whatever the number of
devices. So the stream is defined on global sample indices, not on shards:

- samples are numbered 0..N-1 in shard order (shards as listed, samples in tar order);
- global batch k holds samples [k·B, min((k+1)·B, N)) for the global batch size B;
- within batch k, sample at position j goes to rank j mod W (W = world size);
- every rank yields exactly ceil(N / B) local batches, padded to ceil(B_k / W) rows with
  ``valid = False`` rows so that feature gathering sees equal shapes on every rank;
- data-loader worker w (of n) produces the batches k ≡ w (mod n) (counted from ``start_batch``);
  PyTorch's round-robin over iterable-dataset workers then delivers batches in order.

**Reading.** Every reader (a rank, or one of its data-loader workers) reads only the samples it
decodes, when the set has shard indexes (``PairSet.index``, :mod:`slug_pl.data.shard_index`): the
stream above is then a stream of *references* ``(shard, number in the shard)``, which costs no
reading, and a reader reads the bytes of its own samples alone (:mod:`slug_pl.data.indexed_reader`).
Over all ranks and workers each sample is read once. A set with a shard that has no index (a
compressed shard, a ``pipe:`` or URL spec) is streamed whole by every reader instead, each
decoding only its own samples. Both give the same batches; uneven shard counts are harmless.

**Bad samples** (``bad_samples``): a sample without an image or a caption, one above a limit of
:class:`~slug_pl.data.limits.InputRules` (member bytes, caption characters, image pixels), or
one whose image does not decode, either stops the pass (``"stop"``, the default: :class:`BadSampleError` naming shard
and key) or is *skipped* (``"skip"``). A skipped sample keeps its global index and its place in
its batch but becomes a padding row (``valid = False``): batch boundaries, and so the retain
loss's global batches, stay those of the full stream, every rank agrees on the batches, and the
counts (the sums of ``valid`` over all ranks, reduced once at the end of the pass) are exact.
Each skipped sample is reported once, by the rank that owns its position, in the batch's
``skipped`` list (dicts ``set``, ``index``, ``shard``, ``key``, ``reason``). Under ``"stop"`` a
bad sample is seen by the rank that reads it (the :class:`BadSampleError` carries its ``index``);
:mod:`slug_pl.data.agreement` makes every rank stop with that error at the same batch.

**Excluded samples** (``PairSet.exclude``, e.g. ``data.retain_exclude_concepts``): samples whose
caption matches are left out *before* numbering, by every rank and worker alike (with indexes, the
excluded samples' numbers are in ``PairSet.excluded``, found once from the caption members alone:
:func:`excluded_samples`), so the set is exactly the other samples: batches, counts and gradients
equal those of shards that never held them.

**The authors' retain batches** (``PairSet.sampling``, :mod:`slug_pl.data.reference_batches`):
the set's samples are streamed shuffled, in full batches (the partial one dropped, the epoch
topped up from a second pass) and augmented, as the authors' code does, seeded; positions then
count batch slots of that stream instead of samples, and everything above holds for them.

**Resuming** (``start_batch``): the stream starts at global batch position ``start_batch``
(counted across the sets, forget batches first). Earlier samples are passed over undecoded; whole
shards before the start are not even opened when the set knows its shard sizes.
"""

from __future__ import annotations

import io
import itertools
import math
import os
import re
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import IterableDataset, get_worker_info

from slug_pl.data.indexed_reader import IndexedReader
from slug_pl.data.limits import DEFAULT_RULES, InputRules
from slug_pl.data.reference_batches import AuthorsBatches
from slug_pl.data.shard_index import IndexStore
from slug_pl.data.shards import (
    CAPTION_KEY,
    BadSampleError,
    RawSample,
    ShardError,
    bad_sample_error,
    decode_image,
    iter_raw_samples,
    member_key,
    unreadable_shard_message,
    unusable,
)

BAD_SAMPLE_POLICIES = ("stop", "skip")
#: A reference to one sample: ``(shard, number of the sample in the shard, in tar order)``.
SampleRef = tuple[str, int]


def shard_sample_counts(urls: Sequence[str]) -> list[int]:
    """Number of samples (distinct keys) of each local shard, from tar headers only.

    Raises :class:`ShardError` naming the shard if it cannot be read, is not a tar archive, or ends
    without the tar end-of-archive marker (a copy or download cut off at a file boundary, which
    tar readers otherwise accept silently as a shorter archive).
    """
    return [_count_shard(url) for url in urls]


def count_samples(urls: Sequence[str]) -> int:
    """Number of samples (distinct keys) in local shards, from tar headers only."""
    return sum(shard_sample_counts(urls))


def _count_shard(url: str) -> int:
    try:
        with tarfile.open(url, "r:*") as tar:
            keys = set()
            for member in tar:
                found = member_key(url, member)  # refuses a member name that leaves the shard
                if found is not None:
                    keys.add(found[0])
            plain = isinstance(tar.fileobj, io.BufferedReader)  # not compressed: offsets are bytes
            if plain and keys and tar.offset >= os.path.getsize(url):
                raise tarfile.ReadError(f"no end-of-archive marker after {len(keys)} samples: truncated")
    except (OSError, tarfile.TarError) as err:
        raise ShardError(unreadable_shard_message(url, err)) from err
    return len(keys)


def kept_sample_counts(urls: Sequence[str], exclude: re.Pattern, rules: InputRules = DEFAULT_RULES) -> list[int]:
    """Samples of each shard whose caption does not match ``exclude`` (samples without a caption
    are kept: they are bad samples, reported by the stream)."""
    return [sum(1 for sample in iter_raw_samples([url], rules) if not _excluded(sample, exclude))
            for url in urls]


def excluded_samples(url: str, store: IndexStore, exclude: re.Pattern,
                     rules: InputRules = DEFAULT_RULES) -> tuple[int, ...]:
    """The numbers (tar order) of the samples of the indexed shard ``url`` whose caption matches
    ``exclude``, found as :func:`kept_sample_counts` finds them but reading only caption members."""
    with IndexedReader(store, rules) as reader:
        return tuple(i for i in range(len(reader.index_of(url)))
                     if _excluded(reader.sample(url, i, frozenset({CAPTION_KEY})), exclude))


def _excluded(sample: RawSample, exclude: re.Pattern | None) -> bool:
    return exclude is not None and sample.caption is not None and exclude.search(sample.caption) is not None


@dataclass(frozen=True)
class PairSet:
    """One named pair set of the pass: ``name`` is ``"forget"`` or ``"retain"``.

    ``shard_sizes`` (samples per shard, optional) lets a resumed stream pass over whole shards.
    ``exclude``: samples whose caption matches it are not part of the set (e.g. retain pairs
    naming a forgotten concept); the set is the shards' other samples, numbered 0..N-1 in shard
    order, so batches, ranks and counts work as for a set without them. ``num_samples`` and
    ``shard_sizes`` then count the kept samples (:func:`kept_sample_counts`). ``sampling``: the
    authors' batches of these samples (None: each sample once, in order, the last batch partial).

    ``index``: where the shards' indexes are kept; with it, each reader reads only the samples it
    decodes, and ``shard_sizes`` is required, and with ``exclude`` also ``excluded``: per shard,
    the numbers (tar order) of its samples left out (:func:`excluded_samples`). None: every reader
    streams every shard.
    """

    name: str
    urls: tuple[str, ...]
    global_batch_size: int
    num_samples: int
    shard_sizes: tuple[int, ...] = ()
    exclude: re.Pattern | None = None
    sampling: AuthorsBatches | None = None
    excluded: tuple[tuple[int, ...], ...] = ()
    index: IndexStore | None = None

    def __post_init__(self):
        if self.index is not None and (len(self.shard_sizes) != len(self.urls) or (
                self.exclude is not None and len(self.excluded) != len(self.urls))):
            raise ValueError(f"the indexed {self.name} set needs the sample counts (and, leaving samples "
                             f"out, the excluded samples) of each of its {len(self.urls)} shards")

    def shard_samples(self) -> dict[str, int]:
        """Samples of each shard before any were left out (what its index counts)."""
        excluded = self.excluded or ((),) * len(self.urls)
        return {url: kept + len(out) for url, kept, out in zip(self.urls, self.shard_sizes, excluded)}

    def refs(self, urls: Sequence[str]) -> Iterator[SampleRef]:
        """References to the set's samples in the shards ``urls`` (some of the set's), in order:
        what an indexed stream numbers."""
        excluded = dict(zip(self.urls, self.excluded)) if self.excluded else {}
        totals = self.shard_samples()
        for url in urls:
            out = frozenset(excluded.get(url, ()))
            yield from ((url, i) for i in range(totals[url]) if i not in out)

    @property
    def num_positions(self) -> int:
        """Batch slots of the stream: the samples, or the authors' full batches' slots."""
        if self.sampling is None:
            return self.num_samples
        return self.sampling.positions(self.num_samples, self.global_batch_size)

    @property
    def num_batches(self) -> int:
        return math.ceil(self.num_positions / self.global_batch_size)


class PairBatches(IterableDataset):
    """Local batches of one or more pair sets, in sequence (forget first, then retain).

    Each item is a dict: ``set`` (name), ``batch_index`` (global batch k within its set),
    ``last`` (whether k is the set's last batch), ``images`` float ``(b, 3, H, W)``, ``tokens``
    long ``(b, L)``, ``valid`` bool ``(b,)``, ``skipped`` (this rank's skipped samples of the
    batch, see the module docstring). ``train_transform``: the images' transform in sets whose
    ``sampling`` is ``augmented`` (the authors' training augmentation).
    """

    def __init__(
        self,
        sets: Sequence[PairSet],
        image_transform: Callable,
        tokenize: Callable[[list[str]], torch.Tensor],
        rank: int = 0,
        world_size: int = 1,
        start_batch: int = 0,
        bad_samples: str = "stop",
        rules: InputRules = DEFAULT_RULES,
        train_transform: Callable | None = None,
    ):
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if bad_samples not in BAD_SAMPLE_POLICIES:
            raise ValueError(f"bad_samples must be one of {BAD_SAMPLE_POLICIES}, got {bad_samples!r}")
        self.sets = list(sets)
        total = sum(s.num_batches for s in self.sets)
        if not 0 <= start_batch <= total:
            raise ValueError(f"start_batch {start_batch} outside the {total} batches of the stream")
        self.image_transform = image_transform
        self.train_transform = train_transform
        self.tokenize = tokenize
        self.rank = rank
        self.world_size = world_size
        self.start_batch = start_batch
        self.bad_samples = bad_samples
        self.rules = rules
        self._shape: tuple[int, ...] | None = None

    def __len__(self) -> int:
        return sum(s.num_batches for s in self.sets) - self.start_batch

    def _local_positions(self, batch_size: int) -> list[int]:
        return list(range(self.rank, batch_size, self.world_size))

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        offset = 0  # batch position of the set's first batch, across sets
        for pair_set in self.sets:
            first = max(self.start_batch - offset, 0)
            if first < pair_set.num_batches:
                yield from self._iter_set(pair_set, offset, first, worker, num_workers)
            offset += pair_set.num_batches

    def _iter_set(self, pair_set: PairSet, offset: int, first: int, worker: int, num_workers: int):
        if pair_set.index is None:
            yield from self._iter_streamed(pair_set, offset, first, worker, num_workers)
        else:
            yield from self._iter_indexed(pair_set, offset, first, worker, num_workers)

    def _iter_streamed(self, pair_set: PairSet, offset: int, first: int, worker: int, num_workers: int):
        """The set's batches, every sample read from the tar stream, only this rank's decoded."""
        B, N = pair_set.global_batch_size, pair_set.num_positions
        samples = self._stream_from(pair_set, first * B, lambda urls: self._read(urls, pair_set.exclude))
        for k in range(first, pair_set.num_batches):
            size_k = min(B, N - k * B)
            mine = (offset + k - self.start_batch) % num_workers == worker
            batch = [self._next_sample(samples, pair_set, k * B + j) for j in range(size_k)]
            if not mine:
                continue
            if self.bad_samples == "stop":  # this rank sees the whole batch: the first bad sample stops it
                for j, sample in enumerate(batch):
                    if (reason := unusable(sample)) is not None:
                        raise bad_sample_error(sample, reason, k * B + j)
            own = [(k * B + j, batch[j]) for j in self._local_positions(size_k)]
            out = self._collate(pair_set, k, own, math.ceil(size_k / self.world_size))
            out["last"] = k == pair_set.num_batches - 1
            yield out

    def _iter_indexed(self, pair_set: PairSet, offset: int, first: int, worker: int, num_workers: int):
        """The set's batches from a stream of references: only this rank's samples are read."""
        B, N = pair_set.global_batch_size, pair_set.num_positions
        refs = self._stream_from(pair_set, first * B, pair_set.refs)
        with IndexedReader(pair_set.index, self.rules, pair_set.shard_samples()) as reader:
            for k in range(first, pair_set.num_batches):
                size_k = min(B, N - k * B)
                batch = [self._next_sample(refs, pair_set, k * B + j) for j in range(size_k)]
                if (offset + k - self.start_batch) % num_workers != worker:
                    continue
                own = [(k * B + j, reader.sample(*batch[j])) for j in self._local_positions(size_k)]
                out = self._collate(pair_set, k, own, math.ceil(size_k / self.world_size))
                out["last"] = k == pair_set.num_batches - 1
                yield out

    def _stream_from(self, pair_set: PairSet, start: int, read: Callable[[Sequence[str]], Iterator]) -> Iterator:
        """The set's stream from position ``start`` on: the items ``read(urls)`` gives for the shards
        in order (raw samples, or references), in the authors' order with ``sampling``."""
        if pair_set.sampling is not None:
            return pair_set.sampling.samples(pair_set.urls, read, pair_set.num_samples, pair_set.global_batch_size,
                                             start)
        first_shard, skip = 0, start
        if len(pair_set.shard_sizes) == len(pair_set.urls):  # pass over whole shards unopened
            while first_shard < len(pair_set.urls) and skip >= pair_set.shard_sizes[first_shard]:
                skip -= pair_set.shard_sizes[first_shard]
                first_shard += 1
        return itertools.islice(read(pair_set.urls[first_shard:]), skip, None)

    def _read(self, urls: Sequence[str], exclude: re.Pattern | None) -> Iterator[RawSample]:
        """The raw samples of ``urls`` in order, read under the input rules, less the excluded."""
        samples = iter_raw_samples(urls, self.rules)
        if exclude is not None:  # every rank and worker leaves out the same samples
            samples = (s for s in samples if not _excluded(s, exclude))
        return samples

    @staticmethod
    def _next_sample(samples: Iterator, pair_set: PairSet, index: int):
        try:
            return next(samples)
        except StopIteration:
            raise ShardError(
                f"{pair_set.name} set ended after {index} samples, expected {pair_set.num_samples}: "
                f"the shards changed while reading ({', '.join(pair_set.urls)})"
            ) from None

    def _load(self, pair_set: PairSet, index: int, sample: RawSample) -> tuple[torch.Tensor, str] | dict:
        """The transformed image and caption of a sample, or (policy ``skip``) its skip record
        (``set``, ``index``: global sample index in the set — its stream position with the
        authors' ``sampling`` —, ``shard``, ``key``, ``reason``)."""
        reason, cause = unusable(sample), None
        if reason is None:
            try:
                image = decode_image(sample, self.rules)
                image = (pair_set.sampling.augment(self.train_transform, image, index)
                         if pair_set.sampling is not None and pair_set.sampling.augmented else self.image_transform(image))
            except BadSampleError as err:
                reason, cause = err.reason, err
        if reason is None:
            self._shape = tuple(image.shape)
            return image, sample.caption
        if self.bad_samples == "stop":
            raise bad_sample_error(sample, reason, index) from cause
        return {"set": pair_set.name, "index": index, "shard": sample.shard, "key": sample.key, "reason": reason}

    def _collate(self, pair_set: PairSet, k: int, samples: list[tuple[int, RawSample]], rows: int) -> dict:
        loaded = [self._load(pair_set, index, sample) for index, sample in samples]
        good = [x for x in loaded if isinstance(x, tuple)]
        images = [image for image, _ in good]
        captions = [caption for _, caption in good]
        valid = torch.zeros(rows, dtype=torch.bool)
        valid[: len(good)] = True
        pad = rows - len(good)
        if pad:  # padding rows are zeros and masked out by ``valid``
            template = images[0] if images else torch.zeros(self._image_shape())
            images += [torch.zeros_like(template)] * pad
            captions += [""] * pad
        return {
            "set": pair_set.name,
            "batch_index": k,
            "images": torch.stack(images),
            "tokens": self.tokenize(captions),
            "valid": valid,
            "skipped": [x for x in loaded if isinstance(x, dict)],
        }

    def _image_shape(self) -> tuple[int, ...]:
        """Shape of a transformed image (for an all-padding batch): of the last image this stream
        transformed, else of the first image of any set that decodes."""
        if self._shape is None:
            for pair_set in self.sets:
                for sample in iter_raw_samples(pair_set.urls, self.rules):
                    try:
                        self._shape = tuple(self.image_transform(decode_image(sample, self.rules)).shape)
                        return self._shape
                    except BadSampleError:
                        continue
            raise ShardError(f"no image decodes in {[u for s in self.sets for u in s.urls]}")
        return self._shape
