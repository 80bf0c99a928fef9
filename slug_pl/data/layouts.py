"""Evaluation-set layouts: where the labelled images of a validation or test set live on disk.

Three layouts, each a YAML-friendly dataclass spec with ``load(transform, name, rules, part) -> LoadedSet``:

- :class:`~slug_pl.data.labelled.LabelledSet`: webdataset shards with ``cls`` labels (see
  :mod:`slug_pl.data.labelled`);
- :class:`ImageFolderSet`: an ImageNet-style or generic class-folder dataset, ``root/<class>/*.jpg``;
- :class:`IdentitySet`: a CelebA-style identity set, an image folder plus a file mapping each image
  to an identity name.

In a config a set is written as the plain mapping of its fields; which layout it is follows from
its keys (``shards`` / ``root`` / ``images`` + ``identities``)::

    validation:
      concepts: {images: celeba/img_align_celeba, identities: celeba/identities.csv,
                 include: celeba/val_identities.txt}
      utility: {root: imagenet/val, subset_fraction: 0.05}

Every set is decoded and preprocessed into memory once (``LoadedSet.images`` is ``(N, 3, H, W)``
float32): the full ImageNet validation set at 224 px needs about 30 GB, so pick a subset
(``subset_fraction``) for the step search.
"""

from __future__ import annotations

import csv
import json
import os
import re
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import torch

from slug_pl.data.labelled import (
    DEFAULT_TEMPLATES,
    LabelledSet,
    LoadedSet,
    read_name_list,
)
from slug_pl.data.limits import DEFAULT_RULES, InputLimitError, InputRules
from slug_pl.data.subsets import stratified_sample, stratified_subset
from slug_pl.safety import resolve_inside

#: File suffixes (case-insensitive) read as images by the folder layouts.
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".webp")

#: Keyword values understood by ``classnames`` / ``templates`` of the folder layouts.
IMAGENET_CLASSNAMES_KEY = "imagenet"
TEMPLATE_KEYS = ("openai_imagenet", "simple_imagenet")

_WNID = re.compile(r"^n\d{8}$")
_HEADER_WORDS = {"filename", "file_name", "file", "image", "image_id", "image_name", "img", "path",
                 "name"}
_PARALLEL_FROM = 256  # decode with threads from this many images on


class LayoutError(ValueError):
    """An evaluation set on disk is missing, empty or inconsistent (the message names the file)."""


# -- ImageNet metadata (shipped by open_clip and timm, no download) -------------------------------


def imagenet_classnames() -> list[str]:
    """open_clip's 1,000 ImageNet class names, in the standard class-index order.

    The standard index order (torchvision ``ImageFolder``, timm, open_clip's zero-shot evaluation)
    is the *sorted* list of wnids: index 0 = ``n01440764`` = "tench", index 999 = ``n15075141``
    = "toilet paper". open_clip's ``IMAGENET_CLASSNAMES`` follows it (checked against timm's
    ``imagenet_synsets.txt``, which is sorted, entry by entry; see ``tests/test_layouts.py``).
    """
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return list(IMAGENET_CLASSNAMES)


def imagenet_templates(kind: str = "openai_imagenet") -> list[str]:
    """open_clip's ImageNet prompt templates (callables there) as ``{}`` strings.

    ``kind``: ``"openai_imagenet"`` (the 80 OpenAI prompts) or ``"simple_imagenet"`` (7 prompts).
    """
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    table = {"openai_imagenet": OPENAI_IMAGENET_TEMPLATES, "simple_imagenet": SIMPLE_IMAGENET_TEMPLATES}
    if kind not in table:
        raise ValueError(f"unknown template set {kind!r}; pick one of {sorted(table)}")
    return [t("{}") for t in table[kind]]


def imagenet_wnids() -> list[str] | None:
    """The 1,000 ImageNet-1k wnids in class-index order (from timm, an open_clip dependency), or
    None when timm is not importable."""
    try:
        from timm.data import ImageNetInfo
    except ImportError:  # pragma: no cover - timm ships with open_clip
        return None
    return list(ImageNetInfo("imagenet-1k").label_names())


def _templates(value: str | Sequence[str] | None, default: Sequence[str], what: str) -> list[str]:
    if value is None:
        return list(default)
    if isinstance(value, str) and value in TEMPLATE_KEYS:
        return imagenet_templates(value)
    templates = read_name_list(value, what)
    if not templates:
        raise LayoutError(f"{what} list is empty: give at least one prompt template with {{}}")
    return templates


