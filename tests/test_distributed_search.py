"""The step search shares its evaluations across the ranks of a DDP run (gloo, 2 CPU processes)
and gives what one process gives: every evaluation's metrics, the ranking and the choice.

The parts: how a set is split and put back together, what a rank decodes, that a shared
evaluation's metrics and logits are one process's, and that the other ranks mirror rank 0's model
and stop when its search stops. End to end, the runs compared search the same gradient files
(``model.gradients_from``), so their inputs are the same bytes and any difference would come from
the shared evaluation.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import write_config

from slug_pl.cli import main
from slug_pl.data.labelled import LoadedSet
from slug_pl.evaluation.evaluator import Evaluator
from slug_pl.evaluation.group import EvalGroup


def _init(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _gather_worker(rank: int, world: int, port: int, out: str) -> None:
    _init(rank, world, port)
    try:
        group = EvalGroup.of_default_process_group()
        results = {}
        for n in (7, 3, 2, 1):  # more rows than ranks, as many, fewer
            rows = torch.arange(n * 2, dtype=torch.float32).view(n, 2)
            local = rows[group.part(n)].clone()
            results[n] = {"gathered": group.gather_parts(local, n), "part": group.part_size(n), "local": len(local)}
        results["sum"] = group.sum(torch.tensor([1, rank]))
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_parts_cover_the_set_once_and_gather_back_in_order(tmp_path):
    world = 3
    mp.spawn(_gather_worker, args=(world, 29531, str(tmp_path)), nprocs=world)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for n in (7, 3, 2, 1):
        expected = torch.arange(n * 2, dtype=torch.float32).view(n, 2)
        assert sum(r[n]["part"] for r in results) == n  # every row in exactly one part
        assert all(r[n]["part"] == r[n]["local"] for r in results)
        for r in results:
            assert torch.equal(r[n]["gathered"], expected)  # every rank holds every row, in order
    for r in results:
        assert r["sum"].tolist() == [world, sum(range(world))]  # every rank gets the total


def test_one_process_is_the_group_of_one():
    group = EvalGroup()
    rows = torch.randn(5, 3)
    assert group.alone and group.part(5) == slice(0, 5, 1)
    assert group.gather_parts(rows, 5) is rows
    counts = torch.tensor([3, 4])
    assert group.sum(counts) is counts
    with pytest.raises(ValueError, match="rank"):
        EvalGroup(2, 2)


@pytest.mark.parametrize("max_samples", [None, 17])
def test_a_ranks_part_of_a_labelled_set_is_every_worlds_th_sample(small_world, max_samples):
    """What a rank other than 0 decodes for its part of a shared evaluation: samples ``r::W`` of
    the set (also of a ``max_samples`` subset), and nothing else."""
    import torchvision.transforms as T

    from slug_pl.data.labelled import LabelledSet

    spec = LabelledSet(small_world["val_identities"], small_world["identities_json"], max_samples=max_samples)
    transform = T.Compose([T.Resize((8, 8)), T.ToTensor()])
    whole = spec.load(transform, "val")
    parts = [spec.load(transform, "val", part=(r, 3)) for r in range(3)]
    assert [p.part for p in parts] == [(0, 3), (1, 3), (2, 3)] and whole.part == (0, 1)
    for r, part in enumerate(parts):
        assert torch.equal(part.images, whole.images[r::3]) and torch.equal(part.labels, whole.labels[r::3])
    assert sum(len(p.labels) for p in parts) == len(whole.labels) == (max_samples or len(whole.labels))


#: the parameters the evaluations below edit: a vision block, the vision head, a text block
EDITED = ("visual.transformer.resblocks.1.mlp.c_fc.weight", "visual.proj", "transformer.resblocks.0.attn.out_proj.weight")


def _sets(n_images: int):
    """A concept set of 5 classes × 3 templates and a utility set of 4 × 2, random images."""
    g = torch.Generator().manual_seed(0)
    concepts = LoadedSet("concepts", torch.randn(n_images, 3, 32, 32, generator=g), torch.arange(n_images) % 5,
                         [f"person {i}" for i in range(5)], ["a photo of {}.", "{} smiling.", "a portrait of {}."])
    utility = LoadedSet("utility", torch.randn(n_images, 3, 32, 32, generator=g), torch.arange(n_images) % 4,
                        ["cat", "dog", "car", "tree"], ["a {}.", "a photo of a {}."])
    return concepts, utility


def _evaluations(checkpoint: str, group: EvalGroup, n_images: int) -> list:
    """For the unedited model and each edit of :data:`EDITED`: the metrics and this rank's logits
    of each set; then a step that makes the outputs non-finite ("broken" if the judge says so);
    with the judge of one process or of ``group``."""
    from slug_pl.edit import stepped
    from slug_pl.families.open_clip import OpenClip

    torch.manual_seed(0)
    family = OpenClip(model_name="slug-tiny-vit", pretrained=checkpoint)
    model = family.load()
    concepts, utility = _sets(n_images)
    judge = Evaluator(family, concepts, ["person 0"], utility, batch_size=4, group=group)
    params = dict(model.named_parameters())

    def measure(edited):
        metrics = judge.evaluate(model, edited)
        return metrics, {name: judge.logits(model, name, edited) for name in ("concepts", "utility")}

    out = [measure(None)]
    for name in EDITED:
        direction = torch.randn(params[name].shape, generator=torch.Generator().manual_seed(1))
        with stepped(model, name, direction, 0.5 * params[name].norm().item() / direction.norm().item()):
            out.append(measure(name))
    with stepped(model, "visual.proj", torch.ones_like(params["visual.proj"]), float("inf")):
        try:
            out.append(judge.evaluate(model, edited="visual.proj"))
        except FloatingPointError:
            out.append("broken")
    return out


def _evaluator_worker(rank: int, world: int, port: int, checkpoint: str, n_images: int, out: str) -> None:
    torch.set_num_threads(1)
    _init(rank, world, port)
    try:
        torch.save(_evaluations(checkpoint, EvalGroup.of_default_process_group(), n_images), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_a_shared_evaluation_gives_every_rank_the_metrics_of_one_process(tmp_path, tiny_checkpoint):
    """Two ranks score 13 images each way (an odd count: uneven parts) and 15 + 8 prompts: for the
    unedited model, a vision block, the vision head and a text block edited, each rank's logits are
    one process's rows of its images (so every class embedding is whole) and its metrics are one
    process's; both ranks report a broken step as broken."""
    alone = _evaluations(tiny_checkpoint, EvalGroup(), 13)
    assert alone[-1] == "broken"
    logits = [torch.cat(list(lg.values()), dim=1) for _, lg in alone[:-1]]
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(logits, logits[1:]))  # every edit changes the scores
    mp.spawn(_evaluator_worker, args=(2, 29533, tiny_checkpoint, 13, str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        shared = torch.load(tmp_path / f"rank{rank}.pt")
        assert shared[-1] == "broken"
        for (metrics, logits), (metrics_alone, logits_alone) in zip(shared[:-1], alone[:-1]):
            assert metrics == metrics_alone
            for name in logits:
                torch.testing.assert_close(logits[name], logits_alone[name][rank::2], rtol=0, atol=1e-6)


def _fit(work: Path, world, checkpoint, forget, devices: int, tag: str, search: dict | None = None, **model) -> Path:
    root = work / tag
    root.mkdir()
    trainer = {"devices": devices, "default_root_dir": str(root)}
    if devices > 1:
        trainer["strategy"] = "ddp_spawn"
    config = write_config(root, world, checkpoint, forget, trainer=trainer, model=model,
                          search={"top_k": 2, "max_evals": 6, **(search or {})})
    assert main(["fit", "--config", str(config)]) in (0, 3)
    return root / "lightning_logs" / "version_0"


@pytest.mark.slow
def test_two_processes_search_like_one(tmp_path, monkeypatch, small_world, tiny_checkpoint, forget_shard):
    monkeypatch.chdir(tmp_path)
    one = _fit(tmp_path, small_world, tiny_checkpoint, forget_shard, 1, "one")
    gradients = str(one / "gradients")
    again = _fit(tmp_path, small_world, tiny_checkpoint, forget_shard, 1, "again", gradients_from=gradients)
    two = _fit(tmp_path, small_world, tiny_checkpoint, forget_shard, 2, "two", gradients_from=gradients)
    unshared = _fit(tmp_path, small_world, tiny_checkpoint, forget_shard, 2, "unshared",
                    search={"share_evaluations": False}, gradients_from=gradients)

    def rows(run: Path) -> list[dict]:
        return list(csv.DictReader((run / "search.csv").open()))

    reference = rows(again)
    assert len(reference) > 4  # a real search: several candidates, several steps each
    assert rows(two) == reference  # every evaluation: layer, step, each metric, verdicts
    assert rows(unshared) == reference  # rank 0 alone (search.share_evaluations: false)
    assert (two / "ranking.csv").read_text() == (again / "ranking.csv").read_text()
    s1, s2 = (json.loads((r / "summary.json").read_text()) for r in (again, two))
    assert s2["method"]["edits"] == s1["method"]["edits"]
    assert s2["validation"] == s1["validation"]
    assert s2["after"] == s1["after"]
    ranks = [json.loads((r / "summary.json").read_text())["devices"]["search_ranks"] for r in (again, two, unshared)]
    assert ranks == [1, 2, 1]



class CountingJudge:
    """A judge without collectives: counts its evaluations and the ``edited`` names it was given."""

    def __init__(self):
        self.seen = []

    def evaluate(self, model, edited=None):
        self.seen.append(edited)
        return {"forget_top5": 0.0}


def _mirror_worker(rank: int, world: int, port: int, out: str) -> None:
    from torch import nn

    from slug_pl.distributed_search import coordinating, serve

    _init(rank, world, port)
    try:
        torch.manual_seed(0)
        model = nn.Linear(3, 2)
        judge = CountingJudge()
        if rank == 0:
            try:
                with coordinating(model, EvalGroup.of_default_process_group()) as coordinator:
                    mirrored = coordinator.judge("Ada", judge)
                    mirrored.evaluate(model)
                    with torch.no_grad():
                        model.weight.add_(1.0)  # written in place: sent with the next order
                    mirrored.evaluate(model, edited="weight")
                    raise RuntimeError("the search failed")
            except RuntimeError:
                pass
        else:
            judges = []
            serve(model, lambda concept: judges.append((concept, judge)) or judge)
            judge.concepts = [c for c, _ in judges]
        torch.save({"seen": judge.seen, "weight": model.weight.detach(), "bias": model.bias.detach(),
                    "concepts": getattr(judge, "concepts", None)}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_the_other_ranks_mirror_rank_zeros_model_and_stop_when_its_search_raises(tmp_path):
    """Rank 1 receives each evaluation's order with the parameters rank 0 wrote in place, and
    returns from serving when rank 0's search raises (its stop order is sent on the way out)."""
    mp.spawn(_mirror_worker, args=(2, 29537, str(tmp_path)), nprocs=2)
    zero, one = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert zero["seen"] == one["seen"] == [None, "weight"]
    assert one["concepts"] == ["Ada"]  # one judge, built once
    assert torch.equal(one["weight"], zero["weight"]) and torch.equal(one["bias"], zero["bias"])
    torch.manual_seed(0)
    assert not torch.equal(one["weight"], torch.nn.Linear(3, 2).weight.detach())  # it did change


def _differing_worker(rank: int, world: int, port: int, out: str) -> None:
    from torch import nn

    from slug_pl.distributed_search import coordinating, serve

    _init(rank, world, port)
    try:
        torch.manual_seed(rank)  # rank 1 holds other weights
        model = nn.Linear(3, 2)
        try:
            if rank == 0:
                with coordinating(model, EvalGroup.of_default_process_group()):
                    pass
            else:
                serve(model, lambda concept: CountingJudge())
            message = ""
        except RuntimeError as err:
            message = str(err)
        Path(out, f"rank{rank}.txt").write_text(message)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_every_rank_refuses_to_search_when_a_rank_holds_another_model(tmp_path):
    mp.spawn(_differing_worker, args=(2, 29539, str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        message = (tmp_path / f"rank{rank}.txt").read_text()
        assert "rank(s) [1] hold another model than rank 0" in message and "weight" in message
