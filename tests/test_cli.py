"""End to end through the ``slug-pl`` CLI on a small world and a tiny random model, in a temp dir:
``fit`` (pass + ranking + search + artifacts), ``validate`` with the edit, a search re-run on saved
gradients, ``mine`` and ``--print_config``."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import yaml
from conftest import write_config

from slug_pl.cli import EXIT_TARGET_NOT_MET, main
from slug_pl.edit import apply_edit, load_edits, revert_edit
from slug_pl.families.open_clip import OpenClip
from slug_pl.gradients import load_tensors


REPO = Path(__file__).resolve().parent.parent


def slug_pl_command(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``python -m slug_pl.cli ARGS`` in a new process (its console output as a user sees it)."""
    env = os.environ | {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "slug_pl.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


class Fitted(NamedTuple):
    work: Path
    run: Path
    config: Path
    code: int
    stdout: str
    stderr: str


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, small_world, tiny_checkpoint):
    """One ``slug-pl fit`` in a fresh directory, in its own process (console output captured)."""
    work = tmp_path_factory.mktemp("cli")
    concept = json.loads(Path(small_world["identities_json"]).read_text())[0]
    assert main(["mine", "--shards", small_world["corpus"], "--name", concept, "--out", str(work / "forget")]) == 0
    config = write_config(work, small_world, tiny_checkpoint, "forget/forget-000000.tar",
                          data={"mia_nonmembers": small_world["test_identities"]})
    done = slug_pl_command(["fit", "--config", str(config)], work)
    return Fitted(work, work / "lightning_logs" / "version_0", config, done.returncode, done.stdout, done.stderr)


def test_fit_writes_a_complete_run_record(fitted, small_world):
    work, run, _, code = fitted[:4]
    summary = json.loads((run / "summary.json").read_text())
    assert code == (0 if summary["target"]["met"] else EXIT_TARGET_NOT_MET), fitted.stderr[-3000:]
    for name in ("config.yaml", "ranking.csv", "search.csv", "edit.safetensors", "edited_model/open_clip_model.safetensors", "edited_model/README.md",
                 "report.md", "pareto_vision.png", "pareto_text.png", "gradients/forget.safetensors",
                 "gradients/retain.safetensors"):
        assert (run / name).is_file(), name
    assert list(run.glob("events.out.tfevents.*")), "no TensorBoard events"

    # summary.json follows the documented schema; accuracies are fractions
    assert set(summary) >= {"schema", "method", "concepts", "model", "target", "validation", "before", "after",
                            "cost", "timings_s", "per_concept", "evaluated_on"}
    for block in (summary["before"], summary["after"], summary["validation"]):
        assert set(block) == {"forget_top1", "forget_top5", "retain_top1", "utility_top1"}
        assert all(0.0 <= v <= 1.0 for v in block.values())
    assert summary["method"]["name"] == "slug" and summary["evaluated_on"] == "test"
    (chosen,) = summary["method"]["edits"]
    assert chosen["step"] > 0 and chosen["relative_step"] > 0
    assert summary["cost"]["evaluations"] == len(list(csv.DictReader((run / "search.csv").open())))
    assert summary["cost"]["edit_bytes"] > 0 and summary["cost"]["gradient_evals"] == 4 + small_world["counts"]["corpus"]

    # gradient files: one tensor per model parameter, exact sample counts, metadata
    model = OpenClip("slug-tiny-vit", pretrained=summary_ckpt(run)).load()
    names = {n for n, _ in model.named_parameters()}
    forget, meta = load_tensors(run / "gradients" / "forget.safetensors")
    assert set(forget) == names
    assert meta["counts"]["samples"] == 4  # identity_corpus=4 pairs name the concept
    assert meta["model"]["model_name"] == "slug-tiny-vit"
    assert meta["data"]["num_samples"] == 4 and "versions" in meta and "torch" in meta["versions"]
    _, rmeta = load_tensors(run / "gradients" / "retain.safetensors")
    assert rmeta["counts"]["samples"] == small_world["counts"]["corpus"]
    assert rmeta["counts"]["batches"] == -(-small_world["counts"]["corpus"] // 16)

    # ranking covers every rankable tensor; search.csv has every evaluation
    family = OpenClip("slug-tiny-vit")
    rows = list(csv.DictReader((run / "ranking.csv").open()))
    assert {r["name"] for r in rows} == {n for n, p in model.named_parameters() if family.is_rankable(n, p)}
    evals = list(csv.DictReader((run / "search.csv").open()))
    chosen_rows = [r for r in evals if r["layer"] == chosen["layer"] and float(r["step"]) == chosen["step"]]
    assert chosen_rows and float(chosen_rows[0]["forget_top5"]) == pytest.approx(summary["validation"]["forget_top5"])
    report = (run / "report.md").read_text()
    assert chosen["layer"] in report
    # membership inference (forget pairs vs unseen pairs), before and after, in percent
    assert set(summary["mia"]) == {"before", "after"}
    assert all(0 <= summary["mia"][w]["mean"] <= 100 and summary["mia"][w]["n"] == 4 for w in ("before", "after"))
    assert "MIA" in report and (run / "similarity.png").is_file()


def summary_ckpt(run: Path) -> str:
    return yaml.safe_load((run / "config.yaml").read_text())["model"]["init_args"]["family"]["init_args"]["pretrained"]


def test_edit_patch_reproduces_the_edited_checkpoint(fitted):
    _, run, _, _ = fitted[:4]
    summary = json.loads((run / "summary.json").read_text())
    model = OpenClip("slug-tiny-vit", pretrained=summary_ckpt(run)).load()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    edits, meta = load_edits(run / "edit.safetensors")
    (chosen,) = summary["method"]["edits"]
    assert [e.name for e in edits] == [chosen["layer"]]
    assert edits[0].step == pytest.approx(chosen["step"])
    for e in edits:
        apply_edit(model, e)
    edited = OpenClip("slug-tiny-vit", pretrained=str(run / "edited_model" / "open_clip_model.safetensors")).load()
    for k, v in edited.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, original[k])]
    assert changed == [chosen["layer"]]  # only the one tensor changes
    for e in edits:
        revert_edit(model, e)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in original.items())


