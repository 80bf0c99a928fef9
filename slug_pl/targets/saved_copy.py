"""The edited downstream model on disk: a copy of its original folder in which only the edited
tensors change.

A downstream model often runs in another dtype than it is stored in (Stable Diffusion in float16
and LLaVA in bfloat16 on a GPU, from float32 or float16 files). Saving the model as it runs would
round *every* tensor to the running dtype; instead :func:`copy_with_tensors` copies the original
folder file by file and rewrites only the safetensors files that hold an edited tensor: there the
edited tensor gets the new value in the file's own dtype and every other tensor keeps its stored
bytes. So the saved model differs from the original in exactly the edited tensors, whatever dtype
the run used.

A tensor is found in the files by its name relative to the embedded tower (e.g.
``encoder.layers.3.self_attn.v_proj.weight``; a file key matches when it is that name or ends with
``"." + name``, so both older and newer key layouts are found) *and* by its value: the stored tensor
must be the value the model loaded (bit-equal in float32, else within a rounding step). Every file
holding it is rewritten (e.g. a ``model.safetensors`` and its ``model.fp16.safetensors`` variant);
a ``pytorch_model*.bin`` beside such a file would still hold the old value and is left out of the
copy (loaders prefer safetensors anyway).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from slug_pl.atomic import atomic_folder


class NoSafetensorsError(ValueError):
    """The original folder keeps the edited tensor's weights in no safetensors file."""


@dataclass(frozen=True)
class TensorChange:
    """One edited tensor: its value as the model loaded it (any dtype, for finding it in the
    files) and its new value (float32 from the CLIP; cast to each file's dtype when written)."""

    original: torch.Tensor
    new: torch.Tensor


def _same(stored: torch.Tensor, loaded: torch.Tensor) -> bool:
    """Whether ``loaded`` holds ``stored``'s weights: bit-equal when both are float32, else within
    one rounding step of the coarser dtype (a float32 file loaded in bfloat16 and its float16
    variant are rounded differently)."""
    if stored.shape != loaded.shape:
        return False
    a, b = stored.float(), loaded.detach().cpu().float()
    if stored.dtype == loaded.dtype == torch.float32:
        return torch.equal(a, b)
    eps = max(torch.finfo(t.dtype).eps for t in (stored, loaded) if t.is_floating_point())
    return torch.allclose(a, b, rtol=eps, atol=torch.finfo(torch.float16).tiny)


def _key_matches(key: str, name: str) -> bool:
    return key == name or key.endswith("." + name)


def locate(folder: str | os.PathLike, changes: Mapping[str, TensorChange]) -> dict[Path, dict[str, str]]:
    """Where each change's tensor is stored under ``folder`` (searched recursively):
    ``{file: {file key: name}}``.

    Raises :class:`NoSafetensorsError` when a tensor is in no ``*.safetensors`` file of ``folder``
    (the model is stored in another format, or it is not the model that was loaded).
    """
    from safetensors import safe_open

    folder = Path(folder)
    found: dict[Path, dict[str, str]] = {}
    seen = {name: 0 for name in changes}
    for file in sorted(folder.rglob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                for name, change in changes.items():
                    if _key_matches(key, name) and _same(f.get_tensor(key), change.original):
                        found.setdefault(file, {})[key] = name
                        seen[name] += 1
    missing = [name for name, n in seen.items() if n == 0]
    if missing:
        raise NoSafetensorsError(
            f"no safetensors file under {folder} holds {missing[0]!r} with the value the model loaded: the "
            f"folder keeps its weights in another format (or changed since it was loaded)")
    return found


def _write_file(source: Path, dest: Path, keys: Mapping[str, str], changes: Mapping[str, TensorChange]) -> None:
    """``source`` with the tensors ``keys`` (file key -> change name) replaced, written to ``dest``
    (same keys, dtypes, shapes and metadata)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(source), framework="pt") as f:
        metadata = f.metadata()
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    for key, name in keys.items():
        tensors[key] = changes[name].new.detach().to("cpu", tensors[key].dtype).contiguous()
    dest.unlink(missing_ok=True)  # a copied file: never write through to the original's bytes
    save_file(tensors, str(dest), metadata=metadata)


def copy_with_tensors(source: str | os.PathLike, folder: str | os.PathLike,
                      changes: Mapping[str, TensorChange], within: str = "") -> list[str]:
    """Write the new folder ``folder``: a copy of ``source`` in which the safetensors files that
    hold a changed tensor are rewritten with its new value (see the module docstring); complete or
    absent (:func:`~slug_pl.atomic.atomic_folder`), never over an existing folder.

    ``changes``: tensor name relative to the embedded tower -> :class:`TensorChange`; ``within``:
    the subfolder of ``source`` holding the tower's weights (``"text_encoder"`` of a diffusers
    pipeline; ``""``: anywhere in ``source``). Returns the
    rewritten files, relative to ``folder``. Raises :class:`NoSafetensorsError` (before writing
    anything) when a tensor cannot be found in a safetensors file.
    """
    source = Path(source)
    found = locate(source / within, changes) if changes else {}
    edited_dirs = {file.parent for file in found}
    with atomic_folder(folder) as tmp:
        for path in sorted(source.rglob("*")):
            if path.is_dir():
                continue
            if path.parent in edited_dirs and path.suffix == ".bin":
                continue  # would still hold the unedited weights
            dest = tmp / path.relative_to(source)
            dest.parent.mkdir(parents=True, exist_ok=True)
            if path in found:
                _write_file(path, dest, found[path], changes)
            else:
                shutil.copyfile(path, dest)  # follows links (a hub cache's snapshot links to its blobs)
    return sorted(str(file.relative_to(source)) for file in found)
