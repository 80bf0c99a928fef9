"""``slug-pl compare``: the compare config, where each method takes the forget target, the table
and figure written from run summaries, and (slow) every method end to end on identical data: on a
tiny world, and on the demo from a fresh clone."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from slug_pl.compare import CompareConfig, MethodRun, fit_command, run_compare, write_outputs
from slug_pl.step_search import ForgetTarget

REPO = Path(__file__).resolve().parent.parent
METHODS = ("slug", "ft", "ga", "gaft", "salun", "ssd")


def test_the_demo_compare_config_composes_shared_and_method_configs(tmp_path):
    config = CompareConfig.load(REPO / "configs" / "demo_compare.yaml")
    assert config.shared == REPO / "configs" / "demo.yaml" and tuple(config.methods) == METHODS
    assert config.methods["slug"] is None and config.forget_target == ForgetTarget("forget_top5", 0.0)
    cmd = fit_command(config, "ga", tmp_path, ["--trainer.enable_progress_bar", "false"])
    assert cmd[1:4] == ["-m", "slug_pl.cli", "fit"]
    assert cmd[4:8] == ["--config", str(config.shared), "--config", str(config.methods["ga"])]
    # the one forget target goes to every method the same way
    target = ["--forget_target.metric", "forget_top5", "--forget_target.value", "0.0"]
    assert cmd[8:12] == target and cmd[-2:] == ["--trainer.enable_progress_bar", "false"]
    slug = fit_command(config, "slug", tmp_path, [])
    assert slug.count("--config") == 1 and slug[6:10] == target
    assert slug[slug.index("--trainer.default_root_dir") + 1] == str(tmp_path)


def test_a_bad_compare_config_is_refused_with_its_fix(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"shared": "x.yaml", "methods": {"slug": None}, "epochs": 3}))
    with pytest.raises(ValueError, match="unknown key"):
        CompareConfig.load(bad)
    (tmp_path / "x.yaml").write_text("model: {}\n")
    bad.write_text(yaml.safe_dump({"shared": "x.yaml", "methods": {"ga": "missing.yaml"}}))
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        CompareConfig.load(bad)
    ok = tmp_path / "ok.yaml"
    ok.write_text(yaml.safe_dump({"shared": "x.yaml", "methods": {"slug": None}}))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "comparison.csv").write_text("earlier\n")
    with pytest.raises(FileExistsError):  # before any method runs
        run_compare(CompareConfig.load(ok), tmp_path / "out")
    with pytest.raises(ValueError, match="unknown method"):
        run_compare(CompareConfig.load(ok), tmp_path / "out2", methods=["ga"])


def _summary(name: str, after: dict, cost: dict, met: bool) -> dict:
    before = {"forget_top1": 1.0, "forget_top5": 1.0, "retain_top1": 0.98, "utility_top1": 0.9}
    return {"method": {"name": name}, "concepts": ["Quinn Lindqvist"], "model": {"model_name": "slug-demo-vit"},
            "target": {"met": met, "held_out": {"met": met, "value": after["forget_top5"], "images": 15}},
            "evaluated_on": "test", "before": before, "after": after, "cost": cost,
            "mia": {"before": {"mean": 90.0, "std": 1.0, "n": 60}, "after": {"mean": 55.5, "std": 2.0, "n": 60}}}


def test_comparison_files_from_run_summaries(tmp_path):
    runs = [MethodRun("slug", [], 0, tmp_path / "v0", _summary(
                "slug", {"forget_top1": 0.0, "forget_top5": 0.0, "retain_top1": 0.96, "utility_top1": 0.89},
                {"wall_s": 20.0, "peak_mem_mb": 1400.0, "gradient_evals": 1060, "evaluations": 41, "edit_bytes": 24576},
                True)),
            MethodRun("ga", [], 3, tmp_path / "v1", _summary(
                "ga", {"forget_top1": 0.25, "forget_top5": 0.5, "retain_top1": 0.7, "utility_top1": 0.8},
                {"wall_s": 60.0, "peak_mem_mb": 1500.0, "gradient_evals": 600, "evaluations": 10,
                 "edit_bytes": 13000000}, False)),
            MethodRun("ssd", [], 1, None, None)]  # a method that failed
    rows = write_outputs(tmp_path, runs, ["# header", ""])
    with open(tmp_path / "comparison.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["method"] for r in table] == ["slug", "ga", "ssd"]
    assert float(table[1]["forget_top1"]) == 0.25 and int(table[1]["gradient_evals"]) == 600
    assert float(table[0]["mia"]) == 55.5 and table[0]["target_met"] == "True" and table[2]["wall_s"] == ""
    md = (tmp_path / "comparison.md").read_text().splitlines()
    original = next(line for line in md if line.startswith("| original"))
    assert "| 100.0 | 100.0 | 98.0 | 90.0 | 90.0 |" in original  # the model before, in %
    ga = next(line for line in md if line.startswith("| ga"))
    assert "| no | no | 25.0 | 50.0 | 70.0 | 80.0 | 55.5 | 60.0 | 1500.0 | 600 | 10 | 13,000,000 |" in ga
    assert rows[2] == {"method": "ssd", "run_dir": ""} and table[0]["run_dir"] == "v0"  # relative to the table
    assert (tmp_path / "comparison.png").stat().st_size > 0
    assert list((tmp_path / "lightning_logs" / "comparison").glob("events.out.tfevents.*"))
    runs[1].summary["before"] = dict(runs[1].summary["before"], retain_top1=0.5)  # not the same original model
    with pytest.raises(ValueError, match="identical data"):
        write_outputs(tmp_path / "again", runs, [])


# -- end to end (slow) ---------------------------------------------------------------------------

def _check_comparison(out: Path) -> dict[str, dict]:
    """comparison.csv lists every method; every run's summary has the same before/after schema and
    measured the same original model. Returns the summaries by method."""
    with open(out / "comparison.csv", newline="") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert tuple(rows) == METHODS
    summaries = {m: json.loads((out / r["run_dir"] / "summary.json").read_text()) for m, r in rows.items()}
    keys = {m: (set(s), set(s["before"]), set(s["after"]), set(s["validation"]), set(s["cost"]), set(s["target"]))
            for m, s in summaries.items()}
    assert all(k == keys["slug"] for k in keys.values()), keys
    assert all(s["before"] == summaries["slug"]["before"] for s in summaries.values())
    assert all(s["method"]["name"] == m for m, s in summaries.items())
    for m, r in rows.items():
        assert float(r["forget_top1"]) == summaries[m]["after"]["forget_top1"]
        assert int(r["gradient_evals"]) == summaries[m]["cost"]["gradient_evals"] > 0
        assert int(r["edit_bytes"]) > 0 and float(r["wall_s"]) > 0
    assert (out / "comparison.png").is_file() and "| original |" in (out / "comparison.md").read_text()
    return summaries


@pytest.mark.slow
def test_compare_on_the_demo_from_a_fresh_clone(tmp_path, fresh_demo):
    """``slug-pl compare --config configs/demo_compare.yaml`` in a fresh clone of the committed
    repository, all six methods. The demo world and CLIP come from the session's fresh demo run
    (built from an empty folder there: building them again would only repeat minutes of training)."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    shutil.copytree(fresh_demo["dir"] / ".slug_cache", clone / ".slug_cache")
    env = dict(os.environ, PYTHONPATH=str(clone), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "slug_pl.cli", "compare", "--config", "configs/demo_compare.yaml",
                           "--", "--trainer.enable_progress_bar", "false"], cwd=clone, env=env)
    assert done.returncode == 0
    summaries = _check_comparison(clone / "comparisons" / "demo")
    assert summaries["slug"]["cost"]["edit_bytes"] < min(s["cost"]["edit_bytes"] for m, s in summaries.items()
                                                         if m != "slug")  # one tensor vs many
    assert all("mia" in s and s["target"]["rule"] == "forget_top5 <= 0" for s in summaries.values())
    slug = summaries["slug"]
    assert slug["target"]["met"] and slug["after"]["forget_top1"] == 0.0
    assert slug["before"]["retain_top1"] - slug["after"]["retain_top1"] <= 0.05
    assert slug["before"]["utility_top1"] - slug["after"]["utility_top1"] <= 0.05
