"""Downloaded files are data: hostile ones, each built here, are refused before they run code,
leave their folder or cost memory, with a one-line error naming the file and the entry (or, under
the skip policy, are left out and listed). Every test that could run code plants a marker file
that must not appear; every test that could read or write elsewhere checks that place."""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from slug_pl.cli import main


def png(colour=(200, 30, 30), size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path: Path, members: dict[str, bytes], compress: bool = False) -> Path:
    """A tar at ``path`` holding ``members`` (name -> bytes) in order, exactly as named."""
    with tarfile.open(path, "w:gz" if compress else "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def last_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines, "no error printed"
    return lines[-1]


# ------------------------------------------------------------------ 1. a judge's classifier.json


def test_a_classifier_folder_cannot_name_code_to_call(tmp_path):
    from slug_pl.evaluation.generation import CLASSIFIER_JSON, CLASSIFIER_WEIGHTS, ClassifierJudge

    marker = tmp_path / "ran"
    folder = tmp_path / "judge"
    folder.mkdir()
    save_file({"w": torch.zeros(1)}, str(folder / CLASSIFIER_WEIGHTS))
    spec = {"format": "slug_pl-classifier/1", "class_path": "os.system",
            "init_args": {"command": f"touch {marker}"}, "classnames": ["a"], "image_size": [8, 8],
            "mean": [0.5] * 3, "std": [0.5] * 3}
    (folder / CLASSIFIER_JSON).write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=r"classifier.json: 'os.system' is not a slug_pl classifier class"):
        ClassifierJudge.load(folder)
    # a library architecture cannot smuggle a pickle or a download in through its arguments
    for kwargs, refused in (({"checkpoint_path": str(tmp_path / "evil.pth")}, "checkpoint_path"),
                            ({"pretrained_cfg_overlay": {"file": "x"}}, "pretrained_cfg_overlay")):
        (folder / CLASSIFIER_JSON).write_text(json.dumps(
            {**spec, "arch": {"library": "timm", "name": "test_vit", "kwargs": kwargs}}))
        with pytest.raises(ValueError, match=f"classifier.json: arch kwargs '{refused}' is not an argument"):
            ClassifierJudge.load(folder)
    (folder / CLASSIFIER_JSON).write_text(json.dumps(
        {**spec, "arch": {"library": "timm", "name": "hf-hub:someone/model"}}))
    with pytest.raises(ValueError, match="'hf-hub:someone/model' is not a timm architecture"):
        ClassifierJudge.load(folder)
    assert not marker.exists()


def test_the_projects_own_classifier_checkpoints_still_load(tmp_path):
    """The SD demo's judge (WorldClassifier, by class_path) and a timm one (by arch) load back
    from their folders and give the saved module's logits."""
    from slug_pl.demo.sd import WorldClassifier
    from slug_pl.evaluation.architectures import ArchSpec, build_classifier
    from slug_pl.evaluation.generation import CLASSIFIER_JSON, ClassifierJudge, save_classifier

    torch.manual_seed(0)
    images = [Image.new("RGB", (12, 12), (250, 10, 10)), Image.new("RGB", (12, 12), (10, 10, 250))]
    world = WorldClassifier(num_classes=3, width=8).eval()
    folder = save_classifier(tmp_path / "world", world, "slug_pl.demo.sd.WorldClassifier",
                             {"num_classes": 3, "width": 8}, ["a", "b", "c"], image_size=(16, 16))
    judge = ClassifierJudge.load(folder)
    with torch.no_grad():
        expected = world(torch.stack([judge.preprocess(im) for im in images]))
    torch.testing.assert_close(judge.logits(images, ["a", "b", "c"]), expected)
    arch = {"library": "torchvision", "name": "resnet18"}
    net = build_classifier(ArchSpec.from_record(arch, "test"), 2).eval()
    folder = save_classifier(tmp_path / "resnet", net, "unused", {}, ["x", "y"], image_size=(32, 32))
    spec = json.loads((folder / CLASSIFIER_JSON).read_text())
    del spec["class_path"], spec["init_args"]
    (folder / CLASSIFIER_JSON).unlink()
    (folder / CLASSIFIER_JSON).write_text(json.dumps({**spec, "arch": arch}))
    judge = ClassifierJudge.load(folder)
    with torch.no_grad():
        expected = net(torch.stack([judge.preprocess(im) for im in images]))
    torch.testing.assert_close(judge.logits(images, ["x", "y"]), expected)