def test_validate_with_edit_reproduces_search_metrics(fitted, monkeypatch):
    work, run, config, _ = fitted[:4]
    summary = json.loads((run / "summary.json").read_text())
    monkeypatch.chdir(work)
    from slug_pl import cli

    captured = {}
    original = cli.run_cli

    def spy(args, **kwargs):
        captured["cli"] = original(args, **kwargs)
        return captured["cli"]

    monkeypatch.setattr(cli, "run_cli", spy)
    assert main(["validate", "--config", str(config), "--model.edit", str(run / "edit.safetensors")]) == 0
    metrics = captured["cli"].model.last_eval
    for k, v in summary["validation"].items():
        assert metrics[k] == pytest.approx(v, abs=1e-6), k


def test_test_with_edit_reproduces_the_after_metrics(fitted, monkeypatch):
    """``summary.json``'s after block (held-out test sets) equals ``slug-pl test`` with the patch."""
    work, run, config, _ = fitted[:4]
    summary = json.loads((run / "summary.json").read_text())
    monkeypatch.chdir(work)
    out = work / "test_metrics.json"
    assert main(["test", "--config", str(config), "--model.edit", str(run / "edit.safetensors"),
                 "--json", str(out)]) == 0
    metrics = json.loads(out.read_text())["metrics"]
    for k, v in summary["after"].items():
        assert metrics[k] == pytest.approx(v, abs=1e-6), k
    assert main(["test", "--config", str(config), "--json", str(work / "before.json")]) == 0
    before = json.loads((work / "before.json").read_text())["metrics"]
    for k, v in summary["before"].items():
        assert before[k] == pytest.approx(v, abs=1e-6), k


