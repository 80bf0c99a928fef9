"""UnlearnCanvas: the tree reader and its splits, the shard writer, UA / IRA / CRA, the classifier
paths, the results table, and the synthetic canvas with its classifiers."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from slug_pl.data.labelled import LabelledSet, load_labelled_set
from slug_pl.data.layouts import LayoutError
from slug_pl.data.pairs import PairBatches, PairSet, count_samples
from slug_pl.data.shards import expand_urls
from slug_pl.data.unlearncanvas import (
    CanvasLabelledSet,
    CanvasLayoutWarning,
    UnlearnCanvasSet,
    caption,
    read_layout,
)
from slug_pl.evaluation.unlearncanvas import (
    PUBLISHED,
    CanvasRow,
    CheckpointClassifier,
    ZeroShotClassifier,
    canvas_scores,
    comparison_markdown,
    load_task_classifier,
    prompt_grid,
    read_rows,
    save_task_classifier,
    score_images,
    write_row,
)


def to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)


def _colour(style: int, obj: int, number: int) -> tuple[int, int, int]:
    """A colour that encodes an image's cell and number (so a round trip can be checked)."""
    return (40 * style + 10, 60 * obj + 20, 5 * number)


def make_tree(root: Path, styles=("Abstract", "Van_Gogh", "Seed_Images"), objects=("Bears", "Cats"),
              n: int = 20, ext: str = ".png") -> Path:
    for s, style in enumerate(styles):
        for o, obj in enumerate(objects):
            cell = root / style / obj
            cell.mkdir(parents=True)
            for k in range(1, n + 1):
                Image.new("RGB", (6, 6), _colour(s, o, k)).save(cell / f"{k}{ext}")
    return root


# ================================================================================================
# captions, reader, splits
# ================================================================================================


def test_caption_follows_the_benchmark():
    assert caption("Van_Gogh", "Bears") == "A Bears image in Van Gogh style."
    assert caption("Seed_Images", "Architectures") == "A Architectures image in Photo style."


def test_the_demo_clip_reads_each_image_in_several_captions_none_an_evaluation_prompt():
    """The demo canvas CLIP's captions of one cell: the benchmark's first, some naming the style
    alone and some the object alone, and none equal to a zero-shot prompt the evaluation scores
    with (the style or object phrase in STYLE_TEMPLATES / OBJECT_TEMPLATES)."""
    from slug_pl.data.unlearncanvas import OBJECT_TEMPLATES, STYLE_TEMPLATES
    from slug_pl.demo.unlearncanvas import CANVAS_CLIP_CAPTIONS

    texts = [caption("Van_Gogh", "Bears", t) for t in CANVAS_CLIP_CAPTIONS]
    assert texts[0] == caption("Van_Gogh", "Bears") and len(set(texts)) == len(texts)
    assert any("Van Gogh" in t and "Bears" not in t for t in texts)
    assert any("Bears" in t and "Van Gogh" not in t for t in texts)
    assert all("Van Gogh" in t or "Bears" in t for t in texts)
    prompts = {t.format("Van Gogh") for t in STYLE_TEMPLATES} | {t.format("Bears") for t in OBJECT_TEMPLATES}
    assert {p.lower() for p in prompts}.isdisjoint(t.lower() for t in texts)