def test_a_classifier_folder_reads_no_weights_through_a_link_out(tmp_path):
    from builders_downstream import TinyClassifier

    from slug_pl.evaluation.generation import CLASSIFIER_WEIGHTS, ClassifierJudge, save_classifier

    folder = save_classifier(tmp_path / "judge", TinyClassifier(2), "builders_downstream.TinyClassifier",
                             {"num_classes": 2}, ["a", "b"], image_size=(8, 8))
    outside = tmp_path / "elsewhere.safetensors"
    (folder / CLASSIFIER_WEIGHTS).rename(outside)
    (folder / CLASSIFIER_WEIGHTS).symlink_to(outside)
    with pytest.raises(ValueError, match=r"checkpoint file 'classifier.safetensors' resolves to .*outside"):
        ClassifierJudge.load(folder)


# --------------------------------------------------------------- 2. an UnlearnCanvas classifier JSON


def test_an_unlearncanvas_classifier_json_cannot_call_torch_hub(tmp_path):
    from slug_pl.evaluation.unlearncanvas import load_task_classifier

    marker = tmp_path / "hubconf_ran"
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "hubconf.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                    "import torch\n"
                                    "def model(num_classes=2):\n    return torch.nn.Linear(1, num_classes)\n")
    save_file({"weight": torch.zeros(2, 1), "bias": torch.zeros(2)}, str(tmp_path / "style.safetensors"))
    record = {"task": "style", "classnames": ["A", "B"], "weights": "style.safetensors", "image_size": 8,
              "arch": {"library": "python", "name": "torch.hub.load",
                       "kwargs": {"repo_or_dir": str(hub), "model": "model", "source": "local"}}}
    (tmp_path / "style.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"style.json: 'torch.hub.load' is not a slug_pl classifier class"):
        load_task_classifier(tmp_path / "style.json")
    # the weights entry names a file inside the JSON's folder, nothing else
    (tmp_path / "up.json").write_text(json.dumps({**record, "arch": {"library": "torchvision", "name": "resnet18"},
                                                  "weights": "../secret.safetensors"}))
    with pytest.raises(ValueError, match=r"up.json: weights '../secret.safetensors' climbs out"):
        load_task_classifier(tmp_path / "up.json")
    assert not marker.exists() and "hubconf" not in sys.modules


# -------------------------------------------------------------------- 3. shard specs that run code


def test_mine_refuses_a_pipe_shard_unless_the_user_opts_in(tmp_path, capsys):
    shard = write_tar(tmp_path / "s.tar", {"k0.png": png(), "k0.txt": b"a photo of Ada"})
    marker = tmp_path / "ran"
    spec = f"pipe:touch {marker}; cat {shard}"
    assert main(["mine", "--shards", spec, "--name", "Ada", "--out", str(tmp_path / "out")]) == 2
    line = last_line(capsys)
    assert line.startswith("slug-pl mine: error: --shards: shard 'pipe:touch") and "--allow-shard-commands" in line
    assert not marker.exists() and not (tmp_path / "out").exists()
    # opted in, the spec is the user's own command: it runs
    assert main(["mine", "--shards", spec, "--name", "Ada", "--out", str(tmp_path / "out"),
                 "--allow-shard-commands"]) == 0
    assert marker.exists() and (tmp_path / "out" / "forget-000000.tar").is_file()


@pytest.mark.parametrize("command, where", [("fit", "data.retain"), ("validate", "validation.concepts: shards")])
def test_a_config_shard_field_refuses_a_pipe_spec(tmp_path, small_world, tiny_checkpoint, capsys, command, where):
    import yaml
    from conftest import write_config

    marker = tmp_path / "ran"
    spec = f"pipe:touch {marker}"
    config = write_config(tmp_path, small_world, tiny_checkpoint, small_world["corpus"],
                          trainer={"default_root_dir": str(tmp_path / "runs")})
    raw = yaml.safe_load(config.read_text())
    data = raw["data"]["init_args"]
    if command == "fit":
        data["retain"] = spec
    else:
        data["validation"]["concepts"]["shards"] = spec
    config.write_text(yaml.safe_dump(raw))
    assert main([command, "--config", str(config)]) == 2
    line = last_line(capsys)
    assert line.startswith(f"slug-pl {command}: error: {where}: shard 'pipe:touch")
    assert "data.allow_shard_commands: true" in line
    assert not marker.exists()


# ------------------------------------------------------------------ 4. an identity list that escapes


@pytest.mark.parametrize("name, problem", [("../secret.jpg", "climbs out"), ("/{outside}/secret.jpg", "absolute"),
                                           ("000002", "not an image file name")])
def test_prepare_celeba_copies_only_images_inside_the_folder(tmp_path, capsys, name, problem):
    images = tmp_path / "img_align_celeba"
    images.mkdir()
    for k in (1, 2):
        (images / f"{k:06d}.jpg").write_bytes(png())
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(b"credentials")
    listed = name.format(outside=str(tmp_path).strip("/"))
    (tmp_path / "identities.txt").write_text(f"000001.jpg Mallory\n{listed} Mallory\n")
    out = tmp_path / "out"
    code = main(["prepare", "celeba", "--images", str(images), "--identities", str(tmp_path / "identities.txt"),
                        "--include", "Mallory", "--others", "0", "--val", "1", "--test", "1", "--out", str(out)])
    assert code == 2
    line = last_line(capsys)
    assert line.startswith("slug-pl prepare: error: ") and "identities.txt" in line and "line 2" in line
    assert problem in line and not out.exists()


# ----------------------------------------------------------- 5. a model folder that links elsewhere


def test_an_edited_copy_refuses_a_link_out_of_the_model_folder(tmp_path):
    from slug_pl.safety import UnsafePathError
    from slug_pl.targets.saved_copy import TensorChange, copy_with_tensors

    model = tmp_path / "model"
    model.mkdir()
    weight = torch.ones(2, 2)
    save_file({"encoder.w": weight}, str(model / "model.safetensors"))
    credentials = tmp_path / "home" / "credentials"
    credentials.parent.mkdir()
    credentials.write_text("password")
    (model / "tokenizer.json").symlink_to(credentials)
    with pytest.raises(UnsafePathError, match=r"model folder .*model: tokenizer.json links to .*credentials, outside"):
        copy_with_tensors(model, tmp_path / "out", {"encoder.w": TensorChange(weight, weight * 2)})
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    # a hub snapshot's links into its repository's blobs are the model's own files: copied as files
    repo = tmp_path / "hub" / "models--org--clip"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    save_file({"encoder.w": weight}, str(repo / "blobs" / "sha-weights"))
    (snapshot / "model.safetensors").symlink_to(repo / "blobs" / "sha-weights")
    copy_with_tensors(snapshot, tmp_path / "copy", {"encoder.w": TensorChange(weight, weight * 2)})
    copied = tmp_path / "copy" / "model.safetensors"
    assert not copied.is_symlink() and torch.equal(load_file_tensor(copied, "encoder.w"), weight * 2)


def load_file_tensor(path: Path, key: str) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(path))[key]


