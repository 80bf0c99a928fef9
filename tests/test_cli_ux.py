"""What ``slug-pl`` says when something is wrong: one last line naming the problem (with "did you
mean" where a close name exists) and exit status 2, before any work; the traceback only with
--debug; a resume hint on Ctrl-C; help that lists every command."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import write_config

from slug_pl.cli import EXIT_INTERRUPTED, EXTRA_COMMANDS, LIGHTNING_COMMANDS, main
from slug_pl.console import interrupt_hint

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def config(tmp_path, small_world, tiny_checkpoint, forget_shard):
    return write_config(tmp_path, small_world, tiny_checkpoint, forget_shard,
                        trainer={"default_root_dir": str(tmp_path / "runs")})


def _last_error(capsys, command: str = "fit") -> str:
    err = capsys.readouterr().err
    last = err.splitlines()[-1]
    prefix = f"slug-pl {command}: error: "
    assert last.startswith(prefix), err[-2000:]
    return last[len(prefix):]


def _edit(config: Path, change) -> Path:
    data = yaml.safe_load(config.read_text())
    change(data)
    config.write_text(yaml.safe_dump(data))
    return config


# -- 6. names and keys checked before any work -------------------------------------------------------


def test_unknown_concept_is_refused_before_any_batch(config, small_world, tmp_path, capsys):
    concept = json.loads(Path(small_world["identities_json"]).read_text())[0]
    typo = concept[:-2] + concept[-1]  # one letter dropped
    assert main(["fit", "--config", str(config), "--data.init_args.concepts", json.dumps([typo])]) == 2
    assert _last_error(capsys) == (
        f"data.concepts: {typo!r} is not in the class list of data.validation.concepts (20 names) "
        f"(did you mean {concept!r}?); spell each concept exactly as there")
    assert not (tmp_path / "runs").exists()  # no run folder, no event file: nothing ran


def test_unknown_demo_identity_is_one_short_message(capsys):
    """The demo data module refuses the name in its constructor (jsonargparse used to wrap it into
    a 71-line traceback ending in 'Given value: Namespace(...)')."""
    assert main(["fit", "--config", str(REPO / "configs" / "demo.yaml"),
                 "--data.init_args.concepts", '["Quinn Lindqvst"]']) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) <= 3 and "Traceback" not in err and "Namespace(" not in err
    last = err.splitlines()[-1]
    assert last.startswith("slug-pl fit: error: data.concepts: 'Quinn Lindqvst' is not an identity of the demo "
                           "world (seed 0) (did you mean 'Quinn Lindqvist'?)")


def _top_key(data):
    data["serch"] = data.pop("search")


@pytest.mark.parametrize("args, change, expected", [
    (["--data.init_args.batchsize", "3"], None,
     "data: unknown key 'batchsize' of SlugDataModule (did you mean 'batch_size'?)"),
    ([], lambda d: d["data"]["init_args"].update(batchsize=3),
     "data: unknown key 'batchsize' of SlugDataModule (did you mean 'batch_size'?)"),
    ([], lambda d: d["model"]["init_args"]["family"]["init_args"].update(model_nme="x"),
     "model.family: unknown key 'model_nme' of OpenClip (did you mean 'model_name'?)"),
    ([], lambda d: d["data"]["init_args"]["validation"]["concepts"].update(
        shard=d["data"]["init_args"]["validation"]["concepts"].pop("shards")),
     "data.validation.concepts: unknown key 'shard' (did you mean 'shards'?)"),
    ([], lambda d: d["search"].update(top_kk=3), "unknown key 'search.top_kk' (did you mean 'search.top_k'?)"),
    ([], _top_key, "unknown key 'serch.max_evals' (did you mean 'search.max_evals'?)"),
    (["--serch.top_k", "3"], None, "unrecognized arguments: --serch.top_k 3 (did you mean '--search.top_k'?)"),
    (["--data", "slug_pl.data.datamodule.SlugDataModul"], None,
     "data: no class 'SlugDataModul' in module slug_pl.data.datamodule (did you mean 'SlugDataModule'?)"),
    (["--data.init_args.batch_size", "abc"], None, "data.batch_size: expected int, got 'abc'"),
])
def test_config_typos_name_the_key(config, capsys, args, change, expected):
    if change is not None:
        _edit(config, change)
    assert main(["fit", "--config", str(config), *args]) == 2
    assert _last_error(capsys) == expected


def test_debug_shows_the_traceback(config, capsys, monkeypatch):
    with pytest.raises(ValueError, match=r"data\.batch_size must be a positive integer"):
        main(["fit", "--config", str(config), "--data.init_args.batch_size", "0", "--debug"])
    monkeypatch.setenv("SLUG_PL_DEBUG", "1")
    with pytest.raises(ValueError, match=r"data\.batch_size must be a positive integer"):
        main(["fit", "--config", str(config), "--data.init_args.batch_size", "0"])


def test_missing_shard_and_missing_config_are_named(config, tmp_path, capsys):
    assert main(["fit", "--config", str(config), "--data.init_args.retain", str(tmp_path / "gone.tar")]) == 2
    assert _last_error(capsys).startswith(f"shard not found: {tmp_path / 'gone.tar'}")
    assert main(["fit", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in _last_error(capsys)


def test_a_pass_without_its_batches_fails_loudly(config, capsys):
    assert main(["fit", "--config", str(config), "--trainer.limit_train_batches", "0"]) == 2
    assert _last_error(capsys).startswith("trainer.limit_train_batches is 0: the gradient pass needs every batch")


def test_unknown_command_suggests_the_close_one(capsys):
    assert main(["fitt"]) == 2
    commands = ", ".join([*LIGHTNING_COMMANDS, *EXTRA_COMMANDS])  # every registered command
    assert {"fit", "validate", "test", "mine", "compare"} <= set(commands.split(", "))
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"slug-pl: error: unknown command 'fitt' (did you mean 'fit'?); the commands are {commands}")
    assert main([]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == "slug-pl: error: give a command"


# -- 8. Ctrl-C says how to resume ----------------------------------------------------------------------

STALL = '''
import time
from pathlib import Path
from lightning.pytorch import Callback


class StallAfter(Callback):
    """Blocks after ``batches`` training batches, until the test sends Ctrl-C (SIGINT)."""

    def __init__(self, batches: int, marker: str):
        self.batches, self.marker = batches, marker

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx + 1 == self.batches:
            Path(self.marker).write_text("stalled")
            time.sleep(600)
'''


@pytest.mark.slow  # ~50 s under load: a second process runs the pass
def test_ctrl_c_in_the_pass_says_how_to_resume(config, tmp_path):
    (tmp_path / "stall_module.py").write_text(STALL)
    marker = tmp_path / "stalled"
    stall = {"class_path": "stall_module.StallAfter", "init_args": {"batches": 2, "marker": str(marker)}}
    _edit(config, lambda d: d["trainer"].update(callbacks=[stall]))
    env = os.environ | {"PYTHONPATH": f"{REPO}{os.pathsep}{tmp_path}", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # the child gets Ctrl-C's default action back: a suite run as a background job of a script
    # (`cmd &`) ignores SIGINT, the child would inherit that and Python would then never raise
    # KeyboardInterrupt (the test hung so twice). -X faulthandler: should it hang anyway, SIGABRT
    # makes it print every thread's stack for the failure.
    proc = subprocess.Popen([sys.executable, "-X", "faulthandler", "-m", "slug_pl.cli", "fit", "--config", str(config),
                             "--model.checkpoint_every", "1"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "the pass did not reach batch 2"
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        _, err = proc.communicate(timeout=60)
        pytest.fail(f"the run did not exit within 300 s of Ctrl-C; its threads when aborted:\n{err[-6000:]}")
    run = tmp_path / "runs" / "lightning_logs" / "version_0"
    assert proc.returncode == EXIT_INTERRUPTED, err[-3000:]
    assert err.splitlines()[-1] == (
        f"slug-pl fit: interrupted; the gradient pass saved its state in {run / 'gradients' / 'partial'}: "
        f"resume with slug-pl fit --config {run / 'config.yaml'} --model.resume_from {run}")
    assert [p.name for p in (run / "gradients" / "partial").iterdir()] == ["rank0-batch000000002.pt"]


def test_interrupt_hint_after_the_pass_and_before_any_state(tmp_path):
    for name in ("forget", "retain"):
        (tmp_path / "gradients").mkdir(exist_ok=True)
        (tmp_path / "gradients" / f"{name}.safetensors").write_bytes(b"")
    (tmp_path / "ranking.csv").write_text("")
    assert interrupt_hint(tmp_path) == (
        f"interrupted after the gradient pass (the gradients are saved, ranking.csv is written); re-run the "
        f"search in seconds: slug-pl fit --config {tmp_path / 'config.yaml'} --model.gradients_from "
        f"{tmp_path / 'gradients'}")
    assert interrupt_hint(tmp_path / "empty").startswith("interrupted before the gradient pass saved any state; "
                                                         "with --model.checkpoint_every N")


def test_json_output_is_checked_before_anything_is_built(config, tmp_path, capsys, monkeypatch):
    from slug_pl.families.open_clip import OpenClip

    def never(self):
        raise AssertionError("the model was loaded before --json was checked")

    monkeypatch.setattr(OpenClip, "load", never)
    taken = tmp_path / "metrics.json"
    taken.write_text("{}")
    assert main(["validate", "--config", str(config), "--json", str(taken)]) == 2
    assert _last_error(capsys, "validate") == (f"--json: {taken} already exists and slug_pl never overwrites a file; "
                                               f"give a new file name, or '-' to print the JSON on stdout")
    assert taken.read_text() == "{}" and not (tmp_path / "runs").exists()


def test_a_model_section_without_its_method_says_what_to_write(config, tmp_path, capsys):
    """The format before methods had classes (model: {family: ...}) built the shared base and
    ended in Lightning's 'No training_step() method defined', leaving an empty config.yaml."""
    def old_format(data):
        data["model"] = data["model"]["init_args"]

    _edit(config, old_format)
    assert main(["fit", "--config", str(config)]) == 2
    message = _last_error(capsys)
    assert message.startswith("the model section names no method: give its class_path") and \
        "slug_pl.methods.SlugModule" in message
    assert not (tmp_path / "runs").exists()  # no run folder behind a refused run


