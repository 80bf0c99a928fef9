"""The offline UnlearnCanvas demo: the synthetic canvas, a Hugging Face CLIP trained on its
captions, a small Stable-Diffusion-shaped pipeline trained on it around that CLIP's text tower,
and style / object classifiers that judge the pipeline's images, all built once and cached.

What is built under ``root`` (default ``.slug_cache/demo``):

- ``canvas/``: the synthetic UnlearnCanvas (:func:`slug_pl.demo.canvas.build_canvas`: the demo
  world's objects in six procedural styles, ``<Style>/<Object>/<n>.png``);
- ``unlearncanvas/classifiers/{style,object}.json``: small CNNs trained on the canvas
  (:func:`slug_pl.demo.canvas.train_canvas_classifiers`), the benchmark's ViT-L classifiers'
  stand-ins, trained on the painted images and the pipeline VAE's reconstructions of them (the
  look of generated images; see :func:`train_canvas_pipeline`);
- ``unlearncanvas/clip/``: a tiny ``CLIPModel`` trained on the training split's images, each
  captioned in several ways (:data:`CANVAS_CLIP_CAPTIONS`: the benchmark's ``"A {object} image in
  {style} style."``, other phrasings, the object alone, the style alone;
  :func:`slug_pl.demo.hf_clip.fit_hf_clip`), as a web-trained CLIP has read a style with many
  subjects and an object in many styles;
- ``unlearncanvas/sd_pipeline/``: VAE and UNet of :mod:`slug_pl.demo.sd` trained on the same
  pairs (:func:`~slug_pl.demo.sd.train_vae`, :class:`~slug_pl.demo.sd.UnetTrainer`) with the
  CLIP's text tower as the frozen text encoder; the UNet trains in rounds until every style is
  recognized by the style classifier in at least ``min_recognition`` of its generations (the
  whole prompt grid, ``verify_seeds``), or ``max_unet_steps``;
- ``unlearncanvas/slug_demo_canvas.json``: the cache key and every measurement of the build.

Styles are easier to draw than the SD demo's identities (whole-image colour and texture, not a
face's attributes), so the pipeline trains with fewer steps (:data:`CANVAS_SD_TRAINING`).

:class:`UnlearnCanvasDemo` is the demo's data module (``configs/demo_unlearncanvas.yaml``): it
builds all of this, then serves the canvas like any UnlearnCanvas tree
(:class:`~slug_pl.data.canvas_datamodule.UnlearnCanvasDataModule`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from slug_pl.atomic import rebuilt_folder, write_text
from slug_pl.data.canvas_datamodule import UnlearnCanvasDataModule
from slug_pl.data.unlearncanvas import CAPTION_TEMPLATE
from slug_pl.demo.canvas import CanvasSpec, build_canvas, train_canvas_classifiers
from slug_pl.demo.sd import SdTraining
from slug_pl.demo.datamodule import refuse_other_model, target_source
from slug_pl.demo.training import one_thread

#: Bump when the build changes (what is trained, or how): invalidates cached builds.
BUILD_VERSION = 3
CANVAS_FOLDER = "canvas"
MODELS_FOLDER = "unlearncanvas"
METRICS_FILE = "slug_demo_canvas.json"
#: The split of the canvas the CLIP and the pipeline train on: the data module's default, so its
#: validation and test images are held out from both.
DEMO_SPLIT = (0.9, 0.05, 0.05)
#: The pipeline's training for the canvas (see the module docstring).
CANVAS_SD_TRAINING = SdTraining(vae_steps=600, unet_steps=600, unet_round_steps=300, max_unet_steps=1500,
                                min_recognition=0.8)
#: The CLIP's training (arguments of :func:`slug_pl.demo.hf_clip.fit_hf_clip`). With the caption
#: variants below, 120 epochs reach 100 % / 85 % held-out zero-shot top-1 on styles / objects
#: (40: 96.7 / 65.0 %); with the benchmark's caption alone, more epochs only overfit its 60 texts.
CANVAS_CLIP_TRAINING = {"epochs": 120, "batch_size": 64, "lr": 2e-3, "seed": 0}
#: The ways the CLIP's training captions an image (one drawn per image and epoch). Trained on the
#: benchmark's single template alone (60 distinct texts), every tensor of its text tower carried
#: style and object together, so no single-tensor edit could remove one and keep the other. None is
#: a zero-shot template of the evaluation (:data:`slug_pl.data.unlearncanvas.STYLE_TEMPLATES`,
#: ``OBJECT_TEMPLATES``). The pipeline itself trains on the benchmark's captions only.
CANVAS_CLIP_CAPTIONS = (
    CAPTION_TEMPLATE,  # the benchmark's, which the pipeline trains on
    "a {object} drawn in {style} style",
    "{style} style artwork of a {object}.",
    "a {object}.",
    "a drawing of a {object}.",
    "made in {style} style.",
    "a {style} style picture.",
)


def _say(msg: str) -> None:
    print(msg, flush=True)


def _pixels(paths: list[Path]) -> torch.Tensor:
    """PNG files -> ``(N, 3, H, W)`` float32 in [-1, 1]."""
    arrays = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 127.5 - 1.0 for p in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def train_canvas_clip(canvas_root: str | os.PathLike, out: str | os.PathLike, image_size: int,
                      settings: dict = CANVAS_CLIP_TRAINING) -> dict:  # noqa: B006 (read only)
    """Train the tiny HF CLIP (:func:`~slug_pl.demo.hf_clip.tiny_clip_config`) on the canvas's
    training pairs (split :data:`DEMO_SPLIT`) into the new folder ``out``; return its held-out
    zero-shot top-1 on the test split's styles and objects (fractions) and the training record."""
    from slug_pl.data.unlearncanvas import UnlearnCanvasSet, caption
    from slug_pl.demo.hf_clip import clip_image_processor, fit_hf_clip, tiny_clip_config
    from slug_pl.evaluation.zeroshot import class_embeddings, image_embeddings, topk_hits
    from slug_pl.families.hf_clip import HfClip, ProcessorTransform

    data = UnlearnCanvasSet(str(canvas_root), split_fractions=DEMO_SPLIT).load()
    train = data.splits["train"]
    transform = ProcessorTransform(clip_image_processor(image_size))
    images = torch.stack([transform(Image.open(i.path).convert("RGB")) for i in train])
    captions = [[caption(i.style, i.object, template) for template in CANVAS_CLIP_CAPTIONS] for i in train]
    fitted = fit_hf_clip(images, captions, tiny_clip_config(image_size=image_size), out,
                         label="demo canvas CLIP", **settings)
    family = HfClip(model_name=str(Path(out).resolve()))
    model = family.load()
    for kind in ("style", "object"):
        test = data.labelled("test", kind, family.image_transform())
        logits = image_embeddings(family, model, test.images) @ class_embeddings(
            family, model, test.classnames, test.templates).T
        fitted[f"{kind}s_top1"] = topk_hits(logits, test.labels, 1).float().mean().item()
    _say(f"demo canvas CLIP: held-out zero-shot top-1 styles {fitted['styles_top1']:.3f} objects "
         f"{fitted['objects_top1']:.3f}")
    return fitted


