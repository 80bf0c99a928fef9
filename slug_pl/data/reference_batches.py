"""The authors' retain batches, seeded: ``data.retain_batches: reference`` (docs/reference.md).

The authors' code (CSIPlab/SLUG) reads the retain shards as open_clip's trainer reads a training
set (``src/clip/training/data.py``, ``get_wds_dataset(is_train=True)``; the gradient pass is
``src/clip/unlearn/calc_grad.py``). On one process, one data-loader worker:

1. the shard list is shuffled: a buffered shuffle (:func:`buffered_shuffle`, buffer 2000, first
   pick once 500 are held) drawing from ``random.Random(seed + epoch)``, their ``--seed`` 0 and
   epoch 0;
2. the samples of the shards, in that order, pass through a buffered shuffle of buffer 5000,
   first pick once 1000 are held (webdataset's ``shuffle``, *unseeded* there: a new order in
   every run and every pass);
3. every image gets open_clip's training augmentation (a random resized crop of area scale
   0.9–1, bicubic) instead of the evaluation transform;
4. consecutive samples form batches of B and a partial last batch is dropped;
5. an epoch is ceil(N / B) batches: when N is not a multiple of B the pipeline starts over (a
   second pass, shuffled anew) and the missing batch is the first B samples of that pass.

:class:`AuthorsBatches` is that stream as a pure function of ``seed``: the shard shuffle is
theirs exactly (``random.Random(seed)``, their order at seed 0); the sample shuffle of pass p
draws from ``random.Random(derived_seed(seed, "samples", p))`` and the crop of stream position q
from ``torch.manual_seed(derived_seed(seed, "crop", q))``. Every rank and data-loader worker
computes the same stream, so the global batches, and the gradient, are the same on any number of
devices (the authors' own multi-GPU run splits the shards between nodes instead, and its result
depends on the device count; reproduced here is their one-process run, as their scripts launch it).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

T = TypeVar("T")

#: The authors' shuffle buffers (open_clip's ``_SHARD_SHUFFLE_*`` and ``_SAMPLE_SHUFFLE_*``):
#: (buffer size, items held before the first pick).
SHARD_SHUFFLE = (2000, 500)
SAMPLE_SHUFFLE = (5000, 1000)
#: The training augmentation the authors' retain images get (open_clip's default ``aug_cfg``).
AUGMENTATION = "open_clip training transform: RandomResizedCrop to the image size, area scale 0.9-1, bicubic"


def buffered_shuffle(items: Iterable[T], bufsize: int, initial: int, rng: random.Random) -> Iterator[T]:
    """A streaming shuffle through a buffer (the algorithm of webdataset's ``shuffle``).

    Items enter the buffer two at a time while it holds fewer than ``bufsize`` (one at a time once
    full); once it holds at least ``initial``, every item read is followed by one pick; at the end
    the buffer is emptied by picks. A pick takes the item at ``rng.randint(0, len - 1)`` and moves
    the buffer's last item into its place. Items far apart in the input stay apart: with N above
    ``bufsize`` the order is only shuffled locally.
    """
    initial = min(initial, bufsize)
    source = iter(items)
    buf: list[T] = []

    def pick() -> T:
        k = rng.randint(0, len(buf) - 1)
        item, buf[k] = buf[k], buf[-1]
        buf.pop()
        return item

    for item in source:
        buf.append(item)
        if len(buf) < bufsize:
            buf.extend(itertools.islice(source, 1))
        if len(buf) >= initial:
            yield pick()
    while buf:
        yield pick()


def derived_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed from ``seed`` and labels (SHA-256 of their text): the same in every process."""
    text = "/".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


@dataclass(frozen=True)
class AuthorsBatches:
    """The retain stream of the authors' code, seeded (see the module docstring).

    Positions are batch slots: batch k holds positions [k·B, (k+1)·B). With ``full_batches``
    there are ceil(N / B) · B of them, all in full batches, and a sample may fill two positions
    (pass one and the top-up from pass two); without, N (each sample once, the last batch partial).

    ``shuffle``, ``full_batches`` and ``augmented`` are the three parts of the authors' batching,
    each of which can be taken alone (``data.retain_batches: reference`` takes all three; the
    departures benchmark measures each): steps 1–2, steps 4–5 and step 3 of the module docstring.
    """

    seed: int = 0
    shuffle: bool = True
    full_batches: bool = True
    augmented: bool = True

    def __post_init__(self):
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"data.retain_seed must be a non-negative integer, got {self.seed!r}")

    def positions(self, num_samples: int, batch_size: int) -> int:
        """Batch slots of the stream: ceil(N / B) full batches (N without ``full_batches``).
        Raises ValueError when B > N (the authors' pipeline then yields no batch at all)."""
        if not self.full_batches:
            return num_samples
        if batch_size > num_samples:
            raise ValueError(
                f"data.retain_batches: reference drops a partial batch, and the retain set has {num_samples} "
                f"samples, fewer than data.retain_batch_size {batch_size}: it would give no batch; lower "
                f"data.retain_batch_size"
            )
        return math.ceil(num_samples / batch_size) * batch_size

    def shard_order(self, urls: Sequence[str]) -> list[str]:
        """The shards in the order the authors' pipeline reads them (theirs exactly at the same seed;
        as given without ``shuffle``)."""
        if not self.shuffle:
            return list(urls)
        return list(buffered_shuffle(urls, *SHARD_SHUFFLE, random.Random(self.seed)))

    def samples(self, urls: Sequence[str], read: Callable[[Sequence[str]], Iterator[T]],
                num_samples: int, batch_size: int, start: int = 0) -> Iterator[T]:
        """The samples at positions ``start``, ``start + 1``, …; ``read(urls)`` streams the set's
        samples of those shards in order, as undecoded samples or as references to them (the
        shuffles draw the same numbers whatever the items are, so references give the order of
        the samples without reading them)."""
        shards = self.shard_order(urls)

        def one_pass(p: int) -> Iterator[T]:
            if not self.shuffle:
                return read(shards)
            return buffered_shuffle(read(shards), *SAMPLE_SHUFFLE, random.Random(derived_seed(self.seed, "samples", p)))

        if not self.full_batches:
            return itertools.islice(one_pass(0), start, None)
        full = num_samples // batch_size * batch_size  # pass one, its partial batch dropped
        top_up = self.positions(num_samples, batch_size) - full  # 0 or one batch from pass two
        stream = itertools.chain(itertools.islice(one_pass(0), full), itertools.islice(one_pass(1), top_up))
        return itertools.islice(stream, start, None)

    def augment(self, transform: Callable, image, position: int) -> torch.Tensor:
        """``transform(image)`` with torch's CPU generator seeded for this position (restored after)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derived_seed(self.seed, "crop", position))
            return transform(image)

    def describe(self) -> dict[str, object]:
        """What the gradient files record (JSON types)."""
        out: dict[str, object] = {"policy": "reference", "seed": self.seed}
        if self.shuffle:
            out |= {"shard_shuffle": list(SHARD_SHUFFLE), "sample_shuffle": list(SAMPLE_SHUFFLE)}
        if self.full_batches:
            out["partial_batch"] = "dropped; the epoch topped up from a second pass"
        if self.augmented:
            out["augmentation"] = AUGMENTATION
        return out
