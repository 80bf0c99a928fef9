"""Reliability (issue 5): bad input gets a clear error naming the file, nothing is lost or
overwritten, an interrupted gradient pass resumes to identical gradients, and the same config and
seed give identical artifacts.

Most checks run the gradient pass alone (a plain Trainer, no search) on small shards; the run
fixture ``run_a`` is one full ``slug-pl fit`` shared by the reproducibility, resume and search tests.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
import webdataset as wds
from conftest import write_config
from lightning.pytorch import Callback, Trainer
from PIL import Image

from slug_pl.atomic import atomic_folder, atomic_output, rebuilt_folder, swap_into_place, write_text
from slug_pl.cli import EXIT_TARGET_NOT_MET, TRAINER_DEFAULTS, main
from slug_pl.data.datamodule import SlugDataModule
from slug_pl.data.mining import EmptyForgetSetError, mine_forget_set
from slug_pl.data.pairs import PairBatches, PairSet, shard_sample_counts
from slug_pl.data.shards import BadSampleError, ShardError
from slug_pl.families.open_clip import OpenClip
from slug_pl.gradients import GradientFileError, load_tensors, save_tensors, weights_fingerprint
from slug_pl.methods.slug import SlugModule
from slug_pl.resume import ResumeError
from slug_pl.skip_list import read_skip_list
from slug_pl.methods.slug import SlugSearch

# -- helpers -------------------------------------------------------------------------------------


def _png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def _good(i: int) -> dict:
    return {"__key__": f"s{i:03d}", "png": _png((10 * i % 256, 40, 90)), "txt": f"a photo number {i}".encode()}


def _write_shard(path: Path, samples: list[dict]) -> str:
    with wds.TarWriter(str(path)) as sink:
        for s in samples:
            sink.write(s)
    return str(path)


BAD = {
    "no_caption": {"__key__": "bad-nocap", "png": _png((1, 2, 3))},
    "no_image": {"__key__": "bad-noimg", "txt": b"a caption without a picture"},
    "undecodable": {"__key__": "bad-decode", "jpg": b"\xff\xd8 these are not jpeg bytes", "txt": b"broken"},
}
REASON = {"no_caption": "no caption", "no_image": "no image", "undecodable": "does not decode"}


@pytest.fixture(scope="module")
def family():
    return OpenClip("slug-tiny-vit")


def _sha(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _pass_only(root: Path, checkpoint: str, forget, retain, family_kwargs=None, module_kwargs=None,
               callbacks=(), trainer_kwargs=None, **data) -> SlugModule:
    """Run the gradient pass alone (no search) with run directory ``root``; returns the module."""
    family = OpenClip("slug-tiny-vit", pretrained=checkpoint, **(family_kwargs or {}))
    data = {"batch_size": 4, "retain_batch_size": 8} | data
    module = SlugModule(family, **(module_kwargs or {}))
    trainer_kwargs = {"accelerator": "cpu", "devices": 1} | (trainer_kwargs or {})
    trainer = Trainer(**TRAINER_DEFAULTS, default_root_dir=str(root),
                      logger=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=list(callbacks), **(trainer_kwargs or {}))
    trainer.fit(module, datamodule=SlugDataModule(forget=forget, retain=retain, **data))
    return module


@pytest.fixture(scope="module")
def forget_shards(tmp_path_factory, small_world):
    concept = json.loads(Path(small_world["identities_json"]).read_text())[0]
    out = tmp_path_factory.mktemp("mined") / "forget"
    return [str(p) for p in mine_forget_set(small_world["corpus"], [concept], out).output_shards]


# -- 1. bad input ------------------------------------------------------------------------------


def test_missing_shard_is_named(tmp_path):
    dm = SlugDataModule(forget=str(tmp_path / "nope-{000..001}.tar"), retain=str(tmp_path / "r.tar"))
    with pytest.raises(ShardError, match=r"shard not found: .*nope-000\.tar"):
        dm.pair_set("forget")
    (tmp_path / "dir.tar").mkdir()  # exists, but cannot be read as a shard
    with pytest.raises(ShardError, match=r"dir\.tar.*not a regular file"):
        SlugDataModule(forget=str(tmp_path / "dir.tar")).pair_set("forget")


def test_corrupt_tar_is_named(tmp_path):
    bad = tmp_path / "corrupt.tar"
    bad.write_bytes(os.urandom(3000))
    with pytest.raises(ShardError, match=r"cannot read shard .*corrupt\.tar.*re-download"):
        SlugDataModule(forget=str(bad)).pair_set("forget")


@pytest.mark.parametrize("cut", ["inside_a_file", "at_a_file_boundary"])
def test_truncated_tar_is_named(tmp_path, cut):
    full = Path(_write_shard(tmp_path / "full.tar", [_good(i) for i in range(4)]))
    with tarfile.open(full) as tar:
        members = tar.getmembers()
    # the header offset of the 5th member: the archive cut exactly between two files
    end = members[4].offset if cut == "at_a_file_boundary" else members[4].offset_data + 10
    short = tmp_path / "short.tar"
    short.write_bytes(full.read_bytes()[:end])
    assert shard_sample_counts([str(full)]) == [4]
    with pytest.raises(ShardError, match=r"short\.tar.*(truncated|unexpected end)"):
        SlugDataModule(forget=str(short)).pair_set("forget")


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_sample_stops_naming_shard_and_key(tmp_path, family, kind):
    shard = _write_shard(tmp_path / "pairs.tar", [_good(0), _good(1), BAD[kind], _good(2)])
    ds = PairBatches([PairSet("forget", (shard,), 2, 4)], family.image_transform(), family.tokenize)
    with pytest.raises(BadSampleError, match=rf"{BAD[kind]['__key__']}.*pairs\.tar.*{REASON[kind]}.*bad_samples: skip"):
        list(ds)


def test_bad_sample_error_crosses_dataloader_workers(tmp_path, family):
    shard = _write_shard(tmp_path / "pairs.tar", [_good(0), BAD["undecodable"]])
    ds = PairBatches([PairSet("forget", (shard,), 1, 2)], family.image_transform(), family.tokenize)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1)
    with pytest.raises(BadSampleError, match=r"bad-decode.*pairs\.tar"):
        list(loader)


def test_skip_is_exact_and_the_same_on_every_rank(tmp_path, family):
    """Skipped samples become padding rows: per world size, the valid rows over all ranks are the
    good samples, every rank yields the same number of batches, and each skip is listed once."""
    samples = [_good(0), BAD["no_caption"], _good(1), _good(2), BAD["undecodable"], _good(3),
               BAD["no_image"], _good(4)]
    shard = _write_shard(tmp_path / "mixed.tar", samples)
    pair_set = PairSet("forget", (shard,), 3, len(samples))
    lists = {}
    for world in (1, 2, 3):
        valid, skipped, lengths = 0, [], set()
        for rank in range(world):
            batches = list(PairBatches([pair_set], family.image_transform(), family.tokenize, rank, world,
                                       bad_samples="skip"))
            lengths.add(len(batches))
            valid += sum(int(b["valid"].sum()) for b in batches)
            skipped += [r for b in batches for r in b["skipped"]]
        assert lengths == {3} and valid == 5
        lists[world] = sorted((r["index"], r["key"], r["reason"]) for r in skipped)
    assert lists[1] == lists[2] == lists[3]
    assert [(i, k) for i, k, _ in lists[1]] == [(1, "bad-nocap"), (4, "bad-decode"), (6, "bad-noimg")]


def test_skip_policy_lists_samples_and_matches_the_clean_set(tmp_path, tiny_checkpoint):
    good = [_good(i) for i in range(6)]
    mixed = good[:2] + [BAD["undecodable"]] + good[2:4] + [BAD["no_caption"], BAD["no_image"]] + good[4:]
    dirty = _write_shard(tmp_path / "dirty.tar", mixed)
    clean = _write_shard(tmp_path / "clean.tar", good)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    skip = _pass_only(tmp_path / "a", tiny_checkpoint, dirty, clean, bad_samples="skip", batch_size=3)
    ref = _pass_only(tmp_path / "b", tiny_checkpoint, clean, clean, batch_size=3)
    # the forget mean is over the good samples only: the same gradient as the clean set
    for name, g in ref.gradients["forget"].items():
        torch.testing.assert_close(skip.gradients["forget"][name], g, rtol=1e-5, atol=1e-7)
    _, meta = load_tensors(tmp_path / "a" / "gradients" / "forget.safetensors")
    assert meta["counts"]["samples"] == 6 and meta["counts"]["skipped"] == 3 and meta["bad_samples"] == "skip"
    listed = read_skip_list(tmp_path / "a" / "gradients", meta["skipped"], "forget.safetensors")
    assert meta["skipped"]["count"] == 3 and [(r["key"], r["shard"]) for r in listed] == \
        [("bad-decode", dirty), ("bad-nocap", dirty), ("bad-noimg", dirty)]
    record = json.loads((tmp_path / "a" / "skipped_samples.json").read_text())
    assert record["counts"] == {"forget": 3, "retain": 0} and record["samples"]["forget"] == listed


class AddForgetSamples(Callback):
    """Adds ``extra`` forget samples to this rank's sums before the pass reduces them (what a pass
    over some 16.8 M pairs would hold)."""

    def __init__(self, extra: int):
        self.extra = extra

    def on_train_epoch_end(self, trainer, pl_module):  # runs before the module's own hook
        pl_module._sums["forget"]["samples"] += self.extra


def test_sample_counts_are_exact_above_float32_integers(tmp_path, tiny_checkpoint, forget_shards):
    """2**24 + 1 is the first integer float32 cannot hold: the counts stay exact integers."""
    real = sum(shard_sample_counts(forget_shards))
    module = _pass_only(tmp_path, tiny_checkpoint, forget_shards, forget_shards,
                        callbacks=[AddForgetSamples(2**24 + 1 - real)])
    _, meta = load_tensors(tmp_path / "gradients" / "forget.safetensors")
    assert module.pass_stats["forget"]["samples"] == meta["counts"]["samples"] == 2**24 + 1


def test_every_sample_skipped_is_an_error(tmp_path, tiny_checkpoint, forget_shards):
    dirty = _write_shard(tmp_path / "allbad.tar", [BAD["no_caption"], BAD["undecodable"]])
    with pytest.raises(ValueError, match=r"every sample of the forget set was skipped.*allbad\.tar"):
        _pass_only(tmp_path, tiny_checkpoint, dirty, forget_shards, bad_samples="skip")
    assert not (tmp_path / "gradients" / "forget.safetensors").exists()


def test_empty_forget_set_is_named(tmp_path):
    empty = tmp_path / "forget-000000.tar"
    with tarfile.open(empty, "w"):
        pass
    with pytest.raises(EmptyForgetSetError, match=r"forget set is empty.*forget-000000\.tar.*slug-pl mine"):
        SlugDataModule(forget=str(empty)).pair_set("forget")


def _gradient_folder(tmp_path: Path, grads: dict, meta: dict, change) -> Path:
    folder = tmp_path / "grads"
    for name in ("forget", "retain"):
        g, m = change(dict(grads), dict(meta))
        save_tensors(folder / f"{name}.safetensors", g, m)
    return folder


@pytest.mark.parametrize("case", ["other_model_id", "other_weights", "missing_names", "other_shapes", "nan"])
def test_gradient_file_that_does_not_match_the_model(tmp_path, tiny_checkpoint, case):
    family = OpenClip("slug-tiny-vit", pretrained=tiny_checkpoint)
    model = family.load()
    grads = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    meta = {"model": family.describe(), "model_sha256": weights_fingerprint(model)}

    def change(g, m):
        if case == "other_model_id":
            m = {"model": {**m["model"], "model_name": "ViT-B-32"}}  # an old file without sha256
        elif case == "other_weights":
            m["model_sha256"] = "0" * 64
        elif case == "missing_names":
            g.pop("visual.proj")
        elif case == "other_shapes":
            g["visual.proj"] = torch.zeros(3, 3)
        else:
            g["visual.proj"] = torch.full_like(g["visual.proj"], float("nan"))
        return g, m

    folder = _gradient_folder(tmp_path, grads, meta, change)
    module = SlugModule(family, gradients_from=str(folder))
    module.clip, module._weights_sha256 = model, meta["model_sha256"]
    expected = {"other_model_id": "ViT-B-32", "other_weights": "other weights", "missing_names": "visual.proj",
                "other_shapes": "visual.proj", "nan": "NaN"}[case]
    with pytest.raises(GradientFileError, match=rf"forget\.safetensors.*{expected}.*recompute"):
        module._load_gradients(folder)


def _overflowing_checkpoint(tiny_checkpoint: str, path: Path, value: float) -> str:
    from safetensors.torch import load_file, save_file

    state = load_file(tiny_checkpoint)
    state["visual.conv1.weight"] = state["visual.conv1.weight"] * value
    save_file(state, str(path))
    return str(path)


def test_nan_in_model_weights_is_named(tmp_path, tiny_checkpoint, forget_shards):
    broken = _overflowing_checkpoint(tiny_checkpoint, tmp_path / "nan-model.safetensors", float("nan"))
    with pytest.raises(FloatingPointError, match=r"nan-model\.safetensors.*NaN/inf weights.*visual\.conv1\.weight"):
        _pass_only(tmp_path, broken, forget_shards, forget_shards)


def test_nan_gradients_name_the_set_and_tensors(tmp_path, tiny_checkpoint, forget_shards):
    # finite weights whose activations overflow: the pass runs, its gradients are NaN
    huge = _overflowing_checkpoint(tiny_checkpoint, tmp_path / "huge.safetensors", 1e36)
    with pytest.raises(FloatingPointError, match=r"the forget gradients hold NaN/inf .*visual\..*no gradient file"):
        _pass_only(tmp_path, huge, forget_shards, forget_shards)
    assert not (tmp_path / "gradients").exists() or not any((tmp_path / "gradients").glob("*.safetensors"))


@pytest.mark.parametrize("make, option", [
    (lambda: SlugDataModule(batch_size=0), "data.batch_size"),
    (lambda: SlugDataModule(retain_batch_size=-4), "data.retain_batch_size"),
    (lambda: SlugDataModule(eval_batch_size=0), "data.eval_batch_size"),
    (lambda: SlugDataModule(num_workers=-1), "data.num_workers"),
    (lambda: SlugDataModule(bad_samples="ignore"), "data.bad_samples"),
    (lambda: SlugSearch(top_k=0), "top_k"),
    (lambda: SlugSearch(max_evals=0), "max_evals"),
    (lambda: SlugSearch(initial_step_fraction=-0.1), "initial_step_fraction"),
    (lambda: SlugSearch(tolerance=1.5), "tolerance"),
    (lambda: SlugSearch(utility_guard=-0.1), "utility_guard"),
    (lambda: SlugModule(OpenClip("slug-tiny-vit"), checkpoint_every=0), "model.checkpoint_every"),
    (lambda: SlugModule(OpenClip("slug-tiny-vit"), resume_from="a", gradients_from="b"), "model.resume_from"),
])
def test_nonsensical_config_values(make, option):
    with pytest.raises(ValueError, match=option.replace(".", r"\.")):
        make()


def test_no_candidate_layers_fails_before_the_pass(tmp_path, tiny_checkpoint, forget_shards):
    with pytest.raises(ValueError, match=r"no candidate layers.*include \['nomatch'\]"):
        _pass_only(tmp_path, tiny_checkpoint, forget_shards, forget_shards, family_kwargs={"include": ["nomatch"]})
    assert not (tmp_path / "gradients").exists()


def test_config_errors_surface_through_the_cli(tmp_path, small_world, tiny_checkpoint, forget_shards, capsys):
    """Errors of a class's __init__ (wrapped by jsonargparse) end the command with exit status 2
    and the original message as the last line of stderr."""
    config = write_config(tmp_path, small_world, tiny_checkpoint, forget_shards,
                          trainer={"default_root_dir": str(tmp_path)})
    assert main(["fit", "--config", str(config), "--search.top_k", "0"]) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("slug-pl fit: error: search top_k must be >= 1")
    assert main(["fit", "--config", str(config), "--data.init_args.batch_size", "0"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == \
        "slug-pl fit: error: data.batch_size must be a positive integer, got 0"


# -- 2. nothing lost ---------------------------------------------------------------------------


def test_atomic_output_never_overwrites_and_leaves_no_temp(tmp_path):
    path = write_text(tmp_path / "report.md", "first")
    with pytest.raises(FileExistsError, match=r"report\.md"):
        write_text(path, "second")
    with pytest.raises(RuntimeError):
        with atomic_output(tmp_path / "half.bin") as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("killed while writing")
    assert path.read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]  # no temp file, no half file


def test_atomic_folder_is_complete_or_absent_and_never_replaces(tmp_path):
    with atomic_folder(tmp_path / "model") as tmp:
        (tmp / "config.json").write_text("{}")
    assert [p.name for p in (tmp_path / "model").iterdir()] == ["config.json"]
    with pytest.raises(FileExistsError, match="model"):
        with atomic_folder(tmp_path / "model"):
            pass
    with pytest.raises(RuntimeError):
        with atomic_folder(tmp_path / "half") as tmp:
            (tmp / "weights.safetensors").write_bytes(b"partial")
            raise RuntimeError("killed while saving")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temp folder, no half folder
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "v2").write_text("2")
    swap_into_place(tmp_path / "new", tmp_path / "model")  # a cache rebuilt: the stale one is gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert [p.name for p in (tmp_path / "model").iterdir()] == ["v2"]


def test_atomic_folder_takes_an_empty_folder_only_when_asked_and_names_one_that_appears(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError):
        with atomic_folder(tmp_path / "out"):
            pass
    with atomic_folder(tmp_path / "out", empty_ok=True) as tmp:
        (tmp / "a").write_text("1")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a"]
    with pytest.raises(FileExistsError, match="appeared while it was being written"):
        with atomic_folder(tmp_path / "late") as tmp:
            (tmp_path / "late").mkdir()
            (tmp_path / "late" / "theirs").write_text("x")  # another process, meanwhile
    assert [p.name for p in (tmp_path / "late").iterdir()] == ["theirs"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["late", "out"]  # no temp folder left


def test_rebuilt_folder_swaps_a_cache_in_or_keeps_one_built_meanwhile(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "stale").write_text("old")
    with rebuilt_folder(cache) as build:
        (build.path / "fresh").write_text("new")
    assert build.swapped and [p.name for p in cache.iterdir()] == ["fresh"]
    with rebuilt_folder(cache, keep=lambda: True) as build:  # another process built it meanwhile
        (build.path / "mine").write_text("new")
    assert not build.swapped and [p.name for p in cache.iterdir()] == ["fresh"]
    with rebuilt_folder(cache, made=False) as build:  # for a writer that makes its folder itself
        assert not build.path.exists()
        build.path.mkdir()
        (build.path / "made").write_text("new")
    assert [p.name for p in cache.iterdir()] == ["made"]
    with pytest.raises(RuntimeError):
        with rebuilt_folder(cache) as build:
            raise RuntimeError("killed while building")
    assert [p.name for p in cache.iterdir()] == ["made"]  # the cache there stays
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # nothing temporary left


def test_existing_artifact_stops_the_run_before_any_work(tmp_path, small_world, tiny_checkpoint, forget_shards,
                                                          capsys):
    """A fit into the folder of an earlier run stops before anything is written there (no event
    file, no config.yaml), with a message a command-line user can act on."""
    run = tmp_path / "lightning_logs" / "version_0"
    existing = run / "gradients" / "forget.safetensors"
    existing.parent.mkdir(parents=True)
    existing.write_bytes(b"an earlier run's gradients")
    logger = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
              "init_args": {"save_dir": str(tmp_path), "version": 0}}
    config = write_config(tmp_path, small_world, tiny_checkpoint, forget_shards,
                          trainer={"default_root_dir": str(tmp_path), "logger": logger})
    assert main(["fit", "--config", str(config)]) == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("slug-pl fit: error: the run folder ") and "version_0 holds an earlier run" in last
    assert "gradients/forget.safetensors" in last and "LightningCLI" not in last
    assert existing.read_bytes() == b"an earlier run's gradients"
    assert sorted(p.relative_to(run).as_posix() for p in run.rglob("*")) == ["gradients", "gradients/forget.safetensors"]


def test_a_run_started_in_the_same_folder_at_the_same_moment_is_stopped(tmp_path, small_world, tiny_checkpoint,
                                                                       forget_shards, monkeypatch, capsys):
    """Two runs started together in one folder pick the same version_N and both pass the check
    for an earlier run. Here the other run writes its config.yaml just after this run checked the
    folder: this run stops with a message naming the folder, writes nothing there, and the other
    run's file is untouched. A fit started afterwards takes the next version."""
    from slug_pl.cli import SlugCLI

    checked = SlugCLI._refuse_used_run_dir
    other = "the other run's config\n"

    def check_then_lose_the_race(cli):
        checked(cli)
        run = Path(cli.trainer.log_dir)
        run.mkdir(parents=True, exist_ok=True)
        (run / "config.yaml").write_text(other)

    config = write_config(tmp_path, small_world, tiny_checkpoint, forget_shards,
                          trainer={"default_root_dir": str(tmp_path)})
    monkeypatch.setattr(SlugCLI, "_refuse_used_run_dir", check_then_lose_the_race)
    assert main(["fit", "--config", str(config)]) == 2
    last = capsys.readouterr().err.splitlines()[-1]
    run = tmp_path / "lightning_logs" / "version_0"
    assert last.startswith(f"slug-pl fit: error: the run folder {run} already has a config.yaml: another run took "
                           f"this folder")
    assert "Traceback" not in last
    assert [p.name for p in run.iterdir()] == ["config.yaml"] and (run / "config.yaml").read_text() == other

    monkeypatch.setattr(SlugCLI, "_refuse_used_run_dir", checked)
    main(["fit", "--config", str(config)])
    assert (run / "config.yaml").read_text() == other
    second = tmp_path / "lightning_logs" / "version_1"
    assert "model:" in (second / "config.yaml").read_text() and (second / "summary.json").is_file()


