"""What every demo trainer does the same way: one CPU thread, linear warmup then cosine decay, the
optimizer step, and the epoch loop over a seeded permutation.

The demo models are pinned bit for bit (their metrics are in the docs and the tests): the pieces
here are exactly the loops the builders ran before they shared them, in the same order of random
draws and of operations. A builder that draws something more per epoch or per step (the captions
of :func:`~slug_pl.demo.hf_clip.fit_hf_clip`, the shifts of :func:`~slug_pl.demo.train.train_demo_clip`)
does it in the callbacks, where the loop leaves room for it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread inside the block (restored after): deterministic, and on shared cores far
    faster than two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def warmup_cosine(optimizer: torch.optim.Optimizer, total: int, warmup: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over ``warmup`` steps, then cosine decay to 0 at ``total`` (stepped once per
    optimizer step)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup
        else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))))


def descend(loss: torch.Tensor, optimizer: torch.optim.Optimizer, schedule, clip: Iterable | None = None) -> None:
    """One optimizer step on ``loss``, then one step of the learning-rate ``schedule``; ``clip``:
    parameters whose gradient norm is clipped to 1 before the step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(clip, 1.0)
    optimizer.step()
    schedule.step()


def clamp_logit_scale(model: torch.nn.Module) -> None:
    """A CLIP's logit scale kept in [0, log 100] (the scale itself at most 100), as open_clip's
    training does after every step."""
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))


def train_epochs(loss_of: Callable[[torch.Tensor, object], torch.Tensor], optimizer: torch.optim.Optimizer, schedule,
                 *, n: int, batch_size: int, epochs: int, gen: torch.Generator,
                 draw: Callable[[], object] | None = None, after_step: Callable[[], None] | None = None,
                 report: Callable[[int, float], None] | None = None) -> float:
    """``epochs`` passes over ``n`` examples in batches of ``batch_size`` (the last partial batch
    dropped), each in the order of a permutation drawn from ``gen``; returns the last epoch's mean
    loss.

    Per epoch: the permutation, then ``draw()`` (what the epoch draws besides, from the same
    generator; None: nothing), then per batch ``loss_of(indices, drawn)``, :func:`descend` and
    ``after_step()``; at the end ``report(epoch, mean loss)`` (``epoch`` from 0).
    """
    steps = n // batch_size
    running = 0.0
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=gen)
        drawn = draw() if draw is not None else None
        running = 0.0
        for step in range(steps):
            loss = loss_of(perm[step * batch_size : (step + 1) * batch_size], drawn)
            descend(loss, optimizer, schedule)
            if after_step is not None:
                after_step()
            running += loss.item()
        if report is not None:
            report(epoch, running / steps)
    return running / steps
