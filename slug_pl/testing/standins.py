"""Tiny random stand-ins of the Hugging Face hub repositories the recipes name, in the
repositories' own folder layouts.

Each builder writes one folder whose file names, sub-folders, ``model_index.json`` /
``config.json`` classes and keys are those of the real repository, with the sizes shrunk (widths
16-64, 1-3 layers, images of 32-128 pixels) and random weights, stored as the repository stores
them: safetensors under the hub's tensor names (:mod:`slug_pl.testing.hub_files`), with the
``fp16`` variant files where the repository has them, and in shards with an index where it is
sharded. The same classes that load the real repository load the stand-in, offline.

A model that embeds a CLIP is built *from* a stand-in of that CLIP and shares its tensors bit for
bit, as the real pair does (Stable Diffusion's text encoder is a CLIP's text tower, LLaVA's vision
tower a CLIP's vision tower). :class:`StandIn` names the paired CLIP folders by repository.

Repositories (:data:`BUILDERS`):

- ``stable-diffusion-v1-5/stable-diffusion-v1-5``: :func:`stable_diffusion_v1_5`;
- ``stabilityai/stable-diffusion-2-1``: :func:`stable_diffusion_2_1`;
- ``stabilityai/stable-diffusion-xl-base-1.0``: :func:`stable_diffusion_xl_base`;
- ``llava-hf/llava-1.5-7b-hf``: :func:`llava_1_5`;
- ``llava-hf/llava-v1.6-mistral-7b-hf``: :func:`llava_next_mistral`;
- the CLIPs they pair with, in Hugging Face format: :func:`clip_vit_large_patch14`,
  :func:`clip_vit_large_patch14_336`, :func:`clip_vit_h14_laion`, :func:`clip_vit_bigg14_laion`;
- open_clip as a user gets it: :func:`open_clip_vit_b32_laion` (the hub folder
  ``open_clip_config.json`` + ``open_clip_model.safetensors``, read with ``local-dir:``) and
  :func:`open_clip_checkpoint_file` (that checkpoint alone, given as ``pretrained=`` with a
  registered model config);
- UnlearnCanvas's released checkpoints: :func:`unlearncanvas`;
- pipelines the project does not support, only their configs: :func:`stable_diffusion_3_medium`,
  :func:`flux_1_dev`.

Each builder takes the parent folder ``out`` and writes ``out/<owner>--<name>`` (complete or
absent: written under a temporary name and renamed); a folder already there is reused, so the
pipelines that embed one CLIP share a single stand-in of it. ViT-B/32, Stable Diffusion 1.5 and
LLaVA-1.5 (with their CLIPs) can also be built at the real repositories' shapes, random weights
still (:class:`Sizes`, :data:`REAL_SIZES`), for benchmarks of whole runs. Command line::

    python -m slug_pl.testing.standins OUT_DIR [REPO_ID ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from slug_pl.atomic import atomic_folder
from slug_pl.testing.hub_files import (
    half,
    renamed,
    write_clip_tokenizer_files,
    write_json,
    write_shards,
    write_weights,
)

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SD21 = "stabilityai/stable-diffusion-2-1"
SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
SD3 = "stabilityai/stable-diffusion-3-medium-diffusers"
FLUX = "black-forest-labs/FLUX.1-dev"
LLAVA15 = "llava-hf/llava-1.5-7b-hf"
LLAVA_NEXT = "llava-hf/llava-v1.6-mistral-7b-hf"
CLIP_L14 = "openai/clip-vit-large-patch14"
CLIP_L14_336 = "openai/clip-vit-large-patch14-336"
CLIP_H14 = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
CLIP_BIGG14 = "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"
OPEN_CLIP_B32 = "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"
UNLEARNCANVAS = "OPTML-Group/UnlearnCanvas"

#: OpenAI's CLIP normalization, in every CLIP image processor and feature extractor here.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
#: The special ids of the transformers 4 CLIP configs on the hub (OpenAI's and LAION's): not the
#: tokenizer's 49406 / 49407, which is why CLIPTextModel pools at the largest id for them.
HUB_CLIP_IDS = {"bos_token_id": 0, "pad_token_id": 1, "eos_token_id": 2}


@dataclass(frozen=True)
class StandIn:
    """A built stand-in: its repository id, its folder (or file), the folders of the CLIPs it
    embeds by repository id, and other named paths (e.g. an open_clip model config)."""

    repo_id: str
    path: Path
    paired: Mapping[str, Path] = field(default_factory=dict)
    extras: Mapping[str, Path] = field(default_factory=dict)

    @property
    def clip(self) -> Path | None:
        """The paired CLIP folder (the first, for a pipeline that embeds two)."""
        return next(iter(self.paired.values()), None)


def folder_name(repo_id: str) -> str:
    """``owner/name`` -> ``owner--name`` (the hub cache's spelling)."""
    return repo_id.replace("/", "--")


def _seed(repo_id: str) -> None:
    """Seed torch from the repository id: every build of a stand-in has the same weights."""
    torch.manual_seed(zlib.crc32(repo_id.encode()))


def _build_once(out: str | Path, repo_id: str, write: Callable[[Path], None]) -> Path:
    """``out/<owner>--<name>``: written by ``write(tmp)`` under a temporary name and renamed into
    place, or reused when it is already there."""
    folder = Path(out) / folder_name(repo_id)
    if not folder.is_dir():
        _seed(repo_id)
        with atomic_folder(folder) as tmp:
            write(tmp)
    return folder


def _eager(config):
    """``config`` with the eager attention: transformers 5 refuses to build
    ``StableDiffusionSafetyChecker`` with its default (SDPA)."""
    config._attn_implementation = "eager"
    return config


def _image_processor_config(size: int, feature_extractor: bool = True, **extra) -> dict:
    """A ``preprocessor_config.json`` of a CLIP image processor for ``size``-pixel images, in the
    hub's form (the ``CLIPFeatureExtractor`` name the old repositories still carry)."""
    record = {"crop_size": {"height": size, "width": size}, "do_center_crop": True, "do_convert_rgb": True,
              "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": CLIP_MEAN,
              "image_processor_type": "CLIPImageProcessor", "image_std": CLIP_STD, "resample": 3,
              "rescale_factor": 1 / 255, "size": {"shortest_edge": size}}
    if feature_extractor:
        record["feature_extractor_type"] = "CLIPFeatureExtractor"
    return record | extra


# =============================================================================================
# CLIPs in Hugging Face format
# =============================================================================================


@dataclass(frozen=True)
class ClipShape:
    """A stand-in CLIP's shape: the real repository's activation, the shrunk sizes (or, in
    :data:`REAL_SIZES`, the real ones)."""

    hidden_act: str
    text_layers: int
    text_width: int = 32
    vision_layers: int = 2
    vision_width: int = 32
    image_size: int = 32
    patch_size: int = 8
    projection_dim: int = 16
    tokenizer_pad: str = "<|endoftext|>"
    shards: int = 0
    text_heads: int = 2
    vision_heads: int = 2
    #: the MLP's width as a multiple of the tower's (the real CLIPs': 4)
    mlp_ratio: int = 2


def clip_config(shape: ClipShape):
    """The stand-in's ``CLIPConfig`` (77 text positions and the full 49408-token vocabulary: the
    real tokenizer's ids must all embed)."""
    from transformers import CLIPConfig

    text = {"hidden_size": shape.text_width, "intermediate_size": shape.mlp_ratio * shape.text_width,
            "num_hidden_layers": shape.text_layers, "num_attention_heads": shape.text_heads,
            "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": shape.hidden_act,
            "projection_dim": shape.projection_dim, **HUB_CLIP_IDS}
    vision = {"hidden_size": shape.vision_width, "intermediate_size": shape.mlp_ratio * shape.vision_width,
              "num_hidden_layers": shape.vision_layers, "num_attention_heads": shape.vision_heads,
              "image_size": shape.image_size, "patch_size": shape.patch_size, "hidden_act": shape.hidden_act,
              "projection_dim": shape.projection_dim}
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=shape.projection_dim)