# ------------------------------------------------- 6. names in shards and mapping files that escape


@pytest.mark.parametrize("member", ["../../escape.png", "/tmp/escape.png"])
def test_mine_refuses_a_shard_whose_member_names_leave_it(tmp_path, capsys, member):
    shard = write_tar(tmp_path / "s.tar", {"ok.png": png(), "ok.txt": b"Ada at work",
                                           member: png(), member[:-3] + "txt": b"Ada again"})
    assert main(["mine", "--shards", str(shard), "--name", "Ada", "--out", str(tmp_path / "out")]) == 2
    line = last_line(capsys)
    assert line.startswith(f"slug-pl mine: error: shard {shard}: member {member!r}")
    assert "refuses this shard" in line and not (tmp_path / "out").exists()


def test_an_identity_set_reads_no_image_outside_its_folder(tmp_path):
    from slug_pl.data.layouts import IdentitySet
    from slug_pl.safety import UnsafePathError

    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(png())
    (tmp_path / "private.png").write_bytes(png((1, 2, 3)))
    (images / "b.jpg").symlink_to(tmp_path / "private.png")
    for listed, problem in (("../private.png", "climbs out"), ("b.jpg", "outside")):
        (tmp_path / "ids.csv").write_text(f"a.jpg,Ada\n{listed},Bob\n")
        with pytest.raises(UnsafePathError, match=rf"ids.csv: line 2: image '{listed}' .*{problem}"):
            IdentitySet(str(images), str(tmp_path / "ids.csv")).load(lambda im: torch.zeros(1), "validation.concepts")


# --------------------------------------------------- 7. run folders and caches that links could steer