def test_reader_splits_by_number_and_builds_forget_and_retain(tmp_path):
    root = make_tree(tmp_path / "uc")
    data = UnlearnCanvasSet(str(root), forget_style="Van_Gogh").load()
    assert data.layout.styles == ("Abstract", "Seed_Images", "Van_Gogh")  # sorted folder names
    assert data.layout.objects == ("Bears", "Cats")
    for img in data.splits["train"]:
        assert 1 <= img.number <= 18
    assert {i.number for i in data.splits["validation"]} == {19}
    assert {i.number for i in data.splits["test"]} == {20}
    assert [len(data.splits[s]) for s in ("train", "validation", "test")] == [108, 6, 6]

    forget, retain = data.forget("train"), data.retain("train")
    assert len(forget) == 2 * 18 and {i.style for i in forget} == {"Van_Gogh"}
    assert {i.object for i in forget} == {"Bears", "Cats"}  # a style is forgotten in every object
    assert len(retain) == 4 * 18 and "Van_Gogh" not in {i.style for i in retain}
    assert data.caption(forget[0]) == f"A {forget[0].object} image in Van Gogh style."

    obj = UnlearnCanvasSet(str(root), forget_object="Cats").load()
    assert {(i.style, i.object) for i in obj.forget("test")} == {
        ("Abstract", "Cats"), ("Seed_Images", "Cats"), ("Van_Gogh", "Cats")}
    assert {i.object for i in obj.retain("test")} == {"Bears"}


def test_labelled_sets_carry_style_and_object_labels(tmp_path):
    root = make_tree(tmp_path / "uc", n=4)
    data = UnlearnCanvasSet(str(root), split_fractions=(0.5, 0.25, 0.25)).load()
    styles = data.labelled("test", "style", to_tensor)
    objects = data.labelled("test", "object", to_tensor)
    assert styles.classnames == ["Abstract", "Photo", "Van Gogh"]
    assert objects.classnames == ["Bears", "Cats"]
    assert styles.images.shape == (6, 3, 6, 6)
    layout = CanvasLabelledSet(UnlearnCanvasSet(str(root), split_fractions=(0.5, 0.25, 0.25)),
                               kind="object", split="test").load(to_tensor, "objects")
    assert torch.equal(layout.labels, objects.labels) and torch.equal(layout.images, objects.images)
    second = CanvasLabelledSet(UnlearnCanvasSet(str(root), split_fractions=(0.5, 0.25, 0.25)),
                               kind="object", split="test").load(to_tensor, "objects", part=(1, 4))
    assert second.part == (1, 4)  # rank 1's part of a search shared by 4 ranks
    assert torch.equal(second.labels, objects.labels[1::4]) and torch.equal(second.images, objects.images[1::4])
    # folder order Abstract(0), Seed_Images(1), Van_Gogh(2); make_tree coloured them 0, 2, 1
    tree_index = {"Abstract": 0, "Van_Gogh": 1, "Seed_Images": 2}
    for img, pixels, s_label, o_label in zip(data.splits["test"], styles.images, styles.labels,
                                             objects.labels):
        assert data.layout.styles[s_label] == img.style and data.layout.objects[o_label] == img.object
        expect = _colour(tree_index[img.style], ("Bears", "Cats").index(img.object), img.number)
        assert torch.allclose(pixels[:, 0, 0] * 255, torch.tensor(expect, dtype=torch.float32))


def test_seeded_split_is_deterministic_disjoint_and_recorded(tmp_path):
    root = make_tree(tmp_path / "uc")
    spec = dict(root=str(root), forget_object="Bears", seed=3)
    a, b = UnlearnCanvasSet(**spec).load(), UnlearnCanvasSet(**spec).load()
    assert a.splits == b.splits
    keys = {s: {(i.style, i.object, i.number) for i in a.splits[s]} for s in a.splits}
    assert not keys["train"] & keys["validation"] and not keys["train"] & keys["test"]
    assert not keys["validation"] & keys["test"]
    assert len(keys["train"] | keys["validation"] | keys["test"]) == 3 * 2 * 20

    # the documented rule, computed independently: order a cell by sha256(f"{seed}/{s}/{o}/{n}"),
    # the last round(0.05 * 20) = 1 image is the test image, the one before it validation
    def rank(n):
        return hashlib.sha256(f"3/Van_Gogh/Cats/{n}".encode()).hexdigest()

    order = sorted(range(1, 21), key=rank)
    cell = lambda split: [i.number for i in a.splits[split] if (i.style, i.object) == ("Van_Gogh", "Cats")]  # noqa: E731
    assert cell("test") == [order[-1]] and cell("validation") == [order[-2]]

    other = UnlearnCanvasSet(**{**spec, "seed": 4}).load()
    assert other.splits["test"] != a.splits["test"]
    manifest = a.manifest()
    assert manifest["seed"] == 3 and manifest["split_fractions"] == [0.9, 0.05, 0.05]
    assert manifest["kind"] == "object" and manifest["target"] == "Bears"
    assert manifest["counts"] == {"train": 108, "validation": 6, "test": 6}
    assert f"Van_Gogh/Cats/{order[-1]}.png" in manifest["splits"]["test"]
    json.dumps(manifest)  # JSON-able


