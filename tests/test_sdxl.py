"""The SDXL target on the stand-in of ``stabilityai/stable-diffusion-xl-base-1.0`` (its layout and
config classes, tiny random weights), through either text encoder: the target contract
(tests/target_contract.py: ``reads`` is exactly what changes what the UNet is fed, the pair
check, the transplant, the saved pipeline (both stored variants of the encoder rewritten), ``slug-pl
transplant`` finding the encoder by itself, the verdict over every judge); and what is SDXL's
own: each encoder refuses the other's CLIP, ``reads`` with clip skip and with the negative prompt
encoded, drawing with clip skip."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from slug_pl.families import HfClip
from slug_pl.targets import StableDiffusionXL, TargetMismatchError
from slug_pl.testing import standins as si
from target_contract import PROMPTS, GenerationContract, assert_reads_is_what_changes

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
    (1, 1, 1.0, True), (1, None, 5.0, False), (1, 1, 5.0, False)])
def test_a_tensor_changes_the_unet_input_if_and_only_if_it_is_read(sdxl, sdxl_encoding_negatives, encoder, clip_skip,
                                                                   guidance, zeros):
    """The contract's check (each CLIP tensor perturbed alone) with clip skip and with the empty
    negative prompt encoded (the contract runs each encoder's default)."""
    target = target_of(sdxl.path if zeros else sdxl_encoding_negatives, encoder, clip_skip=clip_skip, guidance=guidance)
    assert_reads_is_what_changes(target, *clip_of(sdxl, encoder), TestSdxlContract.downstream_output)
    assert not target.reads("text_model.final_layer_norm.weight")  # the states are taken before it


class TestSdxlContract(GenerationContract):
    """The target contract on the stand-in, once through each text encoder."""

    NAME, TOWER = "stable_diffusion_xl", "text"
    READ, ALSO_READ = "text_model.encoder.layers.0.mlp.fc1.weight", "text_model.encoder.layers.0.self_attn.v_proj.weight"
    UNREAD = "vision_model.encoder.layers.0.mlp.fc1.weight"  # text_encoder_2 reads its whole tower

    @pytest.fixture(scope="class", params=[1, 2], ids=["text_encoder", "text_encoder_2"])
    @classmethod
    def encoder(cls, request):
        return request.param

    @pytest.fixture(scope="class")
    @classmethod
    def model_folder(cls, sdxl):
        return sdxl.path

    @pytest.fixture(scope="class")
    @classmethod
    def clip(cls, sdxl, encoder):
        return clip_of(sdxl, encoder)

    @pytest.fixture(scope="class")
    @classmethod
    def make_target(cls, encoder):
        return lambda folder, **kwargs: StableDiffusionXL(
            str(folder), text_encoder=encoder, **({"steps": 1, "progress": False, "device": "cpu"} | kwargs))

    @staticmethod
    def downstream_output(target) -> torch.Tensor:
        adapter = target.adapter
        return unet_input(adapter.pipe, adapter.generation["guidance"], adapter.clip_skip)


def test_sdxl_draws_with_clip_skip_through_diffusers(sdxl):
    """clip_skip reaches diffusers' own SDXL encoding (which handles it next to transformers 5)."""
    plain, skipped = target_of(sdxl.path, 2), target_of(sdxl.path, 2, clip_skip=1)
    a = plain.adapter.draw(["a photo of a cat"], [0], output_type="pt")
    b = skipped.adapter.draw(["a photo of a cat"], [0], output_type="pt")
    assert a.shape == b.shape == (1, 3, 128, 128) and not torch.equal(a, b)
