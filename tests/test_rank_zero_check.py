"""The downstream pair check runs on rank 0 alone, and its refusal reaches every rank
(:func:`slug_pl.methods.base.agreed_on_rank_zero`): no rank waits at the pass's first collective
call for a rank that has already stopped."""

from types import SimpleNamespace

import pytest

from slug_pl.methods.base import agreed_on_rank_zero
from slug_pl.targets.base import TargetMismatchError


class Unpicklable(Exception):
    def __init__(self, message, handle):
        super().__init__(message)
        self.handle = handle

    def __reduce__(self):
        raise TypeError("cannot pickle a handle")


def trainer(rank: int, world_size: int, shared: list):
    """A trainer stand-in whose broadcast returns what rank 0 sent (recorded in ``shared``)."""
    def broadcast(obj, src=0):
        if rank == src:
            shared.append(obj)
        return shared[0]
    return SimpleNamespace(is_global_zero=rank == 0, world_size=world_size,
                           strategy=SimpleNamespace(broadcast=broadcast))


def test_only_rank_zero_checks_and_every_rank_raises_its_refusal():
    calls, shared = [], []
    def check():
        calls.append("checked")
        raise TargetMismatchError("text_model.encoder.layers.0.mlp.fc1.weight differs")
    with pytest.raises(TargetMismatchError, match="fc1.weight differs"):
        agreed_on_rank_zero(trainer(0, 2, shared), check)
    with pytest.raises(TargetMismatchError, match="fc1.weight differs"):
        agreed_on_rank_zero(trainer(1, 2, shared), check)
    assert calls == ["checked"]  # rank 1 never ran the check (never loaded the model)


def test_a_passed_check_lets_every_rank_go_on():
    shared, calls = [], []
    agreed_on_rank_zero(trainer(0, 2, shared), lambda: calls.append(0))
    agreed_on_rank_zero(trainer(1, 2, shared), lambda: calls.append(1))
    assert calls == [0] and shared == [None]


def test_an_error_that_does_not_pickle_reaches_the_other_ranks_by_type_and_message():
    shared = []
    def check():
        raise Unpicklable("the pipeline folder is unreadable", handle=object())
    with pytest.raises(Unpicklable):
        agreed_on_rank_zero(trainer(0, 2, shared), check)
    with pytest.raises(RuntimeError, match="Unpicklable: the pipeline folder is unreadable"):
        agreed_on_rank_zero(trainer(1, 2, shared), check)
