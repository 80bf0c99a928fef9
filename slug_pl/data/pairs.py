"""Image–caption pair streams for the gradient pass, exact under DDP and data-loader workers.

The gradient pass needs *exact* averages (DESIGN.md §1): every sample counted once, and, for the
contrastive retain loss, every global batch holding the same samples whatever the number of
devices. So the stream is defined on global sample indices, not on shards:

- samples are numbered 0..N-1 in shard order (shards as listed, samples in tar order);
- global batch k holds samples [k·B, min((k+1)·B, N)) for the global batch size B;
- within batch k, sample at position j goes to rank j mod W (W = world size);
- every rank yields exactly ceil(N / B) local batches, padded to ceil(B_k / W) rows with
  ``valid = False`` rows so that feature gathering sees equal shapes on every rank;
- data-loader worker w (of n) produces the batches k ≡ w (mod n); PyTorch's round-robin over
  iterable-dataset workers then delivers batches in order k = 0, 1, 2, …

Each rank and worker reads the full tar stream but decodes only its own samples; uneven shard
counts are therefore harmless.
"""

from __future__ import annotations

import math
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import IterableDataset, get_worker_info

from slug_pl.data.shards import ShardError, decode_image, iter_raw_samples


def count_samples(urls: Sequence[str]) -> int:
    """Number of samples (distinct keys) in local shards, from tar headers only."""
    total = 0
    for url in urls:
        try:
            with tarfile.open(url, "r:*") as tar:
                keys = set()
                for member in tar:
                    if not member.isfile():
                        continue
                    base = member.name.rsplit("/", 1)[-1]
                    prefix = member.name[: len(member.name) - len(base)]
                    keys.add(prefix + base.split(".", 1)[0])
                total += len(keys)
        except (OSError, tarfile.TarError) as err:
            raise ShardError(f"cannot read shard {url}: {type(err).__name__}: {err}") from err
    return total


@dataclass(frozen=True)
class PairSet:
    """One named pair set of the pass: ``name`` is ``"forget"`` or ``"retain"``."""

    name: str
    urls: tuple[str, ...]
    global_batch_size: int
    num_samples: int

    @property
    def num_batches(self) -> int:
        return math.ceil(self.num_samples / self.global_batch_size)


class PairBatches(IterableDataset):
    """Local batches of one or more pair sets, in sequence (forget first, then retain).

    Each item is a dict: ``set`` (name), ``batch_index`` (global batch k within its set),
    ``last`` (whether k is the set's last batch), ``images`` float ``(b, 3, H, W)``, ``tokens`` long ``(b, L)``, ``valid`` bool ``(b,)``.
    """

    def __init__(
        self,
        sets: Sequence[PairSet],
        image_transform: Callable,
        tokenize: Callable[[list[str]], torch.Tensor],
        rank: int = 0,
        world_size: int = 1,
    ):
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.sets = list(sets)
        self.image_transform = image_transform
        self.tokenize = tokenize
        self.rank = rank
        self.world_size = world_size

    def __len__(self) -> int:
        return sum(s.num_batches for s in self.sets)

    def _local_positions(self, batch_size: int) -> list[int]:
        return list(range(self.rank, batch_size, self.world_size))

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        offset = 0  # batch counter across sets, for worker assignment
        for pair_set in self.sets:
            yield from self._iter_set(pair_set, offset, worker, num_workers)
            offset += pair_set.num_batches

    def _iter_set(self, pair_set: PairSet, offset: int, worker: int, num_workers: int):
        B, N = pair_set.global_batch_size, pair_set.num_samples
        samples = iter_raw_samples(pair_set.urls)
        seen = 0
        for k in range(pair_set.num_batches):
            size_k = min(B, N - k * B)
            mine = (offset + k) % num_workers == worker
            positions = set(self._local_positions(size_k)) if mine else set()
            chosen = []
            for j in range(size_k):
                try:
                    sample = next(samples)
                except StopIteration:
                    raise ShardError(
                        f"{pair_set.name} set ended after {seen} samples, expected {N}: "
                        f"the shards changed while reading ({', '.join(pair_set.urls)})"
                    ) from None
                seen += 1
                if j in positions:
                    if sample.caption is None:
                        raise ShardError(
                            f"sample {sample.key!r} in {sample.shard} has no caption ('txt')"
                        )
                    chosen.append(sample)
            if mine:
                batch = self._collate(pair_set.name, k, chosen, math.ceil(size_k / self.world_size))
                batch["last"] = k == pair_set.num_batches - 1
                yield batch

    def _collate(self, name: str, k: int, samples: list, rows: int) -> dict:
        images = [self.image_transform(decode_image(s)) for s in samples]
        captions = [s.caption for s in samples]
        valid = torch.zeros(rows, dtype=torch.bool)
        valid[: len(samples)] = True
        pad = rows - len(samples)
        if pad:  # padding rows repeat a real sample (or zeros) and are masked out by ``valid``
            template = images[0] if images else None
            if template is None:
                shape = self._image_shape()
                template = torch.zeros(shape)
            images += [torch.zeros_like(template)] * pad
            captions += [""] * pad
        return {
            "set": name,
            "batch_index": k,
            "images": torch.stack(images),
            "tokens": self.tokenize(captions),
            "valid": valid,
        }

    def _image_shape(self) -> tuple[int, ...]:
        """Shape of a transformed image, from any sample of any set (for an all-padding batch)."""
        for pair_set in self.sets:
            for sample in iter_raw_samples(pair_set.urls):
                return tuple(self.image_transform(decode_image(sample)).shape)
        raise ShardError("no samples to infer the image shape from")
