"""Diffusers pipelines as slug_pl loads and draws them: which pipeline a folder holds (Stable
Diffusion 1.x/2.x or SDXL; others refused naming what is supported), loading it without a safety
checker on a device and dtype, and drawing prompts with one seeded generator per image, so an
image depends on its prompt and seed, not on the batching. Used by the generated forget sets
(:mod:`slug_pl.data.generated`), the text-to-image targets (:mod:`slug_pl.targets.stable_diffusion`,
:mod:`slug_pl.targets.sdxl`) and the demos.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
from PIL import Image
from tqdm.auto import tqdm

from slug_pl.safety import read_descriptor

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}

class PipelineError(ValueError):
    """A missing or unusable pipeline folder, or bad drawing settings."""


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """``None`` means float16 on CUDA and float32 elsewhere."""
    if dtype is None:
        return torch.float16 if str(device).startswith("cuda") else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise PipelineError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def check_pipeline_dir(pipeline_dir: str | os.PathLike) -> Path:
    """The resolved pipeline folder; :class:`PipelineError` if it is missing or not a diffusers
    pipeline folder (one with ``model_index.json``)."""
    path = Path(pipeline_dir).expanduser()
    if not path.is_dir():
        raise PipelineError(f"pipeline folder not found: {pipeline_dir}. Give a folder written by "
                            f"StableDiffusionPipeline.save_pretrained")
    if not (path / "model_index.json").is_file():
        raise PipelineError(f"{pipeline_dir} is not a diffusers pipeline folder (no model_index.json); "
                            f"give a folder written by StableDiffusionPipeline.save_pretrained")
    return path.resolve()


#: The diffusers pipelines slug_pl loads (``model_index.json``'s ``_class_name``) and the target
#: that edits each.
SUPPORTED_PIPELINES = {"StableDiffusionPipeline": "slug_pl.targets.StableDiffusion (Stable Diffusion 1.x / 2.x)",
                       "StableDiffusionXLPipeline": "slug_pl.targets.StableDiffusionXL (SDXL)"}


def pipeline_class_name(pipeline_dir: str | os.PathLike) -> str:
    """The diffusers pipeline class a pipeline folder holds (its ``model_index.json``'s
    ``_class_name``), or :class:`PipelineError` naming what is supported when slug_pl does not
    handle it (SD 3, Flux, ...: their text encoders are not a CLIP tower slug_pl can pair)."""
    path = check_pipeline_dir(pipeline_dir)
    try:
        name = read_descriptor(path / "model_index.json", "pipeline index").get("_class_name")
    except ValueError as err:
        raise PipelineError(str(err)) from err
    if name not in SUPPORTED_PIPELINES:
        supported = "; ".join(f"{k}: {v}" for k, v in SUPPORTED_PIPELINES.items())
        raise PipelineError(f"{pipeline_dir} holds a {name} (model_index.json's _class_name), which slug_pl does not "
                            f"handle; it supports {supported}")
    return name


def load_pipeline(pipeline_dir: str | os.PathLike, device: str = "cpu",
                  dtype: torch.dtype = torch.float32, expected: str | None = None):
    """The folder's diffusers pipeline (:func:`pipeline_class_name`: Stable Diffusion or SDXL)
    loaded without a safety checker, on ``device``. ``expected``: the class the caller handles
    (a target refuses a folder of another, naming the target to use)."""
    import diffusers

    path = check_pipeline_dir(pipeline_dir)
    name = pipeline_class_name(path)
    if expected is not None and name != expected:
        raise PipelineError(f"{pipeline_dir} holds a {name}, not a {expected}: use {SUPPORTED_PIPELINES[name]}")
    # the feature extractor only prepares the safety checker's input: left out with it, so a folder
    # downloaded without safety_checker/ and feature_extractor/ loads (a plain from_pretrained
    # stops at "Can't load image processor")
    kwargs = {"safety_checker": None, "feature_extractor": None} if name == "StableDiffusionPipeline" else {}
    try:
        pipe = getattr(diffusers, name).from_pretrained(path, dtype=dtype, **kwargs)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise PipelineError(f"cannot load a {name} from {pipeline_dir}: "
                            f"{type(err).__name__}: {' '.join(str(err).split())}") from err
    return pipe.to(device)



@contextmanager
def _quiet_pipeline(pipe) -> Iterator[None]:
    """Turn off the pipeline's own per-call progress bar (we show one over all images)."""
    previous = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(**{**previous, "disable": True})
    try:
        yield
    finally:
        pipe.set_progress_bar_config(**previous)


def iter_image_batches(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int = 50,
    guidance: float = 7.5,
    batch_size: int = 8,
    height: int | None = None,
    width: int | None = None,
    output_type: Literal["pil", "pt"] = "pil",
) -> Iterator[list[Image.Image] | torch.Tensor]:
    """Yield the images of ``(prompts[i], seeds[i])`` in order, ``batch_size`` pairs at a time.

    Each pair gets its own CPU ``torch.Generator`` seeded with its seed, so its initial noise (and,
    with a deterministic scheduler such as DDIM, its image) does not depend on the batching; the
    pipeline runs on its own device and dtype (choose them before, e.g. ``pipe.to("cuda",
    torch.float16)``). ``output_type="pil"`` yields lists of RGB images, ``"pt"`` float32 CPU
    tensors ``(B, 3, H, W)`` in [0, 1]. ``height`` / ``width`` default to the pipeline's size.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds: give one seed per prompt")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    for start in range(0, len(prompts), batch_size):
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[start:start + batch_size]]
        with _quiet_pipeline(pipe), torch.no_grad():
            images = pipe(prompt=list(prompts[start:start + batch_size]), num_inference_steps=steps,
                          guidance_scale=guidance, generator=generators, height=height, width=width,
                          output_type=output_type).images
        yield images.float().cpu() if output_type == "pt" else [im.convert("RGB") for im in images]


def generate_images(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int = 50,
    guidance: float = 7.5,
    batch_size: int = 8,
    height: int | None = None,
    width: int | None = None,
    progress: bool = True,
    output_type: Literal["pil", "pt"] = "pil",
) -> list[Image.Image] | torch.Tensor:
    """All images of :func:`iter_image_batches`, with a progress bar over images: a list of PIL
    images, or one tensor ``(N, 3, H, W)`` in [0, 1] with ``output_type="pt"``.

    Same (prompt, seed) and batch size give bit-identical images; another batch size gives the
    same image up to float rounding of batched matrix products (≤ 1e-6 on [0, 1] for the float32
    test pipeline on the CPU, enough to move a few pixels by one level of 255; larger in float16).
    """
    batches = []
    with tqdm(total=len(prompts), desc="generating", unit="img", disable=not progress) as bar:
        for batch in iter_image_batches(pipe, prompts, seeds, steps, guidance, batch_size,
                                        height, width, output_type):
            batches.append(batch)
            bar.update(len(batch))
    if output_type == "pt":
        return torch.cat(batches) if batches else torch.empty(0, 3, 0, 0)
    return [image for batch in batches for image in batch]
