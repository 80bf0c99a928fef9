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
must be the value the model loaded (:func:`same_weights`). Every file
holding it is rewritten (e.g. a ``model.safetensors`` and its ``model.fp16.safetensors`` variant);
a ``pytorch_model*.bin`` beside such a file would still hold the old value and is left out of the
copy (loaders prefer safetensors anyway).

The original folder is downloaded, so it may hold symbolic links. A link is followed only where
it stays with the model: inside the folder, or, for a Hugging Face hub snapshot
(``.../models--org--name/snapshots/<revision>``), into that repository's ``blobs`` folder, where
the hub keeps the files its snapshot links to (:func:`model_files`). A link that leads anywhere
else is refused before anything is written (:class:`~slug_pl.safety.UnsafePathError`), so a
file from elsewhere on the machine never lands in the copy.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from slug_pl.atomic import atomic_folder
from slug_pl.safety import UnsafePathError, link_target


#: The spacing of float16's subnormal numbers (2^-24): below 2^-14 a float16 copy of a weight is
#: only this exact in absolute terms.
FLOAT16_SUBNORMAL_STEP = 2.0**-24


class NoSafetensorsError(ValueError):
    """The original folder keeps the edited tensor's weights in no safetensors file."""


@dataclass(frozen=True)
class TensorChange:
    """One edited tensor: its value as the model loaded it (any dtype, for finding it in the
    files) and its new value (float32 from the CLIP; cast to each file's dtype when written)."""

    original: torch.Tensor
    new: torch.Tensor


def same_weights(a: torch.Tensor, b: torch.Tensor, stored: torch.dtype | None = None) -> bool:
    """Whether two copies of a tensor hold the same weights, at the coarsest precision they passed
    through: their own dtypes and ``stored``, the dtype one of them was stored in on the way (a
    float16 checkpoint loaded as float32 holds float16 values). Bit-equal when all are float32;
    otherwise within one rounding step of the coarsest dtype, and within one float16 subnormal
    step absolutely (a float32 CLIP rounded to a float16 checkpoint and loaded as bfloat16 is
    rounded twice; weights below float16's normal range lose more than a relative step there).
    Compared on ``b``'s device."""
    if a.shape != b.shape:
        return False
    x, y = a.detach().to(b.device, torch.float32), b.detach().float()
    dtypes = [a.dtype, b.dtype] + ([stored] if stored is not None else [])
    if all(d == torch.float32 for d in dtypes):
        return torch.equal(x, y)
    eps = max(torch.finfo(d).eps for d in dtypes)
    return torch.allclose(y, x, rtol=eps, atol=FLOAT16_SUBNORMAL_STEP)


def _key_matches(key: str, name: str) -> bool:
    return key == name or key.endswith("." + name)


def model_files(source: str | os.PathLike) -> dict[Path, Path]:
    """The files of the model folder ``source``: their path under ``source`` -> the file to read
    (the path itself, or where its symbolic link leads, inside the model; see the module
    docstring). Links to folders are not entered. Raises :class:`~slug_pl.safety.UnsafePathError`
    naming the folder and the link when a link leads out of the model."""
    source = Path(source)
    roots = (source,)
    if source.resolve().parent.name == "snapshots":  # a hub snapshot links into its repository's blobs
        roots += (source.resolve().parent.parent / "blobs",)
    files = {}
    for path in sorted(source.rglob("*")):
        if path.is_symlink():
            target = link_target(path, roots)
            if target is None:
                raise UnsafePathError(f"model folder {source}: {path.relative_to(source)} links to "
                                      f"{path.resolve()}, outside the model; slug_pl copies no file from "
                                      f"elsewhere into an output (replace the link by the file, or remove it)")
            if target.is_file():
                files[path] = target
        elif path.is_file():
            files[path] = path
    return files


def locate(files: Mapping[Path, Path], changes: Mapping[str, TensorChange], folder: Path) -> dict[Path, dict[str, str]]:
    """Where each change's tensor is stored among the model ``files`` (:func:`model_files`) under
    ``folder``: ``{file: {file key: name}}``.

    Raises :class:`NoSafetensorsError` when a tensor is in no ``*.safetensors`` file of ``folder``
    (the model is stored in another format, or it is not the model that was loaded).
    """
    from safetensors import safe_open

    found: dict[Path, dict[str, str]] = {}
    seen = {name: 0 for name in changes}
    for file, real in files.items():
        if file.suffix != ".safetensors" or folder not in file.parents:
            continue
        with safe_open(str(real), framework="pt") as f:
            for key in f.keys():
                for name, change in changes.items():
                    if _key_matches(key, name) and same_weights(f.get_tensor(key), change.original):
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
    files = model_files(source)  # refuses a link out of the model before anything is written
    found = locate(files, changes, source / within) if changes else {}
    edited_dirs = {file.parent for file in found}
    with atomic_folder(folder) as tmp:
        for path, real in files.items():
            if path.parent in edited_dirs and path.suffix == ".bin":
                continue  # would still hold the unedited weights
            dest = tmp / path.relative_to(source)
            dest.parent.mkdir(parents=True, exist_ok=True)
            if path in found:
                _write_file(real, dest, found[path], changes)
            else:
                shutil.copyfile(real, dest)  # the file's bytes (a hub snapshot's blob), as a file
    return sorted(str(file.relative_to(source)) for file in found)


def save_edited_copy(source: str | os.PathLike, folder: str | os.PathLike, changes: Mapping[str, TensorChange],
                     save_running: Callable[[Path], None], within: str = "") -> Path:
    """A downstream target's ``save_pretrained``: :func:`copy_with_tensors` of ``source`` into the
    new folder ``folder``; when ``source`` keeps the weights in no safetensors file, the model as
    it runs instead (``save_running(tmp)`` writes it into a temporary folder renamed into place;
    in its running dtype). Complete or absent; never over an existing folder."""
    try:
        copy_with_tensors(source, folder, changes, within=within)
    except NoSafetensorsError:
        with atomic_folder(folder) as tmp:
            save_running(tmp)
    return Path(folder)
