"""Keeping the edit off what must stay: the forget gradient projected off the inputs that the
retained prompts (or images) feed each tensor.

An edit ``ΔW`` of a linear layer changes its output for an input ``x`` by ``ΔW x``. If every row of
``ΔW`` is orthogonal to the inputs ``x_1 … x_n`` that the retained prompts feed the layer, their
outputs at that layer do not change; for an embedding table, whose input is a row index, the rows
those prompts use stay as they are. So, with ``V`` an orthonormal basis of the span of those inputs
(the singular directions above ``tolerance`` × the largest singular value; the inputs are kept as
their Gram matrix ``XᵀX``, so every token of thousands of images fits), the projected forget
gradient

    g ← g − (g V) Vᵀ          (linear weights, g of shape (d_out, d_in), V of shape (d_in, r))
    g[rows used by them] ← 0  (embedding tables)

gives a single-layer edit that leaves every state of the retained inputs unchanged (up to the
dropped singular directions), while still moving the forgotten concept's, whose inputs lie partly
outside that span. Used by downstream targets that know what must stay:

- Stable Diffusion (``StableDiffusion(protect_retained=True)``): the retained concepts' prompts,
  a small tolerance (0.05): names are discrete, repeated inputs, so their span is exact.
- LLaVA (``Llava(protect_retained=True)``): the retain set's images, every patch, a large
  tolerance (0.3): only the few directions most images share (colours, layout) are protected.
  With a small one nearly every direction of a 128-wide tower is, the step that still forgets
  grows, and fresh images break (the LLaVA demo at 0.05, protecting the validation images: other
  identities named 99 → 27 % of the time on held-out images).

Biases and layer norms have no input to project off (their "input" is shared by every token): they
are not covered, and only covered tensors are edit candidates when a projection is used.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class InputProjection:
    """What the protected prompts feed each covered tensor.

    Attributes:
        bases: linear weight name -> orthonormal basis ``(d_in, r)`` of the protected inputs (float32).
        rows: embedding weight name -> the row indices the protected prompts use (long).
        prompts: how many protected prompts were encoded.
        tolerance: singular values below this fraction of the largest were dropped.
    """

    bases: dict[str, torch.Tensor]
    rows: dict[str, torch.Tensor]
    prompts: int
    tolerance: float

    def covers(self, name: str) -> bool:
        """Whether the gradient of parameter ``name`` is projected (only those may be edited)."""
        return name in self.bases or name in self.rows

    def apply(self, grads: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``grads`` with every covered tensor projected (new tensors; the others as they are)."""
        out = dict(grads)
        for name, basis in self.bases.items():
            if name in out:
                g = out[name]
                v = basis.to(g.device, torch.float64)
                flat = g.to(torch.float64)
                out[name] = (flat - (flat @ v) @ v.T).to(g.dtype)
        for name, rows in self.rows.items():
            if name in out:
                g = out[name].clone()
                g[rows.to(g.device)] = 0
                out[name] = g
        return out

    def describe(self) -> dict:
        """For the run record: the prompts, the tolerance, and each covered tensor's protected rank."""
        return {"prompts": self.prompts, "tolerance": self.tolerance,
                "rank": {n: int(b.shape[1]) for n, b in self.bases.items()}
                | {n: int(r.numel()) for n, r in self.rows.items()}}


#: Singular directions below this fraction of the largest are taken as zero (float64 leaves ~1e-16 ×
#: the largest in the directions an exactly rank-deficient span lacks; ~1e-8 through a Gram matrix).
GRAM_FLOOR = 1e-6


def check_tolerance(tolerance: float, what: str = "tolerance") -> None:
    """A projection's tolerance is a fraction of the largest singular value in [0, 1)."""
    if not 0.0 <= tolerance < 1.0:
        raise ValueError(f"{what} is a fraction of the largest singular value in [0, 1), got {tolerance}")


