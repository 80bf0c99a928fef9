"""The model-family adapter: everything the core needs to know about a CLIP-like model.

The core (gradient pass, ranking, search, evaluation) only talks to a :class:`ModelFamily`. A new
family (Hugging Face CLIP, Stable Diffusion's text encoder, LLaVA's vision tower) is a new subclass
in its own file; nothing in the core changes. Adapters are stateless about weights: ``load()``
returns a fresh ``nn.Module`` and every other method takes that module as an argument.

Conventions every adapter follows:

- ``encode_image`` / ``encode_text`` return *unnormalized* embeddings of shape ``(B, D)``; the
  core normalizes.
- ``logit_scale`` returns the multiplicative scale (already exponentiated), a 0-dim tensor.
- Parameter names are the model's own ``named_parameters()`` names: gradient files and edits use
  them, so a downstream model can find the tensor it shares.
- Images are normalized with the statistics the model was trained with: the model's own
  preprocessing config unless the user gives ``image_mean`` / ``image_std``; ``describe()``
  records the ones used.
"""

from __future__ import annotations

import math
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

if TYPE_CHECKING:
    from slug_pl.edit import LayerEdit

Tower = Literal["vision", "text"]

#: Default patterns (regular expressions on parameter names) of tensors never ranked: biases,
#: the logit scale, token / positional / class embeddings. Families may extend them.
DEFAULT_EXCLUDE = (
    r"(^|\.)bias$",
    r"(^|\.)in_proj_bias$",
    r"logit_scale$",
    r"logit_bias$",
    r"token_embedding",
    r"positional_embedding",
    r"class_embedding",
)

#: The authors' ranking filter (CSIPlab/SLUG ``src/clip/unlearn_slug.py``): a tensor whose name
#: contains one of these substrings is not ranked, every other one with a forget gradient is (on
#: open_clip models that includes the ViT patch embedding ``visual.conv1.weight``). As ``exclude``
#: patterns they give the same set. Part of the reference preset (docs/reference.md).
AUTHORS_EXCLUDE = ("bias", "logit_scale", "position", "embedding")


def optional_text(value: str | None) -> str | None:
    """``value``, with the strings ``"None"`` and ``"null"`` read as None.

    jsonargparse turns a null given on the command line to an option of a class nested in another
    (``--model.family.init_args.pretrained null``) into the string ``"None"``, while the same null
    in a config file arrives as None; families read both as None (random init, no cache folder)."""
    return None if value in ("None", "null") else value