# -- the shared full run -------------------------------------------------------------------------


def _run_config(root: Path, world, checkpoint, forget, **overrides) -> Path:
    """The config of the shared runs: 4 forget batches (batch 1), 3 retain batches (20 pairs, batch
    8); no test sets (the report uses validation), to keep the search short."""
    root.mkdir(parents=True, exist_ok=True)
    sections = {"data": {"batch_size": 1, "retain": world["corpus_shards"][2], "retain_batch_size": 8,
                         "test": None},
                "search": {"top_k": 1, "max_evals": 2},
                "trainer": {"default_root_dir": str(root), "accelerator": "cpu", "devices": 1,
                            "enable_progress_bar": False}}
    for section, values in overrides.items():
        sections.setdefault(section, {}).update(values)
    return write_config(root, world, checkpoint, forget, **sections)


def _inputs(world, checkpoint, forget) -> list[str]:
    shards = [*world["corpus_shards"], *forget]
    for key in ("val_identities", "val_objects", "test_identities", "test_objects"):
        shards += [str(p) for p in sorted(Path(world[key]).parent.glob("*.tar"))]
    return sorted(set(shards)) + [checkpoint]


@pytest.fixture(scope="module")
def run_a(tmp_path_factory, small_world, tiny_checkpoint, forget_shards):
    """One full ``slug-pl fit``; records the input hashes before and after it."""
    root = tmp_path_factory.mktemp("run_a")
    inputs = _inputs(small_world, tiny_checkpoint, forget_shards)
    before = {p: _sha(p) for p in inputs}
    config = _run_config(root, small_world, tiny_checkpoint, forget_shards)
    code = main(["fit", "--config", str(config)])
    after = {p: _sha(p) for p in inputs}
    return {"run": root / "lightning_logs" / "version_0", "code": code, "before": before, "after": after}