def _style_check(pipe, judge, styles: list[str], objects: list[str], s: SdTraining) -> dict:
    """Per style, the fraction of its generations (every object, ``verify_seeds``) the style
    classifier names correctly; also the objects' mean accuracy. ``min`` / ``mean`` over styles."""
    from slug_pl.pipelines import generate_images
    from slug_pl.evaluation.unlearncanvas import classify, prompt_grid

    prompts = prompt_grid(styles, objects, s.verify_seeds)
    images = generate_images(pipe, [p.text for p in prompts], [p.seed for p in prompts], steps=s.verify_steps,
                             guidance=s.verify_guidance, batch_size=64, progress=False, output_type="pt")
    pred_s, pred_o = classify(judge, images)
    per = {st: float(np.mean([q == st for q, p in zip(pred_s, prompts) if p.style == st])) for st in styles}
    return {"per_style": per, "min": min(per.values()), "mean": float(np.mean(list(per.values()))),
            "objects_mean": float(np.mean([q == p.object for q, p in zip(pred_o, prompts)])),
            "images_per_style": len(objects) * len(s.verify_seeds)}


def _reconstructions(vae):
    """Images ``(N, 3, H, W)`` in [0, 1] -> the VAE's reconstructions of them, in [0, 1]."""

    @torch.no_grad()
    def reconstruct(images: torch.Tensor) -> torch.Tensor:
        out = [vae.decode(vae.encode(images[i:i + 256] * 2 - 1).latent_dist.mean).sample
               for i in range(0, len(images), 256)]
        return ((torch.cat(out) + 1) / 2).clamp(0, 1)

    return reconstruct


