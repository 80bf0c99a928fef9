"""``slug-pl prepare`` on tiny fake copies of the official layouts: what it writes loads as the
recipes' evaluation sets with the right labels, and as the target's classifiers."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from slug_pl.cli import main
from slug_pl.data.labelled import LabelledSet
from slug_pl.data.layouts import IdentitySet, imagenet_classnames, imagenet_templates, imagenet_wnids


def prepare(dataset: str, args: list[str]) -> int:
    return main(["prepare", dataset, *args])


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
    assert prepare("celeba", args) == 0
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
    assert f'shards: "{out}/val-{{000000..000001}}.tar"' in printed
    # the per-split mapping files give the same sets, read from the image folder in place
    for split, mapping in (("val", "val_identities.txt"), ("test", "test_identities.txt")):
        in_place = IdentitySet(str(celeba / "img_align_celeba"), str(out / mapping),
                               classnames=str(out / "celeba_names.txt")).load(_red, split)
        assert torch.equal(in_place.images, sets[split].images) and torch.equal(in_place.labels, sets[split].labels)

    # the same inputs give byte-identical shards
    again = celeba / "again"
    assert prepare("celeba", args[:-1] + [str(again)]) == 0
    assert all((again / p.name).read_bytes() == p.read_bytes() for p in out.iterdir())


def test_celeba_errors_name_the_problem(celeba, capsys):
    base = ["--images", str(celeba / "img_align_celeba"), "--identities", str(celeba / "identity_CelebA.txt"),
            "--names", str(celeba / "identity_names.txt"), "--others", "1", "--val", "2", "--test", "2"]
    assert prepare("celeba", base + ["--include", "Barbara Liskov", "--out", str(celeba / "o1")]) == 2
    assert "'Barbara Liskov' has 2 images; 4 are needed" in capsys.readouterr().err.splitlines()[-1]
    assert prepare("celeba", base + ["--include", "Grace Hoper", "--out", str(celeba / "o2")]) == 2
    assert "did you mean 'Grace Hopper'?" in capsys.readouterr().err.splitlines()[-1]
    (celeba / "used").mkdir()
    (celeba / "used" / "keep.txt").write_text("mine")
    assert prepare("celeba", base + ["--out", str(celeba / "used")]) == 2
    assert "not empty" in capsys.readouterr().err and (celeba / "used" / "keep.txt").read_text() == "mine"
    assert not (celeba / "o1").exists() and not list(celeba.glob(".o1.*"))
    assert prepare("celeba", base + ["--include", "Grace Hopper", "--others", "4", "--out", str(celeba / "o3")]) == 2
    assert "only 3 other identities have 4 images; ask for fewer others" in capsys.readouterr().err


def test_celeba_name_list_and_others_in_a_given_order(celeba):
    """The list the authors use maps images to names directly, after CelebA's count and header
    lines, with underscores for spaces; ``--others-from`` takes the others in its order, skipping
    those without enough images."""
    lines = [line.split() for line in (celeba / "identity_CelebA.txt").read_text().splitlines()]
    names = {"10": "Ada_Lovelace", "11": "Alan_Turing", "12": "Grace_Hopper", "13": "Edsger_Dijkstra",
             "14": "Barbara_Liskov"}
    (celeba / "list_identity_celeba.txt").write_text(
        f"{len(lines)}\nimage_id identity_name\n" + "".join(f"{f} {names[i]}\n" for f, i in lines))
    (celeba / "frequent.txt").write_text("Barbara Liskov\nEdsger Dijkstra\nAlan Turing\n")
    out = celeba / "out"
    assert prepare("celeba", ["--images", str(celeba / "img_align_celeba"), "--identities",
                              str(celeba / "list_identity_celeba.txt"), "--include", "Grace_Hopper", "--others", "1",
                              "--others-from", str(celeba / "frequent.txt"), "--val", "2", "--test", "2",
                              "--out", str(out)]) == 0
    assert (out / "celeba_names.txt").read_text().splitlines() == ["Edsger Dijkstra", "Grace Hopper"]
    mapping = (out / "val_identities.txt").read_text().splitlines()
    assert len(mapping) == 4 and all(line.split(" ", 1)[1] in ("Edsger Dijkstra", "Grace Hopper") for line in mapping)


def test_one_identity_set_for_validation_and_test_is_warned_about():
    """An identity set has no split: the same mapping file for both stages means the report's
    held-out numbers come from the images the search chose the step on."""
    import warnings

    from slug_pl.data.datamodule import EvalSuite, SlugDataModule

    def suite(mapping: str) -> EvalSuite:
        return EvalSuite(IdentitySet("celeba/img_align_celeba", mapping))

    with pytest.warns(UserWarning, match="same images"):
        SlugDataModule(concepts=["Ada"], validation=suite("names.txt"), test=suite("names.txt"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SlugDataModule(concepts=["Ada"], validation=suite("val_identities.txt"), test=suite("test_identities.txt"))


# -- ImageNet --------------------------------------------------------------------------------------

#: Three ImageNet-1k classes and their index in open_clip's (sorted-wnid) order.
CLASSES = {"n01440764": 0, "n01443537": 1, "n02099601": 207}


def _check_imagenet(out: Path, expected: list[tuple[int, int]]) -> None:
    """``expected``: (grey value, open_clip class index) per image, in the written order. The class
    list holds the classes with images, in open_clip's order; labels index it."""
    present = sorted({label for _, label in expected})
    assert (out / "imagenet_classes.txt").read_text().splitlines() == [imagenet_classnames()[i] for i in present]
    assert (out / "imagenet_templates.txt").read_text().splitlines() == imagenet_templates()
    data = LabelledSet(str(out / "val-000000.tar"), str(out / "imagenet_classes.txt"),
                       str(out / "imagenet_templates.txt")).load(_red, "utility")
    assert list(zip(data.images[:, 0].int().tolist(), data.labels.tolist())) == [
        (value, present.index(label)) for value, label in expected]
    assert data.classnames[-1] == "Golden Retriever" and len(data.templates) == 80


