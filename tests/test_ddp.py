"""The gradient pass gives the same answer on 1 and on 2 processes (DDP over gloo on the CPU),
with uneven shards and an uneven last batch, and reduces gradients once per set, not per batch."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
from conftest import write_config
from lightning.pytorch import Callback

from slug_pl.cli import main
from slug_pl.data.mining import mine_forget_set
from slug_pl.gradients import load_tensors

pytestmark = pytest.mark.slow


class CountAllReduce(Callback):
    """Counts ``torch.distributed.all_reduce`` calls from the start to the end of the pass epoch,
    in every process, and writes ``allreduce_rank<r>.json`` into ``folder``."""

    def __init__(self, folder: str):
        self.folder = folder

    def on_train_epoch_start(self, trainer, pl_module):
        import torch.distributed as dist

        self.calls = 0
        self._original = dist.all_reduce

        def counting(*args, **kwargs):
            self.calls += 1
            return self._original(*args, **kwargs)

        dist.all_reduce = counting

    def on_train_epoch_end(self, trainer, pl_module):
        pass  # the module's own epoch-end hook (the reduction) runs after the callbacks' hook

    def on_train_end(self, trainer, pl_module):
        import torch.distributed as dist

        dist.all_reduce = self._original
        Path(self.folder, f"allreduce_rank{trainer.global_rank}.json").write_text(json.dumps({
            "calls": self.calls, "batches": trainer.fit_loop.epoch_loop.batch_progress.total.completed}))


def _fit(work: Path, world, checkpoint, forget, devices: int, retain_batch_size: int, tag: str) -> Path:
    root = work / tag
    root.mkdir()
    trainer = {"devices": devices, "default_root_dir": str(root),
               "callbacks": [{"class_path": f"{__name__}.CountAllReduce", "init_args": {"folder": str(root)}}]}
    if devices > 1:
        trainer["strategy"] = "ddp_spawn"
    config = write_config(root, world, checkpoint, forget, trainer=trainer,
                          data={"batch_size": 3, "retain_batch_size": retain_batch_size},
                          search={"top_k": 2, "max_evals": 3})
    main(["fit", "--config", str(config)])
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_world, tiny_checkpoint):
    work = tmp_path_factory.mktemp("ddp")
    concept = json.loads(Path(small_world["identities_json"]).read_text())[0]
    forget = mine_forget_set(small_world["corpus"], [concept], work / "forget").output_shards
    forget = [str(p) for p in forget]
    old = os.getcwd()
    os.chdir(work)
    try:
        one = _fit(work, small_world, tiny_checkpoint, forget, 1, 16, "one")
        two = _fit(work, small_world, tiny_checkpoint, forget, 2, 16, "two")
        two_big = _fit(work, small_world, tiny_checkpoint, forget, 2, 40, "two_big")
    finally:
        os.chdir(old)
    return {"one": one, "two": two, "two_big": two_big}


def _run_dir(root: Path) -> Path:
    return root / "lightning_logs" / "version_0"


def test_two_processes_give_the_same_gradients(runs, small_world):
    for name in ("forget", "retain"):
        g1, m1 = load_tensors(_run_dir(runs["one"]) / "gradients" / f"{name}.safetensors")
        g2, m2 = load_tensors(_run_dir(runs["two"]) / "gradients" / f"{name}.safetensors")
        assert m1["counts"]["samples"] == m2["counts"]["samples"]
        assert m1["counts"]["batches"] == m2["counts"]["batches"]
        assert m2["world_size"] == 2
        assert set(g1) == set(g2)
        for k in g1:
            ref = g1[k].double()
            err = (g2[k].double() - ref).norm() / ref.norm().clamp(min=1e-30)
            assert err <= 1e-5 or ref.norm() == 0 and g2[k].norm() == 0, (name, k, float(err))
    _, meta = load_tensors(_run_dir(runs["two"]) / "gradients" / "retain.safetensors")
    assert meta["counts"]["samples"] == small_world["counts"]["corpus"]  # nothing dropped or doubled


def test_two_processes_give_the_same_ranking_and_choice(runs):
    def ranking(root):
        rows = list(csv.DictReader((_run_dir(root) / "ranking.csv").open()))
        return [(r["name"], r["on_front"]) for r in rows]

    assert ranking(runs["one"]) == ranking(runs["two"])
    s1, s2 = (json.loads((_run_dir(runs[k]) / "summary.json").read_text()) for k in ("one", "two"))
    (c1,), (c2,) = s1["method"]["edits"], s2["method"]["edits"]
    assert c1["layer"] == c2["layer"]
    assert c1["step"] == pytest.approx(c2["step"], rel=1e-4)


def test_gradients_are_reduced_once_per_set_not_per_batch(runs):
    for key in ("two", "two_big"):
        counts = [json.loads((runs[key] / f"allreduce_rank{r}.json").read_text()) for r in (0, 1)]
        assert counts[0] == counts[1]  # both ranks made the same collective calls
    small, big = (json.loads((runs[k] / "allreduce_rank0.json").read_text()) for k in ("two", "two_big"))
    assert small["batches"] > big["batches"]  # retain batch 16 vs 40: more batches ...
    assert small["calls"] == big["calls"] == 2  # ... but one all-reduce per set (forget, retain)


def test_a_spawned_run_that_misses_the_target_exits_with_status_3(tmp_path, monkeypatch, small_world, tiny_checkpoint):
    """With ddp_spawn the search runs in a child process; the launching process still learns the
    verdict (from the summary.json the child wrote in the run folder it claimed) and exits with 3."""
    concept = json.loads(Path(small_world["identities_json"]).read_text())[0]
    forget = [str(p) for p in mine_forget_set(small_world["corpus"], [concept], tmp_path / "forget").output_shards]
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, small_world, tiny_checkpoint, forget,
                          trainer={"devices": 2, "strategy": "ddp_spawn", "default_root_dir": str(tmp_path)},
                          forget_target={"value": -1.0},
                          search={"top_k": 1, "max_evals": 1, "towers": ["text"]})
    code = main(["fit", "--config", str(config)])
    summary = json.loads((tmp_path / "lightning_logs" / "version_0" / "summary.json").read_text())
    assert summary["target"]["met"] is False and code == 3
