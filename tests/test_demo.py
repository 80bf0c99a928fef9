"""The demo's promised outcome, from a fresh directory (world built, CLIP trained, one identity
unlearned): the validation target is met, and on held-out test images the forgotten identity's
top-1 is 0 while retain and utility top-1 each drop by at most 5 points."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slug_pl.cli import main

REPO = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(fresh_demo):
    """The demo run from a fresh directory (the session's ``fresh_demo``: the world and the model
    are built there, as on a new clone). Returns (directory, exit code)."""
    return fresh_demo["dir"], fresh_demo["code"]


def test_demo_unlearns_one_identity(demo, capsys):
    tmp_path, code = demo
    run = tmp_path / "lightning_logs" / "version_0"
    summary = json.loads((run / "summary.json").read_text())

    trained = json.loads((tmp_path / ".slug_cache/demo/model/slug-demo-vit.json").read_text())
    assert trained["identities_top1"] >= 0.9 and trained["objects_top1"] >= 0.9

    assert code == 0
    assert summary["target"]["met"] is True
    assert summary["validation"]["forget_top5"] == 0.0
    before, after = summary["before"], summary["after"]  # held-out test sets
    assert before["forget_top1"] >= 0.9  # the identity was recognised before
    assert after["forget_top1"] == 0.0
    assert before["retain_top1"] - after["retain_top1"] <= 0.05
    assert before["utility_top1"] - after["utility_top1"] <= 0.05
    assert "mia" in summary and 0 <= summary["mia"]["after"]["mean"] <= 100
    report = (run / "report.md").read_text()
    held = summary["target"]["held_out"]  # the verdict on fresh images is stated, either way
    assert held["images"] == 15 and held["value"] == after["forget_top5"]
    assert ("forgetting **holds**" in report) == held["met"] and (run / "similarity.png").is_file()
    if not held["met"]:
        assert "step_margin" in report  # and how to make it hold
    with capsys.disabled():  # reported as measured, not asserted
        print(f"\ndemo: held-out forget top-5 after = {after['forget_top5']:.3f}; "
              f"retain {before['retain_top1']:.3f} -> {after['retain_top1']:.3f}; "
              f"utility {before['utility_top1']:.3f} -> {after['utility_top1']:.3f}; "
              f"layer {summary['method']['edits'][0]['layer']}")


def test_demo_unlearns_two_identities_jointly(demo, monkeypatch, capsys):
    """Two identities, one edit each, searched jointly (beam over partial edit sets, candidates
    from the first 3 Pareto fronts): both forgotten on validation and held-out images, the other
    identities and the objects keep their accuracy within 5 points (held-out test sets)."""
    work, _ = demo
    monkeypatch.chdir(work)  # re-uses the demo's cached world and model
    names = json.loads((work / ".slug_cache/demo/world/identities.json").read_text())
    pair = names[0:2]
    code = main(["fit", "--config", str(REPO / "configs" / "demo.yaml"), "--trainer.enable_progress_bar", "false",
                 "--data.init_args.concepts", json.dumps(pair), "--search.fronts", "3", "--search.top_k", "6"])
    run = max((work / "lightning_logs").iterdir(), key=lambda p: int(p.name.split("_")[1]))
    summary = json.loads((run / "summary.json").read_text())
    assert code == 0 and summary["target"]["met"] is True
    assert [c["concept"] for c in summary["method"]["per_concept"]] == pair
    for c in summary["method"]["per_concept"]:
        assert c["validation"]["forget_top5"] == 0.0  # on the combined model
    for concept in pair:
        assert summary["per_concept"][concept]["forget_top1"] == 0.0  # held-out test images
    before, after = summary["before"], summary["after"]
    assert before["retain_top1"] - after["retain_top1"] <= 0.05
    assert before["utility_top1"] - after["utility_top1"] <= 0.05
    assert "## Several concepts" in (run / "report.md").read_text()
    with capsys.disabled():
        print(f"\ndemo, two identities: layers {[c['layer'] for c in summary['method']['per_concept']]}; held-out "
              f"forget top-5 {[summary['per_concept'][c]['forget_top5'] for c in pair]}; retain "
              f"{before['retain_top1']:.3f} -> {after['retain_top1']:.3f}; utility "
              f"{before['utility_top1']:.3f} -> {after['utility_top1']:.3f}")
