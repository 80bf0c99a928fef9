"""A Stable-Diffusion-shaped pipeline for the demo world, and a classifier that judges its images.

SLUG unlearns a concept from Stable Diffusion by editing one tensor of its CLIP text encoder. To
show that offline, the demo needs a text-to-image model that really draws the world's identities
from their names. This module trains one from stock diffusers classes, on the CPU, in minutes:

- the **text encoder** is the text tower of the world-trained Hugging Face CLIP
  (:func:`slug_pl.demo.hf_clip.ensure_hf_clip`), copied unchanged into a ``CLIPTextModel`` and
  frozen, with that CLIP's tokenizer (16 positions): the pair SLUG computes gradients on;
- a small **VAE** (``AutoencoderKL``, 32 px images to 8×8×4 latents, ~0.25 M parameters) trained
  to reconstruct the world's images (mean squared error plus a small KL term); its
  ``scaling_factor`` is set to 1 / the standard deviation of the latents, as in Stable Diffusion;
- a small **UNet** (``UNet2DConditionModel``, two levels with cross-attention to the text
  encoder's last hidden states, ~1.1 M parameters) trained with the usual noise-prediction loss
  on the world's images and captions, one caption in ten replaced by the empty prompt so that
  classifier-free guidance works, with Gaussian noise on the text states (conditioning
  augmentation, :attr:`SdTraining.cond_noise`);
- Stable Diffusion's noise schedule (scaled-linear betas 0.00085–0.012, 1,000 steps); the
  pipeline samples with DDIM.

The parts are saved with ``StableDiffusionPipeline.save_pretrained`` and the folder is loaded
back through ``StableDiffusionPipeline.from_pretrained``, like a downloaded model. A build then
measures what the demo needs: the fraction of generations of each identity's prompts that the
CLIP recognizes as that identity (the ``verify_*`` settings of :class:`SdTraining`); it must be
high before unlearning means anything. The UNet trains in rounds until every identity is recognized in at least
``min_recognition`` of its generations (or ``max_unet_steps`` is reached, with a warning).

A second, independent judge: :class:`WorldClassifier`, a small CNN trained on the world's
identity portraits (and their VAE reconstructions, the look of generated images), saved with
:func:`slug_pl.evaluation.generation.save_classifier` for
:class:`~slug_pl.evaluation.generation.ClassifierJudge`.

:func:`ensure_sd_pipeline` builds everything once under ``root`` (``sd_pipeline/`` and
``sd_classifier/``), cached by the fingerprint of the CLIP it embeds, the settings and the
diffusers version; :class:`StableDiffusionDemoWorld` is the demo's data module that builds it
before a run (``configs/demo_sd.yaml``). The SDXL demo (:mod:`slug_pl.demo.sdxl`) builds its
pipeline with the same parts (:func:`build_demo_pipeline`, :func:`ensure_demo_pipeline`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from slug_pl.atomic import file_slug, rebuilt_folder, write_text
from slug_pl.demo.datamodule import DemoWorld, refuse_other_model, target_source
from slug_pl.demo.training import descend, one_thread, warmup_cosine
from slug_pl.demo.world import WorldSpec, spec_record
from slug_pl.evaluation.zeroshot import fill_template

logger = logging.getLogger(__name__)

PIPELINE_FOLDER = "sd_pipeline"
CLASSIFIER_FOLDER = "sd_classifier"
#: The file in a built pipeline folder that holds its cache key and measurements.
METRICS_FILE = "slug_demo_sd.json"
#: First seed of the generated forget set (template k: ``FORGET_SEED0 + 1000 k`` onwards), far from
#: the seeds the target draws with (the report's and the candidate choice's).
FORGET_SEED0 = 10_000
#: Stable Diffusion's training noise schedule (v1 and v2).
NOISE_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear"}


@dataclass(frozen=True)
class SdTraining:
    """Settings of the demo pipeline's training (the cache key holds all of them).

    Attributes:
        vae_steps / vae_batch_size / vae_lr / vae_kl_weight: the VAE's training (Adam, cosine).
            The VAE bounds what generations can show: the world's CLIP recognized 65 % of the
            VAE reconstructions of held-out portraits after 300 steps (reconstruction MSE 0.071 on
            [-1, 1]; one identity at 0 %), 99 % after 1,000 steps (MSE 0.028, each identity at
            least 93 %).
        unet_steps: UNet steps of the first round; later rounds add ``unet_round_steps`` each,
            until every identity's recognition is at least ``min_recognition`` or the total
            reaches ``max_unet_steps``.
        unet_batch_size / unet_lr: the UNet's training (AdamW, warmup then cosine per round).
        uncond_fraction: fraction of captions replaced by the empty prompt (for guidance).
        cond_noise: Gaussian noise added to the text states the UNet is trained on, as a
            fraction of their standard deviation (conditioning augmentation): a UNet trained on
            2,800 exact states otherwise maps any state slightly off them to a wrong identity.
            Measured with the same edit (first-block ``v_proj``, a step that removes the
            identity): the other identities kept 92 % recognition with 0.5, 82 % without; 1.0
            gave 87 %.
        classifier_steps / classifier_batch_size / classifier_lr: the classifier judge's training.
        verify_seeds / verify_steps / verify_guidance: the recognition check after each round
            (every identity, every template of the world, these seeds; DDIM steps, guidance).
        seed: every random choice of the build.
    """

    vae_steps: int = 1000
    vae_batch_size: int = 32
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6
    unet_steps: int = 1000
    unet_round_steps: int = 500
    max_unet_steps: int = 2500
    unet_batch_size: int = 64
    unet_lr: float = 2e-3
    uncond_fraction: float = 0.1
    cond_noise: float = 0.5
    min_recognition: float = 0.9
    classifier_steps: int = 600
    classifier_batch_size: int = 64
    classifier_lr: float = 3e-3
    verify_seeds: tuple[int, ...] = (0, 1)
    verify_steps: int = 20
    verify_guidance: float = 4.0
    seed: int = 0


# ================================================================================================
# the models
# ================================================================================================


def demo_vae(image_size: int = 32):
    """``AutoencoderKL``: ``image_size`` px RGB to ``image_size / 4`` square latents of 4
    channels (three levels 16/32/32 wide, one ResNet block each, ~0.25 M parameters)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1, norm_num_groups=8, sample_size=image_size)


