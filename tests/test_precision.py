"""Precision and memory options of the gradient pass: bf16 autocast keeps fp32 gradient sums close
to the fp32 pass; activation checkpointing gives the same gradients; peak memory is reported."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import write_config

from slug_pl.cli import main
from slug_pl.data.mining import mine_forget_set
from slug_pl.gradients import load_tensors

pytestmark = pytest.mark.slow


def fit_variants(work: Path, world: dict, checkpoint: str, variants: dict[str, list[str]],
                 trainer: dict | None = None) -> dict[str, Path]:
    """One fit per variant (extra CLI arguments) of the first identity, each in ``work/<tag>``;
    returns tag -> run folder."""
    concept = json.loads(Path(world["identities_json"]).read_text())[0]
    forget = [str(p) for p in mine_forget_set(world["corpus"], [concept], work / "forget").output_shards]
    old = os.getcwd()
    os.chdir(work)
    out = {}
    try:
        for tag, extra in variants.items():
            root = work / tag
            config = write_config(root.parent, world, checkpoint, forget,
                                  trainer={"default_root_dir": str(root), **(trainer or {})},
                                  search={"top_k": 1, "max_evals": 2})
            main(["fit", "--config", str(config), *extra])
            out[tag] = root / "lightning_logs" / "version_0"
    finally:
        os.chdir(old)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_world, tiny_checkpoint):
    return fit_variants(tmp_path_factory.mktemp("precision"), small_world, tiny_checkpoint,
                        {"fp32": [], "bf16": ["--trainer.precision", "bf16-mixed"],
                         "ckpt": ["--model.activation_checkpointing", "true"]})


def _total_rel_err(a: dict, b: dict) -> float:
    num = sum(float((a[k].double() - b[k].double()).norm() ** 2) for k in a)
    den = sum(float(b[k].double().norm() ** 2) for k in b)
    return (num / den) ** 0.5


def test_bf16_autocast_keeps_fp32_sums_close_to_fp32(runs):
    for name in ("forget", "retain"):
        ref, _ = load_tensors(runs["fp32"] / "gradients" / f"{name}.safetensors")
        bf16, meta = load_tensors(runs["bf16"] / "gradients" / f"{name}.safetensors")
        assert meta["precision"] == "bf16-mixed"
        assert all(t.dtype == torch.float32 for t in bf16.values())  # sums are kept in fp32
        err = _total_rel_err(bf16, ref)
        assert 0 < err < 0.05, (name, err)  # bf16 rounding is visible but small


def test_activation_checkpointing_gives_the_same_gradients(runs):
    for name in ("forget", "retain"):
        ref, _ = load_tensors(runs["fp32"] / "gradients" / f"{name}.safetensors")
        ckpt, _ = load_tensors(runs["ckpt"] / "gradients" / f"{name}.safetensors")
        assert _total_rel_err(ckpt, ref) < 1e-5


def test_peak_memory_is_in_the_summary(runs):
    summary = json.loads((runs["fp32"] / "summary.json").read_text())
    assert summary["memory"]["device"] == "cpu" and summary["memory"]["peak_rss_gib"] > 0.1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_gpu_pass_gives_the_cpu_gradients(runs, tmp_path_factory, small_world, tiny_checkpoint):
    """The same run on a CUDA GPU: float32 sums agree with the CPU's (cuDNN's TF32 convolutions
    and another summation order round differently); bf16 autocast stays close; peak memory is the
    GPU allocator's."""
    gpu = fit_variants(tmp_path_factory.mktemp("precision_gpu"), small_world, tiny_checkpoint,
                       {"fp32": [], "bf16": ["--trainer.precision", "bf16-mixed"]},
                       trainer={"accelerator": "gpu"})
    for name in ("forget", "retain"):
        ref, _ = load_tensors(runs["fp32"] / "gradients" / f"{name}.safetensors")
        fp32, _ = load_tensors(gpu["fp32"] / "gradients" / f"{name}.safetensors")
        bf16, _ = load_tensors(gpu["bf16"] / "gradients" / f"{name}.safetensors")
        assert _total_rel_err(fp32, ref) < 1e-2, (name, _total_rel_err(fp32, ref))
        assert _total_rel_err(bf16, ref) < 0.05, (name, _total_rel_err(bf16, ref))
    summary = json.loads((gpu["fp32"] / "summary.json").read_text())
    assert summary["memory"]["device"] != "cpu" and summary["memory"]["peak_allocated_gib"] > 0, summary["memory"]