def test_split_ranges(tmp_path):
    root = make_tree(tmp_path / "uc", n=10)
    data = UnlearnCanvasSet(str(root), split_ranges={"train": [1, 6], "test": [9, 10]}).load()
    assert {i.number for i in data.splits["train"]} == set(range(1, 7))
    assert data.splits["validation"] == ()
    assert {i.number for i in data.splits["test"]} == {9, 10}  # 7 and 8 are left out
    with pytest.raises(ValueError, match="overlap"):
        UnlearnCanvasSet(str(root), split_ranges={"train": [1, 6], "test": [6, 10]})
    with pytest.raises(ValueError, match="not both"):
        UnlearnCanvasSet(str(root), forget_style="Abstract", forget_object="Bears")
    with pytest.raises(ValueError, match="sum to 1"):
        UnlearnCanvasSet(str(root), split_fractions=(0.9, 0.2, 0.0))


def _break(root: Path, how: str) -> tuple[dict, Path]:
    """Damage a good tree; return the spec overrides and the path the error must name."""
    if how == "missing root":
        return {"root": str(root / "nowhere")}, root / "nowhere"
    if how == "root is a file":
        (root / "file.txt").write_text("x")
        return {"root": str(root / "file.txt")}, root / "file.txt"
    if how == "missing style folder":
        return {"styles": ["Abstract", "Cubism"]}, root / "Cubism"
    if how == "style is a file":
        (root / "Cubism").write_text("x")
        return {"styles": ["Abstract", "Cubism"]}, root / "Cubism"
    if how == "file where an object folder should be":
        (root / "Abstract" / "notes.txt").write_text("x")
        return {}, root / "Abstract" / "notes.txt"
    if how == "folder inside a cell":
        (root / "Van_Gogh" / "Cats" / "extra").mkdir()
        return {}, root / "Van_Gogh" / "Cats" / "extra"
    if how == "empty cell":
        for p in (root / "Abstract" / "Bears").iterdir():
            p.unlink()
        return {}, root / "Abstract" / "Bears"
    if how == "image not named by number":
        (root / "Abstract" / "Bears" / "3.png").rename(root / "Abstract" / "Bears" / "cover.png")
        return {}, root / "Abstract" / "Bears" / "cover.png"
    if how == "two images with one number":
        Image.new("RGB", (6, 6)).save(root / "Abstract" / "Bears" / "2.jpg")
        return {}, root / "Abstract" / "Bears" / "2.jpg"
    if how == "inconsistent object sets":
        for p in (root / "Seed_Images" / "Cats").iterdir():
            p.unlink()
        (root / "Seed_Images" / "Cats").rmdir()
        return {}, root / "Seed_Images" / "Cats"
    if how == "unknown forget style":
        return {"forget_style": "Cubism"}, root
    raise AssertionError(how)


@pytest.mark.parametrize("how", [
    "missing root", "root is a file", "missing style folder", "style is a file",
    "file where an object folder should be", "folder inside a cell", "empty cell",
    "image not named by number", "two images with one number", "inconsistent object sets",
    "unknown forget style"])
def test_reader_rejects_a_malformed_tree_naming_the_path(tmp_path, how):
    root = make_tree(tmp_path / "uc", n=3)
    overrides, path = _break(root, how)
    spec = {"root": str(root), **overrides}
    with pytest.raises(LayoutError) as err:
        UnlearnCanvasSet(**spec).load()
    assert str(path) in str(err.value), err.value


