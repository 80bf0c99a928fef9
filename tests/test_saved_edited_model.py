"""The edited CLIP a run saves loads with its own library, differs from the base in the edited
tensor only, and carries its model card (slug_pl.edited_model, ModelFamily.save_edited)."""

from __future__ import annotations

import json
import os
import shutil
from fnmatch import fnmatch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import load_file, save_file

from slug_pl.edit import EditMismatchError
from slug_pl.edited_model import save_edited_model
from slug_pl.families import HfClip, OpenClip
from slug_pl.families.hf_clip import HF_CLIP_FILES
from slug_pl.families.open_clip import register_model_configs
from slug_pl.testing.runs import random_edit, write_run

BEFORE = {"forget_top1": 0.8, "forget_top5": 1.0, "retain_top1": 0.6, "utility_top1": 0.5}
AFTER = {"forget_top1": 0.0, "forget_top5": 0.0, "retain_top1": 0.55, "utility_top1": 0.48}
HF_EDITED = "text_model.encoder.layers.1.mlp.fc1.weight"
OC_EDITED = "visual.transformer.resblocks.0.mlp.c_fc.weight"


def _only_differences(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


def test_hf_clip_edited_model_is_a_from_pretrained_folder_with_the_edit_only(tmp_path, tiny_hf_clip):
    from transformers import CLIPModel, CLIPProcessor

    base_folder = tmp_path / "base"
    shutil.copytree(tiny_hf_clip, base_folder)
    # what a hub snapshot of a LAION repository may hold beside the transformers files
    save_file({"visual.proj": torch.ones(2)}, str(base_folder / "open_clip_model.safetensors"))
    (base_folder / "README.md").write_text("# the base model's card\n")
    family = HfClip(model_name=str(base_folder))
    model = family.load()
    edit = random_edit(model, HF_EDITED, concepts=["Alice Abara"], tower="text")
    run = write_run(tmp_path / "version_0", family, model, [edit], BEFORE, AFTER)

    saved = run / "edited_model"
    names = sorted(p.name for p in saved.iterdir())
    assert "open_clip_model.safetensors" not in names
    assert all(n == "README.md" or any(fnmatch(n, p) for p in HF_CLIP_FILES) for n in names)
    edited = CLIPModel.from_pretrained(saved)
    assert _only_differences(edited.state_dict(), model.state_dict()) == [HF_EDITED]
    assert torch.equal(edited.state_dict()[HF_EDITED], edit.edited)
    processor = CLIPProcessor.from_pretrained(saved)
    assert processor.tokenizer("a photo")["input_ids"] == family._get_tokenizer()("a photo")["input_ids"]
    card = (saved / "README.md").read_text()
    assert "the base model's card" not in card and "library_name: \"transformers\"" in card
    assert 'CLIPModel.from_pretrained("edited_model")' in card and HF_EDITED in card


def test_hf_clip_stored_in_float16_keeps_its_files_dtype(tmp_path, tiny_hf_clip):
    from transformers import CLIPModel

    base_folder = tmp_path / "base16"
    shutil.copytree(tiny_hf_clip, base_folder)
    weights = base_folder / "model.safetensors"
    save_file({k: v.half() for k, v in load_file(str(weights)).items()}, str(weights))
    family = HfClip(model_name=str(base_folder))
    model = family.load()
    edit = random_edit(model, HF_EDITED)
    run = write_run(tmp_path / "version_0", family, model, [edit], BEFORE, AFTER)

    stored = load_file(str(run / "edited_model" / "model.safetensors"))
    base = load_file(str(weights))
    assert {t.dtype for t in stored.values()} == {torch.float16}
    assert _only_differences(stored, base) == [HF_EDITED]
    assert torch.equal(stored[HF_EDITED], edit.edited.half())
    loaded = CLIPModel.from_pretrained(run / "edited_model", dtype=torch.float32)
    assert torch.equal(loaded.state_dict()[HF_EDITED], edit.edited.half().float())


@pytest.fixture(scope="module")
def open_clip_file_family(tiny_checkpoint):
    return OpenClip(model_name="slug-tiny-vit", pretrained=tiny_checkpoint)


def test_open_clip_edited_model_loads_as_local_dir_and_as_pretrained_file(tmp_path, open_clip_file_family):
    import open_clip

    family = open_clip_file_family
    model = family.load()
    edit = random_edit(model, OC_EDITED, tower="vision")
    run = write_run(tmp_path / "version_0", family, model, [edit], BEFORE, AFTER)
    saved = run / "edited_model"
    assert sorted(p.name for p in saved.iterdir()) == ["README.md", "open_clip_config.json",
                                                       "open_clip_model.safetensors"]

    from_dir, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{saved}")
    register_model_configs()
    from_file, _, _ = open_clip.create_model_and_transforms("slug-tiny-vit",
                                                            pretrained=str(saved / "open_clip_model.safetensors"))
    for loaded in (from_dir, from_file):
        assert _only_differences(loaded.state_dict(), model.state_dict()) == [OC_EDITED]
        assert torch.equal(loaded.state_dict()[OC_EDITED], edit.edited)
    normalize = [t for t in preprocess.transforms if type(t).__name__ == "Normalize"][0]
    assert list(normalize.mean) == family.image_normalization()["image_mean"]
    assert 'create_model_and_transforms("local-dir:edited_model")' in (saved / "README.md").read_text()


def test_open_clip_local_dir_base_keeps_its_own_config(tmp_path):
    import open_clip

    from slug_pl.testing.standins import open_clip_vit_b32_laion

    base = open_clip_vit_b32_laion(tmp_path / "hub").path
    family = OpenClip(model_name=f"local-dir:{base}")
    model = family.load()
    edit = random_edit(model, OC_EDITED)
    run = write_run(tmp_path / "version_0", family, model, [edit], BEFORE, AFTER)
    saved = run / "edited_model"
    assert json.loads((saved / "open_clip_config.json").read_text()) == \
        json.loads((base / "open_clip_config.json").read_text())
    loaded, _, _ = open_clip.create_model_and_transforms(f"local-dir:{saved}")
    assert _only_differences(loaded.state_dict(), model.state_dict()) == [OC_EDITED]


def test_a_model_that_does_not_carry_the_runs_edit_is_not_saved(tmp_path, open_clip_file_family):
    family = open_clip_file_family
    model = family.load()
    run = write_run(tmp_path / "version_0", family, model, [random_edit(model, OC_EDITED)], BEFORE, AFTER)
    shutil.rmtree(run / "edited_model")
    with pytest.raises(EditMismatchError, match="does not carry the edit"):
        save_edited_model(family, model, run)  # write_run left it unedited
    assert not (run / "edited_model").exists()
