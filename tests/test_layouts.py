"""Evaluation-set layouts on disk: ImageNet-style / generic class folders, CelebA-style identity
sets, shards; YAML parsing of the layout union; evaluation through the Evaluator."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from slug_pl.data.labelled import DEFAULT_TEMPLATES, LabelledSet
from slug_pl.data.layouts import (
    EvalSet,
    IdentitySet,
    ImageFolderSet,
    LayoutError,
    imagenet_classnames,
    imagenet_templates,
    imagenet_wnids,
    read_identity_map,
    stratified_subset,
)

WNIDS = ("n01440764", "n01443537", "n01484850")  # tench, goldfish, great white shark


@pytest.fixture(scope="module")
def family():
    from slug_pl.families.open_clip import OpenClip

    return OpenClip(model_name="slug-tiny-vit")


@pytest.fixture(scope="module")
def model(family):
    torch.manual_seed(0)
    return family.load()


def _png(color=(200, 30, 30), size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _write_image(path: Path, color=(200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".png": "PNG", ".webp": "WEBP"}.get(path.suffix.lower(), "JPEG")
    Image.new("RGB", (10, 12), color).save(path, format=fmt)


def _imagenet_folder(root: Path) -> Path:
    """3 wnid folders with 2, 3, 1 images (mixed suffixes), plus files that must be ignored."""
    _write_image(root / WNIDS[0] / "a.JPEG", (255, 0, 0))
    _write_image(root / WNIDS[0] / "b.jpg", (250, 5, 0))
    _write_image(root / WNIDS[1] / "c.png", (0, 255, 0))
    _write_image(root / WNIDS[1] / "d.jpeg", (0, 250, 5))
    _write_image(root / WNIDS[1] / "sub" / "e.webp", (5, 250, 0))
    _write_image(root / WNIDS[2] / "f.PNG", (0, 0, 255))
    (root / WNIDS[0] / "notes.txt").write_text("not an image")
    _write_image(root / WNIDS[0] / ".hidden.jpg")
    (root / "LOC_val_solution.csv").write_text("stray file at the root")
    return root


def _celeba(root: Path) -> tuple[Path, dict[str, str]]:
    """7 images of 3 identities (names with spaces)."""
    mapping = {"000001.jpg": "Jane Doe", "000002.jpg": "John Smith", "000003.jpg": "Jane Doe",
               "000004.jpg": "Ann Lee", "000005.jpg": "John Smith", "000006.jpg": "Jane Doe",
               "000007.jpg": "Ann Lee"}
    for i, f in enumerate(mapping):
        _write_image(root / "img" / f, (30 * i, 100, 200 - 20 * i))
    return root / "img", mapping


def _write_map(path: Path, mapping: dict[str, str]) -> Path:
    if path.suffix == ".json":
        path.write_text(json.dumps(mapping))
    elif path.suffix == ".csv":
        path.write_text("filename,identity\n# a comment\n"
                        + "".join(f'{f},"{n}"\n' for f, n in mapping.items()))
    elif path.suffix == ".tsv":
        path.write_text("".join(f"{f}\t{n}\n" for f, n in mapping.items()))
    else:
        path.write_text("\n".join(f"{f}   {n}" for f, n in mapping.items()) + "\n\n")
    return path


# -- ImageNet-style / class folders ------------------------------------------------------------


def test_imagenet_style_wnid_folders(tmp_path, family):
    root = _imagenet_folder(tmp_path / "val")
    data = ImageFolderSet(root=str(root)).load(family.image_transform(), "utility")
    assert data.name == "utility"
    assert data.images.shape == (6, 3, 32, 32) and data.images.dtype == torch.float32
    assert data.labels.tolist() == [0, 0, 1, 1, 1, 2]
    assert data.classnames == ["tench", "goldfish", "great white shark"]
    assert data.templates == imagenet_templates()
    assert len(data.templates) == 80 and data.templates[0] == "a bad photo of a {}."
    # explicit templates / template keyword / max_samples
    data = ImageFolderSet(root=str(root), templates="simple_imagenet", max_samples=3).load(
        family.image_transform(), "u")
    # max_samples is a stratified subset: 3 of 6 images is half of each class (2, 3, 1 images):
    # 1, 1.5, 0.5 -> 1 + 1 + 0, and the one left goes to class 1 or 2 (equal remainders)
    counts = tuple(data.labels.tolist().count(c) for c in range(3))
    assert counts in ((1, 2, 0), (1, 1, 1)) and len(data.templates) == 7
    assert data.labels.tolist() == sorted(data.labels.tolist())  # still in class-then-path order


def test_imagenet_classnames_follow_sorted_wnids():
    """open_clip's IMAGENET_CLASSNAMES are in the standard class-index order = sorted wnids."""
    wnids = imagenet_wnids()
    if wnids is None:
        pytest.skip("timm not installed")
    names = imagenet_classnames()
    assert len(wnids) == len(names) == 1000 and wnids == sorted(wnids)
    spot = {0: ("n01440764", "tench"), 1: ("n01443537", "goldfish"),
            207: ("n02099601", "Golden Retriever"), 281: ("n02123045", "tabby cat"),
            409: ("n02708093", "analog clock"), 999: ("n15075141", "toilet paper")}
    for i, (wnid, name) in spot.items():
        assert (wnids[i], names[i]) == (wnid, name)