@dataclass
class TowerStages:
    """One tower split at its transformer blocks, for evaluation that recomputes only what an edit
    changes (see :class:`slug_pl.evaluation.evaluator.Evaluator`).

    ``embed(inputs)`` gives the hidden state entering block 0 (in the layout the blocks expect);
    ``blocks[i](hidden)`` runs block i; ``head(hidden, inputs)`` gives the unnormalized
    embeddings ``(B, D)`` from the hidden state after the last block (``inputs`` for pooling
    that needs them, such as text end-of-text positions). ``first_block(name)`` is the index of
    the first stage a parameter influences: 0 for embedding parameters, i for block i,
    ``len(blocks)`` for head parameters.
    """

    embed: Callable[[torch.Tensor], torch.Tensor]
    blocks: Sequence[Callable[[torch.Tensor], torch.Tensor]]
    head: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    first_block: Callable[[str], int]

    def run(self, inputs: torch.Tensor, start: int = 0, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings from ``inputs``; with ``hidden`` (the state entering block ``start``) the
        stages before ``start`` are skipped."""
        x = self.embed(inputs) if hidden is None else hidden
        for block in self.blocks[start if hidden is not None else 0:]:
            x = block(x)
        return self.head(x, inputs)

    def hidden_before(self, inputs: torch.Tensor, start: int) -> torch.Tensor:
        """The hidden state entering block ``start``."""
        x = self.embed(inputs)
        for block in self.blocks[:start]:
            x = block(x)
        return x


def channel_stats(name: str, values: Sequence[float] | None, positive: bool = False) -> list[float] | None:
    """``values`` checked as one finite number per RGB channel (``> 0`` with ``positive``), as a
    list of floats; None stays None."""
    if values is None:
        return None
    stats = [float(v) for v in values]
    if len(stats) != 3 or not all(math.isfinite(v) and (v > 0 or not positive) for v in stats):
        need = "three positive numbers" if positive else "three finite numbers"
        raise ValueError(f"{name} must be {need}, one per RGB channel (e.g. [0.5, 0.5, 0.5]), got {list(values)}")
    return stats


class ModelFamily(ABC):
    """Adapter between the SLUG core and one family of CLIP-like models."""

    #: Short family identifier written into gradient files and reports.
    family_name: str = "base"

    def __init__(self, exclude: Sequence[str] = DEFAULT_EXCLUDE, include: Sequence[str] = (),
                 image_mean: Sequence[float] | None = None, image_std: Sequence[float] | None = None):
        """``exclude``: regexes of parameter names never ranked; ``include``: if non-empty, only
        names matching one of these regexes are ranked (applied after ``exclude``).
        ``image_mean`` / ``image_std``: per-channel statistics images are normalized with
        (``(x - mean) / std`` on pixels in [0, 1]); None: the model's own preprocessing config."""
        self.exclude = tuple(exclude)
        self.include = tuple(include)
        self.image_mean = channel_stats("image_mean", image_mean)
        self.image_std = channel_stats("image_std", image_std, positive=True)

    # -- loading -------------------------------------------------------------------------------
    @abstractmethod
    def load(self) -> nn.Module:
        """Build the model with its weights, in eval mode, on the CPU."""

    @abstractmethod
    def describe(self) -> dict[str, object]:
        """Identity of the model (family, model id, weights source, the ``image_mean`` /
        ``image_std`` images are normalized with) for metadata and reports."""

    def save_edited(self, model: nn.Module, edits: Sequence[LayerEdit], folder: str | os.PathLike) -> Path:
        """Write ``model``, which carries ``edits``, into the new folder ``folder`` in the form its
        own library loads without slug_pl (e.g. a ``save_pretrained`` folder); complete or absent,
        never over an existing folder. Returns the folder. Families that support it override this."""
        raise NotImplementedError(f"the {self.family_name} family cannot save an edited model; keep the run's "
                                  f"edit.safetensors and apply it to the base model (slug_pl.patch.SlugPatch)")

    # -- inputs --------------------------------------------------------------------------------
    @abstractmethod
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids, shape ``(len(texts), context_length)``, dtype long."""

    @abstractmethod
    def image_transform(self) -> Callable:
        """Deterministic evaluation preprocessing: PIL image -> float tensor ``(3, H, W)``."""

    def train_image_transform(self) -> Callable:
        """The training preprocessing of the authors' retain batches: open_clip's training
        transform (a random resized crop to the model's image size, area scale 0.9–1, bicubic;
        then RGB, to tensor and :meth:`image_normalization`). Random: draws from torch's global
        generator, so the caller seeds it. Families that support the reference retain batches
        override this."""
        raise NotImplementedError(
            f"the {self.family_name} family has no training transform; data.retain_batches: reference "
            f"needs one (use in_order)"
        )

    def image_normalization(self) -> dict[str, list[float] | None]:
        """``{"image_mean": [r, g, b], "image_std": [r, g, b]}``: the statistics
        :meth:`image_transform` normalizes with (the user's, else the model's own). Families
        override this to fill in their model's own; the base knows only the user's (None where
        not given)."""
        return {"image_mean": self.image_mean, "image_std": self.image_std}

    # -- forward -------------------------------------------------------------------------------
    @abstractmethod
    def encode_image(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Unnormalized image embeddings ``(B, D)`` for images ``(B, 3, H, W)``."""

    @abstractmethod
    def encode_text(self, model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        """Unnormalized text embeddings ``(B, D)`` for token ids ``(B, L)``."""

    @abstractmethod
    def logit_scale(self, model: nn.Module) -> torch.Tensor:
        """The contrastive logit scale (exponentiated, > 0), a 0-dim tensor."""

    # -- structure -----------------------------------------------------------------------------
    @abstractmethod
    def tower_of(self, name: str) -> Tower | None:
        """Which tower a parameter belongs to (``None`` for shared tensors such as the scale)."""

    def tower_stages(self, model: nn.Module, tower: Tower) -> TowerStages | None:
        """The tower split into stages, or None when the family does not support partial
        re-evaluation (evaluation then recomputes the whole tower)."""
        return None

    def enable_activation_checkpointing(self, model: nn.Module) -> None:
        """Recompute activations in backward (memory for compute); families that support it
        override this."""
        raise NotImplementedError(
            f"the {self.family_name} family does not support activation checkpointing; set "
            f"model.activation_checkpointing: false"
        )

    def is_rankable(self, name: str, param: torch.Tensor) -> bool:
        """Whether a tensor takes part in the layer ranking (see docs/design.md §1)."""
        if self.tower_of(name) is None:
            return False
        if any(re.search(p, name) for p in self.exclude):
            return False
        if self.include and not any(re.search(p, name) for p in self.include):
            return False
        return True
