"""Each baseline's defining property on tiny data (a small world and a tiny random CLIP), through
``slug-pl fit``: GA lowers the forget pairs' image–caption similarity; FT lowers the retain loss;
SalUn leaves every weight outside its saliency mask bit-identical after an epoch with weight
decay; SSD's weights for a λ do not depend on which λ ran before. Plus the selection rule every
baseline shares, and the run record's schema (the same as SLUG's)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_config

from slug_pl import cli
from slug_pl.cli import EXIT_TARGET_NOT_MET, main
from slug_pl.data.labelled import load_pairs
from slug_pl.edit import apply_edit, load_edits
from slug_pl.evaluation.evaluator import Evaluator
from slug_pl.families.open_clip import OpenClip
from slug_pl.gradients import contrastive_loss, forget_gradient
from slug_pl.methods.salun import saliency_mask
from slug_pl.methods.selection import checkpoint, select
from slug_pl.methods.ssd import dampen
from slug_pl.step_search import ForgetTarget

SUMMARY_KEYS = {"schema", "method", "concepts", "model", "target", "validation", "evaluated_on", "before", "after",
                "per_concept", "cost", "timings_s", "memory"}
CORE = {"forget_top1", "forget_top5", "retain_top1", "utility_top1"}


def fit(tmp_path, monkeypatch, world, checkpoint_path, forget, class_path: str, max_epochs: int = 1,
        target_value: float = 0.0, **init_args):
    """``slug-pl fit`` of a baseline on the tiny world (forget target ``forget_top5 <=
    target_value``); returns (exit code, run folder, the CLI)."""
    base = write_config(tmp_path, world, checkpoint_path, forget, forget_target={"value": target_value})
    method = tmp_path / "method.yaml"
    method.write_text(yaml.safe_dump({"model": {"class_path": class_path, "init_args": init_args},
                                      "trainer": {"max_epochs": max_epochs}}))
    captured = {}
    original = cli.run_cli

    def spy(args, **kwargs):
        captured["cli"] = original(args, **kwargs)
        return captured["cli"]

    monkeypatch.setattr(cli, "run_cli", spy)
    torch.set_num_threads(1)
    code = main(["fit", "--config", str(base), "--config", str(method), "--trainer.default_root_dir", str(tmp_path)])
    return code, tmp_path / "lightning_logs" / "version_0", captured["cli"]


def check_record(run: Path, code: int | None, name: str) -> dict:
    """The common run record, as SLUG writes it; returns the summary. ``code``: the exit code of
    ``slug-pl fit`` (None: not checked)."""
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary) >= SUMMARY_KEYS and summary["method"]["name"] == name
    for block in (summary["before"], summary["after"], summary["validation"]):
        assert set(block) == CORE
    assert summary["evaluated_on"] == "test"
    assert code is None or code == (0 if summary["target"]["met"] else EXIT_TARGET_NOT_MET)
    for f in ("report.md", "edit.safetensors", "selection.csv", "config.yaml", "similarity.png"):
        assert (run / f).is_file(), f
    return summary


def original_and_edited(run: Path, checkpoint_path: str):
    """The tiny model as loaded, and with the run's patch applied."""
    family = OpenClip("slug-tiny-vit", pretrained=checkpoint_path)
    before, after = family.load(), family.load()
    edits, _ = load_edits(run / "edit.safetensors")
    for e in edits:
        apply_edit(after, e)
    return family, before, after, edits


# -- the selection rule ------------------------------------------------------------------------------

def test_selection_takes_the_first_checkpoint_that_meets_the_target():
    target = ForgetTarget("forget_top5", 0.0)
    seq = [checkpoint(1, "epoch 1", {"forget_top5": 0.4, "retain_top1": 0.99, "utility_top1": 0.9}, target),
           checkpoint(2, "epoch 2", {"forget_top5": 0.0, "retain_top1": 0.70, "utility_top1": 0.9}, target),
           checkpoint(3, "epoch 3", {"forget_top5": 0.0, "retain_top1": 0.95, "utility_top1": 0.9}, target)]
    assert select(seq, target).label == "epoch 2"  # the first that meets, though epoch 3 keeps more


