"""The data path on two processes (DDP over gloo on the CPU): a bad sample seen by rank 1 alone
ends both ranks with its message last, the indexed read path gives the gradients of the streamed
one bit for bit, and skipped samples go to a sidecar file that ``gradients_from`` reads back."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import webdataset as wds
from conftest import write_config
from lightning.pytorch import Trainer
from PIL import Image

from slug_pl.cli import TRAINER_DEFAULTS
from slug_pl.data.datamodule import SlugDataModule
from slug_pl.families.open_clip import OpenClip
from slug_pl.gradients import load_tensors
from slug_pl.methods.slug import SlugModule
from slug_pl.skip_list import SkipListError

pytestmark = pytest.mark.slow


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10 * i % 256, 40, 90)).save(buf, format="PNG")
    return buf.getvalue()


def _forget_shard(path: Path, bad_at: int | None = None, n: int = 9) -> str:
    """``n`` good pairs; with ``bad_at``, an image that does not decode at that stream position."""
    samples = [{"__key__": f"s{i:03d}", "png": _png(i), "txt": f"a photo number {i}".encode()} for i in range(n)]
    if bad_at is not None:
        samples.insert(bad_at, {"__key__": "bad-decode", "jpg": b"\xff\xd8 not jpeg bytes", "txt": b"broken"})
    with wds.TarWriter(str(path)) as sink:
        for s in samples:
            sink.write(s)
    return str(path)


@pytest.mark.parametrize("kind", ["bad_sample", "corrupt_shard"])
def test_an_error_seen_by_rank_1_ends_both_ranks_with_its_message_last(tmp_path, small_world, tiny_checkpoint, kind):
    """``slug-pl fit`` on two processes (Lightning's ddp launcher, gloo). ``bad_sample``: forget
    batches of 5, an undecodable image at position 6 (batch 1, position 1: rank 1 reads it);
    ``corrupt_shard``: the second forget shard is no tar (the ranks share the indexing: rank 1
    reads it). Both processes end, and the last line on stderr names the sample or shard (not a
    peer's transport error)."""
    if kind == "bad_sample":
        forget, expected = [_forget_shard(tmp_path / "forget.tar", bad_at=6)], "sample 'bad-decode' in "
    else:
        (tmp_path / "broken.tar").write_bytes(b"not a tar archive at all " * 100)
        forget, expected = [_forget_shard(tmp_path / "forget.tar"), str(tmp_path / "broken.tar")], "cannot read shard "
    config = write_config(tmp_path, small_world, tiny_checkpoint, forget,
                          trainer={"devices": 2, "strategy": "ddp", "default_root_dir": str(tmp_path / "runs")})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    # stderr is a pipe every process inherits: run() returns once the last of them has ended
    done = subprocess.run([sys.executable, "-m", "slug_pl.cli", "fit", "--config", str(config)], cwd=tmp_path,
                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=600)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode != 0
    assert lines[-1].startswith(f"slug-pl fit: error: {expected}"), "\n".join(lines[-20:])
    assert ("forget.tar: image does not decode" if kind == "bad_sample" else "broken.tar") in lines[-1]
    assert not any("Connection closed" in line or "Traceback" in line for line in lines), "\n".join(lines[-40:])
    print(f"ended after {time.monotonic() - started:.1f} s with {len(lines)} stderr lines")


def _pass(root: Path, checkpoint: str, forget, retain, devices: int = 2, module_kwargs=None, **data) -> SlugModule:
    """The gradient pass alone (no search) into run folder ``root``, on ``devices`` CPU processes."""
    family = OpenClip("slug-tiny-vit", pretrained=checkpoint)
    module = SlugModule(family, **(module_kwargs or {}))
    strategy = {"strategy": "ddp_spawn"} if devices > 1 else {}
    trainer = Trainer(**TRAINER_DEFAULTS, default_root_dir=str(root), logger=False, enable_progress_bar=False,
                      enable_model_summary=False, accelerator="cpu", devices=devices, **strategy)
    data = {"batch_size": 3, "retain_batch_size": 8, "num_workers": 1} | data
    trainer.fit(module, datamodule=SlugDataModule(forget=forget, retain=retain, **data))
    return module


def _gzipped(urls, folder: Path) -> list[str]:
    folder.mkdir()
    out = []
    for url in urls:
        path = folder / (Path(url).name + ".gz")
        path.write_bytes(gzip.compress(Path(url).read_bytes(), mtime=0))
        out.append(str(path))
    return out


def test_two_processes_read_by_index_give_the_streamed_gradients_bit_for_bit(tmp_path, small_world, tiny_checkpoint):
    """The same shards, plain (indexed: each rank reads its own samples) and gzipped (no index:
    every rank streams every byte, as before indexes existed): the same gradient tensors, byte for
    byte, on two processes with a data-loader worker each."""
    forget = _forget_shard(tmp_path / "forget.tar", n=11)
    retain = small_world["corpus_shards"]
    _pass(tmp_path / "indexed", tiny_checkpoint, forget, retain)
    _pass(tmp_path / "streamed", tiny_checkpoint, _gzipped([forget], tmp_path / "gz_forget"),
          _gzipped(retain, tmp_path / "gz_retain"))
    assert not list((tmp_path / "streamed").rglob("*.slug-index"))
    for name in ("forget", "retain"):
        a, meta_a = load_tensors(tmp_path / "indexed" / "gradients" / f"{name}.safetensors")
        b, meta_b = load_tensors(tmp_path / "streamed" / "gradients" / f"{name}.safetensors")
        assert meta_a["counts"] == meta_b["counts"] and meta_a["world_size"] == 2
        assert a.keys() == b.keys()
        assert all(a[k].numpy().tobytes() == b[k].numpy().tobytes() for k in a), name


def test_skipped_samples_go_to_a_sidecar_that_gradients_from_reads_back(tmp_path, small_world, tiny_checkpoint):
    bad = {"nocap": {"__key__": "bad-nocap", "png": _png(1)},
           "decode": {"__key__": "bad-decode", "jpg": b"\xff\xd8 not jpeg bytes", "txt": b"broken"}}
    samples = [{"__key__": f"s{i:03d}", "png": _png(i), "txt": f"a photo number {i}".encode()} for i in range(8)]
    samples[1:1] = [bad["nocap"]]  # position 1: rank 1's
    samples[4:4] = [bad["decode"]]  # position 4: batch 1, position 1: rank 1's
    samples[6:6] = [dict(bad["nocap"], __key__="bad-nocap-2")]  # position 6: batch 2, position 0: rank 0's
    dirty = tmp_path / "dirty.tar"
    with wds.TarWriter(str(dirty)) as sink:
        for s in samples:
            sink.write(s)
    _pass(tmp_path / "run", tiny_checkpoint, str(dirty), small_world["corpus_shards"][2], bad_samples="skip")
    folder = tmp_path / "run" / "gradients"
    _, meta = load_tensors(folder / "forget.safetensors")
    sidecar = folder / "skipped_forget.jsonl"
    records = [json.loads(line) for line in sidecar.read_text().splitlines()]
    assert [(r["index"], r["key"]) for r in records] == [(1, "bad-nocap"), (4, "bad-decode"), (6, "bad-nocap-2")]
    assert meta["skipped"] == {"count": 3, "file": "skipped_forget.jsonl",
                               "sha256": hashlib.sha256(sidecar.read_bytes()).hexdigest()}
    assert meta["counts"]["samples"] == 8 and meta["counts"]["skipped"] == 3
    assert not (folder / "skipped_retain.jsonl").exists()
    assert json.loads((tmp_path / "run" / "skipped_samples.json").read_text())["samples"]["forget"] == records

    again = _pass(tmp_path / "again", tiny_checkpoint, str(dirty), small_world["corpus_shards"][2], devices=1,
                  module_kwargs={"gradients_from": str(folder)}, bad_samples="skip")
    assert again.skipped == {"forget": records, "retain": []}
    sidecar.write_text(sidecar.read_text().replace("bad-decode", "bad-other"))  # not the list it was written with
    with pytest.raises(SkipListError, match=r"skipped_forget\.jsonl.*another SHA-256"):
        _pass(tmp_path / "third", tiny_checkpoint, str(dirty), small_world["corpus_shards"][2], devices=1,
              module_kwargs={"gradients_from": str(folder)}, bad_samples="skip")