def test_reader_warns_and_skips(tmp_path):
    root = make_tree(tmp_path / "uc", n=3)
    (root / "Abstract" / "Bears" / "Thumbs.db").write_bytes(b"x")
    (root / "Abstract" / "Bears" / ".DS_Store").write_bytes(b"x")
    (root / "metadata.jsonl").write_text("{}\n")  # silently ignored, like canvas.json
    Image.new("RGB", (6, 6)).save(root / "stray.png")
    (root / "Van_Gogh" / "Cats" / "3.png").unlink()
    with pytest.warns(CanvasLayoutWarning) as record:
        layout = read_layout(root)
    messages = " ".join(str(w.message) for w in record)
    assert "Thumbs.db" in messages and "stray.png" in messages
    assert "different numbers of images" in messages and str(root / "Van_Gogh" / "Cats") in messages
    assert [i.number for i in layout.cells["Abstract", "Bears"]] == [1, 2, 3]
    assert len(layout.cells["Van_Gogh", "Cats"]) == 2
    assert len(record) == 3


# ================================================================================================
# shards
# ================================================================================================


def test_shards_round_trip_through_labelled_sets_and_pairs(tmp_path):
    root = make_tree(tmp_path / "uc", n=5, ext=".jpg")
    data = UnlearnCanvasSet(str(root), forget_style="Van_Gogh",
                            split_fractions=(0.6, 0.2, 0.2)).load()
    out = data.write_shards(tmp_path / "shards", shard_size=4)
    assert out["counts"] == {"forget": 6, "retain": 12, "validation_styles": 6,
                             "validation_objects": 6, "test_styles": 6, "test_objects": 6}
    assert len(expand_urls(out["retain"])) == 3  # 12 samples in shards of 4

    styles = load_labelled_set(LabelledSet(out["test_styles"], out["styles_json"]), to_tensor, "s")
    objects = load_labelled_set(LabelledSet(out["test_objects"], out["objects_json"]), to_tensor, "o")
    expected = data.labelled("test", "style", to_tensor)
    assert styles.classnames == ["Abstract", "Photo", "Van Gogh"]
    assert torch.equal(styles.labels, expected.labels)
    assert torch.equal(objects.labels, data.labelled("test", "object", to_tensor).labels)
    assert torch.equal(styles.images, expected.images)  # the jpg bytes themselves were stored

    forget = data.forget("train")
    urls = tuple(expand_urls(out["forget"]))
    assert count_samples(urls) == len(forget) == 6
    captions = []
    stream = PairBatches([PairSet("forget", urls, 4, 6)], to_tensor,
                         lambda texts: torch.tensor([[len(t)] for t in texts]))
    for batch in stream:
        captions += [c for c in batch["tokens"][:, 0].tolist()]
    assert captions == [len(data.caption(i)) for i in forget]
    assert json.loads(Path(out["manifest_json"]).read_text())["target"] == "Van_Gogh"
    with pytest.raises(FileExistsError, match="not empty"):
        data.write_shards(tmp_path / "shards")


# ================================================================================================
# metrics
# ================================================================================================

