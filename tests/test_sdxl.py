"""The SDXL target on the stand-in of ``stabilityai/stable-diffusion-xl-base-1.0`` (its layout and
config classes, tiny random weights): either text encoder pairs with its own CLIP and refuses the
other, ``reads`` is exactly what changes what the UNet is fed (the penultimate states of both
encoders and the pooled output of the second, with and without clip skip, with the negative
prompt zeroed or encoded), the transplant changes one tensor of the chosen encoder, the saved
pipeline reloads with the plain ``StableDiffusionXLPipeline`` and differs in that tensor only, and
``slug-pl transplant`` finds the encoder by itself."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import changed_files

from slug_pl.cli import main
from slug_pl.edit import apply_edit, make_edit, revert_edit, save_edits
from slug_pl.families import HfClip
from slug_pl.targets import StableDiffusionXL, TargetMismatchError
from slug_pl.testing import standins as si

PROMPTS = ["a photo of Alice Abara.", "a red apple on a table."]
ENCODERS = {1: si.CLIP_L14, 2: si.CLIP_BIGG14}


@pytest.fixture(scope="module")
def sdxl(standin):
    return standin(si.SDXL)


def target_of(folder, encoder: int, **kwargs) -> StableDiffusionXL:
    target = StableDiffusionXL(str(folder), text_encoder=encoder, **({"steps": 1, "progress": False, "device": "cpu"}
                                                                      | kwargs))
    target.load()
    return target


def clip_of(sdxl, encoder: int):
    family = HfClip(str(sdxl.paired[ENCODERS[encoder]]))
    return family, family.load()


@pytest.mark.parametrize("encoder", [1, 2])
def test_each_encoder_pairs_with_its_own_clip_and_refuses_the_other(sdxl, encoder):
    target = target_of(sdxl.path, encoder)
    target.check_pair(*clip_of(sdxl, encoder))
    with pytest.raises(TargetMismatchError, match=f"text_encoder: {3 - encoder}"):
        target.check_pair(*clip_of(sdxl, 3 - encoder))


def unet_input(pipe, guidance: float, clip_skip: int | None) -> torch.Tensor:
    """Everything SDXL's UNet is fed about the prompts: both encoders' states, the pooled output,
    and the negative prompt's (zeros or encoded) under guidance > 1."""
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=guidance > 1, clip_skip=clip_skip)
    parts = [embeds.flatten(1), pooled] + ([negative.flatten(1), negative_pooled] if guidance > 1 else [])
    return torch.cat(parts, dim=1)


@pytest.fixture(scope="module")
def sdxl_encoding_negatives(sdxl, tmp_path_factory):
    """The stand-in with ``force_zeros_for_empty_prompt`` false: the empty negative prompt is encoded."""
    folder = tmp_path_factory.mktemp("sdxl") / "pipe"
    shutil.copytree(sdxl.path, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(index | {"force_zeros_for_empty_prompt": False}))
    return folder


@pytest.mark.parametrize("encoder, clip_skip, guidance, zeros", [
    (1, None, 5.0, True), (2, None, 5.0, True), (1, 1, 1.0, True), (1, None, 5.0, False), (1, 1, 5.0, False)])
def test_a_tensor_changes_the_unet_input_if_and_only_if_it_is_read(sdxl, sdxl_encoding_negatives, encoder, clip_skip,
                                                                   guidance, zeros):
    """Perturb each CLIP tensor alone, mirror it into the pipeline and compare what the UNet is fed."""
    folder = sdxl.path if zeros else sdxl_encoding_negatives
    target = target_of(folder, encoder, clip_skip=clip_skip, guidance=guidance)
    family, model = clip_of(sdxl, encoder)
    target.check_pair(family, model)
    pipe = target.adapter.pipe
    reference = unet_input(pipe, guidance, clip_skip)
    gen = torch.Generator().manual_seed(0)
    for name, param in model.named_parameters():
        edit = make_edit(model, name, torch.randn(param.shape, generator=gen), 0.5)
        apply_edit(model, edit)
        target.adapter.mirror(model)
        changed = not torch.equal(unet_input(pipe, guidance, clip_skip), reference)
        revert_edit(model, edit)
        target.adapter.mirror(model)
        assert changed == target.reads(name), (name, encoder, clip_skip, guidance, zeros)
    # the other encoder is never touched
    other = "text_encoder_2" if encoder == 1 else "text_encoder"
    assert target.adapter.encoder != other


@pytest.mark.parametrize("encoder", [1, 2])
def test_transplant_and_the_saved_pipeline_change_one_tensor_of_the_chosen_encoder(sdxl, encoder, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    target = target_of(sdxl.path, encoder)
    family, model = clip_of(sdxl, encoder)
    target.check_pair(family, model)
    name = "text_model.encoder.layers.0.mlp.fc1.weight"
    edit = make_edit(model, name, torch.randn(model.get_parameter(name).shape, generator=torch.Generator().manual_seed(1)),
                     0.5)
    apply_edit(model, edit)
    changed = target.transplant(model, [edit])
    saved = target.save_pretrained(tmp_path / "edited")
    revert_edit(model, edit)
    subfolder = target.adapter.encoder
    # the edited tensor is rewritten in every stored variant of the encoder, nothing else changes
    assert sorted(str(f) for f in changed_files(sdxl.path, saved)) == [f"{subfolder}/model.fp16.safetensors",
                                                                       f"{subfolder}/model.safetensors"]
    original = StableDiffusionXLPipeline.from_pretrained(sdxl.path)
    reloaded = StableDiffusionXLPipeline.from_pretrained(saved)
    differs = [f"{part}.{n}" for part in ("text_encoder", "text_encoder_2", "unet")
               for n, p in getattr(reloaded, part).named_parameters()
               if not torch.equal(p, getattr(original, part).get_parameter(n))]
    assert differs == [f"{subfolder}.{changed[0]}"]
    assert torch.equal(getattr(reloaded, subfolder).get_parameter(changed[0]), edit.edited)

    # offline, from the edit file: slug-pl transplant finds the encoder the edit belongs to
    save_edits(tmp_path / "edit.safetensors", [edit], {"model": family.describe()})
    out = tmp_path / "by_command"
    assert main(["transplant", "--into", str(sdxl.path), "--edit", str(tmp_path / "edit.safetensors"),
                 "--out", str(out)]) == 0
    assert changed_files(saved, out) == []


def test_sdxl_draws_with_clip_skip_through_diffusers(sdxl):
    """clip_skip reaches diffusers' own SDXL encoding (which handles it next to transformers 5)."""
    plain, skipped = target_of(sdxl.path, 2), target_of(sdxl.path, 2, clip_skip=1)
    a = plain.adapter.draw(["a photo of a cat"], [0], output_type="pt")
    b = skipped.adapter.draw(["a photo of a cat"], [0], output_type="pt")
    assert a.shape == b.shape == (1, 3, 128, 128) and not torch.equal(a, b)