def test_imagenet_wnid_folders(tmp_path):
    if imagenet_wnids() is None:
        pytest.skip("timm not installed")
    for value, wnid in zip((30, 10, 20), CLASSES):
        _image(tmp_path / "val" / wnid / f"ILSVRC2012_val_{value:08d}.JPEG", value)
    assert prepare("imagenet", ["--root", str(tmp_path / "val"), "--out", str(tmp_path / "out")]) == 0
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
    assert prepare("imagenet", args) == 0
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
    assert prepare("imagenet", args) == 0
    _check_imagenet(tmp_path / "out", [(3, 0), (1, 1), (2, 207)])


def test_imagenet_flat_folder_without_labels_is_refused(tmp_path, capsys):
    _image(tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG", 1)
    assert prepare("imagenet", ["--root", str(tmp_path / "val"), "--out", str(tmp_path / "out")]) == 2
    assert "--devkit" in capsys.readouterr().err.splitlines()[-1] and not (tmp_path / "out").exists()


def test_shards_keep_the_image_bytes(tmp_path):
    from slug_pl.data.build_labelled import LabelledImage, write_labelled_shards
    from slug_pl.data.shards import iter_raw_samples

    _image(tmp_path / "a.png", 5, "PNG")
    (shard,) = write_labelled_shards([LabelledImage("a", tmp_path / "a.png", 3)], tmp_path, "val")
    (sample,) = iter_raw_samples([str(shard)])
    assert sample.image == (tmp_path / "a.png").read_bytes() and sample.label == 3 and sample.fields["cls"] == b"3"
    assert Image.open(io.BytesIO(sample.image)).getpixel((0, 0)) == (5, 5, 5)


# -- UnlearnCanvas ---------------------------------------------------------------------------------


def test_unlearncanvas_classifiers_and_styles(standin, tmp_path, capsys):
    """The release's two classifier pickles become safetensors with the JSONs the target reads; the
    run's styles are checked against the data. The stand-in's classifiers are timm's small
    ``test_vit``, refused as the benchmark's ViT-L/16 until --arch names it."""
    from slug_pl.data.unlearncanvas import UC_STYLES
    from slug_pl.evaluation.unlearncanvas import load_task_classifier
    from slug_pl.testing import standins as si

    release = standin(si.UNLEARNCANVAS).extras["style_classifier"].parent
    root = tmp_path / "canvas"
    for style in ("Van_Gogh", "Monet"):
        _image(root / style / "Dogs" / "1.jpg", 9)
    args = ["--classifiers", str(release), "--root", str(root), "--styles", "Van_Gogh", "Monet"]
    assert prepare("unlearncanvas", args + ["--out", str(tmp_path / "refused")]) == 2
    assert "not timm's vit_large_patch16_224" in capsys.readouterr().err and not (tmp_path / "refused").exists()

    out = tmp_path / "uc"
    assert prepare("unlearncanvas", args + ["--arch", "test_vit", "--out", str(out)]) == 0
    assert (out / "styles.txt").read_text().splitlines() == ["Van_Gogh", "Monet"]
    for task, classes in (("style", 51), ("object", 20)):
        record = json.loads((out / f"{task}.json").read_text())
        assert record["arch"] == si.UC_CLASSIFIER_ARCH and record["image_size"] == 32
        classifier = load_task_classifier(out / f"{task}.json")
        assert classifier.task == task and len(classifier.classnames) == classes
        assert classifier.logits(torch.rand(2, 3, 40, 40)).shape == (2, classes)
    assert "Seed_Images" in load_task_classifier(out / "style.json").classnames

    assert prepare("unlearncanvas", args + ["Pencil_Sketch", "--out", str(tmp_path / "unknown")]) == 2
    assert "--styles ['Pencil_Sketch']: not a style of the benchmark's classifier" in capsys.readouterr().err
    assert prepare("unlearncanvas", ["--classifiers", str(release), "--root", str(root), "--arch", "test_vit",
                                     "--out", str(tmp_path / "all")]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("slug-pl prepare: error: ") and UC_STYLES[0] in err