# A hand-made answer set: styles A, B, C x objects x, y x seeds 1, 2 (12 images), unlearning style A.
GRID = prompt_grid(["A", "B", "C"], ["x", "y"], seeds=[1, 2])
# predicted (style, object) of each image, in grid order (seed, style, object)
PRED = [
    ("A", "x"), ("B", "y"), ("B", "x"), ("B", "x"), ("C", "x"), ("C", "y"),   # seed 1
    ("C", "x"), ("A", "y"), ("B", "x"), ("B", "y"), ("A", "y"), ("C", "y"),   # seed 2
]
# Style A unlearned. UA: images prompted A = #0 #1 #6 #7, predicted A only at #0 and #7 -> 2/4 = 0.5.
# IRA: style B images #2 #3 #8 #9 all predicted B -> 1; style C images #4 #5 #10 #11 -> 3/4;
#      mean (1 + 0.75) / 2 = 0.875 over 8 images.
# CRA: objects of the non-A images: x at #2 #4 #8 #10 (predicted x, x, x, y) -> 3/4;
#      y at #3 #5 #9 #11 (predicted x, y, y, y) -> 3/4; mean 0.75 over 8 images.
STYLE_A = dict(ua=0.5, ira=0.875, cra=0.75, n_ua=4, n_ira=8, n_cra=8)
# Object y unlearned. UA: y images #1 #3 #5 #7 #9 #11 predicted (y, x, y, y, y, y) -> 1/6 not y.
# IRA: x images #0 #2 #4 #6 #8 #10 predicted (x, x, x, x, x, y) -> 5/6.
# CRA: styles of the x images: A at #0 #6 (A, C) -> 1/2; B at #2 #8 (B, B) -> 1; C at #4 #10
#      (C, A) -> 1/2; mean 2/3 over 6 images.
OBJECT_Y = dict(ua=1 / 6, ira=5 / 6, cra=2 / 3, n_ua=6, n_ira=6, n_cra=6)


def _check(scores, expected):
    for key, value in expected.items():
        assert getattr(scores, key) == pytest.approx(value), key


def test_prompt_grid_is_seed_then_style_then_object():
    assert [(p.seed, p.style, p.object) for p in GRID[:3]] == [(1, "A", "x"), (1, "A", "y"), (1, "B", "x")]
    assert len(GRID) == 12
    grid = prompt_grid(["Van_Gogh"], ["Bears"])
    assert [p.seed for p in grid] == [188, 288, 588, 688, 888]
    assert grid[0].text == "A Bears image in Van Gogh style."


def test_ua_ira_cra_match_hand_computed_values():
    args = ([p.style for p in GRID], [p.object for p in GRID], [s for s, _ in PRED], [o for _, o in PRED])
    style = canvas_scores("style", "A", *args)
    _check(style, STYLE_A)
    assert style.in_domain == {"B": 1.0, "C": 0.75} and style.cross_domain == {"x": 0.75, "y": 0.75}
    _check(canvas_scores("object", "y", *args), OBJECT_Y)
    with pytest.raises(ValueError, match="no image is prompted"):
        canvas_scores("style", "Z", *args)


class FakeClassifier:
    """Returns one-hot logits for given predictions, one per image in order."""

    styles, objects = ["A", "B", "C"], ["x", "y"]

    def __init__(self, pred):
        self.pred = pred
        self.seen = 0

    def logits(self, images):
        rows = self.pred[self.seen : self.seen + images.shape[0]]
        self.seen += images.shape[0]
        s = torch.zeros(len(rows), 3)
        o = torch.zeros(len(rows), 2)
        for i, (ps, po) in enumerate(rows):
            s[i, self.styles.index(ps)] = 1
            o[i, self.objects.index(po)] = 1
        return s, o


def test_scores_through_a_fake_classifier():
    images = torch.zeros(12, 3, 4, 4)
    _check(score_images(FakeClassifier(PRED), images, GRID, "style", "A", batch_size=5), STYLE_A)
    _check(score_images(FakeClassifier(PRED), images, GRID, "object", "y"), OBJECT_Y)
    with pytest.raises(ValueError, match="no class for prompted style"):
        score_images(FakeClassifier(PRED), images, prompt_grid(["A", "Q"], ["x"], seeds=[1] * 6),
                     "style", "A")


