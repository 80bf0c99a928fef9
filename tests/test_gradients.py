"""The SLUG objectives, their sign, their exact averaging over the data stream, and gradient files.

References are independent of the code under test: open_clip's ``ClipLoss`` and a naive float64
loop for the contrastive loss, and single full-batch computations on the in-memory images and
captions the test shards were written from (PNG is lossless) for the averaged gradients.
"""

from __future__ import annotations

import io
import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from open_clip.loss import ClipLoss
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader

from slug_pl.data.pairs import PairBatches, PairSet, count_samples
from slug_pl.edit import apply_edit, make_edit, revert_edit
from slug_pl.families.open_clip import OpenClip
from slug_pl.gradients import (
    GradientFileError,
    check_matches_model,
    contrastive_loss,
    forget_similarity_sum,
    load_tensors,
    save_tensors,
)

WORDS = ["cat", "dog", "red", "car", "tree", "sky", "blue", "house", "boat", "moon", "lamp", "road"]


@pytest.fixture(scope="module")
def family():
    return OpenClip(model_name="slug-tiny-vit", pretrained=None)


def _tiny_model(family, seed=0):
    torch.manual_seed(seed)
    return family.load()


@pytest.fixture(scope="module")
def model(family):
    return _tiny_model(family)


# -- sign convention -----------------------------------------------------------------------------


def _mean_similarity(family, model, images, tokens):
    u = family.encode_image(model, images)
    v = family.encode_text(model, tokens)
    return forget_similarity_sum(u, v, torch.ones(len(images), dtype=torch.bool)) / len(images)


SIGN_LAYERS = [
    "visual.proj",
    "visual.transformer.resblocks.0.attn.in_proj_weight",
    "text_projection",
    "transformer.resblocks.1.mlp.c_fc.weight",
]


@pytest.fixture(scope="module")
def sign_setup(family):
    model = _tiny_model(family, seed=3)
    torch.manual_seed(4)
    images = torch.randn(5, 3, 32, 32)
    tokens = family.tokenize(["a red car", "a dog on grass", "the moon", "two cats", "a boat"])
    model.zero_grad(set_to_none=True)
    _mean_similarity(family, model, images, tokens).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if n in SIGN_LAYERS}
    model.zero_grad(set_to_none=True)
    return model, images, tokens, grads


@pytest.mark.parametrize("name", SIGN_LAYERS)
def test_positive_step_lowers_the_forget_similarity(family, sign_setup, name):
    model, images, tokens, grads = sign_setup
    param = dict(model.named_parameters())[name]
    original = param.detach().clone()
    grad = grads[name]
    assert grad.norm() > 0
    step = 1e-3 * param.detach().norm().item() / grad.norm().item()
    first_order = step * grad.double().pow(2).sum().item()  # predicted decrease λ‖g‖²

    with torch.no_grad():
        base = _mean_similarity(family, model, images, tokens).item()
        for sign in (1.0, -1.0):
            edit = make_edit(model, name, grad, sign * step)
            apply_edit(model, edit)
            after = _mean_similarity(family, model, images, tokens).item()
            revert_edit(model, edit)
            change = after - base
            if sign > 0:
                assert after < base, f"a positive step must unlearn ({name}: {base} -> {after})"
            else:
                assert after > base, f"a negative step must raise the similarity ({name})"
            # first order: ΔL ≈ −λ·‖g‖² (sign and magnitude of the gradient)
            assert -sign * change == pytest.approx(first_order, rel=0.2)
        assert torch.equal(param.detach(), original)  # reverted exactly
        assert _mean_similarity(family, model, images, tokens).item() == base


# -- contrastive loss ----------------------------------------------------------------------------