def _files_under(folder: Path, root: Path) -> list[Path]:
    """Image files under ``folder`` (recursively, hidden entries skipped), sorted by path; a link
    that leads outside the set's ``root`` is refused (:class:`~slug_pl.safety.UnsafePathError`)."""
    files = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            resolve_inside(root, path.relative_to(root).as_posix(), f"image folder {root}", "file")
            files.append(path)
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def _decode(path: Path, transform: Callable, rules: InputRules) -> torch.Tensor:
    try:
        rgb = rules.open_rgb(path)
    except InputLimitError as err:
        raise LayoutError(f"image {path}: {err}") from err
    except Exception as err:
        raise LayoutError(f"image {path} does not decode: {err}") from err
    return transform(rgb)


def _load_images(paths: Sequence[Path], transform: Callable, rules: InputRules = DEFAULT_RULES) -> torch.Tensor:
    """Decode (under ``rules``) and preprocess ``paths`` in order (threads for large sets: PIL
    releases the GIL)."""
    if len(paths) < _PARALLEL_FROM:
        return torch.stack([_decode(p, transform, rules) for p in paths])
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return torch.stack(list(pool.map(lambda p: _decode(p, transform, rules), paths, chunksize=32)))


def _part_of_set(name: str, paths: Sequence[Path], labels: Sequence[int], transform: Callable, rules: InputRules,
                 classnames: list[str], templates: list[str], part: tuple[int, int]) -> LoadedSet:
    """The set of ``paths`` (in order) with ``labels``, decoding only its samples ``r::W`` for
    ``part`` ``(r, W)`` (an empty part holds no image)."""
    rank, world = part
    paths, labels = list(paths)[rank::world], list(labels)[rank::world]
    images = _load_images(paths, transform, rules) if paths else torch.empty(0)
    return LoadedSet(name, images, torch.tensor(labels, dtype=torch.long), classnames, templates, part)


# -- ImageNet-style / generic class folders -----------------------------------------------------


