"""Model-family adapters. A family is named in configs by its class path, e.g.
``slug_pl.families.OpenClip`` or ``slug_pl.families.HfClip``; adding one is adding a file here
(see ``base.py``)."""

from slug_pl.families.base import ModelFamily
from slug_pl.families.hf_clip import HfClip
from slug_pl.families.open_clip import OpenClip

__all__ = ["HfClip", "ModelFamily", "OpenClip"]
