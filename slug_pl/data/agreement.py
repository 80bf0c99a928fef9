"""Data errors the ranks agree on: one rank's bad sample stops every rank, with its message.

Under DDP each rank reads and decodes only its own samples (:mod:`slug_pl.data.pairs`), so a bad
sample under ``data.bad_samples: stop``, or a shard that changed while reading, is seen by one
rank alone. Were that rank to raise by itself, the others would go on to the pass's next
collective call (the retain loss's gather, the reduction at the end of the pass) and learn of it
only there, from the transport: with gloo as an error about a connection closed by the peer,
printed after the message that matters; with NCCL perhaps only at the process-group timeout.

:class:`AgreedBatches` wraps each rank's data loader. After every fetch, the ranks tell each other
whether their fetch failed with a :class:`~slug_pl.data.shards.ShardError`: one all_gather of one
integer per rank, over a gloo group on the CPU (no GPU synchronisation; its cost is measured in
``benchmarks/results/data_path_scaling.md``). When one did, the ranks exchange the errors and
every rank raises the same one: the bad sample with the lowest stream position (the first in
the batch), else the error of the lowest rank. Every rank thus stops at the same batch, and the
last line on every rank's error output is the one that names the shard and the sample key.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist

from slug_pl.data.shards import BadSampleError, ShardError


class AgreedBatches:
    """The batches of ``loader`` (this rank's data loader), fetched in step with the other ranks:
    a :class:`ShardError` on any rank is raised on every rank (see the module docstring). Every
    rank's loader must yield the same number of batches; call only with ``torch.distributed``
    initialised."""

    def __init__(self, loader: Iterable):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
        world = dist.get_world_size()
        batches = iter(self.loader)
        while True:
            try:
                batch, error = next(batches), None
            except StopIteration:
                return  # every rank has as many batches: all end here together
            except ShardError as err:
                batch, error = None, err
            flags = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
            dist.all_gather(flags, torch.tensor([int(error is not None)]), group=group)
            if any(int(flag) for flag in flags):
                raise agreed_error(error, world, group)
            yield batch


def agreed_error(error: ShardError | None, world: int, group=None) -> ShardError:
    """The error every rank raises, given this rank's (None if its fetch succeeded): the errors of
    all ranks are gathered, and the bad sample with the lowest stream position is chosen, else the
    lowest rank's error. A collective call: every rank of ``group`` must make it."""
    gathered: list[ShardError | None] = [None] * world
    dist.all_gather_object(gathered, error, group=group)
    return first_error([e for e in gathered if e is not None])


def first_error(errors: list[ShardError]) -> ShardError:
    """Of errors listed by rank, the bad sample with the lowest stream position, else the first."""
    placed = [e for e in errors if isinstance(e, BadSampleError) and e.index is not None]
    return min(placed, key=lambda e: e.index) if placed else errors[0]