def _colour_cnn(task: str, num_classes: int):
    """A CanvasCNN whose prediction is known from an image's colour: every conv passes the red,
    green and blue channels on through its centre tap (after (x - 0.5) / 0.5 and ReLU a channel at
    255 gives 1, at 0 gives 0); the head reads (r, g, b) as
    style A = r - g, B = g - r, C = r + g - 1 and object x = 0.5 - b, y = b - 0.5."""
    from slug_pl.demo.canvas import CanvasCNN

    model = CanvasCNN(num_classes, width=4).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.zero_()
                for c in range(3):
                    m.weight[c, c, 1, 1] = 1.0
        w, b = model.classifier.weight, model.classifier.bias
        w.zero_(), b.zero_()
        if task == "style":
            w[0, :2] = torch.tensor([1.0, -1.0])
            w[1, :2] = torch.tensor([-1.0, 1.0])
            w[2, :2] = torch.tensor([1.0, 1.0])
            b[2] = -1.0
        else:
            w[0, 2], b[0] = -1.0, 0.5
            w[1, 2], b[1] = 1.0, -0.5
    return model


def _image_for(style: str, obj: str) -> torch.Tensor:
    rg = {"A": (1.0, 0.0), "B": (0.0, 1.0), "C": (1.0, 1.0)}[style]
    colour = torch.tensor([*rg, 1.0 if obj == "y" else 0.0])
    return colour.view(3, 1, 1).expand(3, 8, 8)


def test_scores_through_checkpoint_classifiers(tmp_path):
    # "python": the library name earlier demo builds wrote; it looks the project class up
    arch = {"library": "python", "name": "slug_pl.demo.canvas.CanvasCNN", "kwargs": {"width": 4}}
    for task, names in (("style", ["A", "B", "C"]), ("object", ["x", "y"])):
        save_task_classifier(_colour_cnn(task, len(names)), tmp_path / f"{task}.json", task=task,
                             classnames=names, arch=arch, image_size=16)
    judge = CheckpointClassifier(tmp_path / "style.json", tmp_path / "object.json")
    images = torch.stack([_image_for(s, o) for s, o in PRED])  # 8 px, resized to 16 by the judge
    _check(score_images(judge, images, GRID, "style", "A"), STYLE_A)
    _check(score_images(judge, images, GRID, "object", "y"), OBJECT_Y)
    with pytest.raises(FileExistsError):
        save_task_classifier(_colour_cnn("style", 3), tmp_path / "style.json", task="style",
                             classnames=["A", "B", "C"], arch=arch, image_size=16)
    with pytest.raises(ValueError, match="style classifier's config says task 'object'"):
        CheckpointClassifier(tmp_path / "object.json", tmp_path / "object.json")


@pytest.mark.parametrize("arch", [{"library": "timm", "name": "test_vit"},
                                  {"library": "torchvision", "name": "resnet18"}])