def test_a_fit_writes_nothing_through_a_dangling_link_in_its_run_folder(tmp_path, small_world, tiny_checkpoint,
                                                                       capsys):
    from conftest import write_config

    run = tmp_path / "lightning_logs" / "version_0"
    run.mkdir(parents=True)
    outside = tmp_path / "elsewhere" / "hparams.yaml"
    outside.parent.mkdir()
    (run / "hparams.yaml").symlink_to(outside)  # dangling
    logger = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
              "init_args": {"save_dir": str(tmp_path), "version": 0}}
    forget = small_world["val_identities"]
    config = write_config(tmp_path, small_world, tiny_checkpoint, forget,
                          trainer={"default_root_dir": str(tmp_path), "logger": logger})
    assert main(["fit", "--config", str(config)]) == 2
    line = last_line(capsys)
    assert line.startswith(f"slug-pl fit: error: the run folder {run} holds an earlier run (hparams.yaml)")
    assert not outside.exists() and [p.name for p in run.iterdir()] == ["hparams.yaml"]


def test_temporary_folders_have_names_nobody_can_plant_a_link_at(tmp_path):
    import os

    from slug_pl.atomic import swap_into_place, temp_folder_beside

    cache = tmp_path / "cache"
    planted = tmp_path / "elsewhere"
    planted.mkdir()
    for guess in (f".cache.tmp-{os.getpid()}", f".cache.old-{os.getpid()}"):
        (tmp_path / guess).symlink_to(planted)
    first, second = temp_folder_beside(cache), temp_folder_beside(cache)
    assert first != second and not first.is_symlink() and first.parent == tmp_path
    (first / "v1").write_text("1")
    swap_into_place(first, cache)
    (second / "v2").write_text("2")
    swap_into_place(second, cache)  # the stale cache moves aside to a fresh name, then goes
    assert [p.name for p in cache.iterdir()] == ["v2"] and list(planted.iterdir()) == []


# --------------------------------------------------------------- 8. members and captions too large


