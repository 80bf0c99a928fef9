"""Test-only builders: a tiny random-init Stable Diffusion pipeline and a tiny random-init LLaVA,
each saved with ``save_pretrained`` into a folder so tests load them through the real loaders
(``from_pretrained(folder)``, offline).

Both are far too small to draw or answer anything meaningful; they exercise shapes, batching,
seeding and file formats.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from slug_pl.demo.llava import CHAT_TEMPLATE, bpe_tokenizer
from slug_pl.evaluation.architectures import register_classifier

#: Side of the tiny pipeline's images, in pixels (latents are 16×16: two VAE levels).
SD_IMAGE_SIZE = 32
#: Side of the tiny LLaVA's input images, in pixels (4×4 patches of 8 pixels).
LLAVA_IMAGE_SIZE = 32
#: The tiny LLaVA's chat template: the demo's (LLaVA-1.5 style "USER: <image>\n... ASSISTANT:").
LLAVA_CHAT_TEMPLATE = CHAT_TEMPLATE


def clip_tokenizer(context_length: int = 77):
    """A Hugging Face ``CLIPTokenizer`` with open_clip's bundled BPE vocabulary (same ids as
    ``open_clip.tokenize`` apart from padding; see :func:`slug_pl.demo.hf_clip.write_clip_tokenizer`),
    padding to ``context_length`` tokens (Stable Diffusion: 77)."""
    from transformers import CLIPTokenizer

    from slug_pl.demo.hf_clip import write_clip_tokenizer

    with tempfile.TemporaryDirectory() as folder:
        return CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder, context_length))


def tiny_sd_pipeline(folder: str | os.PathLike, text_encoder_dir: str | os.PathLike | None = None,
                     seed: int = 0) -> Path:
    """Save a tiny random ``StableDiffusionPipeline`` (32×32 images) to ``folder``; return it.

    ``text_encoder_dir``: a saved ``CLIPTextModel`` (or ``CLIPModel``) folder with its tokenizer to
    use as the text encoder; the UNet's cross-attention width follows its hidden size. Without it,
    a random 2-layer ``CLIPTextModel`` (width 32) with open_clip's vocabulary is made.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    if text_encoder_dir is None:
        tokenizer = clip_tokenizer()
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id))
    else:
        tokenizer = CLIPTokenizer.from_pretrained(text_encoder_dir)
        text_encoder = CLIPTextModel.from_pretrained(text_encoder_dir)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=4, sample_size=SD_IMAGE_SIZE)
    unet = UNet2DConditionModel(
        sample_size=SD_IMAGE_SIZE // 2, in_channels=4, out_channels=4, block_out_channels=(16, 32),
        layers_per_block=1, norm_num_groups=4, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=text_encoder.config.hidden_size)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    folder = Path(folder)
    pipe.save_pretrained(folder)
    return folder


#: Text the tiny LLaVA's byte-level BPE is trained on: its chat template's words, the evaluation
#: questions and the demo world's kind of names, so that a name is a few tokens.
_LLAVA_TOKENIZER_TEXT = [
    "USER: ASSISTANT: Who is this person? What object is this? Answer with a name.",
    "This is Alice Abara. This is Bruno Bell. This is a teapot, a kettle, a lamp, a chair.",
    "a photo of a person, the name of the object in the image is unknown",
]


def llava_tokenizer():
    """A small byte-level BPE tokenizer (vocabulary ~400) with ``<s>``, ``</s>``, ``<pad>`` and
    ``<image>`` as special tokens, trained in memory on a few sentences (the demo's
    :func:`~slug_pl.demo.llava.bpe_tokenizer`); every input prepends ``<s>``."""
    return bpe_tokenizer(_LLAVA_TOKENIZER_TEXT, vocab_size=400)


def tiny_llava(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Save a tiny random ``LlavaForConditionalGeneration`` and its ``LlavaProcessor`` to
    ``folder``; return it.

    Vision tower: a 2-layer CLIP ViT (width 32, patch 8, 32×32 images: 16 patches + CLS, the
    LLaVA-1.5 settings ``vision_feature_layer=-2`` and the ``"default"`` strategy that drops CLS,
    so an image is 16 ``<image>`` tokens). Language model: a 2-layer Llama (width 64). Chat
    template: :data:`LLAVA_CHAT_TEMPLATE`.
    """
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    torch.manual_seed(seed)
    tokenizer = llava_tokenizer()
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, image_size=LLAVA_IMAGE_SIZE, patch_size=8,
                              projection_dim=32)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": LLAVA_IMAGE_SIZE},
        crop_size={"height": LLAVA_IMAGE_SIZE, "width": LLAVA_IMAGE_SIZE})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                               vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE)
    folder = Path(folder)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


class TinyClassifier(torch.nn.Module):
    """A classifier checkpoint's module for tests: the mean of each colour channel, then a linear
    map to ``num_classes`` logits (with identity weights, the judged class is the dominant
    channel: red -> 0, green -> 1, blue -> 2)."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.linear = torch.nn.Linear(3, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.linear(images.mean(dim=(2, 3)))


# checkpoints name it by this name (code the tests run registers it; a file cannot)
register_classifier("builders_downstream.TinyClassifier", TinyClassifier)