def _naive_clip_loss(img, txt, scale):
    """Float64 loops: mean over rows of −log softmax, both directions, averaged."""
    u = [r / r.norm() for r in img.double()]
    v = [r / r.norm() for r in txt.double()]
    n = len(u)
    s = float(scale)
    logits = [[s * float(u[i] @ v[j]) for j in range(n)] for i in range(n)]
    i2t = -sum(logits[i][i] - math.log(sum(math.exp(x) for x in logits[i])) for i in range(n)) / n
    t2i = -sum(logits[j][j] - math.log(sum(math.exp(logits[i][j]) for i in range(n))) for j in range(n)) / n
    return (i2t + t2i) / 2


def test_contrastive_loss_matches_open_clip_and_naive_reference():
    torch.manual_seed(0)
    img, txt = torch.randn(7, 12) * 3, torch.randn(7, 12)
    scale = torch.tensor(14.28)
    ours = contrastive_loss(img, txt, scale)
    ref = ClipLoss()(F.normalize(img, dim=-1), F.normalize(txt, dim=-1), scale)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    assert ours.item() == pytest.approx(_naive_clip_loss(img, txt, scale), rel=1e-5)


def test_contrastive_loss_ignores_invalid_rows_exactly():
    torch.manual_seed(1)
    img = torch.randn(6, 8, requires_grad=True)
    txt = torch.randn(6, 8, requires_grad=True)
    valid = torch.tensor([True, False, True, True, False, True])
    scale = torch.tensor(10.0)
    masked = contrastive_loss(img, txt, scale, valid)
    subset = contrastive_loss(img.detach()[valid], txt.detach()[valid], scale)
    assert torch.equal(masked.detach(), subset)
    ref = ClipLoss()(F.normalize(img.detach()[valid], dim=-1), F.normalize(txt.detach()[valid], dim=-1), scale)
    torch.testing.assert_close(masked.detach(), ref, rtol=1e-6, atol=1e-6)
    masked.backward()
    assert torch.all(img.grad[~valid] == 0) and torch.all(txt.grad[~valid] == 0)
    assert torch.all(img.grad[valid].abs().sum(dim=1) > 0)
    # whatever the padding rows hold (even NaN), the loss is that of the valid rows
    garbage_img, garbage_txt = img.detach().clone(), txt.detach().clone()
    garbage_img[~valid] = float("nan")
    garbage_txt[~valid] = 1e6
    assert torch.equal(contrastive_loss(garbage_img, garbage_txt, scale, valid), subset)


def test_forget_similarity_sum_counts_valid_rows_only():
    torch.manual_seed(2)
    img = torch.randn(5, 8, requires_grad=True)
    txt = torch.randn(5, 8)
    valid = torch.tensor([True, True, False, True, False])
    total = forget_similarity_sum(img, txt, valid)
    a, b = img.detach().double(), txt.double()
    expected = sum(float(a[i] @ b[i] / (a[i].norm() * b[i].norm())) for i in range(5) if valid[i])
    assert total.item() == pytest.approx(expected, rel=1e-6)
    total.backward()
    assert torch.all(img.grad[~valid] == 0)


# -- the data stream: shards -------------------------------------------------------------------


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _write_pair_shards(folder, sizes, seed=0, image_size=(36, 40)):
    """Shards of random-noise PNGs with captions; returns (urls, PIL images, captions) in order."""
    rng = np.random.default_rng(seed)
    urls, images, captions = [], [], []
    i = 0
    for s, n in enumerate(sizes):
        path = folder / f"pairs-{s:03d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for _ in range(n):
                arr = rng.integers(0, 256, size=(*image_size, 3), dtype=np.uint8)
                cap = f"a photo of {WORDS[i % len(WORDS)]} number {i}"
                sink.write({"__key__": f"s{s}-{i:04d}", "png": _png(arr), "txt": cap.encode()})
                images.append(Image.fromarray(arr))
                captions.append(cap)
                i += 1
        urls.append(str(path))
    return urls, images, captions


@pytest.fixture(scope="module")
def pair_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs")
    return _write_pair_shards(folder, [6, 5])  # 11 samples over 2 shards


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_grads_close(a, b, what):
    assert a.keys() == b.keys(), what
    for name in b:
        scale = b[name].abs().max().item()
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6 * max(scale, 1e-12),
                                   msg=lambda m, n=name: f"{what}: {n}: {m}")