def test_search_reruns_on_saved_gradients(fitted, monkeypatch):
    work, run, config, _ = fitted[:4]
    monkeypatch.chdir(work)
    main(["fit", "--config", str(config), "--model.gradients_from", str(run / "gradients")])
    rerun = max((work / "lightning_logs").iterdir(), key=lambda p: int(p.name.split("_")[1]))
    assert not (rerun / "gradients").exists()  # nothing recomputed
    assert (rerun / "ranking.csv").read_text() == (run / "ranking.csv").read_text()
    first, second = (json.loads((d / "summary.json").read_text()) for d in (run, rerun))
    assert first["method"]["edits"] == second["method"]["edits"]
    assert second["timings_s"]["gradients"] == 0.0


def test_print_config_lists_search_and_family(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--print_config", "--model", "slug_pl.methods.SlugModule", "--model.family",
              "slug_pl.families.OpenClip"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["forget_target"] == {"metric": "forget_top5", "value": 0.0}
    assert "forget_target" not in printed["model"]["init_args"]  # linked from the one section, not set twice
    assert printed["model"]["init_args"]["family"]["class_path"] == "slug_pl.families.OpenClip"
    assert printed["trainer"]["max_epochs"] == 1


def test_two_concepts_get_one_edit_each_from_the_joint_search(tmp_path, monkeypatch, small_world, tiny_checkpoint):
    """Two concepts: one edit each; the beam keeps ``beam_width`` complete edit sets, scored on the
    combined model, and the run carries the best of them (targets met, then retain + utility);
    the patch reproduces the edited checkpoint; search.csv says which concept each row searched."""
    beam_width = 2
    monkeypatch.chdir(tmp_path)
    pair = json.loads(Path(small_world["identities_json"]).read_text())[:2]
    forget = {}
    for i, concept in enumerate(pair):
        assert main(["mine", "--shards", small_world["corpus"], "--name", concept, "--out", f"forget{i}"]) == 0
        forget[concept] = f"forget{i}/forget-000000.tar"
    config = write_config(tmp_path, small_world, tiny_checkpoint, "unused",
                          data={"forget": forget, "concepts": pair},
                          search={"top_k": 2, "max_evals": 4, "beam_width": beam_width, "save_checkpoint": True})
    code = main(["fit", "--config", str(config)])
    run = tmp_path / "lightning_logs" / "version_0"
    summary = json.loads((run / "summary.json").read_text())
    assert code == (0 if summary["target"]["met"] else EXIT_TARGET_NOT_MET)
    per_concept = summary["method"]["per_concept"]
    assert [c["concept"] for c in per_concept] == pair and list(summary["per_concept"]) == pair

    alternatives = summary["method"]["joint"]["alternatives"]
    assert 1 <= len(alternatives) <= beam_width and summary["method"]["search"]["beam_width"] == beam_width
    assert all([e["concept"] for e in a["edits"]] == pair for a in alternatives)
    best = max(alternatives, key=lambda a: (a["targets_met"],
                                            a["validation"]["retain_top1"] + a["validation"]["utility_top1"]))
    chosen = [(c["layer"], c["step"]) for c in per_concept]
    assert [layer for layer, _ in chosen] == [e["layer"] for e in best["edits"]]
    for (_, step), e in zip(chosen, best["edits"]):  # the same step, or one raised by the final re-check
        assert step == pytest.approx(e["step"]) or step >= 2 * e["step"] * (1 - 1e-9)

    # one patch entry per edited tensor; applied in order, it reproduces the edited checkpoint
    model = OpenClip("slug-tiny-vit", pretrained=tiny_checkpoint).load()
    edits, _ = load_edits(run / "edit.safetensors")
    assert sorted(e.name for e in edits) == sorted({layer for layer, _ in chosen})
    for e in edits:
        apply_edit(model, e)
    edited = OpenClip("slug-tiny-vit", pretrained=str(run / "edited_model" / "open_clip_model.safetensors")).load()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in edited.state_dict().items())

    rows = list(csv.DictReader((run / "search.csv").open()))
    assert len(rows) == summary["cost"]["evaluations"] and {r["concept"] for r in rows} == set(pair)
    for concept in pair:
        assert (run / f"ranking_{concept.lower().replace(' ', '_')}.csv").is_file()