def test_mine_reads_no_oversized_member(tmp_path, capsys):
    """A .tar.gz of a few dozen KB that holds a 33 MiB member (zeros): its sample stops mining,
    naming the shard, the key and the limit; with --bad-samples skip it is left out and listed,
    and the other samples are mined."""
    shard = tmp_path / "bomb.tar.gz"
    with tarfile.open(shard, "w:gz") as tar, open("/dev/zero", "rb") as zeros:
        for name, data in (("a.png", png()), ("a.txt", b"Ada at work")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("big.png")
        info.size = 33 << 20
        tar.addfile(info, zeros)
        info = tarfile.TarInfo("big.txt")
        info.size = 8
        tar.addfile(info, io.BytesIO(b"Ada huge"))
    assert shard.stat().st_size < 100_000
    args = ["mine", "--shards", str(shard), "--name", "Ada", "--out", str(tmp_path / "out")]
    assert main(args) == 2
    line = last_line(capsys)
    assert line.startswith(f"slug-pl mine: error: sample 'big' in {shard}: its png member has {33 << 20} bytes, "
                           f"more than max_member_bytes ({32 << 20})")
    assert "--bad-samples skip" in line and not (tmp_path / "out").exists()
    assert main(args + ["--bad-samples", "skip"]) == 0
    report = json.loads((tmp_path / "out" / "mining.json").read_text())
    assert [(s["key"], s["shard"]) for s in report["skipped_samples"]] == [("big", str(shard))]
    assert report["counts"]["written"] == 1


def test_a_long_caption_is_a_bad_sample_never_tokenized(tmp_path):
    from slug_pl.data.pairs import PairBatches, PairSet
    from slug_pl.data.shards import BadSampleError

    long_caption = b"Ada" + b"a" * 19_997  # 20,000 characters: read, counted, refused
    huge_caption = b"x" * 50_000  # more bytes than 10,000 characters take: not even read
    shard = write_tar(tmp_path / "pairs.tar", {
        "a.png": png(), "a.txt": b"Ada at work", "b.png": png(), "b.txt": long_caption,
        "c.png": png(), "c.txt": huge_caption})
    seen: list[int] = []

    def tokenize(captions):
        seen.extend(len(c) for c in captions)
        return torch.zeros(len(captions), 4, dtype=torch.long)

    to_tensor = lambda image: torch.zeros(3, 2, 2)  # noqa: E731
    pair_set = PairSet("forget", (str(shard),), 3, 3)
    with pytest.raises(BadSampleError, match=r"sample 'b' in .*pairs.tar: its caption has 20000 characters, more "
                                             r"than max_caption_chars \(10000\).*data.bad_samples: skip"):
        list(PairBatches([pair_set], to_tensor, tokenize))
    batches = list(PairBatches([pair_set], to_tensor, tokenize, bad_samples="skip"))
    assert [(r["key"], r["reason"].split(",")[0]) for b in batches for r in b["skipped"]] == [
        ("b", "its caption has 20000 characters"), ("c", "its caption has 50000 bytes")]
    assert max(seen) <= 10_000


# ---------------------------------------------------------------------- 9. decompression bombs


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header announces ``width`` x ``height`` pixels (a few dozen bytes: the image
    data of a 1 x 1 image follows)."""
    import zlib

    data = png(size=(1, 1))
    ihdr = bytearray(data[8:33])  # length, "IHDR", 13 bytes of header, CRC
    ihdr[8:12], ihdr[12:16] = width.to_bytes(4, "big"), height.to_bytes(4, "big")
    ihdr[21:25] = zlib.crc32(bytes(ihdr[4:21])).to_bytes(4, "big")
    return data[:8] + bytes(ihdr) + data[33:]


@pytest.mark.parametrize("side", [9000, 13000])  # 81 Mpx (below PIL's own bound), 169 Mpx (PIL only warns)
def test_an_image_announcing_too_many_pixels_is_not_decoded(tmp_path, side):
    from slug_pl.data.layouts import ImageFolderSet, LayoutError
    from slug_pl.data.pairs import PairBatches, PairSet
    from slug_pl.data.shards import BadSampleError

    bomb = png_claiming(side, side)
    shard = write_tar(tmp_path / "pairs.tar", {"a.png": png(), "a.txt": b"Ada", "bomb.png": bomb, "bomb.txt": b"Ada"})
    to_tensor = lambda image: torch.zeros(3, 2, 2)  # noqa: E731
    tokenize = lambda captions: torch.zeros(len(captions), 4, dtype=torch.long)  # noqa: E731
    pair_set = PairSet("forget", (str(shard),), 2, 2)
    pixels = rf"{side} x {side} = {side * side} pixels, more than max_image_pixels \({8192 * 8192}\)"
    with pytest.raises(BadSampleError, match=rf"sample 'bomb' in .*pairs.tar: the image has {pixels}"):
        list(PairBatches([pair_set], to_tensor, tokenize))
    batches = list(PairBatches([pair_set], to_tensor, tokenize, bad_samples="skip"))
    assert [r["key"] for b in batches for r in b["skipped"]] == ["bomb"]
    assert sum(int(b["valid"].sum()) for b in batches) == 1
    (tmp_path / "folder" / "cats").mkdir(parents=True)
    (tmp_path / "folder" / "cats" / "bomb.png").write_bytes(bomb)
    with pytest.raises(LayoutError, match=rf"image .*cats/bomb.png: the image has {pixels}"):
        ImageFolderSet(str(tmp_path / "folder")).load(to_tensor, "validation.utility")


# ------------------------------------------------------------- 10. arguments checked before work


def test_generate_checks_its_arguments_before_any_work(tmp_path, capsys):
    out = tmp_path / "out"
    base = ["generate", "--prompt", "a photo of Ada", "--out", str(out)]
    assert main(base + ["--pipeline", str(tmp_path / "missing"), "--n", "10000000"]) == 2
    assert last_line(capsys).startswith(f"slug-pl generate: error: pipeline folder not found: {tmp_path / 'missing'}")
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    assert main(base + ["--pipeline", str(tmp_path / "pipe"), "--n", "2", "--seed", str(2**63 - 1)]) == 2
    assert "must lie in 0..9223372036854775807" in last_line(capsys)
    assert not out.exists()


def test_data_num_workers_is_bounded_by_the_cores(small_world):
    """No more worker processes than the cores this process may use (a config written for a larger
    machine is reduced, with a warning); a negative count is refused."""
    from slug_pl.data.datamodule import SlugDataModule, usable_cores

    with pytest.warns(UserWarning, match=f"data.num_workers 100000 is more than the {usable_cores()} CPU cores"):
        dm = SlugDataModule(retain=small_world["corpus"], num_workers=100_000)
    assert dm.num_workers == usable_cores()
    with pytest.raises(ValueError, match="data.num_workers must be a number of worker processes >= 0, got -1"):
        SlugDataModule(num_workers=-1)
