"""A Stable-Diffusion-XL-shaped pipeline for the demo world, built from the Stable Diffusion demo's parts.

SDXL conditions its UNet on two CLIP text encoders side by side, and SLUG edits one of them
(:class:`slug_pl.targets.StableDiffusionXL`). To show that offline, this module trains a
``StableDiffusionXLPipeline`` of stock diffusers and transformers classes on the demo world, on
the CPU, the way :mod:`slug_pl.demo.sd` trains the Stable Diffusion one:

- ``text_encoder`` (the demo's "CLIP ViT-L/14"): the text tower of the world-trained Hugging Face
  CLIP the SD demo embeds (``root/hf_clip``, 96 wide, 3 layers), a ``CLIPTextModel``;
- ``text_encoder_2`` (the demo's "OpenCLIP ViT-bigG/14"): the text tower *and text projection*
  of a second CLIP trained on the same world, wider and deeper (``root/hf_clip_2``,
  :data:`CLIP_2_TRAINING`), a ``CLIPTextModelWithProjection``;
- both frozen, with their tokenizers, 16 positions each (SDXL puts the two encoders' states side
  by side position by position, so the lengths must agree);
- the SD demo's VAE (the same settings: the same weights) and classifier judge;
- a UNet (:func:`~slug_pl.demo.sd.demo_unet`) with cross-attention to the two encoders'
  *penultimate* hidden states concatenated (96 + 128 = 224 wide) and SDXL's added conditioning
  (``addition_embed_type: text_time``): the second encoder's pooled, projected output and the 6
  size numbers (original size, crop corner, target size: 32, 32, 0, 0, 32, 32, as the pipeline
  passes them by default). It is trained on exactly what ``StableDiffusionXLPipeline.encode_prompt``
  feeds it for each caption (the pipeline's own encoding, so training and drawing agree); a
  dropped caption (one in ten, for guidance) becomes zeros, states and pooled embedding alike:
  SDXL base sets ``force_zeros_for_empty_prompt`` (its unconditional input is all zeros, not the
  encoded empty prompt), and so does this pipeline.

The UNet trains in rounds until *both* world CLIPs recognize every identity in at least
``min_recognition`` of its generations (each run of the demo judges with the CLIP it edits).
The pipeline is saved with ``StableDiffusionXLPipeline.save_pretrained`` and loaded back like a
downloaded model. :func:`ensure_sdxl_pipeline` builds everything once under ``root``
(``hf_clip_2/``, ``sdxl_pipeline/``, ``sdxl_classifier/``, beside the SD demo's ``hf_clip/``),
cached by both CLIPs' fingerprints and the settings; :class:`StableDiffusionXLDemoWorld` is the
demo's data module (``configs/demo_sdxl.yaml``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from slug_pl.demo.datamodule import refuse_other_model, target_source
from slug_pl.demo.hf_clip import ensure_hf_clip
from slug_pl.demo.sd import (SdTraining, StableDiffusionDemoWorld, TextConditioning, UnetTrainer,
                             build_demo_pipeline, demo_scheduler, demo_unet, ensure_demo_pipeline,
                             library_versions, text_encoder_from_clip, training_record)
from slug_pl.demo.world import WorldSpec, spec_record

PIPELINE_FOLDER = "sdxl_pipeline"
CLASSIFIER_FOLDER = "sdxl_classifier"
#: Where the second CLIP is trained (``root/hf_clip_2``); the first is the SD demo's ``root/hf_clip``.
CLIP_2_FOLDER = "hf_clip_2"
#: The second CLIP's shape (settings of :func:`~slug_pl.demo.hf_clip.train_hf_clip`): wider and
#: deeper than the first (96 wide, 3 layers, projection 64), as OpenCLIP ViT-bigG/14 (1280, 32
#: layers) is than CLIP ViT-L/14 (768, 12).
CLIP_2_TRAINING = {"hidden_size": 128, "layers": 4, "heads": 4, "projection_dim": 128}
LABEL = "demo SDXL"


@torch.no_grad()
def sdxl_conditioning(pipe, captions: list[str], batch_size: int = 256) -> TextConditioning:
    """What ``pipe`` (a ``StableDiffusionXLPipeline``) feeds its UNet for each caption, as its own
    ``encode_prompt`` computes it (no clip skip, no guidance): the two encoders' penultimate states
    side by side and the second encoder's pooled output; zeros for a dropped caption
    (``force_zeros_for_empty_prompt``); the default size numbers of a ``pipe``-sized image."""
    states, pooled = [], []
    for i in range(0, len(captions), batch_size):
        s, _, p, _ = pipe.encode_prompt(captions[i:i + batch_size], device="cpu", num_images_per_prompt=1,
                                        do_classifier_free_guidance=False)
        states.append(s)
        pooled.append(p)
    states, pooled = torch.cat(states), torch.cat(pooled)
    size = pipe.default_sample_size * pipe.vae_scale_factor
    return TextConditioning(states, torch.zeros_like(states[:1]), pooled, torch.zeros_like(pooled[:1]),
                            torch.tensor([size, size, 0, 0, size, size], dtype=states.dtype))


def sdxl_pipeline_trainer(vae, clip_folders: tuple[str, str], latents: torch.Tensor, captions: list[str],
                          s: SdTraining):
    """A ``StableDiffusionXLPipeline`` of the trained ``vae``, the text towers of the two CLIPs in
    ``clip_folders`` (the second with its text projection) and a fresh ``text_time`` UNet (DDIM,
    ``force_zeros_for_empty_prompt``, no watermark), and the :class:`~slug_pl.demo.sd.UnetTrainer`
    of that UNet on ``latents`` captioned by ``captions`` (:func:`sdxl_conditioning`)."""
    from diffusers import StableDiffusionXLPipeline

    encoder, tokenizer = text_encoder_from_clip(clip_folders[0])
    encoder_2, tokenizer_2 = text_encoder_from_clip(clip_folders[1], projection=True)
    if tokenizer.model_max_length != tokenizer_2.model_max_length:
        raise ValueError(f"the two CLIPs' text positions differ ({tokenizer.model_max_length} and "
                         f"{tokenizer_2.model_max_length}): SDXL puts their states side by side")
    unet = demo_unet(latents.shape[-1], encoder.config.hidden_size + encoder_2.config.hidden_size,
                     text_time=encoder_2.config.projection_dim)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=encoder, text_encoder_2=encoder_2, tokenizer=tokenizer,
                                     tokenizer_2=tokenizer_2, unet=unet, scheduler=demo_scheduler(),
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)
    return pipe, UnetTrainer(unet, latents, sdxl_conditioning(pipe, list(captions)), s, LABEL)


def build_sdxl_pipeline(clip_folders: tuple[str, str], world: dict, out: str | os.PathLike,
                        classifier_out: str | os.PathLike, s: SdTraining = SdTraining()) -> dict:  # noqa: B008
    """Train the demo SDXL pipeline around the text towers of the two CLIPs in ``clip_folders``
    on ``world`` (:func:`~slug_pl.demo.sd.build_demo_pipeline` with :func:`sdxl_pipeline_trainer`,
    until both CLIPs recognize every identity); save it to the new folder ``out`` and the
    classifier judge to the new folder ``classifier_out``. Returns the measurements."""
    clip_folders = (str(clip_folders[0]), str(clip_folders[1]))
    return build_demo_pipeline(
        lambda vae, latents, captions: sdxl_pipeline_trainer(vae, clip_folders, latents, captions, s),
        list(clip_folders), world, out, classifier_out, s, LABEL)


def ensure_sdxl_pipeline(root: str | os.PathLike, spec: WorldSpec = WorldSpec(),  # noqa: B008 (frozen)
                         train: SdTraining = SdTraining(), clip_train_kwargs: dict | None = None,  # noqa: B008
                         clip_2_train_kwargs: dict | None = None) -> dict:
    """Build (or reuse) the demo world, its two Hugging Face CLIPs (``root/hf_clip``: the SD
    demo's, trained with ``clip_train_kwargs``; ``root/hf_clip_2``: :data:`CLIP_2_TRAINING`
    updated with ``clip_2_train_kwargs``) and the demo SDXL pipeline around their text towers
    (``root/sdxl_pipeline``) with its classifier judge (``root/sdxl_classifier``).

    Reused when made from the same CLIP weights (SHA-256), world spec, settings and library
    versions (:func:`~slug_pl.demo.sd.ensure_demo_pipeline`).

    Returns ``{"path": pipeline folder, "classifier": classifier folder, "hf_clip": the first
    CLIP's folder, "hf_clip_2": the second's, "metrics": build measurements, "world":
    build_world's dict}``.
    """
    root = Path(root).expanduser().resolve()
    clip = ensure_hf_clip(root, spec, clip_train_kwargs)
    clip_2 = ensure_hf_clip(root, spec, {**CLIP_2_TRAINING, **(clip_2_train_kwargs or {})}, folder=CLIP_2_FOLDER)
    folder, classifier = root / PIPELINE_FOLDER, root / CLASSIFIER_FOLDER
    cache_key = {"clip_fingerprints": [clip["fingerprint"], clip_2["fingerprint"]], "spec": spec_record(spec),
                 "train": training_record(train), **library_versions()}
    metrics = ensure_demo_pipeline(
        folder, classifier, cache_key,
        lambda out, classifier_out: build_sdxl_pipeline((clip["path"], clip_2["path"]), clip["world"], out,
                                                        classifier_out, train),
        LABEL)
    return {"path": str(folder), "classifier": str(classifier), "hf_clip": clip["path"], "hf_clip_2": clip_2["path"],
            "metrics": metrics, "world": clip["world"]}


class StableDiffusionXLDemoWorld(StableDiffusionDemoWorld):
    """The demo world that builds the SDXL pipeline around its two Hugging Face CLIPs and the
    classifier judge (:func:`ensure_sdxl_pipeline`, cached) before a run whose target is that
    pipeline; otherwise :class:`~slug_pl.demo.sd.StableDiffusionDemoWorld` (the forget set is the
    pipeline's own images of the concept's prompts, or ``forget_source: mined``).

    The target must be ``slug_pl.targets.StableDiffusionXL`` on ``<root>/sdxl_pipeline``, and the
    family must load the CLIP of the encoder it edits: ``<root>/hf_clip`` for ``text_encoder: 1``,
    ``<root>/hf_clip_2`` for ``text_encoder: 2``; a mismatch is reported with the path to set.
    """

    label = LABEL

    def __init__(self, *args, clip_2_train: dict | None = None, **kwargs):
        """
        Args:
            clip_2_train: overrides of the second CLIP's training settings (those of
                :func:`~slug_pl.demo.hf_clip.train_hf_clip`; default :data:`CLIP_2_TRAINING`).
            *args / **kwargs: as :class:`~slug_pl.demo.sd.StableDiffusionDemoWorld` (``train``:
                the first CLIP's settings, ``sd_train``: the pipeline's).
        """
        super().__init__(*args, **kwargs)
        self.clip_2_train = dict(clip_2_train or {})

    def _ensure(self) -> dict:
        built = ensure_sdxl_pipeline(self.root, self.spec, self.sd_train, self.train_kwargs, self.clip_2_train)
        return {**self._paths(built), "hf_clip_2": built["hf_clip_2"]}

    def check_models(self, family, target=None) -> None:
        """The target is the SDXL target on the demo's pipeline, and the family loads the CLIP
        whose text tower is the encoder the target edits (this replaces the SD demo's check,
        which always wants the first CLIP); else ValueError naming the option and the path."""
        from slug_pl.targets import StableDiffusionXL

        if self.paths is None:
            return
        option = "model.init_args.target (slug_pl.targets.StableDiffusionXL) init_args.pipeline"
        refuse_other_model("the demo builds its SDXL pipeline", self.paths["pipeline"], target_source(target), option)
        if not isinstance(target, StableDiffusionXL):
            raise ValueError(f"the demo builds an SDXL pipeline at {self.paths['pipeline']}: set "
                             f"model.init_args.target.class_path to slug_pl.targets.StableDiffusionXL")
        encoder = target.text_encoder
        clip = self.paths["hf_clip" if encoder == 1 else "hf_clip_2"]
        hint = (" (or edit text_encoder_2 with text_encoder: 2)" if encoder == 1 else
                " (or edit text_encoder with text_encoder: 1 and configs/demo_sdxl_encoder1.yaml)")
        refuse_other_model(f"the demo's SDXL text_encoder{'' if encoder == 1 else '_2'} (text_encoder: {encoder}) is "
                           f"the text tower of its CLIP", clip, family.describe().get("model_name"),
                           "model.init_args.family.init_args.model_name", hint)