def _clip_folder(out, repo_id: str, shape: ClipShape) -> Path:
    """A ``CLIPModel`` repository: ``config.json``, ``model.safetensors`` (or shards with
    ``model.safetensors.index.json``), ``preprocessor_config.json`` and the tokenizer files
    (``vocab.json``, ``merges.txt``, ``tokenizer.json``, ``tokenizer_config.json``,
    ``special_tokens_map.json``). A ``CLIPModel``'s tensor names are the same in transformers 4
    and 5 (``text_model.*``, ``vision_model.*``, the projections, ``logit_scale``)."""
    from transformers import CLIPModel

    def write(folder: Path) -> None:
        config = clip_config(shape)
        model = CLIPModel(config)
        config.save_pretrained(folder)
        if shape.shards:
            write_shards(model.state_dict(), folder, shape.shards)
        else:
            write_weights(model.state_dict(), folder, "model")
        write_json(folder / "preprocessor_config.json", _image_processor_config(shape.image_size))
        write_clip_tokenizer_files(folder, pad_token=shape.tokenizer_pad)

    return _build_once(out, repo_id, write)


#: Stable Diffusion 1.x's CLIP (ViT-L/14: 12 text layers of width 768, quick GELU).
CLIP_L14_SHAPE = ClipShape(hidden_act="quick_gelu", text_layers=2)
#: LLaVA-1.5's CLIP: ViT-L/14 at 336 pixels (24 x 24 patches); here 48 pixels, 6 x 6 patches.
CLIP_L14_336_SHAPE = ClipShape(hidden_act="quick_gelu", text_layers=2, image_size=48)
#: Stable Diffusion 2.x's CLIP (OpenCLIP ViT-H/14: 24 text layers, GELU; pads with ``!``). Three
#: layers, so that the pipeline's encoder, one layer shorter, keeps two.
CLIP_H14_SHAPE = ClipShape(hidden_act="gelu", text_layers=3, tokenizer_pad="!")
#: SDXL's second CLIP (OpenCLIP ViT-bigG/14: 32 text layers of width 1280, GELU; sharded on the hub).
CLIP_BIGG14_SHAPE = ClipShape(hidden_act="gelu", text_layers=2, text_width=48, projection_dim=32,
                              tokenizer_pad="!", shards=2)