def test_selection_else_the_closest_then_what_it_keeps_then_the_earlier():
    target = ForgetTarget("forget_top5", 0.1)
    m = lambda f, r: {"forget_top5": f, "retain_top1": r, "utility_top1": 0.5}  # noqa: E731
    seq = [checkpoint(1, "a", m(0.6, 0.9), target), checkpoint(2, "b", m(0.3, 0.8), target),
           checkpoint(3, "c", m(0.3, 0.85), target), checkpoint(4, "d", m(0.3, 0.85), target),
           checkpoint(5, "e", m(0.5, 1.0), target)]
    assert not any(c.target_met for c in seq)
    assert select(seq, target).label == "c"  # lowest forget top-5 (0.3), then more kept, then earlier
    nan = {"forget_top5": math.nan, "retain_top1": math.nan, "utility_top1": math.nan}
    broken = [checkpoint(1, "broken", nan, target), checkpoint(2, "fine", m(0.9, 0.1), target)]
    assert select(broken, target).label == "fine" and not broken[0].target_met


# -- GA -------------------------------------------------------------------------------------------

def test_ga_lowers_the_forget_similarity(tmp_path, monkeypatch, small_world, tiny_checkpoint, forget_shard):
    code, run, _ = fit(tmp_path, monkeypatch, small_world, tiny_checkpoint, forget_shard, "slug_pl.methods.GaModule",
                       max_epochs=2, lr=1e-3, target_value=-1.0)  # an unreachable target: both epochs run
    summary = check_record(run, code, "ga")
    assert summary["method"]["training"]["epochs_run"] == 2 and not summary["target"]["met"]
    assert summary["cost"]["gradient_evals"] == 2 * 4  # 2 epochs over the 4 forget pairs
    family, before, after, _ = original_and_edited(run, tiny_checkpoint)
    images, tokens = load_pairs(forget_shard, family.image_transform(), family.tokenize)

    def mean_cos(model):
        with torch.no_grad():
            u, v = family.encode_image(model, images), family.encode_text(model, tokens)
            return torch.nn.functional.cosine_similarity(u, v, dim=-1).mean().item()

    assert mean_cos(after) < mean_cos(before) - 1e-3


# -- FT -------------------------------------------------------------------------------------------

def test_ft_lowers_the_retain_loss(tmp_path, monkeypatch, small_world, tiny_checkpoint, forget_shard):
    code, run, _ = fit(tmp_path, monkeypatch, small_world, tiny_checkpoint, forget_shard, "slug_pl.methods.FtModule",
                       max_epochs=1, lr=1e-3)
    summary = check_record(run, code, "ft")
    n = small_world["counts"]["corpus"]
    assert summary["cost"]["gradient_evals"] == n and summary["cost"]["evaluations"] == 1
    family, before, after, edits = original_and_edited(run, tiny_checkpoint)
    assert "logit_scale" not in {e.name for e in edits}  # shared tensors stay fixed
    images, tokens = load_pairs(small_world["corpus"], family.image_transform(), family.tokenize)

    def retain_loss(model):  # the mean contrastive loss over the run's global batches of 16
        with torch.no_grad():
            losses = [contrastive_loss(family.encode_image(model, images[i:i + 16]),
                                       family.encode_text(model, tokens[i:i + 16]), family.logit_scale(model))
                      for i in range(0, n, 16)]
        return torch.stack(losses).mean().item()

    assert retain_loss(after) < retain_loss(before) - 1e-3


# -- SalUn ----------------------------------------------------------------------------------------

def test_saliency_mask_holds_the_top_fraction_of_each_tensor():
    g = {"a": torch.tensor([[0.5, -3.0, 0.1], [2.0, 0.0, -0.2]]), "b": torch.tensor([1.0, 1.0, 1.0])}
    masks = saliency_mask(g, 0.5)
    assert masks["a"].tolist() == [[True, True, False], [True, False, False]]  # |g| 3, 2, 0.5 of 6 entries
    assert masks["b"].tolist() == [True, True, False]  # ceil(1.5) = 2; ties: the lower index first


