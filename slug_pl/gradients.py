"""The two SLUG objectives, their exact averaging, and gradient files.

Objectives (docs/design.md §1), for unit embeddings u (image) and v (text):

- forget:  L_f = (1 / N_f) · Σ_i cos(u_i, v_i) over all N_f forget pairs. g_f = ∇θ L_f is the
  direction that *raises* the similarity, so an edit θ_l ← θ_l − λ·g_f,l (λ > 0) unlearns.
  With ``per_batch`` averaging (the authors' code): L_f = (1 / N_b) · Σ_b mean_{i∈b} cos(u_i, v_i)
  over the N_b forget batches (consecutive, the last one smaller), which weighs the pairs of a
  smaller last batch more and depends on the batch size.
- retain:  L_r = (1 / N_b) · Σ_b CLIP(b) over N_b global batches, CLIP(b) the symmetric
  contrastive loss (mean of image→text and text→image cross-entropies) with the model's logit
  scale, computed on the *global* batch b.

Each batch contributes a *sum* (forget: Σ cos over its valid pairs, or with ``per_batch`` their
mean; retain: its loss, which is already a mean over the global batch); the pass divides by the
global count (pairs, or batches) once at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from slug_pl.atomic import atomic_output

FORGET_LOSS = "mean over forget pairs of cos(image_embedding, text_embedding)"
RETAIN_LOSS = "mean over global batches of the symmetric CLIP contrastive loss (model logit scale)"
#: How the forget gradient averages: over pairs (``per_sample``, the default: independent of the
#: batch size) or over batches (``per_batch``: the mean of the batch means, the authors' code).
FORGET_AVERAGING = ("per_sample", "per_batch")


def forget_loss(averaging: str = "per_sample", batch_size: int | None = None) -> str:
    """The forget objective as gradient files record it (``batch_size``: of the forget batches,
    which define the loss with ``per_batch`` averaging)."""
    if averaging not in FORGET_AVERAGING:
        raise ValueError(f"model.forget_averaging must be one of {list(FORGET_AVERAGING)}, got {averaging!r}")
    if averaging == "per_sample":
        return FORGET_LOSS
    return (f"mean over forget batches of {batch_size} pairs in order (the last one smaller) of the batch mean "
            f"of cos(image_embedding, text_embedding)")


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


def forget_gradient(family, model: nn.Module, batches: Iterable[dict],
                    averaging: str = "per_sample") -> tuple[dict[str, torch.Tensor], int]:
    """g_f = ∇θ of the mean cos(image, caption) over every valid pair of ``batches`` (one
    process; the distributed pass sums the same :func:`forget_similarity_sum` per batch); with
    ``averaging`` ``per_batch``, of the mean over batches of each batch's mean.

    ``batches`` yield dicts with ``images (B, 3, H, W)``, ``tokens (B, L)``, ``valid (B,)`` (see
    :class:`slug_pl.data.pairs.PairBatches`). Returns ``{parameter name: gradient}`` on the CPU
    (fp32; zeros for parameters the objective does not reach) and the number of pairs N_f. The
    model runs in eval mode.
    """
    forget_loss(averaging)  # checks the name
    sums = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    count, n_batches = 0, 0
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            for batch in batches:
                model.zero_grad(set_to_none=True)
                u = family.encode_image(model, batch["images"].to(device))
                v = family.encode_text(model, batch["tokens"].to(device))
                n = int(batch["valid"].sum())
                if n == 0:
                    continue
                total = forget_similarity_sum(u, v, batch["valid"].to(device))
                (total if averaging == "per_sample" else total / n).backward()
                count, n_batches = count + n, n_batches + 1
                for n, p in model.named_parameters():
                    if p.grad is not None:
                        sums[n] += p.grad
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if count == 0:
        raise ValueError("no valid forget pairs: the forget gradient is undefined")
    denominator = count if averaging == "per_sample" else n_batches
    return {n: (g / denominator).float().cpu() for n, g in sums.items()}, count


# -- gradient files ----------------------------------------------------------------------------

def _atomic_save(tensors: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str],
                 overwrite: bool = False) -> None:
    with atomic_output(path, overwrite=overwrite) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


#: The one safetensors metadata key slug_pl writes: the whole metadata as one sorted JSON object.
#: (safetensors writes several keys in an order that differs between processes, so files with
#: several keys are not byte-reproducible.)
METADATA_KEY = "slug_pl"


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, object]) -> Path:
    """Write a safetensors file atomically (temp file + rename; never overwrites).

    The metadata is stored as one JSON object (sorted keys) under :data:`METADATA_KEY`, so it
    reads back with its types and the same tensors and metadata give the same bytes in any process.
    """
    path = Path(path)
    _atomic_save(tensors, path, {METADATA_KEY: json.dumps(dict(metadata), sort_keys=True)})
    return path


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """Read a safetensors file written by :func:`save_tensors` (its metadata decoded); files from
    other tools or older slug_pl versions keep one JSON-decoded value per key (strings that are
    not JSON stay strings)."""
    path = Path(path)
    if not path.is_file():
        raise GradientFileError(f"gradient file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            raw = f.metadata() or {}
    except Exception as err:
        raise GradientFileError(f"cannot read {path}: {err}") from err
    if set(raw) == {METADATA_KEY}:
        return tensors, json.loads(raw[METADATA_KEY])
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


def check_data_identity(meta: Mapping[str, object], expected: Mapping[str, object],
                        path: str | os.PathLike) -> None:
    """Raise :class:`GradientFileError` unless a gradient file was computed from the configured
    data: the same concepts (forget set) and the same data fingerprints (``num_samples`` and every
    shard's size and head/tail hash, see :meth:`SlugDataModule.fingerprint`).

    ``expected`` holds ``concepts`` and ``data`` as this run would record them. Files written
    before slug_pl recorded ``concepts`` are checked on their data fingerprint alone.
    """
    theirs_c, ours_c = meta.get("concepts"), expected.get("concepts")
    if theirs_c is not None and list(theirs_c) != list(ours_c):
        raise GradientFileError(
            f"{path} was computed for concept(s) {list(theirs_c)}, but this run forgets {list(ours_c)}: "
            f"its forget gradient is not this run's; recompute the gradients (drop model.gradients_from) "
            f"or set data concepts to {list(theirs_c)}"
        )
    theirs_d, ours_d = meta.get("data"), expected.get("data")
    if isinstance(theirs_d, Mapping) and isinstance(ours_d, Mapping) and _data_key(theirs_d) != _data_key(ours_d):
        raise GradientFileError(
            f"{path} was computed from other {meta.get('set', '')} data ({_describe_data(theirs_d)}) than "
            f"this run's ({_describe_data(ours_d)}); recompute the gradients for this data"
        )


def _data_key(data: Mapping[str, object]) -> tuple:
    """What identifies a data set in a fingerprint: sample count and each shard's size and hash
    (not its path: moved shards stay the same data)."""
    shards = tuple((s.get("bytes"), s.get("sha256_head_tail")) for s in data.get("shards", []))
    return data.get("num_samples"), shards, json.dumps(data.get("batches"), sort_keys=True)


def _describe_data(data: Mapping[str, object]) -> str:
    shards = data.get("shards", [])
    first = shards[0].get("path") if shards else "no shards"
    batches = f", {data['batches']['policy']} batches" if isinstance(data.get("batches"), Mapping) else ""
    return f"{data.get('num_samples')} samples in {len(shards)} shard(s), first {first}{batches}"


def non_finite(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the tensors holding NaN or ±inf, in order."""
    return [n for n, t in tensors.items() if not torch.isfinite(t).all()]


def weights_fingerprint(model: nn.Module, overrides: Mapping[str, torch.Tensor] | None = None) -> str:
    """SHA-256 over every parameter and buffer (name, dtype, shape, bytes), in name order.

    Identifies the exact weights a gradient file, a partial pass or an edit belongs to, independent
    of the checkpoint's path. ``overrides`` (name -> tensor) stand in for the model's own tensors:
    the fingerprint of the weights the model held before an edit is that of the edited model with
    each edited tensor's original as override (the model is not touched). Costs one read of the
    weights (about 1 s per GB).
    """
    h = hashlib.sha256()
    state = model.state_dict()
    unknown = sorted(set(overrides or {}) - set(state))
    if unknown:
        raise KeyError(f"the model has no tensor {unknown[0]!r} to override in its fingerprint")
    state |= dict(overrides or {})
    for name in sorted(state):
        t = state[name].detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