def orthonormal_span(inputs: torch.Tensor, tolerance: float) -> torch.Tensor:
    """An orthonormal basis ``(d, r)`` of the span of the rows of ``inputs`` ``(n, d)``, keeping the
    singular directions whose singular value is above ``tolerance`` × the largest (and above
    :data:`GRAM_FLOOR` × it: what is left of an exactly rank-deficient span in float64 is zero)."""
    _, s, vh = torch.linalg.svd(inputs.to(torch.float64), full_matrices=False)
    keep = s > max(tolerance, GRAM_FLOOR) * s[0] if s.numel() and s[0] > 0 else torch.zeros_like(s, dtype=torch.bool)
    return vh[keep].T.to(torch.float32).contiguous()


def gram_span(gram: torch.Tensor, tolerance: float) -> torch.Tensor:
    """:func:`orthonormal_span` of inputs given by their Gram matrix ``XᵀX`` ``(d, d)`` (float64):
    the eigenvectors whose singular value ``sqrt(eigenvalue)`` is above ``tolerance`` × the
    largest (and above :data:`GRAM_FLOOR` × it). For inputs too many to keep (every patch of
    thousands of images), accumulated batch by batch."""
    eigenvalues, vectors = torch.linalg.eigh(gram.to(torch.float64))
    s = eigenvalues.clamp(min=0).sqrt()
    top = s.max() if s.numel() else torch.tensor(0.0, dtype=torch.float64)
    keep = s > max(tolerance, GRAM_FLOOR) * top if top > 0 else torch.zeros_like(s, dtype=torch.bool)
    return vectors[:, keep].flip(1).to(torch.float32).contiguous()  # largest first


@torch.no_grad()
def input_projection(model: nn.Module, prefix: str, encode: Callable[[], object], positions: torch.Tensor | None,
                     prompts: int, tolerance: float = 0.05) -> InputProjection:
    """Record what ``encode()`` (encoding the protected inputs, in one or several forward calls)
    feeds every ``nn.Linear`` and ``nn.Embedding`` whose name starts with ``prefix``, at the token
    positions ``positions`` (bool ``(B, T)``: the tokens the downstream model reads; None: every
    token of every call), and return the projection. ``prompts`` is how many inputs were encoded
    (for the record).

    Linear inputs must be ``(B, T, d)``; an embedding's index input ``(B, T)`` or ``(1, T)``
    (position ids, shared by the batch). Linear inputs are kept as their Gram matrix (float64,
    ``d × d`` per layer), so any number of inputs fits in memory.
    """
    check_tolerance(tolerance)
    grams: dict[str, torch.Tensor] = {}
    rows: dict[str, set[int]] = {}

    def linear_hook(name):
        def hook(module, args, output):
            x = args[0]
            x = (x[positions.to(x.device)] if positions is not None else x.reshape(-1, x.shape[-1]))
            x = x.detach().to(torch.float64)
            gram = x.T @ x
            grams[name] = grams[name] + gram.cpu() if name in grams else gram.cpu()
        return hook

    def embedding_hook(name):
        def hook(module, args, output):
            ids = args[0]
            if positions is not None:
                ids = ids.expand(positions.shape[0], -1) if ids.shape[0] == 1 else ids
                ids = ids[positions.to(ids.device)]
            rows.setdefault(name, set()).update(ids.unique().tolist())
        return hook

    handles = []
    for name, module in model.named_modules():
        if not name.startswith(prefix):
            continue
        if isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear_hook(name + ".weight")))
        elif isinstance(module, nn.Embedding):
            handles.append(module.register_forward_hook(embedding_hook(name + ".weight")))
    try:
        encode()
    finally:
        for handle in handles:
            handle.remove()
    bases = {name: gram_span(gram, tolerance) for name, gram in grams.items()}
    used = {name: torch.tensor(sorted(r), dtype=torch.long) for name, r in rows.items()}
    return InputProjection(bases, used, prompts, tolerance)
