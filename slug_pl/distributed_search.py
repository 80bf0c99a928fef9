"""The step search on several processes: rank 0 searches, every rank evaluates.

The search (:mod:`slug_pl.step_search`) is sequential: each step follows from the last one's
metrics. What divides is each evaluation, and that is where its time goes. So rank 0 runs the
search exactly as one process would, with each concept's judge wrapped in a :class:`MirroredJudge`,
and every other rank runs :func:`serve`: it keeps a copy of rank 0's model and takes its part of
each evaluation (:class:`~slug_pl.evaluation.evaluator.Evaluator` over an
:class:`~slug_pl.evaluation.group.EvalGroup`). The metrics every rank computes are those of one
process, so the choice and ``search.csv`` do not depend on the number of processes.

One evaluation, as collective calls in this order on every rank:

1. rank 0 broadcasts the order: ``("evaluate", judge id, concept, edited, changed names)``, or
   ``("stop",)`` when the search ends (always sent, also when rank 0's search raises);
2. rank 0 broadcasts each parameter it changed in place since its last order (the edit being
   evaluated, or the edit just reverted), into the same parameter of every rank's model;
3. the judge's own collectives (the prompt features' gather, the hit counts' sum).

Which parameters changed is read from PyTorch's version counter of each tensor, which every
in-place write bumps (:mod:`slug_pl.edit` writes with ``copy_``): no copy of the model is kept.
Before the first order every rank checks that it holds rank 0's model (:func:`agree_on_model`), so
a difference is an error at once rather than metrics that silently differ from one process's.

What stays on rank 0: the ranking (cheap), per-concept forget gradients of a multi-concept
search, and every judge that asks a downstream model (SD's generations, LLaVA's answers), which
is loaded on rank 0 alone: with a downstream target the search runs on rank 0 alone, as before.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from slug_pl.evaluation.group import EvalGroup


@dataclass(frozen=True)
class Order:
    """What rank 0 asks of the other ranks: ``kind`` ``"evaluate"`` (judge ``judge_id`` of
    ``concept``, with ``edited`` as :meth:`SearchJudge.evaluate` takes it, after the parameters
    ``changed`` are received) or ``"stop"``."""

    kind: str
    judge_id: int = -1
    concept: str = ""
    edited: str | None = None
    changed: tuple[str, ...] = ()


@torch.no_grad()
def model_fingerprint(model: nn.Module) -> list[tuple[str, float, float]]:
    """Per parameter: its name, and the float64 sum and sum of squares of its values."""
    return [(name, p.double().sum().item(), p.double().square().sum().item()) for name, p in model.named_parameters()]


def agree_on_model(model: nn.Module) -> None:
    """Every rank of the default group checks that the others hold the same model (one
    all_gather_object); on a difference every rank raises the same error."""
    mine = model_fingerprint(model)
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    differ = [rank for rank, theirs in enumerate(every) if theirs != every[0]]
    if differ:
        names = [a[0] for a, b in zip(every[0], every[differ[0]]) if a != b] or ["(the parameter lists)"]
        raise RuntimeError(f"rank(s) {differ} hold another model than rank 0 before the search (first difference: "
                           f"{names[0]}); every rank must load the same weights")


def _broadcast_order(order: Order | None) -> Order:
    box = [order]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@torch.no_grad()
def _broadcast_parameters(model: nn.Module, names: tuple[str, ...]) -> None:
    """Rank 0's values of ``names`` into every rank's model (in place, on the model's device)."""
    params = dict(model.named_parameters())
    for name in names:
        dist.broadcast(params[name].detach(), src=0)


class Coordinator:
    """Rank 0's side: sends each evaluation's order and the parameters changed since the last."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._versions = self._read_versions()
        self._next_id = 0

    def _read_versions(self) -> dict[str, int]:
        return {name: p._version for name, p in self.model.named_parameters()}

    def changed(self) -> tuple[str, ...]:
        """Names of the parameters written in place since the last call."""
        now = self._read_versions()
        names = tuple(n for n, v in now.items() if self._versions[n] != v)
        self._versions = now
        return names

    def judge(self, concept: str, judge) -> MirroredJudge:
        self._next_id += 1
        return MirroredJudge(self, self._next_id, concept, judge)

    def send(self, judge_id: int, concept: str, edited: str | None) -> None:
        names = self.changed()
        _broadcast_order(Order("evaluate", judge_id, concept, edited, names))
        _broadcast_parameters(self.model, names)

    def stop(self) -> None:
        _broadcast_order(Order("stop"))


class MirroredJudge:
    """A judge on rank 0 whose every evaluation the other ranks share (see the module docstring)."""

    def __init__(self, coordinator: Coordinator, judge_id: int, concept: str, judge):
        self.coordinator, self.judge_id, self.concept, self.judge = coordinator, judge_id, concept, judge

    def evaluate(self, model: nn.Module, edited: str | None = None) -> dict[str, float]:
        self.coordinator.send(self.judge_id, self.concept, edited)
        return self.judge.evaluate(model, edited)


@contextmanager
def coordinating(model: nn.Module, group: EvalGroup) -> Iterator[Coordinator | None]:
    """Rank 0's search block: a :class:`Coordinator` when the group has other ranks (None
    alone); the stop order is sent on exit, whatever happened inside."""
    if group.alone:
        yield None
        return
    agree_on_model(model)
    coordinator = Coordinator(model)
    try:
        yield coordinator
    finally:
        coordinator.stop()


def serve(model: nn.Module, judge_for: Callable[[str], object]) -> int:
    """Another rank's side of the search, until rank 0's stop order: receive each order and its
    parameters, then take this rank's part of the evaluation with the judge ``judge_for(concept)``
    (a new one for each new judge of rank 0, as rank 0 has). Returns the number of evaluations.

    A step that breaks the model raises the same FloatingPointError on every rank (the judge
    agrees on it); rank 0 records it and the search goes on, so here it is passed over.
    """
    agree_on_model(model)
    judge, judge_id, count = None, None, 0
    while True:
        order = _broadcast_order(None)
        if order.kind == "stop":
            return count
        _broadcast_parameters(model, order.changed)
        if order.judge_id != judge_id:
            judge, judge_id = judge_for(order.concept), order.judge_id
        try:
            judge.evaluate(model, order.edited)
        except FloatingPointError:
            pass
        count += 1