def test_full_imagenet_layout_with_subset(tmp_path, family):
    wnids = imagenet_wnids()
    if wnids is None:
        pytest.skip("timm not installed")
    root = tmp_path / "val"
    png = _png()
    for w in wnids:
        (root / w).mkdir(parents=True)
        (root / w / f"{w}_0.JPEG").write_bytes(png)  # PIL reads by content, not suffix
    spec = ImageFolderSet(root=str(root), subset_fraction=0.003, subset_seed=3)
    data = spec.load(family.image_transform(), "imagenet")
    assert data.classnames == imagenet_classnames() and len(data.templates) == 80
    assert len(data.labels) == 3  # round(0.003 * 1000), stratified: 3 different classes
    assert len(set(data.labels.tolist())) == 3
    again = spec.load(family.image_transform(), "imagenet")
    assert torch.equal(again.labels, data.labels)
    shutil.rmtree(root)  # 1,000 folders: do not leave them for pytest's tmp-dir cleanup


def test_generic_class_folders_and_classnames(tmp_path, family):
    root = tmp_path / "pets"
    _write_image(root / "golden_retriever" / "1.jpg")
    _write_image(root / "golden_retriever" / "2.jpg")
    _write_image(root / "cat" / "1.png")
    t = family.image_transform()
    data = ImageFolderSet(root=str(root)).load(t, "pets")
    assert data.classnames == ["cat", "golden retriever"]
    assert data.labels.tolist() == [0, 1, 1]
    assert data.templates == list(DEFAULT_TEMPLATES)
    names = tmp_path / "names.txt"
    names.write_text("kitty\ndoggo\n")
    assert ImageFolderSet(root=str(root), classnames=str(names)).load(t, "p").classnames == ["kitty", "doggo"]
    mapping = tmp_path / "names.json"
    mapping.write_text(json.dumps({"cat": "a cat", "golden_retriever": "a dog"}))
    assert ImageFolderSet(root=str(root), classnames=str(mapping)).load(t, "p").classnames == ["a cat", "a dog"]
    assert ImageFolderSet(root=str(root), classnames={"cat": "c", "golden_retriever": "g"},
                          templates=["{} here"]).load(t, "p").templates == ["{} here"]
    with pytest.raises(LayoutError, match=r"2 class folders but .* 3 names"):
        ImageFolderSet(root=str(root), classnames=["a", "b", "c"]).load(t, "p")
    with pytest.raises(LayoutError, match="imagenet needs"):
        ImageFolderSet(root=str(root), classnames="imagenet").load(t, "p")