def test_null_on_the_command_line_is_random_init(config, capsys):
    """jsonargparse turns a null given to a nested class's option into the string 'None'; it used
    to reach open_clip as a pretrained tag ('None' is not a known tag), in a 49-line traceback."""
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(config), "--model.family.init_args.pretrained", "null", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["family"]["init_args"]
    from slug_pl.families.open_clip import OpenClip

    family = OpenClip(**{k: v for k, v in printed.items() if k in ("model_name", "pretrained")})
    assert family.pretrained is None
    assert sum(p.numel() for p in family.load().parameters()) > 0  # random init, no tag looked up


# -- 11. help ------------------------------------------------------------------------------------------


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("fit", "validate", "test", "mine"):
        assert f"\n  {command} " in out
    assert "Runs the full optimization routine" not in out


def test_fit_help_has_no_options_that_do_nothing(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: slug-pl fit --config CONFIG.yaml")
    # the top says where the method's, the family's and the data's own keys are, and they answer
    top = "".join(out.split("options:")[0].split())  # argparse wraps lines, even inside an option
    for ask in ("--model.help slug_pl.methods.SlugModule", "--model.family.help slug_pl.families.OpenClip",
                "--data.help slug_pl.data.datamodule.SlugDataModule", "--print_config"):
        assert "".join(ask.split()) in top, ask
    with pytest.raises(SystemExit):
        main(["fit", *"--model.help slug_pl.methods.SlugModule".split()])
    assert "--model.gradients_from" in capsys.readouterr().out
    for option in ("--optimizer", "--lr_scheduler", "--trainer.use_distributed_sampler", "--trainer.fast_dev_run",
                   "--trainer.num_sanity_val_steps", "--trainer.enable_checkpointing"):
        assert option not in out, option
    assert "--search.top_k" in out and "--trainer.devices" in out and "--json" in out
    # 634 lines with the no-op options; real options add a few lines each (search.stop_dominated: 4)
    assert len(out.splitlines()) < 475


def test_hidden_trainer_settings_still_apply(config, monkeypatch):
    from slug_pl import cli

    captured = {}
    original = cli.run_cli

    def spy(args, **kwargs):
        captured["cli"] = original(args, **kwargs)
        return captured["cli"]

    monkeypatch.setattr(cli, "run_cli", spy)
    monkeypatch.chdir(config.parent)
    assert main(["validate", "--config", str(config)]) == 0
    trainer = captured["cli"].trainer
    assert trainer.num_sanity_val_steps == 0 and trainer.checkpoint_callback is None and trainer.max_epochs == 1


@pytest.mark.parametrize("name", ["demo.yaml", "demo_hf.yaml", "clip_vit_b32_laion.yaml", "demo_llava.yaml",
                                  "demo_sd.yaml", "demo_unlearncanvas.yaml", "demo_reference.yaml"])
def test_shipped_configs_parse(name, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(REPO / "configs" / name), "--print_config"])
    assert stop.value.code == 0 and yaml.safe_load(capsys.readouterr().out)["model"]["class_path"]


