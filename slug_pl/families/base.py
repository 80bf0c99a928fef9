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
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

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


class ModelFamily(ABC):
    """Adapter between the SLUG core and one family of CLIP-like models."""

    #: Short family identifier written into gradient files and reports.
    family_name: str = "base"

    def __init__(self, exclude: Sequence[str] = DEFAULT_EXCLUDE, include: Sequence[str] = ()):
        """``exclude``: regexes of parameter names never ranked; ``include``: if non-empty, only
        names matching one of these regexes are ranked (applied after ``exclude``)."""
        self.exclude = tuple(exclude)
        self.include = tuple(include)

    # -- loading -------------------------------------------------------------------------------
    @abstractmethod
    def load(self) -> nn.Module:
        """Build the model with its weights, in eval mode, on the CPU."""

    @abstractmethod
    def describe(self) -> dict[str, str]:
        """Identity of the model (family, model id, weights source) for metadata and reports."""

    # -- inputs --------------------------------------------------------------------------------
    @abstractmethod
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids, shape ``(len(texts), context_length)``, dtype long."""

    @abstractmethod
    def image_transform(self) -> Callable:
        """Deterministic evaluation preprocessing: PIL image -> float tensor ``(3, H, W)``."""

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
        """Whether a tensor takes part in the layer ranking (see DESIGN.md §1)."""
        if self.tower_of(name) is None:
            return False
        if any(re.search(p, name) for p in self.exclude):
            return False
        if self.include and not any(re.search(p, name) for p in self.include):
            return False
        return True
