"""Shard reading, labelled sets, name lists, and the zero-shot accuracy metrics."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from slug_pl.data.labelled import LabelledSet, load_labelled_set, read_name_list
from slug_pl.data.pairs import count_samples
from slug_pl.data.shards import RawSample, ShardError, decode_image, expand_urls, iter_raw_samples
from slug_pl.evaluation.metrics import ZeroShotAccuracy, concept_summary, utility_summary


def _encode(color, fmt="PNG", size=(6, 4)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def _write(path, samples):
    with wds.TarWriter(str(path)) as sink:
        for s in samples:
            sink.write(s)
    return path


# -- expand_urls ---------------------------------------------------------------------------------


@pytest.fixture
def three_shards(tmp_path):
    paths = []
    for i in range(3):
        paths.append(_write(tmp_path / f"a-{i:03d}.tar", [{"__key__": f"k{i}", "txt": b"x"}]))
    _write(tmp_path / "b-000.tar", [{"__key__": "b", "txt": b"x"}])
    return tmp_path, [str(p) for p in paths]


def test_expand_brace_pattern(three_shards):
    folder, paths = three_shards
    assert expand_urls(str(folder / "a-{000..002}.tar")) == paths
    assert expand_urls(str(folder / "a-{002,000}.tar")) == [paths[2], paths[0]]  # order as written


def test_expand_glob_sorted_and_lists(three_shards):
    folder, paths = three_shards
    assert expand_urls(str(folder / "a-*.tar")) == paths
    assert expand_urls(str(folder / "a-00?.tar")) == paths
    b = str(folder / "b-000.tar")
    assert expand_urls([b, str(folder / "a-{000..001}.tar")]) == [b, paths[0], paths[1]]
    assert expand_urls(folder / "b-000.tar") == [b]  # os.PathLike


def test_expand_missing_shard_names_it(three_shards):
    folder, _ = three_shards
    with pytest.raises(ShardError, match="a-003.tar"):
        expand_urls(str(folder / "a-{000..003}.tar"))
    with pytest.raises(ShardError, match="c-"):
        expand_urls(str(folder / "c-*.tar"))
    with pytest.raises(ShardError, match="empty"):
        expand_urls([])


def test_expand_passes_remote_urls_through_only_when_allowed():
    from slug_pl.data.limits import InputRules
    from slug_pl.safety import UnsafePathError

    allowed = InputRules(allow_shard_commands=True)
    assert expand_urls("s3://bucket/shard-{0..1}.tar", allowed) == ["s3://bucket/shard-0.tar", "s3://bucket/shard-1.tar"]
    assert expand_urls("pipe:cat /x/y.tar", allowed) == ["pipe:cat /x/y.tar"]
    for spec in ("pipe:cat /x/y.tar", "https://host/shard.tar", "s3://bucket/shard.tar"):
        with pytest.raises(UnsafePathError, match="data.allow_shard_commands: true"):
            expand_urls(spec, source="data.retain")


# -- iter_raw_samples / count_samples ------------------------------------------------------------


@pytest.fixture
def mixed_shards(tmp_path):
    jpg, png = _encode((255, 0, 0), "JPEG"), _encode((0, 0, 255), "PNG")
    s0 = _write(tmp_path / "m-0.tar", [
        {"__key__": "one", "jpg": jpg, "txt": "  a red square \n".encode(), "cls": b"3"},
        {"__key__": "two", "png": png, "json": b'{"a": 1}'},
        {"__key__": "three", "txt": "caf\u00e9 only".encode()},
    ])
    s1 = _write(tmp_path / "m-1.tar", [
        {"__key__": "sub/four", "webp": _encode((1, 2, 3), "WEBP"), "txt": b"four", "cls": b" 12\n"},
    ])
    return [str(s0), str(s1)], jpg, png


def test_iter_raw_samples_fields(mixed_shards):
    urls, jpg, png = mixed_shards
    samples = list(iter_raw_samples(urls))
    assert [(s.shard, s.key) for s in samples] == [(urls[0], "one"), (urls[0], "two"), (urls[0], "three"),
                                                  (urls[1], "sub/four")]
    one, two, three, four = samples
    assert one.image == jpg and one.caption == "a red square" and one.label == 3
    assert set(one.fields) == {"jpg", "txt", "cls"}
    assert two.image == png and two.caption is None and two.label is None
    assert set(two.fields) == {"png", "json"} and two.fields["json"] == b'{"a": 1}'
    assert three.image is None and three.caption == "caf\u00e9 only"
    assert four.label == 12 and four.caption == "four"
    assert decode_image(one).size == (6, 4) and decode_image(one).mode == "RGB"
    assert decode_image(two).getpixel((0, 0)) == (0, 0, 255)
    assert decode_image(four).size == (6, 4)


def test_count_samples_equals_number_of_samples(mixed_shards, tmp_path):
    urls, _, _ = mixed_shards
    assert count_samples(urls) == len(list(iter_raw_samples(urls))) == 4
    assert count_samples(urls[:1]) == 3
    big = _write(tmp_path / "big.tar", [
        {"__key__": f"k{i:03d}", "png": b"x", "txt": b"y", "json": b"{}"} for i in range(17)
    ])
    assert count_samples([str(big)]) == len(list(iter_raw_samples([str(big)]))) == 17
    assert count_samples([str(big), *urls]) == 21


def test_unreadable_shard_is_named(tmp_path):
    bad = tmp_path / "broken.tar"
    bad.write_bytes(b"\x00not a tar file at all" * 10)
    with pytest.raises(ShardError, match="broken.tar"):
        count_samples([str(bad)])
    with pytest.raises(ShardError, match="broken.tar"):
        list(iter_raw_samples([str(bad)]))


def test_decode_image_errors_name_shard_and_key():
    corrupt = RawSample("shards/x-007.tar", "sample-42", b"\x89PNG but not really", None, None, {})
    with pytest.raises(ShardError, match=r"sample-42.*shards/x-007\.tar"):
        decode_image(corrupt)
    no_image = RawSample("shards/x-007.tar", "sample-43", None, "cap", None, {})
    with pytest.raises(ShardError, match=r"sample-43.*shards/x-007\.tar.*no image"):
        decode_image(no_image)


def test_decode_corrupt_image_from_a_shard(tmp_path):
    path = _write(tmp_path / "c.tar", [{"__key__": "ok", "png": _encode((9, 9, 9))},
                                       {"__key__": "bad", "jpg": b"garbage bytes"}])
    ok, bad = iter_raw_samples([str(path)])
    assert decode_image(ok).getpixel((1, 1)) == (9, 9, 9)
    with pytest.raises(ShardError, match=r"'bad'.*c\.tar"):
        decode_image(bad)


# -- labelled sets ------------------------------------------------------------------------------


def _to_tensor(img):
    return torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)


def test_load_labelled_set(tmp_path):
    path = _write(tmp_path / "lab.tar", [
        {"__key__": f"i{i}", "png": _encode((i, 0, 0)), "cls": str(i % 3).encode()} for i in range(5)
    ])
    spec = LabelledSet(shards=str(path), classnames=["a", "b", "c"])
    data = load_labelled_set(spec, _to_tensor, "val")
    assert data.name == "val" and data.classnames == ["a", "b", "c"]
    assert data.templates == ["a photo of {}."]
    assert data.labels.tolist() == [0, 1, 2, 0, 1]
    assert data.images.shape == (5, 3, 4, 6)
    assert data.images[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4]
    two = load_labelled_set(LabelledSet(shards=str(path), classnames=["a", "b", "c"], max_samples=2),
                            _to_tensor, "val")
    assert two.labels.tolist() == [0, 1]
    sub = data.subset(data.labels == 1, "b-only")
    assert sub.name == "b-only" and sub.labels.tolist() == [1, 1]


def test_load_labelled_set_label_out_of_range(tmp_path):
    path = _write(tmp_path / "lab.tar", [
        {"__key__": "fine", "png": _encode((0, 0, 0)), "cls": b"1"},
        {"__key__": "too-big", "png": _encode((0, 0, 0)), "cls": b"2"},
    ])
    with pytest.raises(ShardError, match=r"'too-big'.*label 2.*2 class names.*'val\.concepts'"):
        load_labelled_set(LabelledSet(shards=str(path), classnames=["a", "b"]), _to_tensor, "val.concepts")
    unlabelled = _write(tmp_path / "nolab.tar", [{"__key__": "u", "png": _encode((0, 0, 0))}])
    with pytest.raises(ShardError, match=r"'u'.*no class label"):
        load_labelled_set(LabelledSet(shards=str(unlabelled), classnames=["a"]), _to_tensor, "v")


def test_read_name_list(tmp_path):
    j = tmp_path / "names.json"
    j.write_text(json.dumps(["Ann Smith", "Bob", " padded "]))
    assert read_name_list(str(j), "class-name") == ["Ann Smith", "Bob", " padded "]
    t = tmp_path / "templates.txt"
    t.write_text("a photo of {}.\n\n   \n  a drawing of {}  \nart of {}")
    assert read_name_list(str(t), "template") == ["a photo of {}.", "a drawing of {}", "art of {}"]
    assert read_name_list(["x", 3], "class-name") == ["x", "3"]
    assert read_name_list(("a",), "class-name") == ["a"]
    with pytest.raises(FileNotFoundError, match=r"class-name file not found: .*missing\.json"):
        read_name_list(str(tmp_path / "missing.json"), "class-name")
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2")
    with pytest.raises(ValueError, match="bad.json"):
        read_name_list(str(bad), "class-name")
    not_strings = tmp_path / "ints.json"
    not_strings.write_text("[1, 2]")
    with pytest.raises(ValueError, match="list of strings"):
        read_name_list(str(not_strings), "class-name")


# -- zero-shot metrics ---------------------------------------------------------------------------

# (label, rank of the true class among the logits: 1 = the top score); 7 classes, 4..6 without images
IMAGES = [(1, 1), (1, 3), (1, 6), (0, 1), (0, 2), (2, 1), (3, 7), (3, 5)]
NUM_CLASSES = 7


def _logits(images=IMAGES, c=NUM_CLASSES):
    """Distinct logits placing the true class at the given rank."""
    rows = []
    for i, (label, rank) in enumerate(images):
        others = [k for k in range(c) if k != label]
        others = others[i % len(others):] + others[: i % len(others)]  # vary the order
        order = others[: rank - 1] + [label] + others[rank - 1:]
        row = torch.empty(c)
        for pos, k in enumerate(order):
            row[k] = 1.0 - 0.1 * pos
        rows.append(row)
    return torch.stack(rows), torch.tensor([label for label, _ in images])


def test_logit_construction():
    logits, labels = _logits()
    for (label, rank), row in zip(IMAGES, logits):
        assert int((row > row[label]).sum()) + 1 == rank


def test_zero_shot_accuracy_per_class_and_micro():
    logits, labels = _logits()
    metric = ZeroShotAccuracy(NUM_CLASSES, sync_on_compute=False)
    metric.update(logits[:3], labels[:3])  # two updates accumulate
    metric.update(logits[3:], labels[3:])
    r = metric.compute()
    assert r["count"].tolist() == [2, 3, 1, 2, 0, 0, 0]
    assert r["top1"].item() == pytest.approx(3 / 8)  # ranks 1: images 0, 3, 5
    assert r["top5"].item() == pytest.approx(6 / 8)  # ranks <= 5: images 0, 1, 3, 4, 5, 7
    per1 = r["per_class_top1"].tolist()
    per5 = r["per_class_top5"].tolist()
    assert per1[:4] == pytest.approx([1 / 2, 1 / 3, 1.0, 0.0])
    assert per5[:4] == pytest.approx([1.0, 2 / 3, 1.0, 1 / 2])
    assert all(math.isnan(v) for v in per1[4:] + per5[4:])


def test_concept_summary_one_forgotten_concept():
    logits, labels = _logits()
    metric = ZeroShotAccuracy(NUM_CLASSES, sync_on_compute=False)
    metric.update(logits, labels)
    out = concept_summary(metric.compute(), [1])
    # forget: images of class 1 (ranks 1, 3, 6)
    assert out["forget_top1"] == pytest.approx(1 / 3)
    assert out["forget_top5"] == pytest.approx(2 / 3)
    # retain: classes 0, 2, 3 (4..6 have no images): top1 (1/2 + 1 + 0)/3, top5 (1 + 1 + 1/2)/3
    assert out["retain_top1"] == pytest.approx(0.5)
    assert out["retain_top5"] == pytest.approx(2.5 / 3)
    assert set(out) == {"forget_top1", "forget_top5", "retain_top1", "retain_top5"}


def test_concept_summary_forget_is_micro_over_several_concepts():
    logits, labels = _logits()
    metric = ZeroShotAccuracy(NUM_CLASSES, sync_on_compute=False)
    metric.update(logits, labels)
    out = concept_summary(metric.compute(), [1, 3])
    # forget images: class 1 (ranks 1, 3, 6) and class 3 (ranks 7, 5): micro over 5 images
    assert out["forget_top1"] == pytest.approx(1 / 5)  # the macro mean would be 1/6
    assert out["forget_top5"] == pytest.approx(3 / 5)  # the macro mean would be 7/12
    assert out["retain_top1"] == pytest.approx((1 / 2 + 1) / 2)
    assert out["retain_top5"] == pytest.approx(1.0)


def test_utility_summary_is_micro():
    logits, labels = _logits()
    metric = ZeroShotAccuracy(NUM_CLASSES, sync_on_compute=False)
    metric.update(logits, labels)
    out = utility_summary(metric.compute())
    assert out == pytest.approx({"utility_top1": 3 / 8, "utility_top5": 6 / 8})


def test_top5_with_fewer_than_five_classes_counts_every_image():
    logits = torch.tensor([[0.1, 0.9, 0.5], [0.7, 0.2, 0.3]])
    metric = ZeroShotAccuracy(3, sync_on_compute=False)
    metric.update(logits, torch.tensor([0, 1]))
    r = metric.compute()
    assert r["top1"].item() == 0.0 and r["top5"].item() == 1.0