def _stream_forget_grads(family, model, urls, n, batch_size, world_size=1):
    """Σ cos over valid rows of every rank's batches, backward, divided by the valid count."""
    model.zero_grad(set_to_none=True)
    count = 0
    for rank in range(world_size):
        ds = PairBatches([PairSet("forget", tuple(urls), batch_size, n)], family.image_transform(),
                         family.tokenize, rank, world_size)
        for batch in ds:
            u = family.encode_image(model, batch["images"])
            v = family.encode_text(model, batch["tokens"])
            forget_similarity_sum(u, v, batch["valid"]).backward()
            count += int(batch["valid"].sum())
    assert count == n
    return {k: g / count for k, g in _grads(model).items()}


def _full_batch_forget_grads(family, model, images, captions):
    model.zero_grad(set_to_none=True)
    transform = family.image_transform()
    x = torch.stack([transform(im) for im in images])
    u = model.encode_image(x)
    v = model.encode_text(family.tokenize(captions))
    F.cosine_similarity(u, v, dim=-1).mean().backward()
    return _grads(model)


@pytest.fixture(scope="module")
def forget_reference(family, model, pair_data):
    _, images, captions = pair_data
    return _full_batch_forget_grads(family, model, images, captions)


def test_count_samples_of_pair_shards(pair_data):
    urls, images, _ = pair_data
    assert count_samples(urls) == len(images) == 11


def test_forget_gradient_is_exact_whatever_the_batch_size(family, model, pair_data, forget_reference):
    urls = pair_data[0]
    n = count_samples(urls)
    reference = forget_reference
    assert "visual.proj" in reference and "text_projection" in reference
    by3 = _stream_forget_grads(family, model, urls, n, 3)
    by7 = _stream_forget_grads(family, model, urls, n, 7)
    _assert_grads_close(by3, by7, "B=3 vs B=7")
    _assert_grads_close(by3, reference, "B=3 vs full batch")
    _assert_grads_close(by7, reference, "B=7 vs full batch")


def test_forget_gradient_is_exact_with_two_ranks(family, model, pair_data, forget_reference):
    urls = pair_data[0]
    n = count_samples(urls)
    reference = forget_reference
    # B=5: the last global batch holds 1 sample, so rank 1's last batch is padding only
    two_ranks = _stream_forget_grads(family, model, urls, n, 5, world_size=2)
    _assert_grads_close(two_ranks, reference, "W=2, B=5 vs full batch")


def test_retain_gradient_uses_global_batches_and_does_not_depend_on_world_size(family, model, pair_data):
    urls, images, captions = pair_data
    n, B = count_samples(urls), 4  # global batches of 4, 4, 3
    transform = family.image_transform()
    scale = family.logit_scale(model)

    # reference: ClipLoss on each global batch [kB, (k+1)B) of the in-memory data, averaged
    model.zero_grad(set_to_none=True)
    num_batches = math.ceil(n / B)
    ref_losses = []
    for k in range(num_batches):
        x = torch.stack([transform(im) for im in images[k * B:(k + 1) * B]])
        u = F.normalize(model.encode_image(x), dim=-1)
        v = F.normalize(model.encode_text(family.tokenize(captions[k * B:(k + 1) * B])), dim=-1)
        loss = ClipLoss()(u, v, model.logit_scale.exp())
        ref_losses.append(loss.item())
        (loss / num_batches).backward()
    reference = _grads(model)
    assert "logit_scale" in reference

    for world in (1, 2):
        model.zero_grad(set_to_none=True)
        streams = [iter(PairBatches([PairSet("retain", tuple(urls), B, n)], transform, family.tokenize, r, world))
                   for r in range(world)]
        losses = []
        for k in range(num_batches):
            local = [next(s) for s in streams]  # every rank yields batch k
            assert all(b["batch_index"] == k for b in local)
            # the "all-gather": features of all ranks, concatenated rank by rank
            u = torch.cat([family.encode_image(model, b["images"]) for b in local])
            v = torch.cat([family.encode_text(model, b["tokens"]) for b in local])
            valid = torch.cat([b["valid"] for b in local])
            loss = contrastive_loss(u, v, family.logit_scale(model), valid)
            losses.append(loss.item())
            (loss / num_batches).backward()
        for s in streams:
            assert next(s, None) is None
        assert losses == pytest.approx(ref_losses, rel=1e-5)
        _assert_grads_close(_grads(model), reference, f"retain W={world}")
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-5)  # open_clip's init: exp(log(1/0.07))