def test_inputs_are_never_modified(run_a):
    assert run_a["code"] in (0, EXIT_TARGET_NOT_MET)
    assert run_a["after"] == run_a["before"]
    assert len(run_a["before"]) >= 8  # shards of every set and the checkpoint


def test_run_records_versions_and_fingerprints(run_a):
    for name in ("forget", "retain"):
        _, meta = load_tensors(run_a["run"] / "gradients" / f"{name}.safetensors")
        assert {"torch", "open_clip_torch", "pillow", "python", "lightning"} <= set(meta["versions"])
        assert all(s["sha256_head_tail"] and s["bytes"] > 0 for s in meta["data"]["shards"])
        assert len(meta["model_sha256"]) == 64
        assert not any("time" in key or "date" in key for key in meta)  # nothing run-specific
    assert not (run_a["run"] / "gradients" / "partial").exists()


# -- 4. reproducibility ------------------------------------------------------------------------


def _tensors_equal(a: Path, b: Path) -> None:
    ta, ma = load_tensors(a)
    tb, mb = load_tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), f"{a.name}: {k}"


def test_same_config_and_seed_give_identical_artifacts(tmp_path, run_a, small_world, tiny_checkpoint, forget_shards):
    config = _run_config(tmp_path, small_world, tiny_checkpoint, forget_shards)
    assert main(["fit", "--config", str(config)]) == run_a["code"]
    a, b = run_a["run"], tmp_path / "lightning_logs" / "version_0"
    for name in ("gradients/forget.safetensors", "gradients/retain.safetensors", "edit.safetensors",
                 "edited_model/open_clip_model.safetensors"):
        _tensors_equal(a / name, b / name)
        assert (a / name).read_bytes() == (b / name).read_bytes(), name  # byte-identical files
    for name in ("forget", "retain"):  # no field differs: no timestamps or run paths in the metadata
        assert load_tensors(a / "gradients" / f"{name}.safetensors")[1] == \
            load_tensors(b / "gradients" / f"{name}.safetensors")[1]
    assert (a / "ranking.csv").read_text() == (b / "ranking.csv").read_text()
    assert (a / "search.csv").read_text() == (b / "search.csv").read_text()
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert sa["method"]["edits"] == sb["method"]["edits"] and sa["after"] == sb["after"]