#: SDXL's size conditioning: each of its 6 numbers is embedded in this many dimensions (SDXL's 256).
TIME_EMBED_DIM = 8


def demo_unet(latent_size: int, cross_attention_dim: int, text_time: int | None = None):
    """``UNet2DConditionModel`` on ``latent_size``² × 4 latents: two levels (32 and 64 channels),
    cross-attention to ``cross_attention_dim``-wide text states at both and in the middle block
    (4 heads), one layer per block (~1.1 M parameters for a 96-wide text encoder).

    ``text_time``: SDXL's added conditioning (``addition_embed_type: text_time``) on a pooled text
    embedding this wide and the 6 size numbers (:data:`TIME_EMBED_DIM` dimensions each), added to
    the timestep embedding; None: none, as Stable Diffusion 1.x / 2.x."""
    from diffusers import UNet2DConditionModel

    added = {} if text_time is None else {
        "addition_embed_type": "text_time", "addition_time_embed_dim": TIME_EMBED_DIM,
        "projection_class_embeddings_input_dim": text_time + 6 * TIME_EMBED_DIM}
    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, block_out_channels=(32, 64),
        layers_per_block=1, norm_num_groups=8, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, **added)


def demo_scheduler():
    """DDIM with Stable Diffusion's schedule (the sampler the pipeline is saved with)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**NOISE_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def text_encoder_from_clip(clip_folder: str | os.PathLike, projection: bool = False):
    """The text tower of the ``CLIPModel`` in ``clip_folder`` as a ``CLIPTextModel`` (the same
    tensors, copied; eval mode, no gradients) and the folder's ``CLIPTokenizer``. With
    ``projection``: a ``CLIPTextModelWithProjection`` holding the CLIP's ``text_projection`` too
    (SDXL's second encoder)."""
    from transformers import CLIPModel, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    clip = CLIPModel.from_pretrained(clip_folder, dtype=torch.float32)
    if projection:
        encoder = CLIPTextModelWithProjection(clip.config.text_config)
        encoder.text_model.load_state_dict(clip.text_model.state_dict())
        encoder.text_projection.load_state_dict(clip.text_projection.state_dict())
    else:
        encoder = CLIPTextModel(clip.config.text_config)
        encoder.load_state_dict(clip.text_model.state_dict())
    encoder.eval().requires_grad_(False)
    return encoder, CLIPTokenizer.from_pretrained(clip_folder)


class WorldClassifier(nn.Module):
    """A small CNN judge: ``(B, 3, 32, 32)`` normalized images to ``(B, num_classes)`` logits.

    Three 3×3 convolution stages (``width``, 2·``width``, 4·``width`` channels; GroupNorm, SiLU,
    2× average pooling after the first two), global average pooling, a linear layer.
    """

    def __init__(self, num_classes: int = 20, width: int = 32):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for stage, out in enumerate((width, 2 * width, 4 * width)):
            layers += [nn.Conv2d(channels, out, 3, padding=1), nn.GroupNorm(8, out), nn.SiLU(),
                       nn.Conv2d(out, out, 3, padding=1), nn.GroupNorm(8, out), nn.SiLU()]
            if stage < 2:
                layers.append(nn.AvgPool2d(2))
            channels = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images).mean(dim=(2, 3)))