# -- PairBatches layout --------------------------------------------------------------------------


def _index_shards(folder, sizes):
    """Shards whose sample i has caption 'cap-i' and an image of constant colour i."""
    urls, i = [], 0
    for s, n in enumerate(sizes):
        path = folder / f"idx-{s:03d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for _ in range(n):
                arr = np.full((2, 2, 3), i + 1, dtype=np.uint8)  # +1: zero is the padding value
                sink.write({"__key__": f"k{i:04d}", "png": _png(arr), "txt": f"cap-{i}".encode()})
                i += 1
        urls.append(str(path))
    return urls


def _to_tensor(img):
    return torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)


def _index_tokens(captions):
    return torch.tensor([[int(c.split("-")[1]) if c else -1] for c in captions])


def _batches(urls, n, B, rank=0, world=1, name="forget"):
    ds = PairBatches([PairSet(name, tuple(urls), B, n)], _to_tensor, _index_tokens, rank, world)
    return ds, list(ds)


def _valid_ids(batch):
    ids = batch["tokens"][:, 0]
    colours = batch["images"][:, 0, 0, 0]
    valid = batch["valid"]
    # images and captions stay paired; padding rows are blank
    assert torch.equal(colours[valid], ids[valid].float() + 1)
    assert torch.all(ids[~valid] == -1) and torch.all(batch["images"][~valid] == 0)
    # valid rows come first
    assert torch.equal(valid, torch.arange(len(valid)) < int(valid.sum()))
    return ids[valid].tolist()


@pytest.mark.parametrize("sizes,B", [([6, 5], 3), ([6, 5], 7), ([6, 5], 11), ([4, 0, 6], 4)])
def test_single_process_stream_order(tmp_path, sizes, B):
    urls = _index_shards(tmp_path, sizes)
    n = sum(sizes)
    assert count_samples(urls) == n
    ds, batches = _batches(urls, n, B)
    assert len(ds) == len(batches) == math.ceil(n / B)
    for k, batch in enumerate(batches):
        assert batch["set"] == "forget" and batch["batch_index"] == k
        assert batch["last"] == (k == len(batches) - 1)
        assert bool(batch["valid"].all())
        assert _valid_ids(batch) == list(range(k * B, min((k + 1) * B, n)))