def test_salun_leaves_weights_outside_the_mask_bit_identical(tmp_path, monkeypatch, small_world, tiny_checkpoint,
                                                            forget_shard):
    fraction = 0.3
    code, run, the_cli = fit(tmp_path, monkeypatch, small_world, tiny_checkpoint, forget_shard,
                             "slug_pl.methods.SalunModule", max_epochs=1, lr=1e-2, weight_decay=0.5,
                             mask_fraction=fraction, target_value=-1.0)
    summary = check_record(run, code, "salun")
    n_forget = 4
    assert summary["cost"]["gradient_evals"] == n_forget + n_forget + small_world["counts"]["corpus"]  # mask + epoch
    family, before, after, _ = original_and_edited(run, tiny_checkpoint)
    datamodule = the_cli.datamodule
    grads, count = forget_gradient(family, before, datamodule.concept_batches(datamodule.concepts[0]))
    assert count == n_forget
    changed_any = 0
    old, new = dict(before.named_parameters()), dict(after.named_parameters())
    for name, g in grads.items():
        if family.tower_of(name) is None:  # the logit scale: not trained at all
            assert torch.equal(old[name], new[name])
            continue
        k = math.ceil(fraction * g.numel())
        threshold = g.abs().flatten().kthvalue(g.numel() - k + 1).values  # the k-th largest |g_f|
        outside = g.abs() < threshold
        assert torch.equal(old[name][outside], new[name][outside]), name  # bit for bit, decay included
        changed = old[name] != new[name]
        assert int(changed.sum()) <= k, name
        if old[name].ndim >= 2:  # decayed matrices: every nonzero weight inside the mask moved
            inside = (~outside) & (old[name] != 0) & (g.abs() > threshold)
            assert bool(changed[inside].all()), name
        changed_any += int(changed.sum())
    assert changed_any > 0
    mask = summary["method"]["mask"]
    assert mask["fraction"] == fraction and "computed" in mask["source"]


def test_salun_mask_from_a_slug_runs_saved_forget_gradient(tmp_path, monkeypatch, small_world, tiny_checkpoint,
                                                          forget_shard):
    """With ``gradients_from`` (a SLUG run's gradients/), SalUn's mask is the one it would compute
    itself, and the mask's gradient pass is neither run nor counted."""
    slug_dir = tmp_path / "slug"
    slug_dir.mkdir()
    config = write_config(slug_dir, small_world, tiny_checkpoint, forget_shard)
    main(["fit", "--config", str(config), "--trainer.default_root_dir", str(slug_dir)])
    gradients = slug_dir / "lightning_logs" / "version_0" / "gradients"
    masks, evals = {}, {}
    for source in ("computed", "saved"):
        work = tmp_path / source
        work.mkdir()
        extra = {"gradients_from": str(gradients)} if source == "saved" else {}
        code, run, the_cli = fit(work, monkeypatch, small_world, tiny_checkpoint, forget_shard,
                                 "slug_pl.methods.SalunModule", max_epochs=1, lr=1e-3, **extra)
        summary = check_record(run, code, "salun")
        masks[source], evals[source] = the_cli.model.masks, summary["cost"]["gradient_evals"]
        assert source in summary["method"]["mask"]["source"]
    assert masks["saved"].keys() == masks["computed"].keys()
    assert all(torch.equal(masks["saved"][n], masks["computed"][n]) for n in masks["saved"])
    assert evals["computed"] - evals["saved"] == 4  # the 4 forget pairs of the mask's pass


# -- SSD ------------------------------------------------------------------------------------------

def test_dampen_by_hand():
    w = {"m": torch.tensor([2.0, -4.0, 1.0, 3.0]), "scale": torch.tensor(5.0)}
    f = {"m": torch.tensor([4.0, 1.0, 30.0, 0.0]), "scale": torch.tensor(100.0)}
    r = {"m": torch.tensor([1.0, 1.0, 1.0, 0.0]), "scale": torch.tensor(0.0)}
    out = dampen(w, f, r, alpha=2.0, lam=0.5)
    # selected where f > 2 r: entries 0 (4 > 2) and 2 (30 > 2); beta = min(0.5 r / f, 1) = 0.125, 1/60
    assert torch.allclose(out["m"], torch.tensor([2.0 * 0.125, -4.0, 1.0 / 60, 3.0]))
    assert out["scale"] == 5.0  # one-element tensors are left out
    assert dampen(w, f, r, alpha=2.0, lam=100.0)["m"].tolist() == w["m"].tolist()  # beta capped at 1


