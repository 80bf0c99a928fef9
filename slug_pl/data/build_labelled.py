"""Build the labelled shards a real run evaluates on, from the official CelebA and ImageNet layouts.

A labelled shard set (read by :class:`~slug_pl.data.labelled.LabelledSet`) is webdataset tars whose
samples hold the image bytes (``jpg``/``png``/..., copied unchanged) and ``cls``, the class index
as decimal text, plus a class-name file with one name per line (label i = line i, 0-based).
``slug-pl prepare celeba`` and ``slug-pl prepare imagenet`` (:mod:`slug_pl.data.prepare`) are the
command lines.

- CelebA (:func:`celeba_splits`): ``img_align_celeba/`` plus a file mapping each image to its
  identity (``identity_CelebA.txt`` maps to numeric ids; a second file maps ids to names, as
  zero-shot prompts need names). The class list is the chosen identities (the concepts to forget
  and ``others`` more, picked by seed among those with enough images), sorted by name; each
  identity's images are split into disjoint validation and test images by seed.
- ImageNet (:func:`imagenet_val_images`): the 50,000 validation images, either sorted into wnid
  folders (``val/n01440764/*.JPEG``), or flat with the devkit's ground truth
  (``ILSVRC2012_devkit_t12/data/{meta.mat,ILSVRC2012_validation_ground_truth.txt}``) or with
  Kaggle's ``LOC_val_solution.csv``. Labels are indices into the sorted wnids, the order of
  open_clip's class names (:func:`slug_pl.data.layouts.imagenet_classnames`).

Selections depend only on the seed and the file names (SHA-256 ranks, as
:mod:`slug_pl.data.subsets`). Outputs go to a new folder, written in a temporary folder beside it
and renamed into place at the end; tar members carry a fixed mtime, so the same inputs give
byte-identical shards.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from slug_pl.atomic import atomic_folder
from slug_pl.data.labelled import read_name_list
from slug_pl.data.layouts import IMAGE_SUFFIXES, IdentityEntry, LayoutError, identity_image, imagenet_wnids, read_identity_map
from slug_pl.data.limits import DEFAULT_MAX_MEMBER_BYTES
from slug_pl.data.shard_writer import write_shards
from slug_pl.errors import did_you_mean

_WNID = re.compile(r"^n\d{8}$")
_DEVKIT_VAL = re.compile(r"^ILSVRC2012_val_(\d{8})$")


@dataclass(frozen=True)
class LabelledImage:
    """One sample to write: ``key`` (unique in the set), the image ``path`` and its class ``label``."""

    key: str
    path: Path
    label: int


def _rank(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}/{key}".encode()).hexdigest()


@contextmanager
def new_output_dir(out: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside ``out`` that becomes ``out`` when the block succeeds; ``out``
    must not exist or be empty (nothing is overwritten: :func:`~slug_pl.atomic.atomic_folder`)."""
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"output folder {out} exists and is not empty; choose a new folder")
    with atomic_folder(out, empty_ok=True) as tmp:
        yield tmp