_WRITE_IN_A_NEW_PROCESS = """
import sys, torch
from slug_pl.gradients import save_tensors
meta = {"set": "forget", "counts": {"samples": 4, "batches": 1, "loss": 0.5}, "model": {"family": "open_clip"},
        "shapes": {"a": [2, 3], "b": [4]}, "versions": {"torch": "x", "python": "y"}}
if sys.argv[2] == "reversed":  # the same metadata built in another insertion order
    meta = dict(reversed(list(meta.items())))
save_tensors(sys.argv[1], {"b": torch.arange(4.0), "a": torch.ones(2, 3)}, meta)
"""


def test_two_processes_write_byte_identical_gradient_files(tmp_path):
    """safetensors writes several metadata keys in an order that differs between processes; the
    gradient files hold one metadata key, so the same tensors and metadata give the same bytes
    (hash randomization differs per process: PYTHONHASHSEED set apart on purpose)."""
    import hashlib
    import os
    import subprocess
    import sys

    digests = []
    for i, order in enumerate(("given", "reversed")):
        path = tmp_path / f"g{i}.safetensors"
        env = {**os.environ, "PYTHONHASHSEED": str(i + 1)}
        subprocess.run([sys.executable, "-c", _WRITE_IN_A_NEW_PROCESS, str(path), order], check=True, env=env)
        digests.append(hashlib.sha256(path.read_bytes()).hexdigest())
    assert digests[0] == digests[1]


