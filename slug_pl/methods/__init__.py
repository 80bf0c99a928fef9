"""Unlearning methods, one file each, over one shared base (:mod:`slug_pl.methods.base`).

A config chooses the method by class path (``model.class_path``), e.g.
``slug_pl.methods.SlugModule`` (SLUG: gradient pass, then the ``search:`` callback). Adding a
method is adding a file here and a config; nothing shared changes.
"""

from slug_pl.methods.base import UnlearningModule
from slug_pl.methods.slug import SlugModule, SlugSearch

__all__ = ["SlugModule", "SlugSearch", "UnlearningModule"]
