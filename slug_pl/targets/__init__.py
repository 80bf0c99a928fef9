"""Downstream targets: models that embed a CLIP tower and consume SLUG's edit (one file each;
see :mod:`slug_pl.targets.base`)."""

from slug_pl.targets.base import DownstreamTarget, TargetMismatchError, TargetReport
from slug_pl.targets.llava import Llava
from slug_pl.targets.stable_diffusion import StableDiffusion
from slug_pl.targets.unlearncanvas import UnlearnCanvas

__all__ = ["DownstreamTarget", "Llava", "StableDiffusion", "TargetMismatchError", "TargetReport", "UnlearnCanvas"]