# -- search that misses / breaks -----------------------------------------------------------------


def test_unreachable_target_finishes_with_exit_status_3(tmp_path, run_a, small_world, tiny_checkpoint, forget_shards):
    config = _run_config(tmp_path, small_world, tiny_checkpoint, forget_shards)
    code = main(["fit", "--config", str(config), "--model.gradients_from", str(run_a["run"] / "gradients"),
                 "--forget_target.value", "-1", "--search.max_evals", "1", "--search.towers", "[text]"])
    assert code == EXIT_TARGET_NOT_MET
    run = tmp_path / "lightning_logs" / "version_0"
    summary = json.loads((run / "summary.json").read_text())
    (chosen,) = summary["method"]["edits"]
    assert summary["target"]["met"] is False and chosen["step"] > 0
    evaluated = list(csv.DictReader((run / "search.csv").open()))
    assert any(r["layer"] == chosen["layer"] and float(r["step"]) == chosen["step"]
               for r in evaluated)  # the closest evaluated step is the one reported
    assert "NOT met" in (run / "report.md").read_text()


def test_non_finite_evaluation_in_the_search(tmp_path, run_a, small_world, tiny_checkpoint, forget_shards, capsys):
    """A step so large that the edited model's logits overflow: the evaluator raises
    FloatingPointError naming the set; a search that records such an evaluation as failed instead
    must not choose it."""
    config = _run_config(tmp_path, small_world, tiny_checkpoint, forget_shards)
    args = ["fit", "--config", str(config), "--model.gradients_from", str(run_a["run"] / "gradients"),
            "--search.initial_step_fraction", "1e30", "--search.max_evals", "1", "--search.towers", "[text]"]
    if main(args) == 2:  # the anticipated error, as the last line
        last = capsys.readouterr().err.splitlines()[-1]
        assert last.startswith("slug-pl fit: error: ") and "non-finite" in last and "concepts" in last
    else:
        run = tmp_path / "lightning_logs" / "version_0"
        summary = json.loads((run / "summary.json").read_text())
        assert summary["target"]["met"] is False