def test_ssd_weights_for_a_lambda_do_not_depend_on_the_lambda_before(tmp_path, monkeypatch, small_world,
                                                                    tiny_checkpoint, forget_shard):
    lambdas = [0.5, 2.0, 0.05]
    code, run, the_cli = fit(tmp_path, monkeypatch, small_world, tiny_checkpoint, forget_shard,
                             "slug_pl.methods.SsdModule", max_epochs=1, alpha=1.0, lambdas=lambdas, target_value=-1.0)
    summary = check_record(run, code, "ssd")
    n = small_world["counts"]["corpus"]
    assert summary["cost"]["gradient_evals"] == 4 + n and summary["cost"]["evaluations"] == 3
    candidates = summary["method"]["candidates"]
    assert [c["lambda"] for c in candidates] == [2.0, 0.5, 0.05]  # mildest (largest λ) first
    module = the_cli.model
    for c in candidates:  # each λ's recorded validation equals that λ applied alone to the original weights
        fresh = the_cli.model.family.load()
        params = dict(fresh.named_parameters())
        with torch.no_grad():
            for name, w in module.dampened(c["lambda"]).items():
                params[name].copy_(w)
        judge = Evaluator.for_concepts(module.context, "validation", module.context.concepts)
        metrics = judge.evaluate(fresh)
        assert {k: metrics[k] for k in CORE} == pytest.approx(c["validation"], abs=1e-9)
    # dampening reads the original weights, never the model's current ones
    first = module.dampened(0.5)
    module._load(module.dampened(0.05))  # as if a stronger λ had just run
    again = module.dampened(0.5)
    assert all(torch.equal(first[k], again[k]) for k in first)
    strongest = module.dampened(0.05)
    assert any(not torch.equal(strongest[k], module._original[k]) for k in strongest)  # the sweep changes weights


# -- DDP ------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("class_path, init_args", [
    # eps large: AdamW's g / (|g| + eps) would otherwise magnify the float noise of gradients that are
    # zero in exact arithmetic (the attention key bias's) into differences of 1e-4
    ("slug_pl.methods.GaftModule", {"lr": 1e-2, "eps": 1e-3}),
    ("slug_pl.methods.SsdModule", {"alpha": 1.0, "lambdas": [0.5]}),
])
def test_a_baseline_gives_the_same_weights_on_one_and_two_processes(tmp_path, monkeypatch, small_world,
                                                                   tiny_checkpoint, forget_shard, class_path, init_args):
    """The losses are those of the global batch (features gathered across ranks), so two processes
    (DDP over gloo, uneven last batches padded) train the same weights as one."""
    edits = {}
    for devices in (1, 2):
        work = tmp_path / f"devices{devices}"
        work.mkdir()
        base = write_config(work, small_world, tiny_checkpoint, forget_shard, forget_target={"value": -1.0})
        method = work / "method.yaml"
        trainer = {"max_epochs": 1, "devices": devices} | ({"strategy": "ddp_spawn"} if devices > 1 else {})
        method.write_text(yaml.safe_dump({"model": {"class_path": class_path, "init_args": init_args},
                                          "trainer": trainer}))
        code = main(["fit", "--config", str(base), "--config", str(method), "--trainer.default_root_dir", str(work)])
        run = work / "lightning_logs" / "version_0"
        check_record(run, code, class_path.rsplit(".", 1)[1].removesuffix("Module").lower())
        edits[devices] = {e.name: e.edited for e in load_edits(run / "edit.safetensors")[0]}
    assert edits[1].keys() == edits[2].keys() and edits[1]
    for name, t in edits[1].items():
        assert torch.allclose(t, edits[2][name], rtol=1e-4, atol=1e-6), name