def train_canvas_pipeline(canvas_root: str | os.PathLike, clip_folder: str | os.PathLike,
                          classifiers_out: str | os.PathLike, out: str | os.PathLike,
                          s: SdTraining = CANVAS_SD_TRAINING) -> dict:
    """Train the demo pipeline (:mod:`slug_pl.demo.sd`'s VAE and UNet) on the canvas's training
    pairs around the text tower of ``clip_folder`` and save it to the new folder ``out``.

    Between the two, the style and object classifiers are trained
    (:func:`~slug_pl.demo.canvas.train_canvas_classifiers`, saved to ``classifiers_out``) on the
    canvas's images and the VAE's reconstructions of them: the look of generated images, which the
    small VAE blurs (without them, generations of the dot-painted ``Pointillism`` were never
    recognized: 0 % of them, every other style 100 %). They decide when the UNet has trained
    enough (:meth:`~slug_pl.demo.sd.UnetTrainer.until_recognized`) and judge the report.
    """
    from slug_pl.data.unlearncanvas import UnlearnCanvasSet
    from slug_pl.demo.sd import pipeline_trainer, text_encoder_from_clip, train_vae, vae_latents
    from slug_pl.evaluation.unlearncanvas import CheckpointClassifier

    t0 = time.perf_counter()
    data = UnlearnCanvasSet(str(canvas_root), split_fractions=DEMO_SPLIT).load()
    train = data.splits["train"]
    pixels = _pixels([i.path for i in train])
    text_encoder, tokenizer = text_encoder_from_clip(clip_folder)
    vae, vae_mse = train_vae(pixels, s)
    latents = vae_latents(vae, pixels)
    t_vae = time.perf_counter() - t0
    _say(f"demo canvas SD: VAE trained ({s.vae_steps} steps, reconstruction MSE {vae_mse:.4f}; {t_vae:.0f}s)")

    judges = train_canvas_classifiers(canvas_root, classifiers_out, views=_reconstructions(vae),
                                      views_name="the demo pipeline's VAE reconstructions")
    _say(f"demo canvas: classifiers' held-out accuracy: style {judges['style']['accuracy']:.3f}, object "
         f"{judges['object']['accuracy']:.3f} ({judges['time_s']:.0f}s)")
    judge = CheckpointClassifier(judges["style"]["config"], judges["object"]["config"])

    pipe, trainer = pipeline_trainer(vae, text_encoder, tokenizer, latents, [data.caption(i) for i in train], s)
    styles, objects = list(data.layout.styles), list(data.layout.objects)
    check = trainer.until_recognized(lambda: _style_check(pipe, judge, styles, objects, s), "styles", "style")
    pipe.save_pretrained(out)
    return {"vae_mse": vae_mse, "vae_seconds": round(t_vae, 1), "unet_steps": trainer.steps_done,
            "unet_loss": trainer.last_loss, "rounds": trainer.rounds, "recognition": check,
            "unet_parameters": sum(p.numel() for p in pipe.unet.parameters()), "classifiers": judges,
            "seconds": round(time.perf_counter() - t0, 1)}


def _settings() -> dict:
    sd = dataclasses.asdict(CANVAS_SD_TRAINING)
    sd["verify_seeds"] = list(sd["verify_seeds"])
    return {"sd": sd, "clip": dict(CANVAS_CLIP_TRAINING), "clip_captions": list(CANVAS_CLIP_CAPTIONS),
            "split": list(DEMO_SPLIT)}