# -- 3. resume ---------------------------------------------------------------------------------

STALL = '''
import time
from pathlib import Path
from lightning.pytorch import Callback

class StallAfter(Callback):
    """Blocks forever after ``batches`` training batches (the test then kills the process)."""

    def __init__(self, batches: int, marker: str):
        self.batches, self.marker = batches, marker

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx + 1 == self.batches:
            Path(self.marker).write_text("stalled")
            time.sleep(3600)
'''


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the pass exited ({proc.returncode}) before {path.name} appeared:\n"
                                 f"{proc.stderr.read().decode()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{path} did not appear in {timeout} s")
        time.sleep(0.1)


@pytest.mark.slow  # ~30 s: a second Python process and two passes
def test_killed_pass_resumes_to_identical_gradients(tmp_path, run_a, small_world, tiny_checkpoint, forget_shards):
    """``slug-pl fit`` in a subprocess (4 forget + 3 retain batches, partial state every 3) is
    SIGKILLed after 5 batches, inside the retain set; ``fit --model.resume_from`` restarts at batch
    3, inside the forget set, and writes bit-identical gradients into a new run directory."""
    (tmp_path / "stall_callback.py").write_text(STALL)
    marker = tmp_path / "stalled"
    root = tmp_path / "runs"
    callback = {"class_path": "stall_callback.StallAfter", "init_args": {"batches": 5, "marker": str(marker)}}
    config = _run_config(root, small_world, tiny_checkpoint, forget_shards, model={"checkpoint_every": 3},
                         trainer={"callbacks": [callback]})
    # one torch thread, as in this process (conftest): float sums in another thread count differ
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "slug_pl.cli", "fit", "--config", str(config)],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _wait_for(marker, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stderr.close()
    interrupted = root / "lightning_logs" / "version_0"
    partial = interrupted / "gradients" / "partial"
    assert sorted(p.name for p in partial.iterdir()) == ["rank0-batch000000003.pt"]
    assert not (interrupted / "gradients" / "forget.safetensors").exists()

    resumed_config = _run_config(tmp_path / "resume", small_world, tiny_checkpoint, forget_shards,
                                 search={"max_evals": 1, "towers": ["vision"], "save_checkpoint": False})
    code = main(["fit", "--config", str(resumed_config), "--model.resume_from", str(interrupted)])
    assert code in (0, EXIT_TARGET_NOT_MET)
    resumed = tmp_path / "resume" / "lightning_logs" / "version_0"
    for name in ("forget", "retain"):
        _tensors_equal(resumed / "gradients" / f"{name}.safetensors", run_a["run"] / "gradients" / f"{name}.safetensors")
        _, meta = load_tensors(resumed / "gradients" / f"{name}.safetensors")
        _, ref = load_tensors(run_a["run"] / "gradients" / f"{name}.safetensors")
        assert meta.pop("resumed") == {"from": str(partial), "batch": 3}
        assert meta == ref
    assert sorted(p.name for p in partial.iterdir()) == ["rank0-batch000000003.pt"]  # left as it was


class Interrupted(Exception):
    pass


class InterruptAfter(Callback):
    def __init__(self, batches: int):
        self.batches = batches

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx + 1 == self.batches:
            raise Interrupted(f"stopped after {self.batches} batches")


def test_interrupted_pass_resumes_inside_the_retain_set(tmp_path, run_a, small_world, tiny_checkpoint, forget_shards):
    """In-process variant: partial state every 5 batches (the forget set finished and stashed, one
    retain batch summed), interrupted after batch 6, resumed: the same gradients as one pass."""
    common = dict(forget=forget_shards, retain=small_world["corpus_shards"][2], batch_size=1, retain_batch_size=8)
    with pytest.raises(Interrupted):
        _pass_only(tmp_path / "a", tiny_checkpoint, module_kwargs={"checkpoint_every": 5},
                   callbacks=[InterruptAfter(6)], **common)
    partial = tmp_path / "a" / "gradients" / "partial"
    assert [p.name for p in partial.iterdir()] == ["rank0-batch000000005.pt"]
    resumed = _pass_only(tmp_path / "b", tiny_checkpoint, module_kwargs={"resume_from": str(tmp_path / "a")},
                         **common)
    assert resumed.resume_position == 5
    for name in ("forget", "retain"):
        _tensors_equal(tmp_path / "b" / "gradients" / f"{name}.safetensors",
                       run_a["run"] / "gradients" / f"{name}.safetensors")
        assert resumed.pass_stats[name] == load_tensors(run_a["run"] / "gradients" / f"{name}.safetensors")[1]["counts"]


@pytest.mark.slow  # ~3 min: three 2-process runs
def test_interrupted_ddp_pass_resumes_on_every_rank(tmp_path, run_a, small_world, tiny_checkpoint, forget_shards):
    """Two processes: at batch 5 the ranks add their sums into rank 0's, which writes the one
    partial file; the pass is interrupted after batch 6, and the resumed 2-process pass equals an
    uninterrupted 2-process pass with the same checkpoints bit for bit, and the 1-process
    gradients to float rounding."""
    common = dict(forget=forget_shards, retain=small_world["corpus_shards"][2], batch_size=1, retain_batch_size=8,
                  trainer_kwargs={"devices": 2, "strategy": "ddp_spawn"})
    with pytest.raises(Exception, match="stopped after 6 batches"):
        _pass_only(tmp_path / "a", tiny_checkpoint, module_kwargs={"checkpoint_every": 5},
                   callbacks=[InterruptAfter(6)], **common)
    partial = tmp_path / "a" / "gradients" / "partial"
    assert sorted(p.name for p in partial.iterdir()) == ["rank0-batch000000005.pt"]  # one file, not one per rank
    _pass_only(tmp_path / "b", tiny_checkpoint, module_kwargs={"resume_from": str(partial)}, **common)
    _pass_only(tmp_path / "c", tiny_checkpoint, module_kwargs={"checkpoint_every": 5}, **common)
    for name in ("forget", "retain"):
        _tensors_equal(tmp_path / "b" / "gradients" / f"{name}.safetensors",
                       tmp_path / "c" / "gradients" / f"{name}.safetensors")
        got, meta = load_tensors(tmp_path / "b" / "gradients" / f"{name}.safetensors")
        ref, ref_meta = load_tensors(run_a["run"] / "gradients" / f"{name}.safetensors")
        assert meta["resumed"]["batch"] == 5
        counts, ref_counts = meta["counts"], ref_meta["counts"]
        assert counts.pop("loss") == pytest.approx(ref_counts.pop("loss"), rel=1e-6) and counts == ref_counts
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6 * max(ref[k].abs().max().item(), 1e-12))


