"""Where the work after the gradient pass runs.

Lightning's teardown moves the LightningModule to the host (``Strategy.teardown`` calls
``lightning_module.cpu()``) *before* ``on_fit_end``, where SLUG's step search, a baseline's
selection and every method's before/after evaluation run. On a GPU machine that put the whole
search on the CPU. These tests spy on the module's placements: when the search (or the final
evaluation) starts, the module's last placement must be ``trainer.strategy.root_device``, not the
host move of the teardown. The CUDA whole-run tests (``pytest -m gpu``) check the same on a GPU
through ``summary.json``'s ``devices``.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import write_config

from slug_pl.cli import main
from slug_pl.methods import base as methods_base
from slug_pl.methods.base import UnlearningModule
from slug_pl.step_search import StepSearch

#: What the spy logs for Lightning's teardown move (``module.cpu()``).
HOST = "host (teardown)"


@pytest.fixture
def placements(monkeypatch):
    """Every placement of a method's module, in order: the device of each ``.to(device)`` and
    :data:`HOST` for each ``.cpu()``; plus what it was when the search and the final evaluation
    started (``at``)."""
    log: list[str] = []
    at: dict[str, str | None] = {}
    real_to, real_cpu = UnlearningModule.to, UnlearningModule.cpu

    def to(self, *args, **kwargs):
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        if device is not None:
            log.append(str(device))
        return real_to(self, *args, **kwargs)

    def cpu(self):
        log.append(HOST)
        return real_cpu(self)

    real_search, real_evaluation = StepSearch.search_concepts, methods_base.evaluate_before_after

    def search_concepts(self, *args, **kwargs):
        at["search"] = log[-1] if log else None
        return real_search(self, *args, **kwargs)

    def evaluate_before_after(*args, **kwargs):
        at["evaluation"] = log[-1] if log else None
        return real_evaluation(*args, **kwargs)

    monkeypatch.setattr(UnlearningModule, "to", to)
    monkeypatch.setattr(UnlearningModule, "cpu", cpu)
    monkeypatch.setattr(StepSearch, "search_concepts", search_concepts)
    monkeypatch.setattr(methods_base, "evaluate_before_after", evaluate_before_after)
    return {"log": log, "at": at}


def test_the_search_and_the_final_evaluation_run_on_the_root_device(tmp_path, small_world, tiny_checkpoint,
                                                                    forget_shard, placements):
    torch.set_num_threads(1)
    config = write_config(tmp_path, small_world, tiny_checkpoint, forget_shard, search={"top_k": 1, "max_evals": 2},
                          trainer={"accelerator": "cpu", "devices": 1, "enable_progress_bar": False,
                                   "default_root_dir": str(tmp_path)})
    main(["fit", "--config", str(config)])
    log, at = placements["log"], placements["at"]
    root = "cpu"  # trainer.strategy.root_device of accelerator cpu
    assert HOST in log, f"the spy never saw Lightning's teardown move: {log}"
    assert at["search"] == root, f"the search started with the module's last placement {at['search']!r} ({log})"
    assert at["evaluation"] == root, f"the final evaluation started after placement {at['evaluation']!r} ({log})"
    assert log[-1] == HOST, "the module goes back to the host after the search, freeing the accelerator"
    summary = json.loads((tmp_path / "lightning_logs" / "version_0" / "summary.json").read_text())
    assert summary["devices"] == {"pass": root, "after_pass": root, "evaluation": root, "precision": "32-true",
                                  "search_ranks": 1}


def test_a_baseline_selects_and_evaluates_on_the_root_device(tmp_path, small_world, tiny_checkpoint, forget_shard,
                                                             placements):
    torch.set_num_threads(1)
    config = write_config(tmp_path, small_world, tiny_checkpoint, forget_shard)
    method = tmp_path / "method.yaml"
    method.write_text(yaml.safe_dump({"model": {"class_path": "slug_pl.methods.GaModule", "init_args": {"lr": 1e-5}},
                                      "trainer": {"max_epochs": 1}}))
    main(["fit", "--config", str(config), "--config", str(method), "--trainer.default_root_dir", str(tmp_path)])
    at = placements["at"]
    assert at["evaluation"] == "cpu", f"the baseline's final evaluation started after {at['evaluation']!r}"
    summary = json.loads((tmp_path / "lightning_logs" / "version_0" / "summary.json").read_text())
    assert summary["devices"]["after_pass"] == summary["devices"]["evaluation"] == "cpu"


def test_a_downstream_model_configured_on_the_cpu_stays_there_with_a_warning_under_a_gpu_run():
    """A target's own ``device`` wins over the run's, but a CPU one under a CUDA run is said aloud;
    without one the target follows the run."""
    import warnings

    from slug_pl.targets.stable_diffusion import StableDiffusionAdapter

    pinned = StableDiffusionAdapter("an/unloaded/pipeline", device="cpu")
    with pytest.warns(UserWarning, match=r"runs on the CPU as its config says \(device: cpu\) while the run is on cuda:0"):
        pinned.use_run_device("cuda:0")
    assert pinned.resolved_device() == torch.device("cpu")

    following = StableDiffusionAdapter("an/unloaded/pipeline")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        following.use_run_device("cuda:0")
        StableDiffusionAdapter("an/unloaded/pipeline", device="cpu").use_run_device("cpu")
    assert following.resolved_device() == torch.device("cuda:0")
