"""The processes that share one evaluation, and the two ways their parts are combined.

An evaluation set of N rows (images, or prompts) is split across the W ranks of a group by
stride: rank r scores rows ``r, r + W, r + 2W, ...`` (:meth:`EvalGroup.part`). Two combinations
then give every rank what one process would have:

- :meth:`EvalGroup.gather_parts`: every rank's rows put back in the set's order (the prompt
  features, from which each class embedding is the mean over its templates);
- :meth:`EvalGroup.sum`: counts summed (the hits and images per class of
  :class:`~slug_pl.evaluation.metrics.ZeroShotAccuracy`, and how many ranks saw non-finite
  outputs), all of one evaluation in one call.

A single process is the group of one (``EvalGroup()``): every part is the whole set and every
combination is the identity, with no call to ``torch.distributed``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class EvalGroup:
    """Rank ``rank`` of ``world`` processes sharing each evaluation (the default process group)."""

    rank: int = 0
    world: int = 1

    def __post_init__(self):
        if not (self.world >= 1 and 0 <= self.rank < self.world):
            raise ValueError(f"an evaluation group needs 0 <= rank < world, got rank {self.rank} of {self.world}")

    @classmethod
    def of_default_process_group(cls) -> EvalGroup:
        """Every process of the initialised default process group (one process when there is none)."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def alone(self) -> bool:
        return self.world == 1

    def part(self, n: int) -> slice:
        """The rows of an ``n``-row set this rank scores: ``rank::world`` (a view when sliced)."""
        return slice(self.rank, n, self.world)

    def part_size(self, n: int, rank: int | None = None) -> int:
        """How many of ``n`` rows rank ``rank`` (default: this one) scores."""
        r = self.rank if rank is None else rank
        return max(0, (n - r + self.world - 1) // self.world)

    def gather_parts(self, local: torch.Tensor, n: int) -> torch.Tensor:
        """The ``(n, ...)`` tensor whose rows ``r::world`` are rank r's ``local`` rows (every rank
        passes its own part, ``part_size(n)`` rows, on the device its backend reduces on)."""
        if self.alone:
            return local
        if local.shape[0] != self.part_size(n):
            raise ValueError(f"rank {self.rank} holds {local.shape[0]} rows of {n}; its part is {self.part_size(n)}")
        rows = self.part_size(n, 0)  # the largest part: every part is padded to it
        padded = local.new_zeros((rows, *local.shape[1:]))
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        out = local.new_empty((n, *local.shape[1:]))
        for r, part in enumerate(parts):
            out[r :: self.world] = part[: self.part_size(n, r)]
        return out

    def sum(self, counts: torch.Tensor) -> torch.Tensor:
        """``counts`` summed over the ranks (every rank gets the total; one all-reduce)."""
        if self.alone:
            return counts
        total = counts.clone()
        dist.all_reduce(total)
        return total
