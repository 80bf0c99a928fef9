"""The shareable patch (slug_pl.patch): read, checked against the base, applied and reverted in one
call, saved as a folder and read back; and the checks an edit file from someone else must pass."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from torch import nn

from slug_pl.edit import EditMismatchError, LayerEdit, make_edit, save_edits
from slug_pl.families.open_clip import OpenClip
from slug_pl.gradients import weights_fingerprint
from slug_pl.patch import PATCH_CONFIG, PATCH_WEIGHTS, SlugPatch, embedded_tower, patch_metadata

EDITED = ["transformer.resblocks.1.mlp.c_fc.weight", "visual.transformer.resblocks.0.attn.out_proj.weight"]


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return OpenClip(model_name="slug-tiny-vit", pretrained=None).load()


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _edits(model: nn.Module, names=EDITED) -> list[LayerEdit]:
    torch.manual_seed(1)
    params = dict(model.named_parameters())
    return [make_edit(model, n, torch.randn_like(params[n]), 0.5, concepts=["Alice Abara"], tower=t)
            for n, t in zip(names, ["text", "vision"])]


def _write_patch(path, model, edits, **extra) -> SlugPatch:
    """The edit file a run writes for ``edits`` computed on ``model`` (not carrying them)."""
    for e in edits:
        dict(model.named_parameters())[e.name].data.copy_(e.edited)
    meta = {"model": {"family": "open_clip", "model_name": "slug-tiny-vit", "pretrained": "None"},
            "concepts": ["Alice Abara"], "method": "slug", "target": "forget_top5 <= 0",
            **patch_metadata(model, edits), **extra}
    for e in edits:
        dict(model.named_parameters())[e.name].data.copy_(e.original)
    save_edits(path, edits, meta)
    return SlugPatch.from_file(path)


@pytest.fixture()
def base():
    return _model(0)


@pytest.fixture()
def patch(tmp_path, base):
    return _write_patch(tmp_path / "edit.safetensors", base, _edits(base))


def test_the_run_records_the_base_weights_hash_without_touching_the_model(base):
    before = _state(base)
    edits = _edits(base)
    for e in edits:
        dict(base.named_parameters())[e.name].data.copy_(e.edited)
    meta = patch_metadata(base, edits)
    for e in edits:
        dict(base.named_parameters())[e.name].data.copy_(e.original)
    assert meta["base_sha256"] == weights_fingerprint(base)
    assert meta["slug_pl_version"] == "0.1.0"
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
    with pytest.raises(KeyError, match="no_such"):
        weights_fingerprint(base, {"no_such.weight": torch.zeros(1)})


def test_apply_edits_and_revert_restores_bit_for_bit(patch, base):
    before = _state(base)
    assert patch.apply(base) is base
    params = dict(base.named_parameters())
    for e in patch.edits:
        assert torch.equal(params[e.name].detach(), e.edited)
        assert not torch.equal(e.edited, e.original)
    changed = [k for k, v in base.state_dict().items() if not torch.equal(v, before[k])]
    assert sorted(changed) == sorted(EDITED)
    assert patch.is_applied(base)
    patch.revert(base)
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
    assert not patch.is_applied(base)


def test_applied_block_restores_the_model_even_on_error(patch, base):
    before = _state(base)
    with pytest.raises(RuntimeError, match="inside"):
        with patch.applied(base) as edited:
            assert patch.is_applied(edited)
            raise RuntimeError("inside")
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


def test_applying_twice_says_so_and_reverting_an_unedited_model_is_refused(patch, base):
    patch.apply(base)
    with pytest.raises(EditMismatchError, match="carries this patch already"):
        patch.apply(base)
    patch.revert(base)
    with pytest.raises(EditMismatchError, match="does not hold this patch's edit"):
        patch.revert(base)


def test_other_weights_are_refused_naming_the_entry_and_nothing_changes(patch):
    other = _model(7)
    before = _state(other)
    with pytest.raises(EditMismatchError, match=r"edit\.safetensors: entry 'transformer\.resblocks\.1\.mlp\.c_fc"):
        patch.apply(other)
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())


def test_a_model_that_differs_only_outside_the_edit_is_refused_by_the_hash(patch, base):
    with torch.no_grad():
        base.ln_final.weight.add_(1e-3)  # not an edited tensor: only the whole-weights hash sees it
    before = _state(base)
    with pytest.raises(EditMismatchError, match="differs elsewhere") as err:
        patch.apply(base)
    assert patch.base_sha256[:12] in str(err.value) and "float32" in str(err.value)
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


def test_a_patch_without_the_hash_checks_each_tensor_only(tmp_path, base):
    edits = _edits(base)
    save_edits(tmp_path / "old.safetensors", edits, {"concepts": ["Alice Abara"]})  # an older run's file
    old = SlugPatch.from_file(tmp_path / "old.safetensors")
    assert old.base_sha256 is None
    with torch.no_grad():
        base.ln_final.weight.add_(1e-3)
    old.apply(base)
    assert old.is_applied(base)


def test_a_second_entry_that_does_not_fit_leaves_the_first_unapplied(tmp_path, base):
    edits = _edits(base)
    patch = _write_patch(tmp_path / "edit.safetensors", base, edits)
    with torch.no_grad():
        dict(base.named_parameters())[EDITED[1]].mul_(2)
    before = _state(base)
    with pytest.raises(EditMismatchError, match=EDITED[1].replace(".", r"\.")):
        patch.apply(base)
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


def test_a_model_without_the_tensor_or_of_another_shape_is_refused(patch):
    with pytest.raises(EditMismatchError, match="entry 'transformer.resblocks.1.mlp.c_fc.weight'.*no parameter"):
        patch.apply(nn.Linear(2, 2))
    wide = nn.Module()
    for e in patch.edits:  # every name present, one with another shape
        shape = (3, 3) if e.name == EDITED[0] else e.edited.shape
        wide.register_parameter(e.name.replace(".", "_"), nn.Parameter(torch.zeros(shape)))
    with pytest.raises(EditMismatchError, match=r"has shape .* the model's 'transformer_resblocks_1_mlp_c_fc_weight' \(3, 3\)"):
        patch.apply(wide, name_map=lambda name: name.replace(".", "_"))


def test_save_pretrained_writes_a_small_folder_that_reads_back(tmp_path, patch, base):
    folder = patch.save_pretrained(tmp_path / "alice_patch")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", PATCH_CONFIG, PATCH_WEIGHTS]
    config = json.loads((folder / PATCH_CONFIG).read_text())
    assert config["format"] == "slug_patch" and config["base_sha256"] == weights_fingerprint(base)
    assert sorted(config["layers"]) == sorted(EDITED) and config["layers"][EDITED[0]]["step"] == 0.5
    card = (folder / "README.md").read_text()
    assert "machine-unlearning" in card and EDITED[0] in card and "without its run record" in card
    with pytest.raises(FileExistsError):
        patch.save_pretrained(folder)

    shared = SlugPatch.from_pretrained(folder)
    assert shared.names == patch.names and shared.config == {**patch.config, "layers": config["layers"]}
    before = _state(base)
    with shared.applied(base):
        assert all(torch.equal(dict(base.named_parameters())[e.name], e.edited) for e in patch.edits)
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


def test_a_shared_folder_that_was_altered_is_refused(tmp_path, patch):
    folder = patch.save_pretrained(tmp_path / "alice_patch")
    config = json.loads((folder / PATCH_CONFIG).read_text())
    (folder / PATCH_CONFIG).write_text(json.dumps({**config, "concepts": ["Bob"]}))
    with pytest.raises(EditMismatchError, match="disagree on entry 'concepts'"):
        SlugPatch.from_pretrained(folder)
    (folder / PATCH_CONFIG).write_text(json.dumps({**config, "format": "peft"}))
    with pytest.raises(EditMismatchError, match="not a slug_patch config"):
        SlugPatch.from_pretrained(folder)
    with pytest.raises(FileNotFoundError, match="holds no slug_patch.json"):
        SlugPatch.from_pretrained(tmp_path)


def test_from_run_reads_the_summary_for_the_card(tmp_path, patch):
    run = tmp_path / "version_0"
    run.mkdir()
    save_edits(run / "edit.safetensors", patch.edits, patch.config)
    (run / "summary.json").write_text(json.dumps({"concepts": ["Alice Abara"], "before": {}, "after": {}}))
    assert SlugPatch.from_run(run).summary["concepts"] == ["Alice Abara"]
    (tmp_path / "unfinished").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no edit.safetensors"):
        SlugPatch.from_run(tmp_path / "unfinished")


# -- a model that embeds one tower ---------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_edit(tiny_hf_clip, tmp_path_factory):
    """A patch of the tiny Hugging Face CLIP editing one text and one vision tensor."""
    from transformers import CLIPModel

    clip = CLIPModel.from_pretrained(tiny_hf_clip, dtype=torch.float32)
    names = ["text_model.encoder.layers.1.mlp.fc1.weight", "vision_model.encoder.layers.0.self_attn.v_proj.weight"]
    torch.manual_seed(3)
    params = dict(clip.named_parameters())
    edits = [make_edit(clip, n, torch.randn_like(params[n]), 0.3) for n in names]
    path = tmp_path_factory.mktemp("hf_patch") / "edit.safetensors"
    save_edits(path, edits, {"concepts": ["x"], **patch_metadata(clip, edits)})
    return SlugPatch.from_file(path)


def _tower_patch(patch: SlugPatch, root: str) -> SlugPatch:
    return SlugPatch([e for e in patch.edits if e.name.startswith(root)], patch.config, patch.source)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_text_encoder_in_any_precision_takes_the_text_edit_and_gives_it_back(tiny_hf_clip, hf_edit, dtype):
    from transformers import CLIPTextModel

    encoder = CLIPTextModel.from_pretrained(tiny_hf_clip, dtype=dtype)
    loaded = _state(encoder)
    text = _tower_patch(hf_edit, "text_model.")
    name_map = embedded_tower(encoder)
    assert name_map("text_model.encoder.layers.1.mlp.fc1.weight") == "encoder.layers.1.mlp.fc1.weight"
    text.apply(encoder, name_map=name_map)
    edit = text.edits[0]
    assert torch.equal(encoder.state_dict()["encoder.layers.1.mlp.fc1.weight"], edit.edited.to(dtype))
    changed = [k for k, v in encoder.state_dict().items() if not torch.equal(v, loaded[k])]
    assert changed == ["encoder.layers.1.mlp.fc1.weight"]
    text.revert(encoder, name_map=name_map)
    assert all(torch.equal(v, loaded[k]) for k, v in encoder.state_dict().items())


def test_the_vision_edit_reaches_a_tower_under_a_prefix_and_not_the_text_encoder(tiny_hf_clip, hf_edit):
    from transformers import CLIPTextModel, CLIPVisionModel

    vlm = nn.Module()  # a VLM's layout: the tower as model.vision_tower
    vlm.model = nn.Module()
    vlm.model.vision_tower = CLIPVisionModel.from_pretrained(tiny_hf_clip, dtype=torch.float32)
    vision = _tower_patch(hf_edit, "vision_model.")
    vision.apply(vlm, name_map=embedded_tower(vlm))
    tensor = vlm.state_dict()["model.vision_tower.encoder.layers.0.self_attn.v_proj.weight"]
    assert torch.equal(tensor, vision.edits[0].edited)

    encoder = CLIPTextModel.from_pretrained(tiny_hf_clip, dtype=torch.float32)  # the other tower
    with pytest.raises(EditMismatchError, match="not the original this patch edits"):
        vision.apply(encoder, name_map=embedded_tower(encoder))


def test_the_whole_clip_cannot_take_a_patch_meant_for_other_weights_via_the_name_map(tiny_hf_clip, hf_edit):
    from transformers import CLIPModel

    clip = CLIPModel.from_pretrained(tiny_hf_clip, dtype=torch.float16)
    with pytest.raises(EditMismatchError, match="float16"):
        hf_edit.apply(clip)  # the CLIP itself, in another dtype: its hash is not the base's
    hf_edit.apply(clip, name_map=embedded_tower(clip))  # tensor by tensor, within rounding
    assert hf_edit.is_applied(clip, name_map=embedded_tower(clip))
