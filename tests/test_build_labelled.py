"""scripts/celeba_to_shards.py and scripts/imagenet_to_shards.py on tiny fake copies of the official
layouts: the shards they write load as the recipe's labelled sets with the right labels."""

from __future__ import annotations

import csv
import importlib.util
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from slug_pl.data.labelled import LabelledSet
from slug_pl.data.layouts import imagenet_classnames, imagenet_templates, imagenet_wnids

REPO = Path(__file__).resolve().parent.parent


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _image(path: Path, value: int, fmt: str = "JPEG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (6, 6), (value, value, value)).save(path, format=fmt)


def _red(img: Image.Image) -> torch.Tensor:
    """A transform that keeps what identifies an image here: its grey value."""
    return torch.tensor([float(img.getpixel((2, 2))[0])])


# -- CelebA ----------------------------------------------------------------------------------------


@pytest.fixture
def celeba(tmp_path):
    """img_align_celeba with 5 identities (ids 10..14; id 14 has 2 images, the others 4) and the
    id -> name file; image i has grey value i."""
    images, lines = tmp_path / "img_align_celeba", []
    counts = {10: 4, 11: 4, 12: 4, 13: 4, 14: 2}
    n = 0
    for ident, count in counts.items():
        for _ in range(count):
            n += 1
            _image(images / f"{n:06d}.jpg", n)
            lines.append(f"{n:06d}.jpg {ident}")
    (tmp_path / "identity_CelebA.txt").write_text("\n".join(lines) + "\n")
    names = {10: "Ada Lovelace", 11: "Alan Turing", 12: "Grace Hopper", 13: "Edsger Dijkstra", 14: "Barbara Liskov"}
    (tmp_path / "identity_names.txt").write_text("".join(f"{i} {n}\n" for i, n in names.items()))
    return tmp_path


def test_celeba_shards_hold_disjoint_splits_of_the_chosen_identities(celeba, capsys):
    out = celeba / "out"
    args = ["--images", str(celeba / "img_align_celeba"), "--identities", str(celeba / "identity_CelebA.txt"),
            "--names", str(celeba / "identity_names.txt"), "--include", "Grace Hopper", "--others", "2",
            "--val", "2", "--test", "2", "--shard-size", "3", "--out", str(out)]
    assert _script("celeba_to_shards")(args) == 0
    classnames = (out / "celeba_names.txt").read_text().splitlines()
    # Grace Hopper and 2 of the 3 others with >= 4 images (Barbara Liskov has only 2), sorted
    assert "Grace Hopper" in classnames and len(classnames) == 3 and classnames == sorted(classnames)
    assert "Barbara Liskov" not in classnames
    sets = {}
    for split in ("val", "test"):
        shards = sorted(out.glob(f"{split}-*.tar"))
        assert [p.name for p in shards] == [f"{split}-000000.tar", f"{split}-000001.tar"]  # 6 images, 3 per shard
        sets[split] = LabelledSet([str(p) for p in shards], str(out / "celeba_names.txt")).load(_red, split)
    owner = {10: "Ada Lovelace", 11: "Alan Turing", 12: "Grace Hopper", 13: "Edsger Dijkstra"}
    for split, data in sets.items():
        assert data.labels.tolist() == [0, 0, 1, 1, 2, 2]
        for value, label in zip(data.images[:, 0].int().tolist(), data.labels.tolist()):
            assert owner[10 + (value - 1) // 4] == classnames[label]  # image n belongs to id 10 + (n-1)//4
    assert not set(sets["val"].images[:, 0].tolist()) & set(sets["test"].images[:, 0].tolist())
    printed = capsys.readouterr().out
    assert f"shards: {out}/val-{{000000..000001}}.tar" in printed

    # the same inputs give byte-identical shards
    again = celeba / "again"
    assert _script("celeba_to_shards")(args[:-1] + [str(again)]) == 0
    assert all((again / p.name).read_bytes() == p.read_bytes() for p in out.iterdir())


def test_celeba_errors_name_the_problem(celeba, capsys):
    base = ["--images", str(celeba / "img_align_celeba"), "--identities", str(celeba / "identity_CelebA.txt"),
            "--names", str(celeba / "identity_names.txt"), "--others", "1", "--val", "2", "--test", "2"]
    assert _script("celeba_to_shards")(base + ["--include", "Barbara Liskov", "--out", str(celeba / "o1")]) == 2
    assert "'Barbara Liskov' has 2 images; 4 are needed" in capsys.readouterr().err.splitlines()[-1]
    assert _script("celeba_to_shards")(base + ["--include", "Grace Hoper", "--out", str(celeba / "o2")]) == 2
    assert "did you mean 'Grace Hopper'?" in capsys.readouterr().err.splitlines()[-1]
    (celeba / "used").mkdir()
    (celeba / "used" / "keep.txt").write_text("mine")
    assert _script("celeba_to_shards")(base + ["--out", str(celeba / "used")]) == 2
    assert "not empty" in capsys.readouterr().err and (celeba / "used" / "keep.txt").read_text() == "mine"
    assert not (celeba / "o1").exists() and not list(celeba.glob(".o1.tmp-*"))


# -- ImageNet --------------------------------------------------------------------------------------

#: Three ImageNet-1k classes and their index in open_clip's (sorted-wnid) order.
CLASSES = {"n01440764": 0, "n01443537": 1, "n02099601": 207}


def _check_imagenet(out: Path, expected: list[tuple[int, int]]) -> None:
    """``expected``: (grey value, label) per image, in the written order."""
    assert (out / "imagenet_classes.txt").read_text().splitlines() == imagenet_classnames()
    assert (out / "imagenet_templates.txt").read_text().splitlines() == imagenet_templates()
    data = LabelledSet(str(out / "val-000000.tar"), str(out / "imagenet_classes.txt"),
                       str(out / "imagenet_templates.txt")).load(_red, "utility")
    assert list(zip(data.images[:, 0].int().tolist(), data.labels.tolist())) == expected
    assert data.classnames[207] == "Golden Retriever" and len(data.templates) == 80


def test_imagenet_wnid_folders(tmp_path):
    if imagenet_wnids() is None:
        pytest.skip("timm not installed")
    for value, wnid in zip((30, 10, 20), CLASSES):
        _image(tmp_path / "val" / wnid / f"ILSVRC2012_val_{value:08d}.JPEG", value)
    assert _script("imagenet_to_shards")(["--root", str(tmp_path / "val"), "--out", str(tmp_path / "out")]) == 0
    _check_imagenet(tmp_path / "out", [(30, 0), (10, 1), (20, 207)])


def test_imagenet_flat_folder_with_the_kaggle_solution(tmp_path):
    if imagenet_wnids() is None:
        pytest.skip("timm not installed")
    flat, rows = tmp_path / "val", []
    for number, wnid in zip((1, 2, 3, 4), ("n02099601", "n01440764", "n01443537", "n01440764")):
        _image(flat / f"ILSVRC2012_val_{number:08d}.JPEG", number)
        rows.append({"ImageId": f"ILSVRC2012_val_{number:08d}", "PredictionString": f"{wnid} 1 2 3 4 {wnid} 5 6 7 8"})
    with open(tmp_path / "LOC_val_solution.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["ImageId", "PredictionString"])
        writer.writeheader()
        writer.writerows(rows)
    args = ["--root", str(flat), "--solution-csv", str(tmp_path / "LOC_val_solution.csv"), "--out", str(tmp_path / "out")]
    assert _script("imagenet_to_shards")(args) == 0
    _check_imagenet(tmp_path / "out", [(2, 0), (4, 0), (3, 1), (1, 207)])


def test_imagenet_flat_folder_with_the_devkit(tmp_path):
    """The devkit numbers classes its own way (ILSVRC2012_ID, not the sorted-wnid index): the
    labels must come out in open_clip's order all the same."""
    if imagenet_wnids() is None:
        pytest.skip("timm not installed")
    from scipy.io import savemat

    data = tmp_path / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True)
    synsets = np.zeros((4, 1), dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_children", "O")])
    for row, entry in enumerate([(7, "n02099601", 0), (8, "n01440764", 0), (9, "n01443537", 0), (1001, "n00001740", 3)]):
        synsets[row, 0] = entry
    savemat(str(data / "meta.mat"), {"synsets": synsets})
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text("9\n7\n8\n")  # images 1, 2, 3
    for number in (1, 2, 3):
        _image(tmp_path / "flat" / f"ILSVRC2012_val_{number:08d}.JPEG", number)
    args = ["--root", str(tmp_path / "flat"), "--devkit", str(tmp_path / "ILSVRC2012_devkit_t12"),
            "--out", str(tmp_path / "out")]
    assert _script("imagenet_to_shards")(args) == 0
    _check_imagenet(tmp_path / "out", [(3, 0), (1, 1), (2, 207)])


def test_imagenet_flat_folder_without_labels_is_refused(tmp_path, capsys):
    _image(tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG", 1)
    assert _script("imagenet_to_shards")(["--root", str(tmp_path / "val"), "--out", str(tmp_path / "out")]) == 2
    assert "--devkit" in capsys.readouterr().err.splitlines()[-1] and not (tmp_path / "out").exists()


def test_shards_keep_the_image_bytes(tmp_path):
    from slug_pl.data.build_labelled import LabelledImage, write_labelled_shards
    from slug_pl.data.shards import iter_raw_samples

    _image(tmp_path / "a.png", 5, "PNG")
    (shard,) = write_labelled_shards([LabelledImage("a", tmp_path / "a.png", 3)], tmp_path, "val")
    (sample,) = iter_raw_samples([str(shard)])
    assert sample.image == (tmp_path / "a.png").read_bytes() and sample.label == 3 and sample.fields["cls"] == b"3"
    assert Image.open(io.BytesIO(sample.image)).getpixel((0, 0)) == (5, 5, 5)