def ensure_canvas_demo(root: str | os.PathLike, spec: CanvasSpec = CanvasSpec()) -> dict:  # noqa: B008 (frozen)
    """Build (or reuse) the canvas at ``root/canvas`` and the classifiers, CLIP and pipeline at
    ``root/unlearncanvas`` (module docstring). Reused when made from the same canvas
    (fingerprint), settings and library versions; a new build is made in a temporary folder and
    renamed into place, so the folder is complete or absent.

    Returns ``{"canvas": tree folder, "clip", "pipeline", "style_classifier",
    "object_classifier": paths, "metrics": the build's measurements}``.
    """
    from importlib.metadata import version

    root = Path(root).expanduser().resolve()
    canvas = build_canvas(root / CANVAS_FOLDER, spec)
    folder = root / MODELS_FOLDER
    cache_key = {"build_version": BUILD_VERSION, "canvas_fingerprint": canvas["fingerprint"],
                 "spec": dataclasses.asdict(spec), **_settings(),
                 "diffusers": version("diffusers"), "transformers": version("transformers")}
    cache_key = json.loads(json.dumps(cache_key))  # tuples as lists, as it reads back
    try:
        metrics = json.loads((folder / METRICS_FILE).read_text())
    except (OSError, ValueError):
        metrics = None
    if metrics is not None and metrics.get("cache_key") == cache_key:
        _say(f"demo canvas: reusing {folder}")
    else:
        with one_thread(), rebuilt_folder(folder) as build:
            tmp = build.path
            t0 = time.perf_counter()
            clip = train_canvas_clip(canvas["root"], tmp / "clip", spec.image_size)
            sd = train_canvas_pipeline(canvas["root"], tmp / "clip", tmp / "classifiers", tmp / "sd_pipeline")
            classifiers = sd.pop("classifiers")
            for kind in ("style", "object"):  # recorded relative to the cache folder (tmp is renamed)
                classifiers[kind]["config"] = Path(classifiers[kind]["config"]).relative_to(tmp).as_posix()
            metrics = {"cache_key": cache_key, "classifiers": classifiers, "clip": clip, "sd": sd,
                       "total_seconds": round(time.perf_counter() - t0, 1)}
            write_text(tmp / METRICS_FILE, json.dumps(metrics, indent=1, sort_keys=True) + "\n")
    return {"canvas": canvas["root"], "clip": str(folder / "clip"), "pipeline": str(folder / "sd_pipeline"),
            "style_classifier": str(folder / "classifiers" / "style.json"),
            "object_classifier": str(folder / "classifiers" / "object.json"), "metrics": metrics}


class UnlearnCanvasDemo(UnlearnCanvasDataModule):
    """The demo canvas as a SLUG run's data: builds everything (:func:`ensure_canvas_demo`,
    cached) in ``prepare_data``, then serves the canvas as
    :class:`~slug_pl.data.canvas_datamodule.UnlearnCanvasDataModule` does (split
    :data:`DEMO_SPLIT`, the one the CLIP and the pipeline were trained on).

    The family must load ``<root>/unlearncanvas/clip`` and the target
    ``<root>/unlearncanvas/sd_pipeline``; a mismatch is reported with the path to put in the config.
    """

    def __init__(self, root: str = ".slug_cache/demo", forget_style: str | None = None,
                 forget_object: str | None = None, batch_size: int = 64, retain_batch_size: int | None = 128,
                 eval_batch_size: int = 512, num_workers: int = 0):
        """
        Args:
            root: the demo's cache folder.
            forget_style / forget_object: what to unlearn (a folder name of the canvas, e.g.
                ``Watercolor`` or ``Apple``); exactly one.
            batch_size / retain_batch_size / eval_batch_size / num_workers: as in
                :class:`~slug_pl.data.datamodule.SlugDataModule`.
        """
        self.demo_root = Path(root).expanduser()
        super().__init__(str(self.demo_root / CANVAS_FOLDER), forget_style=forget_style, forget_object=forget_object,
                         split_fractions=DEMO_SPLIT, shards_dir=str(self.demo_root / "unlearncanvas_shards"),
                         batch_size=batch_size, retain_batch_size=retain_batch_size, num_workers=num_workers,
                         eval_batch_size=eval_batch_size)
        self.built: dict | None = None

    def prepare_data(self) -> None:
        self.built = ensure_canvas_demo(self.demo_root)
        super().prepare_data()

    def setup(self, stage: str) -> None:
        if self.built is None:  # prepare_data ran in another process (DDP): read the cache
            self.built = ensure_canvas_demo(self.demo_root)
        super().setup(stage)

    def check_models(self, family, target=None) -> None:
        if self.built is None:
            return
        refuse_other_model("the UnlearnCanvas demo builds its CLIP", self.built["clip"],
                           family.describe().get("model_name"), "model.init_args.family.init_args.model_name")
        refuse_other_model("the UnlearnCanvas demo builds its Stable Diffusion pipeline", self.built["pipeline"],
                           target_source(target), "model.init_args.target.init_args.pipeline")
