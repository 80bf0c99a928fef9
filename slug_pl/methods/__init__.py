"""Unlearning methods, one file each, over one shared base (:mod:`slug_pl.methods.base`).

A config chooses the method by class path (``model.class_path``), e.g.
``slug_pl.methods.SlugModule`` (SLUG: gradient pass, then the ``search:`` callback) or a baseline
(``FtModule``, ``GaModule``, ``GaftModule``, ``SalunModule``, ``SsdModule``: see
:mod:`slug_pl.methods.trained` and ``configs/baselines/``). Adding a method is adding a file here
and a config; nothing shared changes.
"""

from slug_pl.methods.base import UnlearningModule
from slug_pl.methods.ft import FtModule
from slug_pl.methods.ga import GaModule
from slug_pl.methods.gaft import GaftModule
from slug_pl.methods.salun import SalunModule
from slug_pl.methods.slug import SlugModule, SlugSearch
from slug_pl.methods.ssd import SsdModule
from slug_pl.methods.trained import BaselineModule, TrainedModule

__all__ = ["BaselineModule", "FtModule", "GaModule", "GaftModule", "SalunModule", "SlugModule", "SlugSearch",
           "SsdModule", "TrainedModule", "UnlearningModule"]