@dataclass
class ImageFolderSet:
    """An ImageNet-style or generic class-folder dataset: ``root/<class folder>/**/*.{jpg,png,…}``.

    Class folders are sorted by name; label ``i`` is the ``i``-th folder. Image files (suffixes
    ``.JPEG .jpg .jpeg .png .webp``, any case, also in sub-folders; hidden entries skipped) are
    sorted by path within a folder.

    Attributes:
        root: the folder holding one sub-folder per class (e.g. ImageNet ``val/`` sorted into wnid
            folders).
        classnames: class names, by default:

            - folders named by ImageNet-1k wnids (``n01440764`` …): open_clip's ImageNet class
              names (all 1,000 folders: the full list; a subset of wnids: the names of those
              classes, in folder order);
            - otherwise the folder names, underscores read as spaces (``golden_retriever`` →
              "golden retriever").

            Or: a list / ``.json`` / text file in sorted-folder order (one name per folder), a
            JSON object file or inline mapping ``{folder: name}``, or ``"imagenet"`` (wnid folders
            required).
        templates: prompt templates with ``{}``: a list, a file, ``"openai_imagenet"`` or
            ``"simple_imagenet"`` (open_clip's sets). Default: the 80 OpenAI ImageNet templates
            when the class names are open_clip's ImageNet names, else ``["a photo of {}."]``.
        subset_fraction: keep a fixed-seed random subset of this fraction of the images, e.g.
            0.05. The subset is *stratified* (every class keeps its share, ±1 image; see
            :func:`stratified_subset`) and reproducible everywhere for a given ``subset_seed``.
            Classes with no image in the subset stay in the class list.
        subset_seed: seed of the subset.
        max_samples: keep at most this many images (after ``subset_fraction``): a stratified
            subset with seed ``subset_seed``, like ``subset_fraction`` (every class keeps its
            share, ±1 image).
    """

    root: str
    classnames: str | list[str] | dict[str, str] | None = None
    templates: str | list[str] | None = None
    subset_fraction: float | None = None
    subset_seed: int = 0
    max_samples: int | None = None

    def _class_names(self, root: Path, folders: list[str]) -> tuple[list[str], bool]:
        """Class names for ``folders`` and whether they are open_clip's ImageNet names."""
        is_wnid = bool(folders) and all(_WNID.match(f) for f in folders)
        spec = self.classnames
        if spec is None or spec == IMAGENET_CLASSNAMES_KEY:
            if is_wnid:
                names = self._imagenet_names(root, folders)
                if names is not None:
                    return names, True
            if spec == IMAGENET_CLASSNAMES_KEY:
                raise LayoutError(
                    f"classnames: imagenet needs the class folders of {root} to be ImageNet-1k "
                    f"wnids (n01440764 …); found e.g. {folders[:3]}"
                )
            return [f.replace("_", " ") for f in folders], False
        if isinstance(spec, dict) or (isinstance(spec, str) and spec.endswith(".json")
                                      and isinstance(_read_json(spec, "class-name"), dict)):
            mapping = spec if isinstance(spec, dict) else _read_json(spec, "class-name")
            missing = [f for f in folders if f not in mapping]
            if missing:
                raise LayoutError(
                    f"the class-name mapping {spec if isinstance(spec, str) else '(inline)'} has "
                    f"no entry for {len(missing)} class folder(s) of {root}, e.g. {missing[:3]}"
                )
            return [str(mapping[f]) for f in folders], False
        names = read_name_list(spec, "class-name")
        if len(names) != len(folders):
            raise LayoutError(
                f"{root} has {len(folders)} class folders but the class-name list "
                f"{spec if isinstance(spec, str) else '(inline)'} has {len(names)} names; give one "
                f"name per folder, in sorted folder order"
            )
        return names, False

    @staticmethod
    def _imagenet_names(root: Path, folders: list[str]) -> list[str] | None:
        names = imagenet_classnames()
        wnids = imagenet_wnids()
        if wnids is None:  # no timm: only the complete, sorted set can be mapped
            return names if len(folders) == 1000 else None
        index = {w: i for i, w in enumerate(wnids)}
        unknown = [f for f in folders if f not in index]
        if unknown:
            if len(folders) == 1000:
                raise LayoutError(
                    f"{root} has 1,000 wnid folders but {len(unknown)} are not ImageNet-1k "
                    f"classes, e.g. {unknown[:3]}; give classnames explicitly"
                )
            return None
        return [names[index[f]] for f in folders]

    def _class_folders(self, name: str) -> tuple[Path, list[Path]]:
        root = Path(self.root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"image folder of set {name!r} not found: {root}")
        folders = sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")),
                         key=lambda d: d.name)
        if not folders:
            loose = [p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES][:1]
            hint = (" (images lie directly in it: sort them into one folder per class, e.g. "
                    "ImageNet val into wnid folders)" if loose else "")
            raise LayoutError(f"set {name!r}: {root} has no class folders{hint}")
        return root, folders

    def class_names(self, name: str, rules: InputRules = DEFAULT_RULES) -> list[str]:
        """The class list in label order, read without decoding an image (checks the folder)."""
        root, folders = self._class_folders(name)
        return self._class_names(root, [d.name for d in folders])[0]

    def load(self, transform: Callable, name: str, rules: InputRules = DEFAULT_RULES,
             part: tuple[int, int] = (0, 1)) -> LoadedSet:
        """Decode the set, or with ``part`` ``(r, W)`` only its samples ``r::W``."""
        root, folders = self._class_folders(name)
        files = [_files_under(d, root) for d in folders]
        empty = [d.name for d, f in zip(folders, files) if not f]
        if empty:
            raise LayoutError(
                f"set {name!r}: {len(empty)} class folder(s) of {root} hold no images "
                f"({', '.join(IMAGE_SUFFIXES)}), e.g. {[str(root / e) for e in empty[:3]]}"
            )
        folder_names = [d.name for d in folders]
        classnames, is_imagenet = self._class_names(root, folder_names)
        default_templates = imagenet_templates() if is_imagenet else DEFAULT_TEMPLATES
        templates = _templates(self.templates, default_templates, f"{name} template")
        if self.subset_fraction is not None:
            keys = [[p.relative_to(root).as_posix() for p in f] for f in files]
            picks = stratified_subset(keys, self.subset_fraction, self.subset_seed)
            files = [[f[i] for i in idx] for f, idx in zip(files, picks)]
        if self.max_samples is not None:
            keys = [[p.relative_to(root).as_posix() for p in f] for f in files]
            picks = stratified_sample(keys, self.max_samples, self.subset_seed)
            files = [[f[i] for i in idx] for f, idx in zip(files, picks)]
        paths = [p for f in files for p in f]
        labels = [c for c, f in enumerate(files) for _ in f]
        if not paths:
            raise LayoutError(
                f"set {name!r}: no images left from {root} after subset_fraction="
                f"{self.subset_fraction} / max_samples={self.max_samples}"
            )
        return _part_of_set(name, paths, labels, transform, rules, classnames, templates, part)


def _read_json(path: str, what: str):
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{what} file not found: {p}")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise LayoutError(f"{what} file {p} is not valid JSON: {err}") from err


# -- CelebA-style identity sets -----------------------------------------------------------------