# ================================================================================================
# the world's images
# ================================================================================================


@dataclass
class WorldImages:
    """The world's training corpus in memory: ``pixels (N, 3, H, W)`` in [-1, 1], each image's
    caption, and its identity's index in ``identities`` (-1 for object scenes)."""

    pixels: torch.Tensor
    captions: list[str]
    identity: torch.Tensor
    identities: list[str]


def load_world_images(world: dict) -> WorldImages:
    """Decode every corpus sample of a built world (:func:`slug_pl.demo.world.build_world`)."""
    from slug_pl.data.shards import decode_image, iter_raw_samples

    identities = json.loads(Path(world["identities_json"]).read_text())
    pixels, captions, identity = [], [], []
    for sample in iter_raw_samples(world["corpus_shards"]):
        array = np.asarray(decode_image(sample), dtype=np.float32) / 127.5 - 1.0
        pixels.append(torch.from_numpy(array).permute(2, 0, 1))
        captions.append(sample.caption or "")
        meta = json.loads(sample.fields["json"])
        identity.append(identities.index(meta["name"]) if meta["kind"] == "identity" else -1)
    return WorldImages(torch.stack(pixels), captions, torch.tensor(identity), identities)


# ================================================================================================
# training
# ================================================================================================


def train_vae(pixels: torch.Tensor, s: SdTraining):
    """Train :func:`demo_vae` to reconstruct ``pixels`` (in [-1, 1]); set its ``scaling_factor``
    to 1 / std of the latent means. Returns the VAE (eval mode) and the final reconstruction
    error (mean squared, on [-1, 1])."""
    torch.manual_seed(s.seed)
    vae = demo_vae(pixels.shape[-1]).train()
    optimizer = torch.optim.Adam(vae.parameters(), lr=s.vae_lr)
    schedule = warmup_cosine(optimizer, s.vae_steps)
    gen = torch.Generator().manual_seed(s.seed)
    for _ in range(s.vae_steps):
        x = pixels[torch.randint(len(pixels), (s.vae_batch_size,), generator=gen)]
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=gen)).sample
        mse = F.mse_loss(reconstruction, x)
        loss = mse + s.vae_kl_weight * posterior.kl().mean()
        descend(loss, optimizer, schedule)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        means = torch.cat([vae.encode(pixels[i:i + 256]).latent_dist.mean for i in range(0, len(pixels), 256)])
    vae.register_to_config(scaling_factor=float(1.0 / means.std()))
    return vae, mse.item()


