"""The two SLUG objectives, their exact averaging, and gradient files.

Objectives (DESIGN.md §1), for unit embeddings u (image) and v (text):

- forget:  L_f = (1 / N_f) · Σ_i cos(u_i, v_i) over all N_f forget pairs. g_f = ∇θ L_f is the
  direction that *raises* the similarity, so an edit θ_l ← θ_l − λ·g_f,l (λ > 0) unlearns.
- retain:  L_r = (1 / N_b) · Σ_b CLIP(b) over N_b global batches, CLIP(b) the symmetric
  contrastive loss (mean of image→text and text→image cross-entropies) with the model's logit
  scale, computed on the *global* batch b.

Each batch contributes a *sum* (forget: Σ cos over its valid pairs; retain: its loss, which is
already a mean over the global batch); the pass divides by the global count once at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from slug_pl.atomic import atomic_output

FORGET_LOSS = "mean over forget pairs of cos(image_embedding, text_embedding)"
RETAIN_LOSS = "mean over global batches of the symmetric CLIP contrastive loss (model logit scale)"


class GradientFileError(ValueError):
    """A gradient file is unreadable or does not match the model."""


def forget_similarity_sum(image_features: torch.Tensor, text_features: torch.Tensor,
                          valid: torch.Tensor) -> torch.Tensor:
    """Σ over valid rows of cos(u_i, v_i); features ``(B, D)``, ``valid`` bool ``(B,)``."""
    cos = F.cosine_similarity(image_features.float(), text_features.float(), dim=-1)
    return (cos * valid.float()).sum()


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor,
                     logit_scale: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric CLIP loss over the valid rows of a (global) batch; features ``(B, D)``.

    Invalid rows (padding) take no part: they are dropped before the similarity matrix.
    """
    if valid is not None:
        image_features, text_features = image_features[valid], text_features[valid]
    u = F.normalize(image_features.float(), dim=-1)
    v = F.normalize(text_features.float(), dim=-1)
    logits = logit_scale.float() * u @ v.T
    target = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


# -- gradient files ----------------------------------------------------------------------------

def _atomic_save(tensors: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str],
                 overwrite: bool = False) -> None:
    with atomic_output(path, overwrite=overwrite) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, object]) -> Path:
    """Write a safetensors file atomically (temp file + rename; never overwrites).

    Every metadata value is stored JSON-encoded (strings too), so it reads back with its type.
    """
    meta = {k: json.dumps(v, sort_keys=True) for k, v in metadata.items()}
    path = Path(path)
    _atomic_save(tensors, path, meta)
    return path


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """Read a safetensors file written by :func:`save_tensors`; JSON metadata is decoded (values
    that are not JSON, from files written by other tools, stay strings)."""
    path = Path(path)
    if not path.is_file():
        raise GradientFileError(f"gradient file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            raw = f.metadata() or {}
    except Exception as err:
        raise GradientFileError(f"cannot read {path}: {err}") from err
    meta: dict[str, object] = {}
    for k, v in raw.items():
        try:
            meta[k] = json.loads(v)
        except json.JSONDecodeError:
            meta[k] = v
    return tensors, meta


def check_matches_model(grads: Mapping[str, torch.Tensor], model: nn.Module, path: str | os.PathLike,
                        require_all: bool = False) -> None:
    """Raise :class:`GradientFileError` unless every gradient names a model parameter of its shape
    and is finite; with ``require_all``, also unless every trainable parameter has a gradient."""
    params = dict(model.named_parameters())
    unknown = [n for n in grads if n not in params]
    if unknown:
        raise GradientFileError(
            f"{path} has {len(unknown)} tensor(s) the model does not have (e.g. {unknown[:3]}): it "
            f"was computed for another model; recompute the gradients for this model"
        )
    if require_all:
        missing = [n for n, p in params.items() if p.requires_grad and n not in grads]
        if missing:
            raise GradientFileError(
                f"{path} lacks {len(missing)} of the model's {len(params)} parameters (e.g. "
                f"{missing[:3]}): it was computed for another model or is incomplete; recompute the "
                f"gradients for this model"
            )
    wrong = [(n, tuple(g.shape), tuple(params[n].shape)) for n, g in grads.items() if g.shape != params[n].shape]
    if wrong:
        raise GradientFileError(
            f"{path}: shape mismatch for {len(wrong)} tensor(s), e.g. {wrong[0][0]} is "
            f"{wrong[0][1]} in the file but {wrong[0][2]} in the model; recompute the gradients"
        )
    bad = non_finite(grads)
    if bad:
        raise GradientFileError(f"{path} has NaN/inf in {len(bad)} tensor(s), e.g. {bad[0]}; recompute "
                                f"the gradients (see the checks of the gradient pass)")


def check_model_identity(meta: Mapping[str, object], model_id: Mapping[str, str], weights_sha256: str,
                         path: str | os.PathLike) -> None:
    """Raise :class:`GradientFileError` if a gradient file's metadata names another model.

    ``model_id`` is the family's ``describe()``. When the file records the weights' fingerprint
    (``model_sha256``, written since slug_pl 0.1), it decides: equal weights match even if the
    checkpoint moved. Otherwise family and model name must agree.
    """
    recorded = meta.get("model_sha256")
    if recorded is not None:
        if recorded != weights_sha256:
            raise GradientFileError(
                f"{path} was computed for other weights (model {meta.get('model')}, weights sha256 "
                f"{str(recorded)[:12]}…) than the loaded model ({dict(model_id)}, sha256 "
                f"{weights_sha256[:12]}…); recompute the gradients for this model"
            )
        return
    theirs = meta.get("model")
    if isinstance(theirs, Mapping):
        for key in ("family", "model_name"):
            if key in theirs and key in model_id and theirs[key] != model_id[key]:
                raise GradientFileError(
                    f"{path} was computed for {key} {theirs[key]!r}, but the model is "
                    f"{model_id[key]!r}; recompute the gradients for this model"
                )


def non_finite(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the tensors holding NaN or ±inf, in order."""
    return [n for n, t in tensors.items() if not torch.isfinite(t).all()]


def weights_fingerprint(model: nn.Module) -> str:
    """SHA-256 over every parameter and buffer (name, dtype, shape, bytes), in name order.

    Identifies the exact weights a gradient file or a partial pass belongs to, independent of the
    checkpoint's path. Costs one read of the weights (about 1 s per GB).
    """
    h = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        t = state[name].detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