def test_image_folder_errors(tmp_path, family):
    t = family.image_transform()
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolderSet(root=str(tmp_path / "nowhere")).load(t, "x")
    flat = tmp_path / "flat"
    _write_image(flat / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(LayoutError, match="no class folders.*sort them"):
        ImageFolderSet(root=str(flat)).load(t, "x")
    root = tmp_path / "r"
    _write_image(root / "a" / "1.jpg")
    (root / "b").mkdir()
    (root / "b" / "readme.txt").write_text("x")
    with pytest.raises(LayoutError, match=r"hold no images.*r/b"):
        ImageFolderSet(root=str(root)).load(t, "x")
    (root / "b" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(LayoutError, match="broken.jpg does not decode"):
        ImageFolderSet(root=str(root)).load(t, "x")


def test_stratified_subset_is_exact_and_seeded():
    keys = [[f"c{c}/{i}.jpg" for i in range(50)] for c in range(10)]
    picks = stratified_subset(keys, 0.05, seed=0)
    sizes = [len(p) for p in picks]
    assert sum(sizes) == 25 and set(sizes) == {2, 3}
    assert picks == stratified_subset(keys, 0.05, seed=0)
    assert picks != stratified_subset(keys, 0.05, seed=1)
    assert [len(p) for p in stratified_subset([["a"] * 10, ["b"] * 30], 0.5, 0)] == [5, 15]
    assert stratified_subset(keys, 1.0, 0) == [list(range(50))] * 10
    with pytest.raises(ValueError, match="subset_fraction"):
        stratified_subset(keys, 0.0, 0)


# -- CelebA-style identity sets --------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".txt", ".json"])
def test_identity_set_formats_and_include(tmp_path, family, suffix):
    images, mapping = _celeba(tmp_path)
    path = _write_map(tmp_path / f"identities{suffix}", mapping)
    t = family.image_transform()
    data = IdentitySet(images=str(images), identities=str(path)).load(t, "concepts")
    assert data.classnames == ["Ann Lee", "Jane Doe", "John Smith"]
    assert data.labels.tolist() == [0, 0, 1, 1, 1, 2, 2]
    assert data.images.shape == (7, 3, 32, 32)
    assert data.templates == list(DEFAULT_TEMPLATES)
    sub = IdentitySet(images=str(images), identities=str(path), include=["Jane Doe", "Ann Lee"],
                      max_per_identity=2).load(t, "concepts")
    assert sub.classnames == ["Ann Lee", "Jane Doe", "John Smith"]  # class list stays complete
    assert sub.labels.tolist() == [0, 0, 1, 1]
    # the loaded images are those of 000004, 000007 (Ann Lee), 000001, 000003 (Jane Doe)
    full = IdentitySet(images=str(images), identities=str(path)).load(t, "c")
    assert torch.equal(sub.images, full.images[[0, 1, 2, 3]])


def test_identity_set_classnames_file_and_errors(tmp_path, family):
    images, mapping = _celeba(tmp_path)
    path = _write_map(tmp_path / "ids.csv", mapping)
    t = family.image_transform()
    names = tmp_path / "names.json"
    names.write_text(json.dumps(["Zed Extra", "John Smith", "Jane Doe", "Ann Lee"]))
    data = IdentitySet(images=str(images), identities=str(path), classnames=str(names)).load(t, "c")
    assert data.classnames[0] == "Zed Extra" and data.labels.tolist() == [1, 1, 2, 2, 2, 3, 3]

    with pytest.raises(LayoutError, match="not in the class list"):
        IdentitySet(images=str(images), identities=str(path), include=["Jane Do"]).load(t, "c")
    with pytest.raises(LayoutError, match=r"ids.csv line \d+: identity 'Ann Lee' is not in the class list"):
        IdentitySet(images=str(images), identities=str(path), classnames=["Jane Doe", "John Smith"]).load(t, "c")

    bad = tmp_path / "bad.txt"
    bad.write_text("000001.jpg Jane Doe\n\n000002.jpg\n")
    with pytest.raises(LayoutError, match=r"bad.txt line 3: expected"):
        IdentitySet(images=str(images), identities=str(bad)).load(t, "c")

    gone = tmp_path / "gone.tsv"
    gone.write_text("000001.jpg\tJane Doe\n000099.jpg\tJane Doe\n000002.jpg\tJohn Smith\n")
    with pytest.raises(LayoutError, match=r"gone.tsv line 2 lists image '000099.jpg', which is missing"):
        IdentitySet(images=str(images), identities=str(gone)).load(t, "c")
    # only loaded images must exist: a missing image of an identity left out is fine
    only = IdentitySet(images=str(images), identities=str(gone), include=["John Smith"]).load(t, "c")
    assert only.classnames == ["Jane Doe", "John Smith"] and only.labels.tolist() == [1]

    clash = tmp_path / "clash.txt"
    clash.write_text("000001.jpg Jane Doe\n000001.jpg John Smith\n")
    with pytest.raises(LayoutError, match=r"clash.txt line 2: image '000001.jpg' is mapped"):
        read_identity_map(clash)
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        IdentitySet(images=str(images), identities=str(tmp_path / "nope.csv")).load(t, "c")


# -- YAML path and evaluation ----------------------------------------------------------------


@dataclass
class _Suite:
    """Stands in for EvalSuite with the layout union (EvalSuite itself lives in datamodule.py)."""

    concepts: EvalSet
    utility: EvalSet | None = None


class _Data:
    def __init__(self, validation: _Suite | None = None, test: _Suite | None = None):
        self.validation, self.test = validation, test


def _shard(path: Path, colors: list[tuple[int, int, int]], labels: list[int]) -> Path:
    with tarfile.open(path, "w") as tar:
        for i, (color, label) in enumerate(zip(colors, labels)):
            for ext, payload in (("png", _png(color)), ("cls", str(label).encode())):
                info = tarfile.TarInfo(f"s{i:03d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return path


def test_layouts_parse_from_yaml_and_evaluate(tmp_path, family, model):
    import jsonargparse

    from slug_pl.evaluation.evaluator import Evaluator

    images, mapping = _celeba(tmp_path)
    ids = _write_map(tmp_path / "ids.csv", mapping)
    val = _imagenet_folder(tmp_path / "val")
    shard = _shard(tmp_path / "objects.tar", [(9, 9, 9), (200, 200, 0), (0, 90, 90)], [0, 1, 1])
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"data": {
        "validation": {
            "concepts": {"images": str(images), "identities": str(ids),
                         "include": ["Jane Doe", "John Smith"], "templates": ["a photo of {}."]},
            "utility": {"root": str(val), "templates": "simple_imagenet"}},
        "test": {
            "concepts": {"images": str(images), "identities": str(ids)},
            "utility": {"shards": str(shard), "classnames": ["dark", "bright"]}},
    }}))
    parser = jsonargparse.ArgumentParser()
    parser.add_argument("--config", action="config")
    parser.add_class_arguments(_Data, "data")
    cfg = parser.parse_args(["--config", str(config)])
    assert "root:" in parser.dump(cfg)  # round-trips (LightningCLI saves config.yaml this way)
    data = parser.instantiate(cfg).data
    assert isinstance(data.validation.concepts, IdentitySet)
    assert isinstance(data.validation.utility, ImageFolderSet)
    assert isinstance(data.test.utility, LabelledSet)

    t = family.image_transform()
    for suite, n_concepts, n_utility in ((data.validation, 5, 6), (data.test, 7, 3)):
        concepts = suite.concepts.load(t, "concepts")
        utility = suite.utility.load(t, "utility")
        assert (len(concepts.labels), len(utility.labels)) == (n_concepts, n_utility)
        assert concepts.classnames == ["Ann Lee", "Jane Doe", "John Smith"]
        metrics = Evaluator(family, concepts, ["Jane Doe"], utility, batch_size=4).evaluate(model)
        assert set(metrics) == {"forget_top1", "forget_top5", "retain_top1", "retain_top5",
                                "utility_top1", "utility_top5"}
        assert all(0.0 <= v <= 1.0 for v in metrics.values())
        assert metrics["forget_top5"] == 1.0  # 3 classes: top-5 is every class
    assert data.test.utility.load(t, "u").labels.tolist() == [0, 1, 1]


