"""Reversible single-layer edits, open_clip weight loaders, and the tower / rankable filter."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torchvision import transforms as T

from slug_pl.edit import (
    ORIGINAL_PREFIX,
    EditMismatchError,
    LayerEdit,
    apply_edit,
    load_edits,
    make_edit,
    revert_edit,
    save_edits,
    stepped,
)
from slug_pl.families.open_clip import SHIPPED_CONFIGS, OpenClip
from slug_pl.gradients import save_tensors

TINY_CFG = json.loads((SHIPPED_CONFIGS / "slug-tiny-vit.json").read_text())


@pytest.fixture(scope="module")
def family():
    return OpenClip(model_name="slug-tiny-vit", pretrained=None)


def _model(family, seed):
    torch.manual_seed(seed)
    return family.load()


@pytest.fixture(scope="module")
def model(family):
    return _model(family, 0)


def _snapshot(model):
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def _assert_state_equal(model, snapshot):
    state = model.state_dict()
    assert state.keys() == snapshot.keys()
    for n, t in snapshot.items():
        assert torch.equal(state[n], t), n


# -- edits ---------------------------------------------------------------------------------------


def test_apply_then_revert_is_bit_identical(family):
    model = _model(family, 1)
    before = _snapshot(model)
    name = "visual.transformer.resblocks.1.mlp.c_proj.weight"
    torch.manual_seed(7)
    grad = torch.randn_like(before[name])
    edit = make_edit(model, name, grad, 0.37, importance=1.5)
    assert edit.step == 0.37 and edit.info == {"importance": 1.5}
    assert torch.equal(edit.original, before[name])
    # θ − λ·g, computed here in float64 and rounded once
    expected = (before[name].double() - 0.37 * grad.double()).float()
    assert torch.equal(edit.edited, expected)
    _assert_state_equal(model, before)  # make_edit alone changes nothing

    apply_edit(model, edit)
    state = model.state_dict()
    assert torch.equal(state[name], expected)
    for n, t in before.items():  # only the edited tensor changed
        if n != name:
            assert torch.equal(state[n], t), n

    revert_edit(model, edit)
    _assert_state_equal(model, before)


def test_applying_twice_or_reverting_unapplied_raises(family):
    model = _model(family, 2)
    before = _snapshot(model)
    name = "text_projection"
    edit = make_edit(model, name, torch.ones_like(before[name]), 0.1)
    with pytest.raises(EditMismatchError, match="text_projection"):
        revert_edit(model, edit)  # not applied yet
    apply_edit(model, edit)
    with pytest.raises(EditMismatchError, match="text_projection"):
        apply_edit(model, edit)
    revert_edit(model, edit)
    _assert_state_equal(model, before)


def test_stepped_restores_even_on_error(family):
    model = _model(family, 3)
    before = _snapshot(model)
    name = "visual.proj"
    grad = torch.full_like(before[name], 0.5)
    with pytest.raises(RuntimeError, match="boom"):
        with stepped(model, name, grad, 2.0) as edit:
            assert torch.equal(dict(model.named_parameters())[name].detach(), before[name] - 1.0)
            assert isinstance(edit, LayerEdit)
            raise RuntimeError("boom")
    _assert_state_equal(model, before)


def test_edit_on_other_weights_or_model_raises(family, model):
    name = "visual.proj"
    edit = make_edit(model, name, torch.ones_like(model.visual.proj), 0.2)
    other = _model(family, 99)  # same architecture, other weights
    before = _snapshot(other)
    with pytest.raises(EditMismatchError, match="visual.proj"):
        apply_edit(other, edit)
    _assert_state_equal(other, before)  # untouched
    missing = LayerEdit("visual.no_such_param", edit.original, edit.edited, 0.2)
    with pytest.raises(EditMismatchError, match="no_such_param"):
        apply_edit(other, missing)
    wrong_shape = LayerEdit(name, edit.original.T.contiguous(), edit.edited.T.contiguous(), 0.2)
    with pytest.raises(EditMismatchError, match="shape"):
        apply_edit(model, wrong_shape)


def test_save_and_load_edits_round_trip(tmp_path, family):
    model = _model(family, 4)
    before = _snapshot(model)
    torch.manual_seed(8)
    names = ["visual.proj", "transformer.resblocks.0.mlp.c_fc.weight"]
    edits = [make_edit(model, n, torch.randn_like(before[n]), s, importance=i, tower=t)
             for n, s, i, t in zip(names, [0.25, 1e-3], [2.0, 0.5], ["vision", "text"])]
    path = tmp_path / "edit.safetensors"
    save_edits(path, edits, {"model": {"family": "open_clip", "model_name": "slug-tiny-vit"}, "concept": "x"})
    with pytest.raises(FileExistsError):
        save_edits(path, edits, {})
    loaded, meta = load_edits(path)
    assert meta["model"] == {"family": "open_clip", "model_name": "slug-tiny-vit"}
    assert meta["concept"] == "x"
    assert set(meta["layers"]) == set(names)
    by_name = {e.name: e for e in loaded}
    assert set(by_name) == set(names)
    for e in edits:
        got = by_name[e.name]
        assert got.step == e.step and got.info == e.info
        assert torch.equal(got.original, e.original) and torch.equal(got.edited, e.edited)
        assert got.edited.dtype == e.edited.dtype

    # the loaded patch applies to a model with the original weights and reverts exactly
    fresh = _model(family, 4)
    for e in loaded:
        apply_edit(fresh, e)
    for e in edits:
        assert torch.equal(dict(fresh.named_parameters())[e.name].detach(), e.edited)
    for e in loaded:
        revert_edit(fresh, e)
    _assert_state_equal(fresh, before)


def test_load_edits_refuses_non_edit_files(tmp_path):
    plain = save_tensors(tmp_path / "grads.safetensors", {"visual.proj": torch.zeros(2)}, {"set": "forget"})
    with pytest.raises(EditMismatchError, match="no edits"):
        load_edits(plain)
    partial = save_tensors(tmp_path / "partial.safetensors", {"visual.proj": torch.zeros(2)},
                           {"layers": {"visual.proj": {"step": 0.1}}})
    with pytest.raises(EditMismatchError, match="visual.proj"):
        load_edits(partial)
    assert ORIGINAL_PREFIX == "original/"


def _edit_file(tmp_path, tensors, layers, name="bad.safetensors"):
    return save_tensors(tmp_path / name, {k: v.clone() for k, v in tensors.items()}, {"layers": layers})


def test_hostile_edit_files_are_refused_naming_the_file_and_the_entry(tmp_path):
    w = torch.ones(2, 2)
    cases = {
        "stray": ({"a.weight": w, "original/a.weight": w, "extra": w}, {"a.weight": {"step": 1.0}},
                  "tensor 'extra' belongs to no edit"),
        "name": ({"../a": w, "original/../a": w}, {"../a": {"step": 1.0}}, "entry '../a' is not a parameter name"),
        "shape": ({"a.weight": w, "original/a.weight": torch.ones(3)}, {"a.weight": {"step": 1.0}},
                  "entry 'a.weight' holds an edited value"),
        "integer": ({"a.weight": w.long(), "original/a.weight": w.long()}, {"a.weight": {"step": 1.0}},
                    "one floating tensor"),
        "nan": ({"a.weight": w * float("nan"), "original/a.weight": w}, {"a.weight": {"step": 1.0}},
                "entry 'a.weight' holds NaN"),
        "step": ({"a.weight": w, "original/a.weight": w}, {"a.weight": {"step": "rm -rf"}},
                 "entry 'a.weight' has no finite step"),
        "layers": ({"a.weight": w}, ["a.weight"], "not a table of edits"),
    }
    for case, (tensors, layers, message) in cases.items():
        path = _edit_file(tmp_path, tensors, layers, f"{case}.safetensors")
        with pytest.raises(EditMismatchError, match=message) as err:
            load_edits(path)
        assert f"{case}.safetensors" in str(err.value), case


def test_an_edit_file_over_the_size_bound_is_not_read(tmp_path):
    path = _edit_file(tmp_path, {"a.weight": torch.ones(64), "original/a.weight": torch.zeros(64)},
                      {"a.weight": {"step": 1.0}})
    assert len(load_edits(path)[0]) == 1
    with pytest.raises(EditMismatchError, match=r"bad\.safetensors is \d+ bytes, more than an edit file may hold \(100\)"):
        load_edits(path, max_bytes=100)


# -- loaders -------------------------------------------------------------------------------------


def _assert_same_weights(a, b):
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for n in pa:
        assert torch.equal(pa[n], pb[n]), n
    ba, bb = dict(a.named_buffers()), dict(b.named_buffers())
    assert ba.keys() == bb.keys()
    for n in ba:
        assert torch.equal(ba[n], bb[n]), n


def _state(model):
    return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_checkpoint_round_trip_is_bit_identical(tmp_path, model, suffix):
    path = tmp_path / f"tiny{suffix}"
    if suffix == ".safetensors":
        save_file(_state(model), str(path))
    else:
        torch.save(_state(model), path)
    loaded = OpenClip(model_name="slug-tiny-vit", pretrained=str(path)).load()
    assert not loaded.training
    _assert_same_weights(loaded, model)
    other = _model(OpenClip(model_name="slug-tiny-vit", pretrained=None), 123)
    assert not torch.equal(other.visual.proj, model.visual.proj)  # the check can fail


def test_checkpoint_with_state_dict_key_and_module_prefix(tmp_path, model):
    path = tmp_path / "ddp.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in _state(model).items()}, "epoch": 3}, path)
    _assert_same_weights(OpenClip(model_name="slug-tiny-vit", pretrained=str(path)).load(), model)


def test_missing_checkpoint_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "model.safetensors"
    with pytest.raises(FileNotFoundError, match="nowhere/model.safetensors"):
        OpenClip(model_name="slug-tiny-vit", pretrained=str(missing)).load()
    with pytest.raises(FileNotFoundError, match="missing-weights.pt"):
        OpenClip(model_name="slug-tiny-vit", pretrained="missing-weights.pt").load()


def test_user_model_config_registers_and_loads(tmp_path):
    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 24, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    path = tmp_path / "slug-test-micro-vit.json"
    path.write_text(json.dumps(cfg))
    fam = OpenClip(model_name="slug-test-micro-vit", pretrained=None, model_config=str(path))
    assert "slug-test-micro-vit" in open_clip.list_models()
    m = fam.load()
    assert tuple(m.text_projection.shape) == (32, 16) and tuple(m.visual.proj.shape) == (32, 16)
    assert tuple(m.positional_embedding.shape) == (8, 32)
    assert len(m.visual.transformer.resblocks) == 1
    tokens = fam.tokenize(["a photo of a cat"])
    assert tokens.shape == (1, 8)
    x = fam.image_transform()(Image.new("RGB", (50, 30), (10, 20, 30)))
    assert x.shape == (3, 24, 24)
    with torch.no_grad():
        assert fam.encode_image(m, x[None]).shape == (1, 16)
        assert fam.encode_text(m, tokens).shape == (1, 16)


def test_missing_model_config_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-config.json"):
        OpenClip(model_name="slug-tiny-vit", model_config=str(tmp_path / "no-config.json"))


def _normalize_of(transform):
    norms = [t for t in transform.transforms if isinstance(t, T.Normalize)]
    assert len(norms) == 1
    return tuple(round(float(v), 6) for v in norms[0].mean), tuple(round(float(v), 6) for v in norms[0].std)


def test_local_dir_model_loads_weights_and_preprocessing(tmp_path, model):
    # the layout open_clip's save_for_hf writes: open_clip_config.json {model_cfg, preprocess_cfg}
    # plus open_clip_model.safetensors; factory.create_model reads both for 'local-dir:'
    folder = tmp_path / "saved-model"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": TINY_CFG,
        "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
    }))
    save_file(_state(model), str(folder / "open_clip_model.safetensors"))
    fam = OpenClip(model_name=f"local-dir:{folder}", pretrained=None)
    loaded = fam.load()
    _assert_same_weights(loaded, model)
    assert fam.tokenize(["a dog"]).shape == (1, TINY_CFG["text_cfg"]["context_length"])
    fresh = OpenClip(model_name=f"local-dir:{folder}", pretrained=None)  # transform before load
    for f in (fam, fresh):
        assert _normalize_of(f.image_transform()) == ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def test_image_transform_does_not_depend_on_load_order():
    """The preprocessing of a pretrained tag (here SigLIP's mean/std 0.5) must be the one the
    family hands out, whether or not ``load()`` ran first (no weights are needed to check it)."""
    cfg = open_clip.get_pretrained_cfg("ViT-B-16-SigLIP", "webli")
    assert tuple(cfg["mean"]) == (0.5, 0.5, 0.5)
    fam = OpenClip(model_name="ViT-B-16-SigLIP", pretrained="webli")
    assert _normalize_of(fam.image_transform()) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def test_tiny_transform_same_before_and_after_load(family):
    img = Image.new("RGB", (45, 33), (200, 100, 50))
    fresh = OpenClip(model_name="slug-tiny-vit", pretrained=None)
    before = fresh.image_transform()(img)
    fresh.load()
    assert torch.equal(fresh.image_transform()(img), before)
    assert before.shape == (3, 32, 32)


# -- towers and the rankable filter ----------------------------------------------------------


RANKABLE = {  # real open_clip names of the tiny model: (tower, rankable)
    "visual.proj": ("vision", True),
    "visual.conv1.weight": ("vision", False),
    "visual.class_embedding": ("vision", False),
    "visual.positional_embedding": ("vision", False),
    "visual.ln_pre.weight": ("vision", True),
    "visual.ln_pre.bias": ("vision", False),
    "visual.ln_post.weight": ("vision", True),
    "visual.transformer.resblocks.0.attn.in_proj_weight": ("vision", True),
    "visual.transformer.resblocks.0.attn.in_proj_bias": ("vision", False),
    "visual.transformer.resblocks.0.attn.out_proj.weight": ("vision", True),
    "visual.transformer.resblocks.1.mlp.c_fc.bias": ("vision", False),
    "visual.transformer.resblocks.1.ln_2.weight": ("vision", True),
    "transformer.resblocks.0.attn.in_proj_weight": ("text", True),
    "transformer.resblocks.0.attn.in_proj_bias": ("text", False),
    "transformer.resblocks.1.mlp.c_proj.weight": ("text", True),
    "transformer.resblocks.1.mlp.c_proj.bias": ("text", False),
    "transformer.resblocks.1.ln_1.weight": ("text", True),
    "token_embedding.weight": ("text", False),
    "positional_embedding": ("text", False),
    "ln_final.weight": ("text", True),
    "ln_final.bias": ("text", False),
    "text_projection": ("text", True),
    "logit_scale": (None, False),
}


def test_tower_of_and_is_rankable_on_real_names(family, model):
    params = dict(model.named_parameters())
    for name, (tower, rankable) in RANKABLE.items():
        assert name in params, name
        assert family.tower_of(name) == tower, name
        assert family.is_rankable(name, params[name]) is rankable, name


def test_every_parameter_is_classified(family, model):
    params = dict(model.named_parameters())
    # only the shared logit scale belongs to no tower
    assert {n for n in params if family.tower_of(n) is None} == {"logit_scale"}
    assert {n for n in params if family.tower_of(n) == "vision"} == {n for n in params if n.startswith("visual.")}
    rankable = {n for n, p in params.items() if family.is_rankable(n, p)}
    # independent rule: no biases, no embeddings, no patch conv, no logit scale
    expected = {n for n in params
                if not n.endswith("bias") and "embedding" not in n and not n.startswith("visual.conv1")
                and n != "logit_scale"}
    assert rankable == expected
    # 2 blocks × 6 weights (ln_1, in_proj, out_proj, ln_2, c_fc, c_proj) per tower + ln/proj
    assert len([n for n in rankable if n.startswith("visual.")]) == 12 + 3  # ln_pre, ln_post, proj
    assert len([n for n in rankable if not n.startswith("visual.")]) == 12 + 2  # ln_final, text_projection


def test_custom_text_clip_names_and_filters():
    fam = OpenClip(model_name="slug-tiny-vit", pretrained=None)
    assert fam.tower_of("text.transformer.resblocks.0.mlp.c_fc.weight") == "text"
    assert fam.tower_of("text.proj") == "text"
    assert fam.tower_of("logit_bias") is None
    w = torch.zeros(2, 2)
    only_mlp = OpenClip(model_name="slug-tiny-vit", pretrained=None, include=[r"\.mlp\."])
    assert only_mlp.is_rankable("visual.transformer.resblocks.0.mlp.c_fc.weight", w)
    assert not only_mlp.is_rankable("visual.transformer.resblocks.0.attn.out_proj.weight", w)
    assert not only_mlp.is_rankable("visual.transformer.resblocks.0.mlp.c_fc.bias", w)  # exclude first
    no_filter = OpenClip(model_name="slug-tiny-vit", pretrained=None, exclude=())
    assert no_filter.is_rankable("visual.conv1.weight", w)
    assert not no_filter.is_rankable("logit_scale", w)  # no tower: never ranked


def test_restep_rebuilds_later_edits_of_the_same_tensor():
    """Two concepts' edits on one tensor, applied in order; raising the first one's step (the
    final re-check of a joint search) leaves θ − λ1'·g1 − λ2·g2, and reverting both restores θ
    bit for bit."""
    from slug_pl.edit import restep_edit
    from slug_pl.step_search import Outcome

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    theta = model.weight.detach().clone()
    g1, g2, gb = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3)
    outcomes = []
    for name, g, step in (("weight", g1, 0.5), ("bias", gb, 0.25), ("weight", g2, 0.75)):
        e = make_edit(model, name, g, step, concepts=[f"c{len(outcomes)}"])
        apply_edit(model, e)
        outcomes.append(Outcome(f"c{len(outcomes)}", [], {}, [], None, None, True, e, g, {}))
    restep_edit(model, outcomes, 0, 1.0)
    assert torch.allclose(model.weight, theta - 1.0 * g1 - 0.75 * g2, atol=1e-6)
    assert [o.edit.step for o in outcomes] == [1.0, 0.25, 0.75]
    assert outcomes[0].edit.info == {"concepts": ["c0"]}
    for o in reversed(outcomes):
        revert_edit(model, o.edit)
    assert torch.equal(model.weight, theta)