#: Stable Diffusion 1.5's safety checker (a CLIP ViT-L/14 vision tower and its projection).
SAFETY_CHECKER_SHAPE = ClipShape(hidden_act="quick_gelu", text_layers=1, image_size=32)
#: The stand-in of ViT-B/32's open_clip model config (the real: width 768 / 512, 12 layers each,
#: 224-pixel images in 32-pixel patches, 77 text positions, embedding 512).
OPEN_CLIP_B32_CFG = {"embed_dim": 16,
                     "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 16},
                     "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


@dataclass(frozen=True)
class Sizes:
    """The sizes of the stand-ins that come in two: :func:`open_clip_vit_b32_laion`,
    :func:`stable_diffusion_v1_5` and :func:`llava_1_5` with the CLIPs they embed
    (:func:`clip_vit_large_patch14`, :func:`clip_vit_large_patch14_336`).

    :data:`TINY_SIZES` (the default) builds them in seconds on a CPU. :data:`REAL_SIZES` holds the
    real repositories' configs: the same folders at the real shapes, with random weights, for
    measuring speed and memory (``benchmarks/real_shape_runs.py``). Built inside ``with
    torch.device("cuda")`` they are made on the GPU; on disk ViT-B/32 takes 0.6 GB, SD 1.5 with
    its CLIP 6 GB, LLaVA-1.5-7B with its CLIP 15 GB.
    """

    clip_l14: ClipShape
    clip_l14_336: ClipShape
    #: ``UNet2DConditionModel`` arguments (its cross-attention width is the text encoder's)
    sd15_unet: Mapping[str, object]
    #: ``AutoencoderKL`` arguments
    sd15_vae: Mapping[str, object]
    sd15_safety_checker: ClipShape
    #: LLaVA's ``text_config`` (the language model), as its ``config.json`` holds it
    llava15_text: Mapping[str, object]
    #: open_clip's ``model_cfg``
    open_clip_b32: Mapping[str, object]
    #: write the ``fp16`` variant files where the repository has them (no loader here reads them)
    fp16_variants: bool = True


_CROSS_ATTN_DOWN, _CROSS_ATTN_UP = "CrossAttnDownBlock2D", "CrossAttnUpBlock2D"

TINY_SIZES = Sizes(
    clip_l14=CLIP_L14_SHAPE, clip_l14_336=CLIP_L14_336_SHAPE,
    sd15_unet={"sample_size": 8, "attention_head_dim": 8, "down_block_types": (_CROSS_ATTN_DOWN, "DownBlock2D"),
               "up_block_types": ("UpBlock2D", _CROSS_ATTN_UP)},
    sd15_vae={"sample_size": 64}, sd15_safety_checker=SAFETY_CHECKER_SHAPE,
    llava15_text={"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
                  "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
                  "max_position_embeddings": 256},
    open_clip_b32=OPEN_CLIP_B32_CFG)

#: OpenAI's CLIP ViT-L/14 (``openai/clip-vit-large-patch14``'s ``config.json``): 428 M parameters.
_REAL_CLIP_L14 = ClipShape(hidden_act="quick_gelu", text_layers=12, text_width=768, text_heads=12, vision_layers=24,
                           vision_width=1024, vision_heads=16, image_size=224, patch_size=14, projection_dim=768,
                           mlp_ratio=4)
REAL_SIZES = Sizes(
    clip_l14=_REAL_CLIP_L14,
    clip_l14_336=replace(_REAL_CLIP_L14, image_size=336),
    # stable-diffusion-v1-5's unet/config.json (860 M parameters) and vae/config.json (84 M)
    sd15_unet={"sample_size": 64, "attention_head_dim": 8, "block_out_channels": (320, 640, 1280, 1280),
               "layers_per_block": 2, "norm_num_groups": 32,
               "down_block_types": (_CROSS_ATTN_DOWN,) * 3 + ("DownBlock2D",),
               "up_block_types": ("UpBlock2D",) + (_CROSS_ATTN_UP,) * 3},
    sd15_vae={"sample_size": 512, "block_out_channels": (128, 256, 512, 512), "layers_per_block": 2,
              "norm_num_groups": 32},
    sd15_safety_checker=_REAL_CLIP_L14,
    # llava-1.5-7b-hf's text_config: Vicuna-7B (Llama 2's shapes, 6.7 B parameters)
    llava15_text={"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
                  "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
                  "num_key_value_heads": 32, "max_position_embeddings": 4096, "vocab_size": 32064},
    # open_clip's model_configs/ViT-B-32.json (151 M parameters)
    open_clip_b32={"embed_dim": 512, "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32},
                   "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}},
    fp16_variants=False)


def clip_vit_large_patch14(out, sizes: Sizes = TINY_SIZES) -> StandIn:
    """``openai/clip-vit-large-patch14``: the CLIP whose text tower is Stable Diffusion 1.x's and
    SDXL's first text encoder. The real repository also holds ``pytorch_model.bin``,
    ``tf_model.h5`` and ``flax_model.msgpack``, which no loader here reads."""
    return StandIn(CLIP_L14, _clip_folder(out, CLIP_L14, sizes.clip_l14))


def clip_vit_large_patch14_336(out, sizes: Sizes = TINY_SIZES) -> StandIn:
    """``openai/clip-vit-large-patch14-336``: LLaVA-1.5's vision tower."""
    return StandIn(CLIP_L14_336, _clip_folder(out, CLIP_L14_336, sizes.clip_l14_336))


def clip_vit_h14_laion(out) -> StandIn:
    """``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` in its Hugging Face files (the repository also
    holds the open_clip files, ``open_clip_config.json`` and ``open_clip_model.safetensors``)."""
    return StandIn(CLIP_H14, _clip_folder(out, CLIP_H14, CLIP_H14_SHAPE))


def clip_vit_bigg14_laion(out) -> StandIn:
    """``laion/CLIP-ViT-bigG-14-laion2B-39B-b160k`` in its Hugging Face files, sharded."""
    return StandIn(CLIP_BIGG14, _clip_folder(out, CLIP_BIGG14, CLIP_BIGG14_SHAPE))


def _clip_state(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a stand-in CLIP folder (one file or shards), under the hub's names."""
    from safetensors.torch import load_file

    return {name: t for file in sorted(folder.glob("model*.safetensors")) for name, t in load_file(str(file)).items()}


# =============================================================================================
# Stable Diffusion pipelines
# =============================================================================================

#: ``scheduler/scheduler_config.json`` of Stable Diffusion 1.5 (PNDM, as the repository has it).
SD15_SCHEDULER = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
                  "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
                  "steps_offset": 1, "trained_betas": None}
#: Stable Diffusion 2.1's: DDIM with ``v_prediction`` (the 768 model predicts velocity).
SD21_SCHEDULER = {"_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
                  "num_train_timesteps": 1000, "prediction_type": "v_prediction", "set_alpha_to_one": False,
                  "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}
#: SDXL base 1.0's: Euler, leading timestep spacing.
SDXL_SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0",
                  "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                  "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
                  "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False,
                  "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading",
                  "trained_betas": None, "use_karras_sigmas": False}


def _vae(sample_size: int, **extra):
    """A 4-level ``AutoencoderKL`` like every Stable Diffusion VAE (latents 8x smaller than the
    image, 4 channels), 8-16 channels wide unless ``extra`` says otherwise."""
    from diffusers import AutoencoderKL

    tiny = {"block_out_channels": (8, 8, 16, 16), "layers_per_block": 1, "norm_num_groups": 4}
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         sample_size=sample_size, **(tiny | extra))


def _unet(**config):
    """A ``UNet2DConditionModel`` with the real model's settings passed in ``config``; unless it
    says otherwise, two levels (16 and 32 channels, one block per level)."""
    from diffusers import UNet2DConditionModel

    tiny = {"block_out_channels": (16, 32), "layers_per_block": 1, "norm_num_groups": 8}
    return UNet2DConditionModel(in_channels=4, out_channels=4, **(tiny | config))


def _write_diffusers_model(model, folder: Path, fp16: bool) -> None:
    model.save_config(folder)
    write_weights(model.state_dict(), folder, "diffusion_pytorch_model", fp16_variant=fp16)


def _write_text_encoder(folder: Path, clip_folder: Path, architecture: str, layers: int | None,
                        projection: bool, fp16: bool) -> None:
    """A pipeline's text encoder cut from the CLIP at ``clip_folder``: its ``text_model.*``
    tensors (the first ``layers`` layers; None: all) and, with ``projection``,
    ``text_projection.weight`` (``CLIPTextModelWithProjection``), under the CLIP's own names,
    which are the hub checkpoints' names for these classes too."""
    from transformers import CLIPConfig, CLIPTextConfig

    clip = CLIPConfig.from_pretrained(clip_folder)
    text = clip.text_config.to_dict()
    total = text["num_hidden_layers"]
    keep = total if layers is None else layers
    dropped = tuple(f"text_model.encoder.layers.{i}." for i in range(keep, total))
    state = {name: t for name, t in _clip_state(clip_folder).items()
             if (name.startswith("text_model.") and not name.startswith(dropped))
             or (projection and name == "text_projection.weight")}
    config = CLIPTextConfig(**{**text, "num_hidden_layers": keep})
    config.architectures = [architecture]
    config.save_pretrained(folder)
    write_weights(state, folder, "model", fp16_variant=fp16)


def _write_safety_checker(folder: Path, fp16: bool, shape: ClipShape = SAFETY_CHECKER_SHAPE) -> None:
    """``safety_checker/``: a ``StableDiffusionSafetyChecker`` (a CLIP vision tower, its projection
    and the concept embeddings). The hub checkpoint nests the vision tower twice
    (``vision_model.vision_model.*``, transformers 4's ``CLIPVisionModel`` inside the checker)."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    config = _eager(clip_config(shape))
    checker = StableDiffusionSafetyChecker(config)
    config.architectures = ["StableDiffusionSafetyChecker"]
    config.save_pretrained(folder)
    state = renamed(checker.state_dict(), [("vision_model.", "vision_model.vision_model.")])
    write_weights(state, folder, "model", fp16_variant=fp16)


def _sd_pipeline_writer(*, model_index: dict, scheduler: dict, text_encoders: dict, tokenizer_pads: dict,
                        unet, vae, safety_checker: bool, fp16: bool,
                        safety_checker_shape: ClipShape = SAFETY_CHECKER_SHAPE) -> Callable[[Path], None]:
    """What writes a Stable Diffusion folder: ``model_index.json``, ``scheduler/``, each text encoder
    (``name -> (clip folder, architecture, layers, projection)``), each ``tokenizer*`` folder
    (``name -> pad token``), ``unet/``, ``vae/``, and ``safety_checker/`` + ``feature_extractor/``
    when ``safety_checker``."""

    def write(folder: Path) -> None:
        write_json(folder / "model_index.json", model_index)
        write_json(folder / "scheduler" / "scheduler_config.json", scheduler)
        for name, (clip_folder, architecture, layers, projection) in text_encoders.items():
            _write_text_encoder(folder / name, clip_folder, architecture, layers, projection, fp16)
        for name, pad in tokenizer_pads.items():
            write_clip_tokenizer_files(folder / name, pad_token=pad, tokenizer_json=False)
        _write_diffusers_model(unet, folder / "unet", fp16)
        _write_diffusers_model(vae, folder / "vae", fp16)
        if safety_checker:
            _write_safety_checker(folder / "safety_checker", fp16, safety_checker_shape)
            write_json(folder / "feature_extractor" / "preprocessor_config.json",
                       _image_processor_config(safety_checker_shape.image_size))

    return write


def _sd15_model_index(diffusers_version: str = "0.6.0") -> dict:
    return {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers_version,
            "feature_extractor": ["transformers", "CLIPImageProcessor"],
            "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
            "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"]}


def _sd15_writer(clip: Path, fp16: bool, diffusers_version: str,
                 sizes: Sizes = TINY_SIZES) -> Callable[[Path], None]:
    """Stable Diffusion 1.5's folder at ``sizes``, embedding the CLIP at ``clip`` (see
    :func:`stable_diffusion_v1_5`); the UNet and the VAE are made when it is written."""

    def write(folder: Path) -> None:
        width = json.loads((clip / "config.json").read_text())["text_config"]["hidden_size"]
        _sd_pipeline_writer(
            model_index=_sd15_model_index(diffusers_version), scheduler=SD15_SCHEDULER,
            text_encoders={"text_encoder": (clip, "CLIPTextModel", None, False)},
            tokenizer_pads={"tokenizer": "<|endoftext|>"}, unet=_unet(cross_attention_dim=width, **sizes.sd15_unet),
            vae=_vae(**sizes.sd15_vae), safety_checker=True, fp16=fp16,
            safety_checker_shape=sizes.sd15_safety_checker)(folder)

    return write


def stable_diffusion_v1_5(out, sizes: Sizes = TINY_SIZES) -> StandIn:
    """``stable-diffusion-v1-5/stable-diffusion-v1-5`` (the copy of ``runwayml/stable-diffusion-v1-5``):
    ``StableDiffusionPipeline`` with ``safety_checker/`` (``StableDiffusionSafetyChecker``) and
    ``feature_extractor/`` (``CLIPImageProcessor``), the PNDM scheduler config of the repository,
    ``text_encoder/`` = the text tower of :func:`clip_vit_large_patch14` (shared bit for bit),
    ``tokenizer/`` (``vocab.json``, ``merges.txt``, ``tokenizer_config.json``,
    ``special_tokens_map.json``), ``unet/`` and ``vae/``; every weight file also as its
    ``fp16`` variant. Images are 64 pixels (UNet ``sample_size`` 8, the real 64; with
    :data:`REAL_SIZES` 512, and no ``fp16`` variants). The real
    repository also holds the single-file checkpoints (``v1-5-pruned*.ckpt`` / ``.safetensors``),
    ``.bin`` duplicates and ``unet/diffusion_pytorch_model.non_ema.*``, which no loader reads."""
    clip = clip_vit_large_patch14(out, sizes).path
    writer = _sd15_writer(clip, fp16=sizes.fp16_variants, diffusers_version="0.6.0", sizes=sizes)
    return StandIn(SD15, _build_once(out, SD15, writer), {CLIP_L14: clip})


def stable_diffusion_2_1(out) -> StandIn:
    """``stabilityai/stable-diffusion-2-1``: the 768-pixel v-prediction model. ``model_index.json``
    has no safety checker (``[null, null]``, ``requires_safety_checker: false``) but still a
    ``feature_extractor/``; the scheduler is DDIM with ``prediction_type: v_prediction``; the UNet
    uses linear projections and upcast attention with per-level head counts; ``sample_size`` 12
    (the real 96: 1.5 x Stable Diffusion 1.5's). The text encoder is
    :func:`clip_vit_h14_laion`'s text tower **without its last layer** (the real one keeps 23 of
    ViT-H/14's 24: 2.x conditions on the penultimate layer) with the CLIP's final layer norm; its
    tokenizer pads with ``!``. Weights also as ``fp16`` variants."""
    clip = clip_vit_h14_laion(out).path
    width = json.loads((clip / "config.json").read_text())["text_config"]["hidden_size"]
    layers = CLIP_H14_SHAPE.text_layers - 1
    model_index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.10.0.dev0",
                   "feature_extractor": ["transformers", "CLIPImageProcessor"], "requires_safety_checker": False,
                   "safety_checker": [None, None], "scheduler": ["diffusers", "DDIMScheduler"],
                   "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
                   "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    unet = _unet(sample_size=12, attention_head_dim=(2, 4), cross_attention_dim=width, use_linear_projection=True,
                 upcast_attention=True, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    base = _sd_pipeline_writer(
        model_index=model_index, scheduler=SD21_SCHEDULER,
        text_encoders={"text_encoder": (clip, "CLIPTextModel", layers, False)},
        tokenizer_pads={"tokenizer": "!"}, unet=unet, vae=_vae(96), safety_checker=False, fp16=True)

    def write(folder: Path) -> None:
        base(folder)
        write_json(folder / "feature_extractor" / "preprocessor_config.json", _image_processor_config(32))

    return StandIn(SD21, _build_once(out, SD21, write), {CLIP_H14: clip})


#: SDXL's UNet adds 6 size/crop numbers, each embedded in this many dimensions (the real 256).
SDXL_TIME_EMBED_DIM = 8


def stable_diffusion_xl_base(out) -> StandIn:
    """``stabilityai/stable-diffusion-xl-base-1.0``: ``StableDiffusionXLPipeline`` with
    ``text_encoder/`` (``CLIPTextModel``, :func:`clip_vit_large_patch14`'s text tower) and
    ``text_encoder_2/`` (``CLIPTextModelWithProjection``, :func:`clip_vit_bigg14_laion`'s text
    tower and text projection), ``tokenizer/`` and ``tokenizer_2/`` (the second pads with ``!``),
    the Euler scheduler, ``force_zeros_for_empty_prompt``, and a UNet conditioned on both
    encoders' states side by side (``cross_attention_dim`` = the two widths summed) and on
    ``addition_embed_type: text_time`` (``projection_class_embeddings_input_dim`` = the second
    encoder's projection + 6 x ``addition_time_embed_dim``, the real 1280 + 6 x 256 = 2816).
    ``sample_size`` 16 (the real 128). Weights also as ``fp16`` variants. The real repository
    also holds ``sd_xl_base_1.0*.safetensors``, ``vae_1_0/``, ONNX and OpenVINO exports and
    Flax weights, which no loader reads."""
    clip_l = clip_vit_large_patch14(out).path
    clip_g = clip_vit_bigg14_laion(out).path
    model_index = {"_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.19.0.dev0",
                   "force_zeros_for_empty_prompt": True, "add_watermarker": None,
                   "scheduler": ["diffusers", "EulerDiscreteScheduler"],
                   "text_encoder": ["transformers", "CLIPTextModel"],
                   "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                   "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
                   "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    unet = _unet(sample_size=16, attention_head_dim=(2, 4), use_linear_projection=True,
                 cross_attention_dim=CLIP_L14_SHAPE.text_width + CLIP_BIGG14_SHAPE.text_width,
                 transformer_layers_per_block=(1, 2), addition_embed_type="text_time",
                 addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
                 projection_class_embeddings_input_dim=CLIP_BIGG14_SHAPE.projection_dim + 6 * SDXL_TIME_EMBED_DIM,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    write = _sd_pipeline_writer(
        model_index=model_index, scheduler=SDXL_SCHEDULER,
        text_encoders={"text_encoder": (clip_l, "CLIPTextModel", None, False),
                       "text_encoder_2": (clip_g, "CLIPTextModelWithProjection", None, True)},
        tokenizer_pads={"tokenizer": "<|endoftext|>", "tokenizer_2": "!"}, unet=unet,
        vae=_vae(128, scaling_factor=0.13025, force_upcast=True), safety_checker=False, fp16=True)
    return StandIn(SDXL, _build_once(out, SDXL, write), {CLIP_L14: clip_l, CLIP_BIGG14: clip_g})


# =============================================================================================
# LLaVA
# =============================================================================================

#: ``chat_template.json`` of ``llava-hf/llava-1.5-7b-hf``: ``USER: <image>\n{text} ASSISTANT:``.
LLAVA15_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != "
    "'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
#: A chat template in the form of ``llava-hf/llava-v1.6-mistral-7b-hf``'s: Mistral's
#: ``[INST] <image>\n{text} [/INST]``.
LLAVA_NEXT_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ '<<SYS>>\n' + message['content'][0]"
    "['text'] + '\n<</SYS>>\n\n' }}{% elif message['role'] == 'user' %}{{ '[INST] ' }}{# Render all images "
    "first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}"
    "{% endfor %}{# Render all text next #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'text') %}{{ content['text'] }}{% endfor %}{{' [/INST]' }}{% elif message['role'] == "
    "'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ ' ' + content['text'] + '</s> '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}")
#: Text the LLaVA stand-ins' byte-level BPE is trained on (their real tokenizers are Llama's and
#: Mistral's SentencePiece vocabularies of 32000 tokens).
_LLAVA_TOKENIZER_TEXT = ["USER: ASSISTANT: [INST] [/INST] What is shown in this image? Who is this person?",
                         "This is a photo of a person, a cat, a dog, a teapot. Answer with a name."]
#: The language models' vocabulary is the tokenizer's rounded up to this (the real 32064 holds
#: Llama's 32000, ``<image>``, ``<pad>`` and padding to a multiple of 64).
_VOCAB_MULTIPLE = 64
#: transformers 5 LLaVA names -> the hub checkpoints' (transformers 4) names.
_LLAVA_HUB_NAMES = [("model.vision_tower.", "vision_tower.vision_model."),
                    ("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                    ("model.multi_modal_projector.", "multi_modal_projector."),
                    ("model.image_newline", "image_newline")]


def _llava_tokenizer(folder: Path):
    """A byte-level BPE with LLaVA's special tokens (``<s>``, ``</s>``, ``<pad>``, ``<image>``),
    saved in ``folder`` with the hub repository's ``special_tokens_map.json`` and
    ``added_tokens.json`` beside ``tokenizer.json`` / ``tokenizer_config.json``. The real
    repositories also hold the SentencePiece ``tokenizer.model``, which the fast tokenizer does
    not read when ``tokenizer.json`` is there."""
    from slug_pl.demo.llava import bpe_tokenizer

    tokenizer = bpe_tokenizer(_LLAVA_TOKENIZER_TEXT, vocab_size=300)
    tokenizer.add_special_tokens({"unk_token": "<unk>"})
    tokenizer.save_pretrained(folder)
    write_json(folder / "special_tokens_map.json",
               {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"})
    write_json(folder / "added_tokens.json",
               {token: tokenizer.convert_tokens_to_ids(token) for token in ("<image>", "<pad>")})
    return tokenizer


def _vocab_size(tokenizer) -> int:
    return -(-len(tokenizer) // _VOCAB_MULTIPLE) * _VOCAB_MULTIPLE


def _write_llava_weights(model, folder: Path, clip_folder: Path, shards: int) -> None:
    """Load the CLIP's vision tower into ``model`` (bit for bit), then write the model in
    ``shards`` float16 files under the hub's transformers 4 names (the LLaVA repositories hold
    float16 weights, and their ``config.json`` says so: transformers 5 loads them as float16
    unless told otherwise; the float32 CLIP's tower is in them rounded to float16)."""
    vision = {name[len("vision_model."):]: t for name, t in _clip_state(clip_folder).items()
              if name.startswith("vision_model.")}
    model.model.vision_tower.load_state_dict(vision)
    write_shards(half(renamed(model.state_dict(), _LLAVA_HUB_NAMES)), folder, shards)


def _vision_config_record(clip_folder: Path) -> dict:
    """The ``vision_config`` a LLaVA ``config.json`` holds: the CLIP vision tower's sizes."""
    vision = json.loads((clip_folder / "config.json").read_text())["vision_config"]
    keys = ("hidden_size", "image_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
            "patch_size", "projection_dim", "hidden_act")
    return {"model_type": "clip_vision_model", **{k: vision[k] for k in keys}}


def _llava_writer(clip: Path, *, architecture: str, model_type: str, language_model: dict, shards: int,
                  processor_class: str, chat_template: str, config_extra: Mapping = {},
                  image_processor_extra: Mapping = {}) -> Callable[[Path], None]:
    """What writes a LLaVA repository around the CLIP at ``clip``: the tokenizer files,
    ``config.json`` in the hub's transformers 4 form (``image_token_index``, a partial
    ``text_config`` = ``language_model`` with the vocabulary, the CLIP's ``vision_config``, features
    at ``vision_feature_layer: -2`` with the ``default`` strategy, float16),
    ``generation_config.json``, the weights in ``shards`` float16 files
    (:func:`_write_llava_weights`), ``preprocessor_config.json``, ``processor_config.json`` and
    ``chat_template.json``. ``config_extra`` / ``image_processor_extra``: the keys LLaVA-NeXT adds
    to ``config.json`` / ``preprocessor_config.json``."""

    def write(folder: Path) -> None:
        import transformers

        tokenizer = _llava_tokenizer(folder)
        vision = _vision_config_record(clip)
        size, vocab = vision["image_size"], language_model.get("vocab_size", _vocab_size(tokenizer))
        record = {"architectures": [architecture], "ignore_index": -100,
                  "image_token_index": tokenizer.convert_tokens_to_ids("<image>"), "model_type": model_type,
                  "pad_token_id": tokenizer.pad_token_id, "projector_hidden_act": "gelu",
                  "tie_word_embeddings": False, "torch_dtype": "float16",
                  "text_config": {**language_model, "rms_norm_eps": 1e-05, "torch_dtype": "float16",
                                  "vocab_size": vocab},
                  "vision_config": vision, "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
                  "vocab_size": vocab, **config_extra}
        write_json(folder / "config.json", record)
        write_json(folder / "generation_config.json",
                   {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                    "pad_token_id": tokenizer.pad_token_id})
        model_class = getattr(transformers, architecture)
        model = model_class(model_class.config_class.from_pretrained(folder))
        _write_llava_weights(model, folder, clip, shards)
        image_processor = _image_processor_config(size, feature_extractor=False, processor_class=processor_class)
        write_json(folder / "preprocessor_config.json", image_processor | dict(image_processor_extra))
        write_json(folder / "processor_config.json",
                   {"image_token": "<image>", "num_additional_image_tokens": 1, "patch_size": vision["patch_size"],
                    "processor_class": processor_class, "vision_feature_select_strategy": "default"})
        write_json(folder / "chat_template.json", {"chat_template": chat_template})

    return write


def llava_1_5(out, sizes: Sizes = TINY_SIZES) -> StandIn:
    """``llava-hf/llava-1.5-7b-hf``: ``LlavaForConditionalGeneration`` whose vision tower is
    :func:`clip_vit_large_patch14_336`'s (in float16, as the hub holds it), read at
    ``vision_feature_layer: -2`` with the ``default`` strategy (class token dropped), a two-layer
    projector and a 2-layer Llama (with :data:`REAL_SIZES`, Vicuna-7B's shapes and its 32,064-token
    vocabulary, though the tokenizer stays a small one). Files as the repository holds them: ``config.json`` in its
    transformers 4 form, ``generation_config.json``, three shards
    ``model-0000i-of-00003.safetensors`` with ``model.safetensors.index.json`` under the
    transformers 4 names (``language_model.model.*``, ``vision_tower.vision_model.*``),
    ``preprocessor_config.json`` (``CLIPImageProcessor``), ``processor_config.json``,
    ``chat_template.json``, and the tokenizer files but ``tokenizer.model``."""
    clip = clip_vit_large_patch14_336(out, sizes).path
    write = _llava_writer(clip, architecture="LlavaForConditionalGeneration", model_type="llava",
                          language_model=dict(sizes.llava15_text), shards=3, processor_class="LlavaProcessor",
                          chat_template=LLAVA15_CHAT_TEMPLATE)
    return StandIn(LLAVA15, _build_once(out, LLAVA15, write), {CLIP_L14_336: clip})


def llava_next_mistral(out) -> StandIn:
    """``llava-hf/llava-v1.6-mistral-7b-hf`` (LLaVA-NeXT): ``LlavaNextForConditionalGeneration``
    with ``image_grid_pinpoints`` (the real 336-pixel grid [[336, 672], [672, 336], [672, 672],
    [1008, 336], [336, 1008]] in units of the stand-in's image size), ``use_image_newline_parameter``,
    a Mistral language model, four
    shards, ``LlavaNextImageProcessor`` in ``preprocessor_config.json``. Its vision tower is
    :func:`clip_vit_large_patch14_336`'s. Only meant to load: whether the project takes it is what
    a test checks."""
    clip = clip_vit_large_patch14_336(out).path
    size = _vision_config_record(clip)["image_size"]
    pinpoints = [[size * a, size * b] for a, b in ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))]
    mistral = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 64,
               "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "max_position_embeddings": 1024, "sliding_window": None}
    write = _llava_writer(clip, architecture="LlavaNextForConditionalGeneration", model_type="llava_next",
                          language_model=mistral, shards=4, processor_class="LlavaNextProcessor",
                          chat_template=LLAVA_NEXT_CHAT_TEMPLATE,
                          config_extra={"image_grid_pinpoints": pinpoints, "use_image_newline_parameter": True},
                          image_processor_extra={"image_processor_type": "LlavaNextImageProcessor",
                                                 "image_grid_pinpoints": pinpoints, "do_pad": True})
    return StandIn(LLAVA_NEXT, _build_once(out, LLAVA_NEXT, write), {CLIP_L14_336: clip})


# =============================================================================================
# open_clip
# =============================================================================================

#: The name :func:`open_clip_checkpoint_file` registers its model config under.
OPEN_CLIP_STANDIN_NAME = "slug-standin-ViT-B-32"


def open_clip_vit_b32_laion(out, sizes: Sizes = TINY_SIZES) -> StandIn:
    """``laion/CLIP-ViT-B-32-laion2B-s34B-b79K`` as open_clip reads it: ``open_clip_config.json``
    (``model_cfg`` and ``preprocess_cfg``) and ``open_clip_model.safetensors`` (the open_clip
    model's state dict), loadable as ``local-dir:<folder>`` (open_clip prefers
    ``open_clip_model.safetensors`` among a folder's checkpoints). The real repository also holds
    ``open_clip_pytorch_model.bin`` and the model in Hugging Face format (``config.json``,
    ``model.safetensors``, ``pytorch_model.bin``, tokenizer files), which open_clip does not read."""
    import open_clip

    def write(folder: Path) -> None:
        model = open_clip.CLIP(**sizes.open_clip_b32)
        write_json(folder / "open_clip_config.json",
                   {"model_cfg": sizes.open_clip_b32, "preprocess_cfg": {"mean": CLIP_MEAN, "std": CLIP_STD}})
        write_weights(model.state_dict(), folder, "open_clip_model")

    return StandIn(OPEN_CLIP_B32, _build_once(out, OPEN_CLIP_B32, write))


def open_clip_checkpoint_file(out) -> StandIn:
    """The open_clip checkpoint as one file, ``pretrained=<file>.safetensors`` for a registered
    model config: :func:`open_clip_vit_b32_laion`'s ``open_clip_model.safetensors``, with its
    ``model_cfg`` written as ``<out>/model_configs/slug-standin-ViT-B-32.json`` (a file named
    after the model, as ``open_clip.add_model_config`` registers it) in ``extras["model_config"]``."""
    hub = open_clip_vit_b32_laion(out).path
    config = Path(out) / "model_configs" / f"{OPEN_CLIP_STANDIN_NAME}.json"
    if not config.is_file():
        write_json(config, json.loads((hub / "open_clip_config.json").read_text())["model_cfg"])
    return StandIn(OPEN_CLIP_B32, hub / "open_clip_model.safetensors", extras={"model_config": config})


# =============================================================================================
# UnlearnCanvas
# =============================================================================================

#: The stand-in of the benchmark's classifier architecture (timm's ``vit_large_patch16_224`` with its
#: head replaced by ``Linear(1024, classes)``): timm's ``test_vit``, a ViT of the same tensor names
#: (``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.N.*``, ``norm``, ``head``) and
#: patch size, 64 wide with 6 blocks, at 32-pixel images. A timm architecture by name, so that a
#: classifier JSON can describe it (``arch`` takes a name and only arguments such as ``img_size``).
UC_CLASSIFIER_ARCH = {"library": "timm", "name": "test_vit", "kwargs": {"img_size": 32}}
#: Where the benchmark's files lie in its released checkpoint folder, and how many classes each
#: classifier has (the style classifier: the 50 styles and ``Seed_Images``; the object one: 20).
UC_GENERATOR = "diffuser/style50"
UC_STYLE_CLASSIFIER = "cls_model/style50.pth"
UC_OBJECT_CLASSIFIER = "cls_model/style50_cls.pth"


def unlearncanvas_classnames() -> dict[str, list[str]]:
    """The classifiers' classes in output order (sorted: the benchmark's ``const.py`` lists)."""
    from slug_pl.data.unlearncanvas import UC_OBJECTS, UC_STYLES

    return {"style": sorted([*UC_STYLES, "Seed_Images"]), "object": sorted(UC_OBJECTS)}


def _write_uc_classifier(path: Path, classes: int) -> None:
    """A benchmark classifier checkpoint: ``torch.save({"model_state_dict": state})`` of the
    timm ViT (:data:`UC_CLASSIFIER_ARCH`), as ``accuracy.py`` reads it."""
    import timm

    model = timm.create_model(UC_CLASSIFIER_ARCH["name"], pretrained=False, num_classes=classes,
                              **UC_CLASSIFIER_ARCH["kwargs"])
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model_state_dict": model.state_dict()}, path)


def unlearncanvas(out) -> StandIn:
    """UnlearnCanvas's released checkpoints (``github.com/OPTML-Group/UnlearnCanvas``, shared as a
    folder of files, not a hub repository) in their layout:

    - ``diffuser/style50/``: the benchmark's Stable Diffusion 1.5 fine-tuned on the 50 styles, as
      its ``diffuser_sd_training.py`` saves it (``StableDiffusionPipeline.from_pretrained(SD 1.5,
      unet=..., text_encoder=..., vae=...).save_pretrained``: Stable Diffusion 1.5's layout with
      ``safety_checker/`` and ``feature_extractor/``, no ``fp16`` variants). Only the UNet is
      trained; the text encoder stays SD 1.5's, so the pair is :func:`clip_vit_large_patch14`.
    - ``cls_model/style50.pth`` (style, 51 classes) and ``cls_model/style50_cls.pth`` (object, 20
      classes): ``{"model_state_dict": ...}`` of a timm ``vit_large_patch16_224`` whose head is
      ``Linear(1024, classes)``, read by the benchmark's ``accuracy.py`` with
      ``timm.create_model("vit_large_patch16_224.augreg_in21k")``, images resized to 224 and
      normalized with mean = std = 0.5. The stand-in's are timm's small ``test_vit``
      (:data:`UC_CLASSIFIER_ARCH`), so a loader builds them by that name.
      (The real folder also holds ``style60.pth``, for the 60-style release.)
    """
    clip = clip_vit_large_patch14(out).path
    pipeline = _sd15_writer(clip, fp16=False, diffusers_version="0.21.4")
    classes = unlearncanvas_classnames()

    def write(folder: Path) -> None:
        pipeline(folder / UC_GENERATOR)
        _write_uc_classifier(folder / UC_STYLE_CLASSIFIER, len(classes["style"]))
        _write_uc_classifier(folder / UC_OBJECT_CLASSIFIER, len(classes["object"]))

    folder = _build_once(out, UNLEARNCANVAS, write)
    return StandIn(UNLEARNCANVAS, folder / UC_GENERATOR, {CLIP_L14: clip},
                   {"style_classifier": folder / UC_STYLE_CLASSIFIER,
                    "object_classifier": folder / UC_OBJECT_CLASSIFIER})


# =============================================================================================
# Pipelines the project does not support: configs only
# =============================================================================================


def _configs_only(out, repo_id: str, model_index: dict, configs: dict[str, dict]) -> StandIn:
    def write(folder: Path) -> None:
        write_json(folder / "model_index.json", model_index)
        for path, record in configs.items():
            write_json(folder / path, record)

    return StandIn(repo_id, _build_once(out, repo_id, write))


def stable_diffusion_3_medium(out) -> StandIn:
    """``stabilityai/stable-diffusion-3-medium-diffusers``: ``model_index.json``
    (``StableDiffusion3Pipeline``: an ``SD3Transformer2DModel`` in ``transformer/``, two CLIP
    text encoders with projection and a T5 in ``text_encoder_3``) and the components' configs,
    no weights."""
    model_index = {"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.29.0.dev0",
                   "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                   "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
                   "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                   "text_encoder_3": ["transformers", "T5EncoderModel"],
                   "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
                   "tokenizer_3": ["transformers", "T5TokenizerFast"],
                   "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}
    clip_text = {"architectures": ["CLIPTextModelWithProjection"], "model_type": "clip_text_model",
                 "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "projection_dim": 16}
    configs = {"scheduler/scheduler_config.json": {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0,
                                                   "num_train_timesteps": 1000},
               "text_encoder/config.json": clip_text, "text_encoder_2/config.json": clip_text,
               "text_encoder_3/config.json": {"architectures": ["T5EncoderModel"], "model_type": "t5", "d_model": 32,
                                              "num_layers": 2, "num_heads": 2},
               "transformer/config.json": {"_class_name": "SD3Transformer2DModel", "sample_size": 16,
                                           "num_layers": 2, "joint_attention_dim": 32},
               "vae/config.json": {"_class_name": "AutoencoderKL", "latent_channels": 16}}
    return _configs_only(out, SD3, model_index, configs)


def flux_1_dev(out) -> StandIn:
    """``black-forest-labs/FLUX.1-dev``: ``model_index.json`` (``FluxPipeline``: a
    ``FluxTransformer2DModel``, a CLIP text encoder and a T5 in ``text_encoder_2``) and the
    components' configs, no weights."""
    model_index = {"_class_name": "FluxPipeline", "_diffusers_version": "0.30.0.dev0",
                   "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                   "text_encoder": ["transformers", "CLIPTextModel"],
                   "text_encoder_2": ["transformers", "T5EncoderModel"],
                   "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
                   "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}
    configs = {"scheduler/scheduler_config.json": {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0},
               "text_encoder/config.json": {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
                                            "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2},
               "text_encoder_2/config.json": {"architectures": ["T5EncoderModel"], "model_type": "t5",
                                              "d_model": 32, "num_layers": 2, "num_heads": 2},
               "transformer/config.json": {"_class_name": "FluxTransformer2DModel", "num_layers": 2,
                                           "joint_attention_dim": 32},
               "vae/config.json": {"_class_name": "AutoencoderKL", "latent_channels": 16}}
    return _configs_only(out, FLUX, model_index, configs)


# =============================================================================================
# registry and command line
# =============================================================================================

#: Every builder by the repository it mirrors (the open_clip single file shares its repository
#: with the hub folder and is built with it).
BUILDERS: dict[str, Callable[[str | Path], StandIn]] = {
    SD15: stable_diffusion_v1_5, SD21: stable_diffusion_2_1, SDXL: stable_diffusion_xl_base,
    LLAVA15: llava_1_5, LLAVA_NEXT: llava_next_mistral, CLIP_L14: clip_vit_large_patch14,
    CLIP_L14_336: clip_vit_large_patch14_336, CLIP_H14: clip_vit_h14_laion, CLIP_BIGG14: clip_vit_bigg14_laion,
    OPEN_CLIP_B32: open_clip_checkpoint_file, UNLEARNCANVAS: unlearncanvas, SD3: stable_diffusion_3_medium,
    FLUX: flux_1_dev,
}


def build(out: str | Path, repo_id: str) -> StandIn:
    """The stand-in of ``repo_id`` under ``out`` (:data:`BUILDERS`)."""
    if repo_id not in BUILDERS:
        raise KeyError(f"no stand-in of {repo_id!r}; there are stand-ins of: {', '.join(BUILDERS)}")
    return BUILDERS[repo_id](out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slug_pl.testing.standins",
                                     description="Build tiny random stand-ins of hub repositories in their layouts.")
    parser.add_argument("out", help="parent folder; each stand-in goes to OUT/<owner>--<name>")
    parser.add_argument("repos", nargs="*", metavar="REPO_ID", help=f"repositories (default: all): {', '.join(BUILDERS)}")
    args = parser.parse_args(argv)
    unknown = [r for r in args.repos if r not in BUILDERS]
    if unknown:
        parser.error(f"no stand-in of {', '.join(unknown)}; choose from {', '.join(BUILDERS)}")
    for repo_id in args.repos or BUILDERS:
        standin = build(args.out, repo_id)
        paired = "".join(f"\n  pairs with {r}: {p}" for r, p in standin.paired.items())
        print(f"{repo_id}: {standin.path}{paired}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
