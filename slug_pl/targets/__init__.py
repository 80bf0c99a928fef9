"""Downstream targets: models that embed a CLIP tower and consume SLUG's edit (one file each: an
adapter, and the target a config names, which pairs it with its judge; see
:mod:`slug_pl.targets.base`)."""

from slug_pl.targets.base import DownstreamAdapter, DownstreamTarget, TargetMismatchError, TargetReport
from slug_pl.targets.llava import Llava, LlavaAdapter
from slug_pl.targets.sdxl import StableDiffusionXL, StableDiffusionXLAdapter
from slug_pl.targets.stable_diffusion import StableDiffusion, StableDiffusionAdapter
from slug_pl.targets.unlearncanvas import UnlearnCanvas

__all__ = ["DownstreamAdapter", "DownstreamTarget", "Llava", "LlavaAdapter", "StableDiffusion",
           "StableDiffusionAdapter", "StableDiffusionXL", "StableDiffusionXLAdapter", "TargetMismatchError",
           "TargetReport", "UnlearnCanvas"]