@torch.no_grad()
def encode_prompts(text_encoder, tokenizer, prompts: list[str], batch_size: int = 256) -> torch.Tensor:
    """What ``StableDiffusionPipeline`` feeds the UNet for ``prompts`` (no clip skip): the text
    encoder's last hidden states ``(N, context, width)`` of the prompts padded to the tokenizer's
    ``model_max_length``."""
    out = []
    for i in range(0, len(prompts), batch_size):
        ids = tokenizer(prompts[i:i + batch_size], padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        out.append(text_encoder(ids)[0])
    return torch.cat(out)


@dataclass
class TextConditioning:
    """What a UNet is trained on for each caption, and in place of a dropped caption.

    Attributes:
        states: ``(N, context, width)``, the ``encoder_hidden_states`` of each caption.
        empty: ``(1, context, width)``, those of a dropped caption (the unconditional input).
        pooled / empty_pooled: ``(N, P)`` / ``(1, P)``, SDXL's pooled text embedding
            (``added_cond_kwargs["text_embeds"]``); None for a UNet without ``text_time``.
        time_ids: ``(6,)``, SDXL's size conditioning (``added_cond_kwargs["time_ids"]``), the
            same for every image; None without ``text_time``.
    """

    states: torch.Tensor
    empty: torch.Tensor
    pooled: torch.Tensor | None = None
    empty_pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None


class UnetTrainer:
    """Noise-prediction training of a UNet on fixed latents and text conditioning, in rounds.

    Each round is AdamW with a short warmup and a cosine decay over the round's steps; batches
    are drawn with replacement from one seeded generator, so rounds continue one random stream.
    ``label`` prefixes the progress lines.
    """

    def __init__(self, unet, latents: torch.Tensor, conditioning: TextConditioning, s: SdTraining,
                 label: str = "demo SD"):
        from diffusers import DDPMScheduler

        self.unet, self.latents, self.cond, self.s, self.label = unet, latents, conditioning, s, label
        self.noise = DDPMScheduler(**NOISE_SCHEDULE)
        self.gen = torch.Generator().manual_seed(s.seed + 1)
        self.state_std = float(conditioning.states.std())
        self.pooled_std = None if conditioning.pooled is None else float(conditioning.pooled.std())
        self.steps_done = 0
        self.last_loss = float("nan")
        #: one record per round of :meth:`until_recognized`: steps so far, loss, min / mean recognition, seconds
        self.rounds: list[dict] = []

    def round(self, steps: int) -> None:
        s, unet = self.s, self.unet.train()
        optimizer = torch.optim.AdamW(unet.parameters(), lr=s.unet_lr, weight_decay=0.01)
        schedule = warmup_cosine(optimizer, steps, warmup=max(1, steps // 20))
        running = 0.0
        for _ in range(steps):
            idx = torch.randint(len(self.latents), (s.unet_batch_size,), generator=self.gen)
            x0 = self.latents[idx]
            noise = torch.randn(x0.shape, generator=self.gen)
            t = torch.randint(self.noise.config.num_train_timesteps, (len(idx),), generator=self.gen)
            drop = torch.rand(len(idx), generator=self.gen) < s.uncond_fraction
            states = self._conditioned(self.cond.states[idx], self.cond.empty, drop, self.state_std)
            added = None
            if self.cond.pooled is not None:
                pooled = self._conditioned(self.cond.pooled[idx], self.cond.empty_pooled, drop, self.pooled_std)
                added = {"text_embeds": pooled, "time_ids": self.cond.time_ids.expand(len(idx), -1)}
            prediction = unet(self.noise.add_noise(x0, noise, t), t, encoder_hidden_states=states,
                              added_cond_kwargs=added).sample
            loss = F.mse_loss(prediction, noise)
            descend(loss, optimizer, schedule, clip=unet.parameters())
            running += loss.item()
        self.steps_done += steps
        self.last_loss = running / steps
        unet.eval()

    def _conditioned(self, batch: torch.Tensor, empty: torch.Tensor, drop: torch.Tensor, std: float) -> torch.Tensor:
        """``batch`` with the dropped rows replaced by ``empty``, plus the conditioning noise
        (``cond_noise`` × ``std``)."""
        out = torch.where(drop.view(-1, *[1] * (batch.dim() - 1)), empty, batch)
        if self.s.cond_noise > 0:
            out = out + self.s.cond_noise * std * torch.randn(out.shape, generator=self.gen)
        return out

    def until_recognized(self, check: Callable[[], dict], what: str, one: str) -> dict:
        """Train in rounds (``unet_steps``, then ``unet_round_steps`` each) until ``check()``'s
        ``min`` (the lowest per-concept recognition, a fraction) reaches ``min_recognition`` or
        the steps reach ``max_unet_steps`` (then a warning). ``check()`` returns ``min`` and
        ``mean``; ``what`` / ``one`` name the concepts in the progress lines ("identities",
        "identity"). Each round is recorded in :attr:`rounds`; returns the last check."""
        s = self.s
        steps = s.unet_steps
        while True:
            t1 = time.perf_counter()
            self.round(steps)
            result = check()
            self.rounds.append({"steps": self.steps_done, "loss": self.last_loss, "min": result["min"],
                                "mean": result["mean"], "seconds": time.perf_counter() - t1})
            _say(f"{self.label}: UNet {self.steps_done} steps (loss {self.last_loss:.4f}): {what} recognized in "
                 f"{100 * result['mean']:.1f} % of generations (lowest {one} {100 * result['min']:.1f} %; "
                 f"{time.perf_counter() - t1:.0f}s)")
            if result["min"] >= s.min_recognition or self.steps_done >= s.max_unet_steps:
                break
            steps = min(s.unet_round_steps, s.max_unet_steps - self.steps_done)
        if result["min"] < s.min_recognition:
            _say(f"{self.label}: WARNING: after {self.steps_done} UNet steps an {one} is recognized in only "
                 f"{100 * result['min']:.1f} % of its generations (wanted {100 * s.min_recognition:.0f} %)")
        return result


def pipeline_trainer(vae, text_encoder, tokenizer, latents: torch.Tensor, captions: list[str], s: SdTraining):
    """A ``StableDiffusionPipeline`` of the trained ``vae``, the frozen ``text_encoder`` and a fresh
    :func:`demo_unet` (DDIM, no safety checker), and the :class:`UnetTrainer` of that UNet on
    ``latents`` (scaled VAE latent means) captioned by ``captions``."""
    from diffusers import StableDiffusionPipeline

    conditioning = TextConditioning(encode_prompts(text_encoder, tokenizer, list(captions)),
                                    encode_prompts(text_encoder, tokenizer, [""]))
    unet = demo_unet(latents.shape[-1], text_encoder.config.hidden_size)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=demo_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    return pipe, UnetTrainer(unet, latents, conditioning, s)


def vae_latents(vae, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The VAE's latent means of ``pixels`` (in [-1, 1]) times its ``scaling_factor``: what the
    UNet is trained on."""
    with torch.no_grad():
        return torch.cat([vae.encode(pixels[i:i + batch_size]).latent_dist.mean
                          for i in range(0, len(pixels), batch_size)]) * vae.config.scaling_factor


def train_classifier(pixels: torch.Tensor, labels: torch.Tensor, num_classes: int, s: SdTraining) -> WorldClassifier:
    """Train :class:`WorldClassifier` on ``pixels`` (in [-1, 1], i.e. normalized with mean and
    std 0.5) with random shifts of up to 2 pixels (AdamW, cosine)."""
    torch.manual_seed(s.seed + 2)
    model = WorldClassifier(num_classes).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.classifier_lr, weight_decay=0.05)
    schedule = warmup_cosine(optimizer, s.classifier_steps, warmup=max(1, s.classifier_steps // 20))
    gen = torch.Generator().manual_seed(s.seed + 2)
    for _ in range(s.classifier_steps):
        idx = torch.randint(len(pixels), (s.classifier_batch_size,), generator=gen)
        x = F.pad(pixels[idx], (2, 2, 2, 2), mode="replicate")
        dx, dy = (int(v) for v in torch.randint(5, (2,), generator=gen))
        x = x[:, :, dy:dy + pixels.shape[-2], dx:dx + pixels.shape[-1]]
        loss = F.cross_entropy(model(x), labels[idx])
        descend(loss, optimizer, schedule)
    return model.eval().requires_grad_(False)


def _train_classifier_judge(pixels: np.ndarray, labels: np.ndarray, num_classes: int, s: SdTraining,
                            test_pixels: np.ndarray, test_labels: np.ndarray) -> tuple[dict, float, float]:
    """:func:`train_classifier` in a process of its own (one thread): returns the classifier's
    state dict as numpy arrays, its top-1 accuracy on ``test_pixels`` and the seconds it took."""
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    model = train_classifier(torch.from_numpy(pixels), torch.from_numpy(labels), num_classes, s)
    with torch.no_grad():
        accuracy = (model(torch.from_numpy(test_pixels)).argmax(-1) == torch.from_numpy(test_labels)).float().mean()
    return {k: v.numpy() for k, v in model.state_dict().items()}, float(accuracy), time.perf_counter() - t0


def _labelled_identities(world: dict, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A world split's labelled portraits: pixels in [-1, 1] and labels."""
    from slug_pl.data.shards import decode_image, expand_urls, iter_raw_samples

    pixels, labels = [], []
    for sample in iter_raw_samples(expand_urls(world[f"{split}_identities"])):
        pixels.append(torch.from_numpy(np.asarray(decode_image(sample), dtype=np.float32) / 127.5 - 1.0)
                      .permute(2, 0, 1))
        labels.append(sample.label)
    return torch.stack(pixels), torch.tensor(labels)


# ================================================================================================
# the build
# ================================================================================================


def _say(msg: str) -> None:
    logger.info(msg)
    print(msg, flush=True)


def _recognition_check(pipe, clip_folders: list[str], world: dict, s: SdTraining) -> dict:
    """Per identity, the fraction of its generations (every identity template × ``verify_seeds``)
    a world CLIP recognizes as that identity, zero-shot among all identities; with several CLIPs
    (each judging the same images) the lowest of theirs, each CLIP's in ``per_clip`` (by folder
    name)."""
    from slug_pl.evaluation.generation import ClipZeroShotJudge, PromptSet, recognition
    from slug_pl.families.hf_clip import HfClip
    from slug_pl.pipelines import generate_images

    identities = json.loads(Path(world["identities_json"]).read_text())
    templates = json.loads(Path(world["templates_json"]).read_text())["identities"]
    prompts = PromptSet(identities, (), templates, s.verify_seeds)
    items = prompts.items()
    images = generate_images(pipe, [i.prompt for i in items], [i.seed for i in items], steps=s.verify_steps,
                             guidance=s.verify_guidance, batch_size=64, progress=False)
    per_clip = {}
    for folder in clip_folders:
        family = HfClip(model_name=str(folder))
        judge = ClipZeroShotJudge(family, family.load(), templates)
        per_clip[Path(folder).name] = recognition(judge, images, [i.concept for i in items], identities,
                                                  ())["per_concept"]
    per = {name: min(p[name] for p in per_clip.values()) for name in identities}
    return {"per_identity": per, "min": min(per.values()), "mean": sum(per.values()) / len(per),
            "images_per_identity": len(templates) * len(s.verify_seeds), "per_clip": per_clip}


#: ``make(vae, latents, captions)``: the pipeline around a trained VAE and the trainer of its UNet
#: on the VAE's ``latents`` captioned by ``captions`` (:func:`pipeline_trainer` for Stable Diffusion).
PipelineMaker = Callable[[object, torch.Tensor, list[str]], tuple[object, UnetTrainer]]


def build_demo_pipeline(make: PipelineMaker, clip_folders: list[str], world: dict, out: str | os.PathLike,
                        classifier_out: str | os.PathLike, s: SdTraining, label: str = "demo SD") -> dict:
    """Train a demo pipeline on ``world`` (a :func:`~slug_pl.demo.world.build_world` dict): the
    VAE, then the UNet of ``make``'s pipeline until the world CLIPs in ``clip_folders`` recognize
    every identity in its generations (:meth:`UnetTrainer.until_recognized`), alongside the
    classifier judge; save the pipeline to the new folder ``out`` (``save_pretrained``) and the
    judge to the new folder ``classifier_out``. Returns the measurements; ``label`` prefixes the
    progress lines.

    Runs on one CPU thread (restored afterwards), the classifier judge alongside the UNet in a
    second process of one thread; the same settings give the same weights.
    """
    from slug_pl.evaluation.generation import save_classifier

    with one_thread():
        t0 = time.perf_counter()
        data = load_world_images(world)
        _say(f"{label}: {len(data.captions)} image-caption pairs loaded ({time.perf_counter() - t0:.0f}s)")

        vae, vae_mse = train_vae(data.pixels, s)
        latents = vae_latents(vae, data.pixels)
        t_vae = time.perf_counter() - t0
        _say(f"{label}: VAE trained ({s.vae_steps} steps, reconstruction MSE {vae_mse:.4f}, "
             f"scaling factor {vae.config.scaling_factor:.3f}; {t_vae:.0f}s)")

        # the classifier judge trains in a second process while the UNet trains here (its inputs
        # are ready once the VAE is: the portraits and their reconstructions); one thread each
        t2 = time.perf_counter()
        portraits = data.pixels[data.identity >= 0]
        labels = data.identity[data.identity >= 0]
        with torch.no_grad():  # the decoder's look: reconstructions of the same portraits
            recon = torch.cat([vae.decode(vae.encode(portraits[i:i + 256]).latent_dist.mean).sample.clamp(-1, 1)
                               for i in range(0, len(portraits), 256)])
        test_pixels, test_labels = _labelled_identities(world, "test")
        spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
            judge = pool.submit(_train_classifier_judge, torch.cat([portraits, recon]).numpy(),
                                torch.cat([labels, labels]).numpy(), len(data.identities), s,
                                test_pixels.numpy(), test_labels.numpy())
            pipe, trainer = make(vae, latents, data.captions)
            unet = pipe.unet
            check = trainer.until_recognized(lambda: _recognition_check(pipe, [str(f) for f in clip_folders], world, s),
                                             "identities", "identity")
            rounds = trainer.rounds
            pipe.save_pretrained(out)
            state, classifier_accuracy, classifier_seconds = judge.result()
        classifier = WorldClassifier(len(data.identities))
        classifier.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
        save_classifier(classifier_out, classifier.eval(), f"{WorldClassifier.__module__}.{WorldClassifier.__name__}",
                        {"num_classes": len(data.identities)}, data.identities,
                        image_size=tuple(data.pixels.shape[-2:]))
        _say(f"{label}: classifier judge: {100 * classifier_accuracy:.1f} % on held-out portraits "
             f"({classifier_seconds:.0f}s in a second process, alongside the UNet; "
             f"{time.perf_counter() - t2:.0f}s for both)")
    return {
        "vae_mse": vae_mse, "vae_seconds": round(t_vae, 1), "scaling_factor": vae.config.scaling_factor,
        "vae_parameters": sum(p.numel() for p in vae.parameters()),
        "unet_parameters": sum(p.numel() for p in unet.parameters()),
        "unet_steps": trainer.steps_done, "unet_loss": trainer.last_loss, "rounds": rounds,
        "recognition": check, "classifier_test_accuracy": classifier_accuracy,
        "total_seconds": round(time.perf_counter() - t0, 1),
    }


def build_sd_pipeline(clip_folder: str | os.PathLike, world: dict, out: str | os.PathLike,
                      classifier_out: str | os.PathLike, s: SdTraining = SdTraining()) -> dict:  # noqa: B008
    """Train the demo Stable Diffusion pipeline around the text tower of ``clip_folder`` on
    ``world`` (:func:`build_demo_pipeline` with :func:`pipeline_trainer`); save it to the new
    folder ``out`` and the classifier judge to the new folder ``classifier_out``. Returns the
    measurements."""
    text_encoder, tokenizer = text_encoder_from_clip(clip_folder)
    return build_demo_pipeline(
        lambda vae, latents, captions: pipeline_trainer(vae, text_encoder, tokenizer, latents, captions, s),
        [str(clip_folder)], world, out, classifier_out, s)


def _cached(folder: Path, classifier: Path, cache_key: dict) -> dict | None:
    try:
        saved = json.loads((folder / METRICS_FILE).read_text())
    except (OSError, ValueError):
        return None
    complete = (folder / "model_index.json").is_file() and (classifier / "classifier.json").is_file()
    return saved if complete and saved.get("cache_key") == cache_key else None


def library_versions() -> dict:
    """The versions of the libraries a demo pipeline's weights depend on (part of its cache key)."""
    from importlib.metadata import version

    return {"diffusers": version("diffusers"), "transformers": version("transformers")}


def ensure_demo_pipeline(folder: Path, classifier: Path, cache_key: dict,
                         build: Callable[[Path, Path], dict], label: str = "demo SD") -> dict:
    """The measurements of the demo pipeline at ``folder`` with its classifier judge at
    ``classifier``: read back when they were built with ``cache_key``, else built by
    ``build(pipeline folder, classifier folder)`` into temporary folders renamed into place at
    the end (stale ones are replaced only then), so the folders are complete or absent."""
    metrics = _cached(folder, classifier, cache_key)
    if metrics is not None:
        _say(f"{label}: reusing {folder}")
        return metrics
    # the classifier's folder is swapped in first (the inner block ends first), the pipeline's
    # last: its metrics file marks the build complete
    with rebuilt_folder(folder) as pipeline, rebuilt_folder(classifier) as judge:
        metrics = build(pipeline.path, judge.path)
        metrics["cache_key"] = cache_key
        write_text(pipeline.path / METRICS_FILE, json.dumps(metrics, indent=1, sort_keys=True) + "\n")
    return metrics


def training_record(train: SdTraining) -> dict:
    """``train`` as JSON (for a cache key)."""
    settings = dataclasses.asdict(train)
    settings["verify_seeds"] = list(settings["verify_seeds"])
    return settings


def ensure_sd_pipeline(root: str | os.PathLike, spec: WorldSpec = WorldSpec(),  # noqa: B008 (frozen)
                       train: SdTraining = SdTraining(), clip_train_kwargs: dict | None = None) -> dict:  # noqa: B008
    """Build (or reuse) the demo world, its Hugging Face CLIP (``root/hf_clip``) and the demo
    Stable Diffusion pipeline around that CLIP's text tower (``root/sd_pipeline``, a
    ``save_pretrained`` folder) with its classifier judge (``root/sd_classifier``).

    Reused when made from the same CLIP weights (SHA-256), world spec, settings and diffusers
    version (:func:`ensure_demo_pipeline`).

    Returns ``{"path": pipeline folder, "classifier": classifier folder, "hf_clip": CLIP folder,
    "metrics": build measurements, "world": build_world's dict}``.
    """
    from slug_pl.demo.hf_clip import ensure_hf_clip

    root = Path(root).expanduser().resolve()
    clip = ensure_hf_clip(root, spec, clip_train_kwargs)
    folder, classifier = root / PIPELINE_FOLDER, root / CLASSIFIER_FOLDER
    cache_key = {"clip_fingerprint": clip["fingerprint"], "spec": spec_record(spec), "train": training_record(train),
                 **library_versions()}
    metrics = ensure_demo_pipeline(
        folder, classifier, cache_key,
        lambda out, classifier_out: build_sd_pipeline(clip["path"], clip["world"], out, classifier_out, train))
    return {"path": str(folder), "classifier": str(classifier), "hf_clip": clip["path"], "metrics": metrics,
            "world": clip["world"]}



# ================================================================================================
# the demo's data module
# ================================================================================================


class StableDiffusionDemoWorld(DemoWorld):
    """The demo world (:class:`~slug_pl.demo.datamodule.DemoWorld`) that also builds the Stable
    Diffusion pipeline around its Hugging Face CLIP and the classifier judge
    (:func:`ensure_sd_pipeline`, cached), before a run whose target is that pipeline.

    The forget set is what a user of a real pipeline would make with ``slug-pl generate``: the
    pipeline's own images of the concept's prompts (each identity template of the world, drawn
    ``forget_images`` times with its own seeds), captioned with the prompt
    (:func:`slug_pl.data.generated.generate_forget_set`; cached per pipeline). ``forget_source:
    mined`` uses the world's captioned photos of the identity instead, as the CLIP demo does.

    The family must load ``<root>/hf_clip`` and the target ``<root>/sd_pipeline``; a mismatch is
    reported with the path to put in the config.
    """

    #: Prefixes the progress lines.
    label = "demo SD"

    def __init__(self, *args, sd_train: dict | None = None, forget_source: str = "generated",
                 forget_images: int = 15, forget_steps: int = 20, forget_guidance: float = 4.0, **kwargs):
        """
        Args:
            sd_train: overrides of the pipeline's training settings (fields of :class:`SdTraining`).
            forget_source: ``generated`` (the pipeline's images of the concept's prompts) or
                ``mined`` (the world's captioned photos of the identity).
            forget_images / forget_steps / forget_guidance: generated forget set: images per
                prompt template, DDIM steps, guidance scale.
            *args / **kwargs: as :class:`~slug_pl.demo.datamodule.DemoWorld`.
        """
        super().__init__(*args, **kwargs)
        fields = {f.name for f in dataclasses.fields(SdTraining)}
        unknown = sorted(set(sd_train or {}) - fields)
        if unknown:
            raise ValueError(f"data.init_args.sd_train: unknown settings {unknown}; allowed: {sorted(fields)}")
        if forget_source not in ("generated", "mined"):
            raise ValueError(f"data.init_args.forget_source must be 'generated' or 'mined', got {forget_source!r}")
        overrides = dict(sd_train or {})
        if "verify_seeds" in overrides:
            overrides["verify_seeds"] = tuple(overrides["verify_seeds"])
        self.sd_train = SdTraining(**overrides)
        self.forget_source = forget_source
        self.forget_generation = {"n": forget_images, "steps": forget_steps, "guidance": forget_guidance}

    def _ensure(self) -> dict:
        return self._paths(ensure_sd_pipeline(self.root, self.spec, self.sd_train, self.train_kwargs))

    @staticmethod
    def _paths(built: dict) -> dict:
        """The world's paths and the built models' (``ensure_*_pipeline``'s result): the CLIP
        (``hf_clip``), the ``pipeline`` and its ``classifier`` judge, and ``pipeline_key`` (a
        hash of the pipeline's cache key, naming its generated forget sets)."""
        key = hashlib.sha256(json.dumps(built["metrics"]["cache_key"], sort_keys=True).encode()).hexdigest()
        return {**built["world"], "hf_clip": built["hf_clip"], "metrics": built["metrics"],
                "pipeline": built["path"], "classifier": built["classifier"], "pipeline_key": key}

    def _generated_dirs(self, concept: str) -> list[Path]:
        """One folder of shards per identity template, keyed by the pipeline build and settings."""
        g = self.forget_generation
        folder = (self.root / "forget_generated" / self.paths["pipeline_key"][:12]
                  / f"{file_slug(concept)}-n{g['n']}-s{g['steps']}-g{g['guidance']:g}")
        return [folder / f"template{k}" for k in range(len(self._identity_templates()))]

    def _identity_templates(self) -> list[str]:
        return json.loads(Path(self.paths["templates_json"]).read_text())["identities"]

    def prepare_data(self) -> None:
        super().prepare_data()
        if self.forget_source != "generated":
            return
        from slug_pl.data.generated import MANIFEST_NAME, generate_forget_set

        g = self.forget_generation
        templates = self._identity_templates()
        for concept in self.concepts:
            for k, (out, template) in enumerate(zip(self._generated_dirs(concept), templates)):
                if (out / MANIFEST_NAME).is_file():
                    continue
                prompt = fill_template(template, concept)
                generate_forget_set(self.paths["pipeline"], prompt, g["n"], out, seed0=FORGET_SEED0 + 1000 * k,
                                    batch_size=g["n"], steps=g["steps"], guidance=g["guidance"], device="cpu",
                                    dtype="float32", progress=False)
                rank_zero_info(f"{self.label}: generated {g['n']} forget images of {prompt!r} into {out}")

    def check_models(self, family, target=None) -> None:
        super().check_models(family, target)
        if self.paths is not None:
            refuse_other_model("the demo builds its Stable Diffusion pipeline", self.paths["pipeline"],
                               target_source(target),
                               "model.init_args.target (slug_pl.targets.StableDiffusion) init_args.pipeline")

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.forget_source == "generated":
            self.forget = {c: [str(p) for d in self._generated_dirs(c) for p in sorted(d.glob("*.tar"))]
                           for c in self.concepts}

    def mia_pairs(self):
        """None with a generated forget set: its images were never the CLIP's training pairs, so
        membership inference has no members to find."""
        return None if self.forget_source == "generated" else super().mia_pairs()