def test_yaml_union_rejects_unknown_layout():
    import jsonargparse

    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--suite", type=EvalSet)
    assert isinstance(parser.instantiate(parser.parse_args(["--suite", '{"root": "/a"}'])).suite,
                      ImageFolderSet)
    with pytest.raises(jsonargparse.ArgumentError, match="rot"):
        parser.parse_args(["--suite", '{"rot": "/a"}'])


# -- one rank's part (a shared evaluation, slug_pl.distributed_search) -------------------------------


@pytest.mark.parametrize("layout", ["folders", "identities", "shards"])
def test_every_layout_decodes_one_ranks_part(tmp_path, family, layout):
    """``load(..., part=(r, W))`` of each layout holds samples ``r::W`` of the whole set and
    nothing else; parts of a set smaller than the ranks may be empty."""
    t = family.image_transform()
    if layout == "folders":
        spec = ImageFolderSet(root=str(_imagenet_folder(tmp_path / "val")))
    elif layout == "identities":
        images, mapping = _celeba(tmp_path)
        spec = IdentitySet(images=str(images), identities=str(_write_map(tmp_path / "ids.csv", mapping)))
    else:
        colors = [(30 * i, 100, 200 - 20 * i) for i in range(5)]
        spec = LabelledSet(str(_shard(tmp_path / "s.tar", colors, [0, 1, 0, 1, 1])), ["a", "b"])
    whole = spec.load(t, "set")
    for world in (2, 3, 9):
        parts = [spec.load(t, "set", part=(r, world)) for r in range(world)]
        for r, part in enumerate(parts):
            assert part.part == (r, world) and part.classnames == whole.classnames
            assert torch.equal(part.labels, whole.labels[r::world])
            if len(part.labels):
                assert torch.equal(part.images, whole.images[r::world])
        assert sum(len(p.labels) for p in parts) == len(whole.labels)