def test_library_checkpoints_load_in_the_benchmark_format(tmp_path, arch):
    """timm / torchvision heads saved as the benchmark saves its classifiers (a
    ``{"model_state_dict": ...}`` .pth) load once ``slug-pl convert-checkpoint`` has written their
    weights as safetensors, and give the logits of the model that was saved, on (x - 0.5) / 0.5
    input; the .pth itself is refused with the command that converts it."""
    from slug_pl.cli import main
    from slug_pl.evaluation.architectures import ArchSpec, build_classifier

    torch.manual_seed(0)
    model = build_classifier(ArchSpec.from_record(arch, "test"), 3).eval()
    size = 32 if arch["library"] == "torchvision" else model.default_cfg["input_size"][-1]
    torch.save({"model_state_dict": model.state_dict(), "epoch": 3}, tmp_path / "style50.pth")
    record = {"task": "style", "classnames": ["A", "B", "C"], "arch": arch, "weights": "style50.pth",
              "image_size": size, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    (tmp_path / "pickle.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="convert-checkpoint .*style50.pth"):
        load_task_classifier(tmp_path / "pickle.json")
    assert main(["convert-checkpoint", str(tmp_path / "style50.pth")]) == 0
    (tmp_path / "style.json").write_text(json.dumps({**record, "weights": "style50.safetensors"}))
    loaded = load_task_classifier(tmp_path / "style.json")
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        assert torch.allclose(loaded.logits(x), model((x - 0.5) / 0.5), atol=1e-5)
    (tmp_path / "bad.json").write_text(json.dumps({**record, "weights": "style50.safetensors",
                                                    "classnames": ["A", "B"]}))
    with pytest.raises(ValueError, match="do not fit"):
        load_task_classifier(tmp_path / "bad.json")


def test_the_benchmark_classifier_layout_loads(tmp_path):
    """The UnlearnCanvas classifiers' layout: accuracy.py builds timm's
    ``vit_large_patch16_224.augreg_in21k`` and replaces its head by ``Linear(1024, classes)``; the
    allow-list builds that name with that head (on the meta device: no memory for 300 M
    weights). A tagged ViT of the same family then goes the whole way: .pth with
    model_state_dict -> convert -> load, every tensor as saved."""
    from slug_pl.convert import convert_checkpoint
    from slug_pl.evaluation.architectures import ArchSpec, build_classifier

    with torch.device("meta"):
        large = build_classifier(ArchSpec.from_record(
            {"library": "timm", "name": "vit_large_patch16_224.augreg_in21k"}, "test"), 51)
    assert (large.head.in_features, large.head.out_features) == (1024, 51)
    arch = {"library": "timm", "name": "vit_tiny_patch16_224.augreg_in21k", "kwargs": {"img_size": 32}}
    model = build_classifier(ArchSpec.from_record(arch, "test"), 4)
    torch.save({"model_state_dict": model.state_dict()}, tmp_path / "cls.pth")
    convert_checkpoint(tmp_path / "cls.pth")
    (tmp_path / "object.json").write_text(json.dumps({
        "task": "object", "classnames": ["Bears", "Birds", "Cats", "Dogs"], "arch": arch,
        "weights": "cls.safetensors", "image_size": 32}))
    loaded = load_task_classifier(tmp_path / "object.json").model.state_dict()
    assert loaded.keys() == model.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


def test_zero_shot_classifier_is_clip_zero_shot_over_phrases(tiny_checkpoint):
    import torch.nn.functional as F
    from torchvision.transforms.functional import to_pil_image

    from slug_pl.families.open_clip import OpenClip

    family = OpenClip(model_name="slug-tiny-vit", pretrained=tiny_checkpoint)
    model = family.load()
    judge = ZeroShotClassifier(family, model, ["Van_Gogh", "Seed_Images"], ["Bears"],
                               style_templates=["a {} painting."], object_templates=["{}"])
    images = torch.rand(3, 3, 20, 20)
    style_logits, object_logits = judge.logits(images)
    with torch.no_grad():
        batch = torch.stack([family.image_transform()(to_pil_image(i)) for i in images])
        img = F.normalize(model.encode_image(batch), dim=-1)
        txt = F.normalize(model.encode_text(family.tokenize(["a Van Gogh painting.",
                                                            "a Photo painting."])), dim=-1)
    assert style_logits.shape == (3, 2) and object_logits.shape == (3, 1)
    assert torch.allclose(style_logits, img @ txt.T, atol=1e-5)


# ================================================================================================
# the results table
# ================================================================================================


def test_results_table_appends_rows_and_refuses_other_files(tmp_path):
    path = tmp_path / "unlearncanvas.csv"
    args = ([p.style for p in GRID], [p.object for p in GRID], [s for s, _ in PRED], [o for _, o in PRED])
    first = CanvasRow.from_scores("SLUG", canvas_scores("style", "A", *args), time_s=12.5,
                                  peak_memory_gb=np.float64(1.25), storage_gb=0.001)
    write_row(path, first)
    head = path.read_bytes()
    assert head.decode().splitlines()[0] == ("method,target,kind,UA,IRA,CRA,n_UA,n_IRA,n_CRA,"
                                             "time_s,peak_memory_gb,storage_gb")
    assert head.decode().splitlines()[1] == "SLUG,A,style,0.5,0.875,0.75,4,8,8,12.5,1.25,0.001"
    second = CanvasRow.from_scores("GA", canvas_scores("object", "y", *args))
    write_row(path, second)
    assert path.read_bytes().startswith(head)
    assert read_rows(path) == [first, second]

    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not an UnlearnCanvas results table"):
        write_row(other, first)
    assert other.read_text() == "a,b\n1,2\n"

    table = comparison_markdown(read_rows(path))
    lines = table.splitlines()
    assert lines[2].startswith("| SLUG (style: A) | 50.00 (n=4) | 87.50 (n=8) | 75.00 (n=8) |  |  |  | 12.5 |")
    assert "| GA (object: y) |  |  |  | 16.67 (n=6) | 83.33 (n=6) | 66.67 (n=6) |" in lines[3]
    esd = next(line for line in lines if line.startswith("| ESD |"))
    assert "98.58" in esd and "6163" in esd and "published, not measured here" in esd
    assert "| 667 | 30.8 | 4.0 |" in next(line for line in lines if line.startswith("| SalUn |"))
    assert sum("published, not measured here" in line for line in lines) == len(PUBLISHED)


# ================================================================================================
# the synthetic canvas
# ================================================================================================


def _hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_canvas_is_deterministic_and_reads_like_the_benchmark(tmp_path):
    from slug_pl.demo.canvas import CanvasSpec, build_canvas

    spec = CanvasSpec(styles=("Pencil_Sketch", "Neon", "Mosaic"), n_objects=3, images_per_cell=4)
    a = build_canvas(tmp_path / "a", spec)
    b = build_canvas(tmp_path / "b", spec)
    assert a["built"] and _hashes(tmp_path / "a") == _hashes(tmp_path / "b")
    assert a["fingerprint"] == b["fingerprint"]
    assert build_canvas(tmp_path / "a", spec)["built"] is False  # cached
    c = build_canvas(tmp_path / "c", CanvasSpec(**{**spec.__dict__, "seed": 1}))
    assert c["fingerprint"] != a["fingerprint"]

    data = UnlearnCanvasSet(str(tmp_path / "a"), forget_style="Pencil_Sketch",
                            split_fractions=(0.5, 0.25, 0.25)).load()
    assert data.layout.styles == ("Mosaic", "Neon", "Pencil_Sketch")
    assert data.layout.objects == ("Apple", "Banana", "Bicycle")
    assert len(data.forget("train")) == 3 * 2
    assert data.caption(data.forget("train")[0]) == "A Apple image in Pencil Sketch style."
    images = data.labelled("test", "style", to_tensor).images
    assert images.shape == (9, 3, 32, 32)
    # the styles look different: Neon is dark, Pencil_Sketch light
    per_style = {s: images[[i for i, img in enumerate(data.splits["test"]) if img.style == s]].mean()
                 for s in data.layout.styles}
    assert per_style["Neon"] < 0.35 < 0.7 < per_style["Pencil_Sketch"]
    with pytest.raises(FileExistsError, match="not a synthetic canvas"):
        (tmp_path / "user").mkdir()
        (tmp_path / "user" / "notes.txt").write_text("mine")
        build_canvas(tmp_path / "user", spec)


@pytest.mark.slow
def test_canvas_classifiers_reach_95_percent(tmp_path):
    from slug_pl.demo.canvas import build_canvas, train_canvas_classifiers

    canvas = build_canvas(tmp_path / "canvas")
    result = train_canvas_classifiers(canvas["root"], tmp_path / "classifiers")
    assert result["style"]["n_test"] == 6 * 10 * 5
    assert result["style"]["accuracy"] >= 0.95 and result["object"]["accuracy"] >= 0.95, result
    judge = CheckpointClassifier(result["style"]["config"], result["object"]["config"])
    assert judge.styles == sorted(canvas["styles"]) and judge.objects == sorted(canvas["objects"])
    assert not math.isnan(result["time_s"])