@dataclass(frozen=True)
class IdentityEntry:
    """One line of an identity mapping file (``line`` is None for JSON)."""

    filename: str
    identity: str
    line: int | None


def _where(path: Path, line: int | None, key: str | None = None) -> str:
    if line is not None:
        return f"{path} line {line}"
    return f"{path} (entry {key!r})"


def read_identity_map(path: str | os.PathLike) -> list[IdentityEntry]:
    """Read a file mapping image file names (relative to the image folder) to identity names.

    Formats, by suffix:

    - ``.json``: an object ``{"000001.jpg": "Jane Doe", …}`` (integer ids are read as strings);
    - ``.csv``: ``filename,identity name`` (standard CSV quoting; an unquoted name containing
      commas is re-joined);
    - ``.tsv``: ``filename<TAB>identity name``;
    - anything else (``.txt``, CelebA's ``identity_CelebA.txt``): ``filename identity name``,
      split at the first run of whitespace, so names may contain spaces but file names may not.

    Blank lines and lines starting with ``#`` are skipped; a first line holding a single number
    (the image count CelebA's list files start with) is skipped, and so is a first line whose first
    field is a header word (``filename``, ``image``, ``image_id``, ``path``, ``name`` …). A file
    listed twice with different identities is an error; an exact repeat is ignored.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"identity mapping file not found: {path}")
    suffix = path.suffix.lower()
    raw: list[tuple[str, str, int | None]] = []
    if suffix == ".json":
        data = _read_json(str(path), "identity mapping")
        if not isinstance(data, dict):
            raise LayoutError(f"identity mapping file {path} must hold a JSON object "
                              f"{{image file: identity name}}, got {type(data).__name__}")
        for key, value in data.items():
            if not isinstance(value, (str, int)) or isinstance(value, bool) or not str(value).strip():
                raise LayoutError(f"{_where(path, None, key)}: the identity must be a non-empty "
                                  f"string, got {value!r}")
            raw.append((str(key).strip(), str(value).strip(), None))
    else:
        with open(path, newline="", encoding="utf-8-sig") as f:
            lines = f.read().splitlines()
        first = True
        for number, text in enumerate(lines, start=1):
            if not text.strip() or text.lstrip().startswith("#"):
                continue
            if suffix == ".csv":
                fields = next(csv.reader([text]))
                parts = [fields[0], ",".join(fields[1:])] if len(fields) >= 2 else fields
            elif suffix == ".tsv":
                parts = text.split("\t", 1)
            else:
                parts = text.strip().split(None, 1)
            parts = [p.strip() for p in parts]
            if first and len(parts) == 1 and parts[0].isdigit():
                continue  # the image count CelebA's list files start with; a header may follow
            if first and parts and parts[0].lower() in _HEADER_WORDS:
                first = False
                continue
            first = False
            if len(parts) < 2 or not parts[0] or not parts[1]:
                sep = {".csv": "a comma", ".tsv": "a tab"}.get(suffix, "whitespace")
                raise LayoutError(
                    f"{path} line {number}: expected 'image file' and 'identity name' separated by "
                    f"{sep}, got {text!r}"
                )
            raw.append((parts[0], parts[1], number))
    entries: dict[str, IdentityEntry] = {}
    for filename, identity, line in raw:
        seen = entries.get(filename)
        if seen is not None:
            if seen.identity != identity:
                raise LayoutError(
                    f"{_where(path, line, filename)}: image {filename!r} is mapped to "
                    f"{identity!r} but {_where(path, seen.line, filename)} maps it to "
                    f"{seen.identity!r}"
                )
            continue
        entries[filename] = IdentityEntry(filename, identity, line)
    if not entries:
        raise LayoutError(f"identity mapping file {path} has no entries")
    return list(entries.values())


def identity_image(folder: Path, mapping_path: Path, entry: IdentityEntry) -> Path:
    """The image an identity-mapping entry names, inside ``folder`` (else
    :class:`~slug_pl.safety.UnsafePathError` naming the mapping file and the entry)."""
    what = f"line {entry.line}: image" if entry.line is not None else "entry"
    return resolve_inside(folder, entry.filename, str(mapping_path), what)


@dataclass
class IdentitySet:
    """A CelebA-style identity set: an image folder and a file mapping image → identity name.

    The class list is every identity of the mapping file (sorted), or ``classnames`` when given;
    label ``i`` ↔ ``classnames[i]``. ``include`` restricts which identities' *images* are loaded
    (e.g. the forgotten identities plus 100 others for retain accuracy) while the class list stays
    complete, so zero-shot prediction is over all identities. Images are ordered by label, then
    file name.

    Attributes:
        images: the image folder; mapping-file names are relative to it.
        identities: the mapping file (``.json`` / ``.csv`` / ``.tsv`` / whitespace text; see
            :func:`read_identity_map`).
        classnames: the class list (inline, ``.json`` list or text file, one per line). Every
            loaded image's identity must be in it; it may name identities without images.
        templates: prompt templates with ``{}`` (inline or a file).
        include: identity names whose images are loaded (inline or a file); every name must be
            in the class list. None: all images of the mapping file.
        max_per_identity: keep at most this many images per identity (the first by file name).

    Only the images that are loaded must exist; a missing one is an error naming the mapping
    file and line.
    """

    images: str
    identities: str
    classnames: str | list[str] | None = None
    templates: str | list[str] = field(default_factory=lambda: list(DEFAULT_TEMPLATES))
    include: str | list[str] | None = None
    max_per_identity: int | None = None

    def _classes(self, name: str) -> tuple[Path, Path, list[IdentityEntry], list[str]]:
        """The image folder, the mapping file, its entries and the class list."""
        folder = Path(self.images).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"image folder of identity set {name!r} not found: {folder}")
        mapping_path = Path(self.identities).expanduser()
        entries = read_identity_map(mapping_path)
        if self.classnames is None:
            classnames = sorted({e.identity for e in entries})
        else:
            classnames = read_name_list(self.classnames, f"{name} class-name")
            if len(set(classnames)) != len(classnames):
                dup = sorted({c for c in classnames if classnames.count(c) > 1})
                raise LayoutError(f"set {name!r}: the class list names {dup[:3]} more than once")
        return folder, mapping_path, entries, classnames

    def class_names(self, name: str, rules: InputRules = DEFAULT_RULES) -> list[str]:
        """The class list in label order, read without decoding an image (checks folder and file)."""
        return self._classes(name)[3]

    def load(self, transform: Callable, name: str, rules: InputRules = DEFAULT_RULES,
             part: tuple[int, int] = (0, 1)) -> LoadedSet:
        """Decode the set, or with ``part`` ``(r, W)`` only its samples ``r::W``."""
        folder, mapping_path, entries, classnames = self._classes(name)
        index = {c: i for i, c in enumerate(classnames)}
        templates = _templates(self.templates, DEFAULT_TEMPLATES, f"{name} template")

        wanted = None
        if self.include is not None:
            wanted = set(read_name_list(self.include, f"{name} include"))
            unknown = sorted(wanted - index.keys())
            if unknown:
                raise LayoutError(
                    f"set {name!r}: include names {len(unknown)} identities not in the class list "
                    f"({len(classnames)} names from {self.classnames or mapping_path}), e.g. "
                    f"{unknown[:3]}; spell them exactly as in the mapping file"
                )
        selected = [e for e in entries if wanted is None or e.identity in wanted]
        outside = [e for e in selected if e.identity not in index]
        if outside:
            e = outside[0]
            raise LayoutError(
                f"{_where(mapping_path, e.line, e.filename)}: identity {e.identity!r} is not in the "
                f"class list {self.classnames} ({len(outside)} image(s) affected)"
            )
        if wanted is not None:
            present = {e.identity for e in selected}
            absent = sorted(wanted - present)
            if absent:
                warnings.warn(
                    f"set {name!r}: {len(absent)} included identities have no image in "
                    f"{mapping_path}, e.g. {absent[:3]}", stacklevel=2
                )
        selected.sort(key=lambda e: (index[e.identity], e.filename))
        if self.max_per_identity is not None:
            kept, counts = [], {}
            for e in selected:
                if counts.get(e.identity, 0) < self.max_per_identity:
                    kept.append(e)
                    counts[e.identity] = counts.get(e.identity, 0) + 1
            selected = kept
        if not selected:
            raise LayoutError(f"set {name!r}: no images selected from {mapping_path}")
        paths = [identity_image(folder, mapping_path, e) for e in selected]
        missing = [(e, p) for e, p in zip(selected, paths) if not p.is_file()]
        if missing:
            e, path = missing[0]
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise LayoutError(
                f"{_where(mapping_path, e.line, e.filename)} lists image {e.filename!r}, which is "
                f"missing: {path}{more}"
            )
        labels = [index[e.identity] for e in selected]
        return _part_of_set(name, paths, labels, transform, rules, classnames, templates, part)


# -- one entry point ------------------------------------------------------------------------------

#: The type of an evaluation-set field in a config (jsonargparse picks the layout by its keys).
EvalSet = Union[LabelledSet, ImageFolderSet, IdentitySet]