@pytest.mark.parametrize("n,B", [(12, 4), (11, 3), (11, 5), (10, 4), (3, 8)])
def test_two_ranks_partition_the_stream(tmp_path, n, B):
    urls = _index_shards(tmp_path, [n // 2, n - n // 2])
    world = 2
    per_rank = [_batches(urls, n, B, rank, world)[1] for rank in range(world)]
    num_batches = math.ceil(n / B)
    seen = []
    for rank, batches in enumerate(per_rank):
        assert len(batches) == num_batches  # same number of batches on every rank
        for k, batch in enumerate(batches):
            size_k = min(B, n - k * B)
            assert batch["batch_index"] == k
            assert len(batch["valid"]) == math.ceil(size_k / world)  # equal shapes on all ranks
            ids = _valid_ids(batch)
            # position j of global batch k goes to rank j mod W
            assert ids == [k * B + j for j in range(size_k) if j % world == rank]
            seen += ids
    assert sorted(seen) == list(range(n))  # each sample exactly once over the ranks
    # padding exists exactly where a rank has fewer samples than rows
    total_rows = sum(len(b["valid"]) for bs in per_rank for b in bs)
    total_valid = sum(int(b["valid"].sum()) for bs in per_rank for b in bs)
    assert total_valid == n
    expected_rows = world * sum(math.ceil(min(B, n - k * B) / world) for k in range(num_batches))
    assert total_rows == expected_rows


def test_three_ranks_with_all_padding_batch(tmp_path):
    urls = _index_shards(tmp_path, [7])
    n, B, world = 7, 3, 3  # batches 3, 3, 1: ranks 1 and 2 get an all-padding last batch
    seen = []
    for rank in range(world):
        _, batches = _batches(urls, n, B, rank, world)
        assert len(batches) == 3
        last = batches[-1]
        assert last["images"].shape == (1, 3, 2, 2)
        assert bool(last["valid"][0]) == (rank == 0)
        for b in batches:
            seen += _valid_ids(b)
    assert sorted(seen) == list(range(n))


def test_rank_outside_world_is_refused(tmp_path):
    urls = _index_shards(tmp_path, [2])
    with pytest.raises(ValueError, match="rank 2"):
        PairBatches([PairSet("forget", tuple(urls), 2, 2)], _to_tensor, _index_tokens, 2, 2)


def test_dataloader_workers_deliver_batches_in_order(tmp_path):
    urls = _index_shards(tmp_path, [6, 5])
    sets = [PairSet("forget", tuple(urls), 3, 11), PairSet("retain", tuple(urls), 5, 11)]
    expected = list(PairBatches(sets, _to_tensor, _index_tokens))
    got = list(DataLoader(PairBatches(sets, _to_tensor, _index_tokens), batch_size=None, num_workers=2))
    assert [(b["set"], b["batch_index"]) for b in got] == \
        [("forget", k) for k in range(4)] + [("retain", k) for k in range(3)]
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a["set"] == b["set"] and a["last"] == b["last"]
        assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["images"], b["images"])


# -- gradient files ----------------------------------------------------------------------------


def test_save_load_round_trip_with_metadata(tmp_path):
    torch.manual_seed(0)
    tensors = {"a.weight": torch.randn(3, 4), "b": torch.randn(5).double(), "c": torch.arange(6).view(2, 3)}
    meta = {"set": "forget", "counts": {"samples": 11, "batches": 4, "loss": 0.25},
            "shapes": {"a.weight": [3, 4]}, "world_size": 2, "eval_mode": True, "ratio": 0.5,
            "versions": {"torch": "2.x"}, "nothing": None}
    path = save_tensors(tmp_path / "grads" / "forget.safetensors", tensors, meta)
    assert path == tmp_path / "grads" / "forget.safetensors"
    back, back_meta = load_tensors(path)
    assert back.keys() == tensors.keys()
    for k in tensors:
        assert back[k].dtype == tensors[k].dtype and torch.equal(back[k], tensors[k])
    assert back_meta == meta
    assert sorted(p.name for p in path.parent.iterdir()) == ["forget.safetensors"]  # no temp file


def test_string_metadata_that_looks_like_json_stays_a_string(tmp_path):
    # save_tensors stores str values verbatim and JSON-encodes the rest; a str must come back a str
    meta = {"pretrained": "2", "tag": "null", "flag": "true", "list": "[1]"}
    path = save_tensors(tmp_path / "g.safetensors", {"x": torch.zeros(1)}, meta)
    assert load_tensors(path)[1] == meta


def test_save_refuses_to_overwrite(tmp_path):
    path = tmp_path / "forget.safetensors"
    save_tensors(path, {"x": torch.ones(2)}, {"n": 1})
    with pytest.raises(FileExistsError, match="forget.safetensors"):
        save_tensors(path, {"x": torch.zeros(2)}, {"n": 2})
    tensors, meta = load_tensors(path)
    assert torch.equal(tensors["x"], torch.ones(2)) and meta == {"n": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["forget.safetensors"]


def test_load_missing_or_corrupt_file(tmp_path):
    with pytest.raises(GradientFileError, match="nope.safetensors"):
        load_tensors(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"this is not a safetensors file")
    with pytest.raises(GradientFileError, match="bad.safetensors"):
        load_tensors(bad)


def test_plain_safetensors_without_metadata_loads(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.ones(2, 2)}, str(path))
    tensors, meta = load_tensors(path)
    assert meta == {} and torch.equal(tensors["w"], torch.ones(2, 2))


class _Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.ln = nn.LayerNorm(2)


def test_check_matches_model():
    model = _Small()
    good = {"lin.weight": torch.zeros(2, 3), "ln.weight": torch.zeros(2)}
    check_matches_model(good, model, "g.safetensors")  # a subset of the parameters is fine
    with pytest.raises(GradientFileError, match=r"g\.safetensors.*other\.weight"):
        check_matches_model({**good, "other.weight": torch.zeros(2)}, model, "g.safetensors")
    with pytest.raises(GradientFileError, match=r"lin\.weight.*\(3, 2\).*\(2, 3\)"):
        check_matches_model({"lin.weight": torch.zeros(3, 2)}, model, "g.safetensors")
    nan = torch.zeros(2, 3)
    nan[1, 2] = float("nan")
    with pytest.raises(GradientFileError, match=r"NaN.*lin\.weight"):
        check_matches_model({"lin.weight": nan}, model, "g.safetensors")
    with pytest.raises(GradientFileError, match=r"ln\.bias"):
        check_matches_model({"ln.bias": torch.tensor([0.0, float("inf")])}, model, "g.safetensors")


def test_gradient_file_round_trip_matches_model(tmp_path, family, model):
    torch.manual_seed(5)
    grads = {n: torch.randn_like(p) for n, p in model.named_parameters() if n.startswith("visual.ln")}
    path = save_tensors(tmp_path / "forget.safetensors", grads,
                        {"shapes": {k: list(v.shape) for k, v in grads.items()}})
    back, meta = load_tensors(path)
    check_matches_model(back, model, path)
    assert meta["shapes"] == {k: list(v.shape) for k, v in grads.items()}
    assert json.dumps(meta["shapes"])  # decoded to plain JSON types


def test_gradient_files_are_byte_identical_from_two_checkouts_in_different_folders(tmp_path, monkeypatch, small_world,
                                                                                     tiny_checkpoint):
    """The same config and seed in two folders, each with its own copy of the data and the model
    (as two clones build the demo): the retain shards named by absolute paths inside the folder
    (as the demo world resolves them), forget set and checkpoint by relative ones. The gradient
    files record every path relative to the working folder, so their bytes are the same."""
    import shutil

    from conftest import write_config

    from slug_pl.cli import main

    concept = json.loads(open(small_world["identities_json"]).read())[0]
    files = {}
    for clone in ("first", "second/deeper"):
        root = tmp_path / clone
        shutil.copytree(small_world["root"], root / "world")
        shutil.copy(tiny_checkpoint, root / "model.safetensors")
        world = {k: v.replace(small_world["root"], str(root / "world")) for k, v in small_world.items()
                 if isinstance(v, str)}
        monkeypatch.chdir(root)
        assert main(["mine", "--shards", world["corpus"], "--name", concept, "--out", "forget"]) == 0
        config = write_config(root, world, "model.safetensors", "forget/forget-000000.tar",
                              search={"top_k": 1, "max_evals": 1})
        assert main(["fit", "--config", str(config)]) == 0
        files[clone] = {name: (root / "lightning_logs/version_0/gradients" / f"{name}.safetensors").read_bytes()
                        for name in ("forget", "retain")}
        _, meta = load_tensors(root / "lightning_logs/version_0/gradients/retain.safetensors")
        assert [s["path"] for s in meta["data"]["shards"]] == [
            f"world/corpus/corpus-{i:06d}.tar" for i in range(3)]  # relative to the working folder
    assert files["first"] == files["second/deeper"]