# -- what a user sees ------------------------------------------------------------------------------


def test_fit_console_output_fits_one_screen_without_notices_that_do_not_apply(fitted):
    """The fit's whole console output: a screenful, no Lightning notice about optimizers, eval
    mode, empty validation loaders or LightningCLI arguments, warnings as one line each."""
    from slug_pl.console import GRADIENT_ONLY_WARNINGS, NOT_APPLICABLE_WARNINGS, QUIET_NOTICES

    lines = (fitted.stdout + fitted.stderr).splitlines()
    assert fitted.stdout == ""  # nothing for a program to read: the results are files
    assert len(lines) <= 20, "\n".join(lines)
    silenced = [*NOT_APPLICABLE_WARNINGS, *GRADIENT_ONLY_WARNINGS, *QUIET_NOTICES]
    for line in lines:
        assert not any(re.search(p, line) for p in silenced), line
        assert "Traceback" not in line and "site-packages" not in line, line
        assert "warning" not in line.lower() or line.startswith("slug-pl fit: warning: "), line
    assert lines[-1].startswith("slug: target forget_top5 <= 0")


def test_test_json_dash_writes_only_json_to_stdout(fitted, monkeypatch, capsys):
    monkeypatch.chdir(fitted.work)
    edit = str(fitted.run / "edit.safetensors")
    assert main(["test", "--config", str(fitted.config), "--model.edit", edit, "--json", "-"]) == 0
    out, err = capsys.readouterr()
    record = json.load(io.StringIO(out))
    assert record["stage"] == "test" and record["edit"] == edit and "forget_top1" in record["metrics"]
    assert "warning" not in err


@pytest.mark.slow  # ~25 s: a second process
def test_test_json_stdout_holds_only_json(fitted):
    """``slug-pl test --json -`` with a progress bar: stdout parses with json.load; the table,
    progress bar and logs go to stderr."""
    done = slug_pl_command(["test", "--config", str(fitted.config), "--model.edit", str(fitted.run / "edit.safetensors"),
                            "--json", "-", "--trainer.enable_progress_bar", "true"], fitted.work)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.load(io.StringIO(done.stdout))
    summary = json.loads((fitted.run / "summary.json").read_text())
    assert record["stage"] == "test" and record["edit"] == str(fitted.run / "edit.safetensors")
    for k, v in summary["after"].items():
        assert record["metrics"][k] == pytest.approx(v, abs=1e-6), k
    assert 0 <= record["mia"]["mean"] <= 100 and record["mia"]["n"] == 4


def test_validate_prints_each_metric_once(fitted, monkeypatch, capsys):
    """One table on stdout, one row per set, the numbers of the JSON record (in %)."""
    monkeypatch.chdir(fitted.work)
    record_path = fitted.work / "validate.json"
    assert main(["validate", "--config", str(fitted.config), "--json", str(record_path)]) == 0
    out, err = capsys.readouterr()
    assert "DataLoader" not in out + err
    rows = out.splitlines()
    assert rows[0].startswith("validate: ") and "(edit: none)" in rows[0]
    assert rows[1].split() == ["top-1", "top-5"]
    assert [r.split()[0] for r in rows[2:5]] == ["forget", "retain", "utility"]  # one row per set
    assert rows[5].startswith("membership inference: ")
    metrics = json.loads(record_path.read_text())["metrics"]
    for row in rows[2:5]:
        name, top1, top5 = row.split()
        assert float(top1.rstrip("%")) == pytest.approx(100 * metrics[f"{name}_top1"], abs=0.051)
        assert float(top5.rstrip("%")) == pytest.approx(100 * metrics[f"{name}_top5"], abs=0.051)


def test_missing_edit_file_is_named_as_an_edit(fitted, monkeypatch, capsys):
    monkeypatch.chdir(fitted.work)
    assert main(["validate", "--config", str(fitted.config), "--model.edit", "nope/edit.safetensors"]) == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("slug-pl validate: error: edit file not found: nope/edit.safetensors") and "gradient" not in last