def test_resume_refuses_another_setup(tmp_path, tiny_checkpoint, forget_shards):
    """Partial state from another batch size is refused, naming the file and the difference."""
    from slug_pl import resume

    folder = tmp_path / "old" / "gradients" / "partial"
    state = resume.PartialState(position=2, stashed={}, grads={}, sums={},
                                compat={"global_batch_size": {"forget": 2, "retain": 8}})
    resume.save_partial(folder, state)
    position, path = resume.find_partial(tmp_path / "old")
    assert position == 2 and path.name == "rank0-batch000000002.pt"
    with pytest.raises(ResumeError, match=r"holds the state of 1 rank\(s\), not 2"):  # one process saved it
        resume.load_partial(path, world_size=2)
    with pytest.raises(ResumeError, match=r"rank0-batch000000002\.pt.*global_batch_size"):
        resume.check_compatible(resume.load_partial(path).compat,
                                {"global_batch_size": {"forget": 4, "retain": 8}}, path)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ResumeError, match=r"no partial gradient-pass state in .*nothing"):
        resume.find_partial(tmp_path / "nothing")


def test_start_batch_skips_without_decoding(tmp_path, family, monkeypatch):
    shards = [_write_shard(tmp_path / f"p-{i}.tar", [_good(10 * i + j) for j in range(5)]) for i in range(3)]
    sets = [PairSet("forget", tuple(shards[:1]), 2, 5, (5,)), PairSet("retain", tuple(shards), 4, 15, (5, 5, 5))]
    full = list(PairBatches(sets, family.image_transform(), family.tokenize))
    import slug_pl.data.pairs as pairs

    decoded, real = [], pairs.decode_image
    monkeypatch.setattr(pairs, "decode_image", lambda s, rules: decoded.append(s.key) or real(s, rules))
    for start in (0, 2, 3, 5, len(full)):
        decoded.clear()
        tail = list(PairBatches(sets, family.image_transform(), family.tokenize, start_batch=start))
        assert [(b["set"], b["batch_index"]) for b in tail] == [(b["set"], b["batch_index"]) for b in full[start:]]
        for a, b in zip(tail, full[start:]):
            assert torch.equal(a["images"], b["images"]) and torch.equal(a["tokens"], b["tokens"])
        assert len(decoded) == sum(int(b["valid"].sum()) for b in full[start:])  # only what it yields


def test_start_batch_with_dataloader_workers(tmp_path, family):
    shards = [_write_shard(tmp_path / f"w-{i}.tar", [_good(10 * i + j) for j in range(4)]) for i in range(2)]
    sets = [PairSet("forget", tuple(shards), 3, 8, (4, 4)), PairSet("retain", tuple(shards), 2, 8, (4, 4))]
    full = list(PairBatches(sets, family.image_transform(), family.tokenize))
    got = list(torch.utils.data.DataLoader(PairBatches(sets, family.image_transform(), family.tokenize, start_batch=2),
                                           batch_size=None, num_workers=2))
    assert [(b["set"], b["batch_index"]) for b in got] == [(b["set"], b["batch_index"]) for b in full[2:]]
    assert all(torch.equal(a["images"], b["images"]) for a, b in zip(got, full[2:]))