@pytest.mark.slow  # minutes: builds the demo world and trains its CLIP in a fresh folder
def test_fresh_demo_console_fits_one_screen(fresh_demo):
    """From a fresh folder (as a new clone): the demo's whole console output is a screenful, with
    no warning that does not apply."""
    from slug_pl.console import GRADIENT_ONLY_WARNINGS, NOT_APPLICABLE_WARNINGS, QUIET_NOTICES

    lines = fresh_demo["console"]
    assert fresh_demo["code"] in (0, 3), "\n".join(lines[-40:])
    assert len(lines) <= 30, "\n".join(lines)
    silenced = [*NOT_APPLICABLE_WARNINGS, *GRADIENT_ONLY_WARNINGS, *QUIET_NOTICES, "No pretrained weights loaded"]
    for line in lines:
        assert not any(re.search(p, line) for p in silenced), line
        assert "warning" not in line.lower() or line.startswith("slug-pl fit: warning: "), line


def test_an_old_config_s_forget_target_says_where_it_moved(config, capsys):
    """The forget target was search.target_metric / target_value for SLUG and model arguments for
    the baselines; it is one top-level section now, and an old config is told so."""
    def old_form(data):
        data["search"]["target_metric"] = data.pop("forget_target")["metric"]

    _edit(config, old_form)
    assert main(["fit", "--config", str(config)]) == 2
    assert _last_error(capsys).endswith("the forget target is set once for every method, in the top-level section "
                                        "forget_target (write forget_target.metric there, or --forget_target.metric)")