def write_labelled_shards(images: Sequence[LabelledImage], folder: Path, prefix: str,
                          shard_size: int = 1000, max_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> list[Path]:
    """Write ``images`` in order as ``<prefix>-000000.tar``, ... (``shard_size`` samples each) in
    ``folder``: the file's bytes under its suffix (``.JPEG`` -> ``jpeg``) and ``cls``. An image
    file above ``max_bytes`` is refused (a reader would not read it either)."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    keys = [i.key for i in images]
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})[:3]
        raise ValueError(f"sample keys must be unique in a set, e.g. {dup} repeat")

    def sample(image: LabelledImage) -> dict:
        if image.path.stat().st_size > max_bytes:
            raise ValueError(f"image {image.path} has {image.path.stat().st_size} bytes, more than "
                             f"the {max_bytes} a shard member may hold (max_member_bytes)")
        return {"__key__": image.key, image.path.suffix.lower().lstrip("."): image.path.read_bytes(),
                "cls": str(image.label).encode()}

    return write_shards(folder, prefix, images, shard_size, sample)


# -- CelebA ---------------------------------------------------------------------------------------


@dataclass
class IdentitySplits:
    """What :func:`celeba_splits` chose: the class list, the validation / test images, and the
    file name each image key has in the identity list (relative to the image folder)."""

    classnames: list[str]
    validation: list[LabelledImage]
    test: list[LabelledImage]
    files: dict[str, str]


def identity_name(name: str) -> str:
    """A name as prompts use it: underscores as spaces (the CelebA name lists spell ``Elon_Musk``),
    runs of whitespace as one space."""
    return " ".join(name.replace("_", " ").split())


def celeba_splits(images_dir: str | os.PathLike, identities: str | os.PathLike, names: str | os.PathLike | None,
                  include: Sequence[str], others: int, per_identity: tuple[int, int], seed: int = 0,
                  others_from: str | os.PathLike | None = None) -> IdentitySplits:
    """Pick identities and split their images into validation and test.

    Args:
        images_dir: the image folder (``img_align_celeba``).
        identities: image file -> identity (``identity_CelebA.txt``: ``000001.jpg 2880``; any format
            of :func:`~slug_pl.data.layouts.read_identity_map`).
        names: identity id -> name (``2880 Jane Doe``, same formats), or None when ``identities``
            maps to names already. Identities without a name are left out. Names are read with
            underscores as spaces (:func:`identity_name`).
        include: names that must be in the class list (the concepts to forget).
        others: how many more identities, among those with enough images: picked by seed, or the
            first ones of ``others_from`` that have enough images.
        per_identity: (validation, test) images per identity, disjoint.
        seed: seed of both choices.
        others_from: a file of names (one per line) to take the others from, in its order.
    """
    folder = Path(images_dir).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    entries = read_identity_map(identities)
    listed = {e.filename: e for e in entries}
    id_to_name = {e.filename: e.identity for e in read_identity_map(names)} if names is not None else None
    by_name: dict[str, list[str]] = {}
    for e in entries:
        name = e.identity if id_to_name is None else id_to_name.get(e.identity)
        if name is not None:
            by_name.setdefault(identity_name(name), []).append(e.filename)
    include = [identity_name(n) for n in include]
    need = sum(per_identity)
    for name in include:
        if name not in by_name:
            raise ValueError(f"identity {name!r} has no image in {identities}{did_you_mean(name, by_name)}")
        if len(by_name[name]) < need:
            raise ValueError(f"identity {name!r} has {len(by_name[name])} images; {need} are needed "
                             f"({per_identity[0]} validation + {per_identity[1]} test)")
    if others_from is None:
        pool = sorted(by_name, key=lambda n: _rank(seed, n))
    else:
        pool = list(dict.fromkeys(identity_name(n) for n in read_name_list(str(others_from), "--others-from")))
    candidates = [n for n in pool if n not in include and len(by_name.get(n, ())) >= need]
    if len(candidates) < others:
        source = f"of the names in {others_from}" if others_from is not None else "other identities"
        raise ValueError(f"only {len(candidates)} {source} have {need} images; ask for fewer others")
    classnames = sorted([*include, *candidates[:others]])
    validation, test, files = [], [], {}
    for label, name in enumerate(classnames):
        chosen = sorted(by_name[name], key=lambda f: _rank(seed, f))[:need]
        paths = {f: _listed_image(folder, Path(identities), listed[f]) for f in chosen}
        missing = [f for f in chosen if not paths[f].is_file()]
        if missing:
            raise FileNotFoundError(f"{identities} lists {missing[0]!r} (identity {name!r}), missing in {folder}")
        for split, part in ((validation, chosen[: per_identity[0]]), (test, chosen[per_identity[0]:])):
            for f in sorted(part):
                split.append(LabelledImage(Path(f).stem, paths[f], label))
                files[Path(f).stem] = f
    return IdentitySplits(classnames, validation, test, files)


def _listed_image(folder: Path, identities: Path, entry: IdentityEntry) -> Path:
    """The image file an identity-list entry names: inside ``folder`` and with an image suffix
    (else an error naming the list and the entry)."""
    path = identity_image(folder, identities, entry)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        where = f"line {entry.line}" if entry.line is not None else f"entry {entry.filename!r}"
        raise LayoutError(f"{identities} {where}: {entry.filename!r} is not an image file name (expected "
                          f"one of {', '.join(IMAGE_SUFFIXES)})")
    return path


# -- ImageNet -------------------------------------------------------------------------------------


def _wnid_index() -> dict[str, int]:
    wnids = imagenet_wnids()
    if wnids is None:  # pragma: no cover - timm ships with open_clip
        raise LayoutError("the ImageNet wnid list needs timm (an open_clip dependency)")
    return {w: i for i, w in enumerate(wnids)}


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def imagenet_val_images(root: str | os.PathLike, devkit: str | os.PathLike | None = None,
                        solution_csv: str | os.PathLike | None = None) -> list[LabelledImage]:
    """The ImageNet validation images with their labels (sorted-wnid index, open_clip's order).

    ``root`` holds wnid folders, or (with ``devkit`` or ``solution_csv``) the flat
    ``ILSVRC2012_val_00000001.JPEG`` files. Images are ordered by label, then file name.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"ImageNet validation folder not found: {root}")
    index = _wnid_index()
    folders = sorted(d for d in root.iterdir() if d.is_dir() and _WNID.match(d.name))
    if folders:
        unknown = [d.name for d in folders if d.name not in index]
        if unknown:
            raise LayoutError(f"{root}: {len(unknown)} folders are not ImageNet-1k wnids, e.g. {unknown[:3]}")
        labelled = [(index[d.name], p) for d in folders for p in _image_files(d)]
    elif devkit is not None:
        labelled = _devkit_labels(root, Path(devkit).expanduser(), index)
    elif solution_csv is not None:
        labelled = _csv_labels(root, Path(solution_csv).expanduser(), index)
    else:
        raise LayoutError(f"{root} has no wnid folders: give the devkit folder (--devkit) or Kaggle's "
                          f"LOC_val_solution.csv (--solution-csv) for the labels of its flat files")
    if not labelled:
        raise LayoutError(f"no images found in {root}")
    labelled.sort(key=lambda lp: (lp[0], lp[1].name))
    return [LabelledImage(p.stem, p, label) for label, p in labelled]


def _devkit_labels(root: Path, devkit: Path, index: dict[str, int]) -> list[tuple[int, Path]]:
    """Labels from ILSVRC2012_devkit_t12: ``data/meta.mat`` (ILSVRC2012_ID -> wnid) and
    ``data/ILSVRC2012_validation_ground_truth.txt`` (line i: the ILSVRC2012_ID of image i)."""
    from scipy.io import loadmat

    data = devkit / "data" if (devkit / "data").is_dir() else devkit
    meta, truth = data / "meta.mat", data / "ILSVRC2012_validation_ground_truth.txt"
    for path in (meta, truth):
        if not path.is_file():
            raise FileNotFoundError(f"devkit file not found: {path}")
    synsets = loadmat(str(meta), squeeze_me=True)["synsets"]
    id_to_wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
    ids = [int(line) for line in truth.read_text().split()]
    out = []
    for p in _image_files(root):
        m = _DEVKIT_VAL.match(p.stem)
        if m is None:
            continue
        number = int(m.group(1))
        if not 1 <= number <= len(ids):
            raise LayoutError(f"{p.name}: no line {number} in {truth} ({len(ids)} lines)")
        out.append((index[id_to_wnid[ids[number - 1]]], p))
    return out


def _csv_labels(root: Path, solution: Path, index: dict[str, int]) -> list[tuple[int, Path]]:
    """Labels from Kaggle's ``LOC_val_solution.csv`` (``ImageId,PredictionString``; the first
    token of the prediction string is the wnid)."""
    if not solution.is_file():
        raise FileNotFoundError(f"solution file not found: {solution}")
    with open(solution, newline="") as f:
        wnid_of = {row["ImageId"]: row["PredictionString"].split()[0] for row in csv.DictReader(f)}
    out = []
    for p in _image_files(root):
        if p.stem not in wnid_of:
            raise LayoutError(f"{p.name} has no row in {solution}")
        out.append((index[wnid_of[p.stem]], p))
    return out
