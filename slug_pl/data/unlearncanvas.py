"""UnlearnCanvas on disk: the style × object image tree, its splits, forget / retain sets, labelled
evaluation sets and webdataset shards.

**The benchmark's layout and conventions** (read in the benchmark's repository,
github.com/OPTML-Group/UnlearnCanvas, commit 920cfd1):

- ``README.md``: images of 60 artistic styles, 400 per style over 20 object classes, stored as
  ``<root>/<Style>/<Object>/<n>.jpg``; the photographs the styles were painted from lie in
  ``Seed_Images``.
- ``diffusion_model_finetuning/dataset_preparation.py``: ``n`` runs from 1 to 20 in every
  (style, object) cell; the fine-tuning caption is ``"A {object} image in {style} style."`` with
  the style's underscores read as spaces and ``"Photo"`` for ``Seed_Images``
  (``GenerationDataset``); its split is ``(0.9, 0.05, 0.05)`` of the 20 images by number:
  training reads images 1–18, evaluation reads ``int(20 * (1 - 0.9))`` images from number 18 on,
  which in floating point is the single image 18, also a training image.
- ``machine_unlearning/evaluation/constants/const.py``: the 50 styles and 20 objects of the
  published unlearning experiments (:data:`UC_STYLES`, :data:`UC_OBJECTS`); the style classifier's
  class list is these 50 plus ``Seed_Images``, in sorted order.
- SLUG's own UnlearnCanvas scripts (github.com/CSIPlab/SLUG, ``src/clip/a0_create_tar_ucanvas.py``)
  build the forget set of a style from every image of that style (all objects), and of an object
  from every image of that object (all styles), captioned ``"A {object} image in {style} style."``.

**What this module does.** :class:`UnlearnCanvasSet` (a YAML-friendly spec) reads and checks the
tree (:func:`read_layout`), splits every cell by image number (:func:`split_cell`) and gives a
:class:`CanvasData`: the forget set of one style or one object, the retain set (every other
image), captions, labelled style / object sets as :class:`~slug_pl.data.labelled.LoadedSet`, and
:meth:`CanvasData.write_shards`, which writes them as webdataset shards for the gradient pass.

**Splits** are disjoint by construction (unlike the benchmark's own evaluation split above), fixed
by the spec and recorded in :meth:`CanvasData.manifest`:

- ``split_fractions=(f_train, f_val, f_test)`` (default ``(0.9, 0.05, 0.05)``): a cell of n
  images gets ``round(f_val·n)`` validation and ``round(f_test·n)`` test images (halves round up)
  and the rest for training. With ``seed=None`` images are taken in number order (training first,
  so a 20-image cell gives training 1–18, validation 19, test 20, the benchmark's training
  images); with an integer ``seed`` each cell's images are ordered by
  ``sha256(f"{seed}/{style}/{object}/{n}")`` first (machine-independent).
- ``split_ranges={"train": [1, 18], "validation": [19, 19], "test": [20, 20]}``: inclusive image
  number ranges, the same in every cell; numbers outside every range are left out.

**What the reader rejects and what it warns about** (errors are :class:`LayoutError` and name the
path):

- errors: a missing root, style folder or object folder; a style or object folder that is a
  file; a file next to the object folders of a style; a folder inside a (style, object) cell; an
  empty cell; an image whose name is not its number (``1.jpg``); two images with one number
  (``1.jpg`` and ``1.png``); styles that do not all hold the same objects (every metric of the
  benchmark assumes the full style × object grid); a forget style or object that is not in the
  tree; an image that does not decode (when it is read);
- warnings (:class:`CanvasLayoutWarning`, the file is skipped): images lying at the root, next
  to the style folders; non-image files inside a cell (e.g. ``Thumbs.db``); cells that hold
  different numbers of images;
- silently skipped: hidden entries (``.DS_Store``) and other files at the root (the benchmark's
  fine-tuning code writes ``metadata.jsonl`` there, the synthetic canvas ``canvas.json``).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from slug_pl.atomic import write_text
from slug_pl.data.labelled import LoadedSet, read_name_list
from slug_pl.data.layouts import IMAGE_SUFFIXES, LayoutError, _load_images
from slug_pl.data.limits import DEFAULT_MAX_MEMBER_BYTES, DEFAULT_RULES, InputRules
from slug_pl.data.shard_writer import SLUG_OWNER, brace_pattern, write_shards
from slug_pl.safety import resolve_inside

#: The 50 styles of the benchmark's published unlearning experiments (const.py, "50 style version").
UC_STYLES = (
    "Abstractionism", "Artist_Sketch", "Blossom_Season", "Bricks", "Byzantine", "Cartoon",
    "Cold_Warm", "Color_Fantasy", "Comic_Etch", "Crayon", "Cubism", "Dadaism", "Dapple",
    "Defoliation", "Early_Autumn", "Expressionism", "Fauvism", "French", "Glowing_Sunset",
    "Gorgeous_Love", "Greenfield", "Impressionism", "Ink_Art", "Joy", "Liquid_Dreams",
    "Magic_Cube", "Meta_Physics", "Meteor_Shower", "Monet", "Mosaic", "Neon_Lines", "On_Fire",
    "Pastel", "Pencil_Drawing", "Picasso", "Pop_Art", "Red_Blue_Ink", "Rust", "Sketch",
    "Sponge_Dabbed", "Structuralism", "Superstring", "Surrealism", "Ukiyoe", "Van_Gogh",
    "Vibrant_Flow", "Warm_Love", "Warm_Smear", "Watercolor", "Winter",
)
#: The 20 object classes (const.py ``class_available``).
UC_OBJECTS = (
    "Architectures", "Bears", "Birds", "Butterfly", "Cats", "Dogs", "Fishes", "Flame", "Flowers",
    "Frogs", "Horses", "Human", "Jellyfish", "Rabbits", "Sandwiches", "Sea", "Statues", "Towers",
    "Trees", "Waterfalls",
)
#: The folder of the photographs the styles were painted from; captioned as "Photo" style.
SEED_IMAGES = "Seed_Images"
UC_IMAGES_PER_CELL = 20
#: The benchmark's caption and generation prompt (``{style}`` is :func:`style_phrase` of the folder).
CAPTION_TEMPLATE = "A {object} image in {style} style."
SPLITS = ("train", "validation", "test")
KINDS = ("style", "object")

#: Zero-shot prompt templates for the labelled sets (class names are style / object phrases).
STYLE_TEMPLATES = ("an image in {} style.", "a painting in {} style.", "artwork in {} style.")
OBJECT_TEMPLATES = ("an image of {}.", "a painting of {}.", "a picture of {}.")


class CanvasLayoutWarning(UserWarning):
    """Something in an UnlearnCanvas tree is skipped or uneven but the tree is usable."""


def style_phrase(style: str) -> str:
    """The words of a style folder name in captions: underscores as spaces, ``Seed_Images`` -> Photo."""
    return "Photo" if style == SEED_IMAGES else style.replace("_", " ")


def object_phrase(obj: str) -> str:
    """The words of an object folder name in captions (underscores as spaces)."""
    return obj.replace("_", " ")


def caption(style: str, obj: str, template: str = CAPTION_TEMPLATE) -> str:
    """The benchmark's caption of a (style, object) cell, e.g. "A Bears image in Van Gogh style."."""
    return template.format(style=style_phrase(style), object=object_phrase(obj))


# ================================================================================================
# reading and checking the tree
# ================================================================================================


@dataclass(frozen=True)
class CanvasImage:
    """One image of the tree: ``root/style/object/<number>.<ext>``."""

    path: Path
    style: str
    object: str
    number: int


@dataclass(frozen=True)
class CanvasLayout:
    """A checked tree: styles and objects in label order, and every cell's images by number."""

    root: Path
    styles: tuple[str, ...]
    objects: tuple[str, ...]
    cells: dict[tuple[str, str], tuple[CanvasImage, ...]]

    def images(self) -> list[CanvasImage]:
        """Every image, ordered by style, object, number."""
        return [img for s in self.styles for o in self.objects for img in self.cells[s, o]]


def _visible(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if not p.name.startswith(".")), key=lambda p: p.name)


def _require_folder(path: Path, what: str, hint: str) -> None:
    if not path.exists():
        raise LayoutError(f"missing {what} folder {path}: {hint}")
    if not path.is_dir():
        raise LayoutError(f"{path} is a file where a {what} folder should be: {hint}")


def _read_cell(root: Path, style: str, obj: str) -> tuple[tuple[CanvasImage, ...], list[Path]]:
    """A cell's images sorted by number, and the non-image files skipped; a link that leads out
    of the tree ``root`` is refused (:class:`~slug_pl.safety.UnsafePathError`)."""
    folder = root / style / obj
    images: dict[int, CanvasImage] = {}
    skipped = []
    for path in _visible(folder):
        resolve_inside(root, path.relative_to(root).as_posix(), f"UnlearnCanvas tree {root}", "file")
        if path.is_dir():
            raise LayoutError(f"{path} is a folder inside the (style, object) cell {folder}; a cell "
                              f"holds only its images, named by number (1.jpg, 2.jpg, ...)")
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            skipped.append(path)
            continue
        if not path.stem.isdigit():
            raise LayoutError(f"{path}: an image of the cell {folder} must be named by its number "
                              f"(1.jpg, 2.jpg, ...); rename or remove it")
        number = int(path.stem)
        if number in images:
            raise LayoutError(f"{path} and {images[number].path} both hold image {number} of the "
                              f"cell {folder}; keep one")
        images[number] = CanvasImage(path, style, obj, number)
    if not images:
        raise LayoutError(f"{folder} is an empty (style, object) cell: no images "
                          f"({', '.join(IMAGE_SUFFIXES)}) named by number")
    return tuple(images[n] for n in sorted(images)), skipped


def read_layout(root: str | os.PathLike, styles: Sequence[str] | None = None,
                objects: Sequence[str] | None = None) -> CanvasLayout:
    """Read and check ``root/<Style>/<Object>/<n>.<ext>`` (see the module docstring for what is an
    error and what a warning).

    ``styles`` / ``objects`` select folders (in that label order); by default every style folder
    and every object folder, sorted by name (the benchmark's classifiers use sorted lists).
    """
    root = Path(root).expanduser()
    hint = "the layout is <root>/<Style>/<Object>/<n>.jpg"
    if not root.exists():
        raise LayoutError(f"UnlearnCanvas root not found: {root}")
    if not root.is_dir():
        raise LayoutError(f"UnlearnCanvas root {root} is a file; give the folder that holds one "
                          f"folder per style ({hint})")
    entries = _visible(root)
    if styles is None:
        style_names = [p.name for p in entries if p.is_dir()]
        loose = [p for p in entries if not p.is_dir() and p.suffix.lower() in IMAGE_SUFFIXES]
        if loose:
            warnings.warn(f"{root}: {len(loose)} image(s) lie next to the style folders and are "
                          f"ignored, e.g. {loose[0].name}", CanvasLayoutWarning, stacklevel=2)
        if not style_names:
            raise LayoutError(f"{root} holds no style folders ({hint})")
    else:
        style_names = list(styles)
        if not style_names or len(set(style_names)) != len(style_names):
            raise LayoutError(f"styles must name distinct style folders, got {style_names}")
        for s in style_names:
            _require_folder(root / s, "style", hint)

    objects_of: dict[str, list[str]] = {}
    for s in style_names:
        children = _visible(root / s)
        files = [p for p in children if not p.is_dir()]
        if files:
            raise LayoutError(f"{files[0]} is a file where an object folder should be: a style "
                              f"folder holds only object folders ({hint})")
        objects_of[s] = [p.name for p in children]
    if objects is None:
        object_names = sorted({o for names in objects_of.values() for o in names})
        if not object_names:
            raise LayoutError(f"the style folders of {root} hold no object folders ({hint})")
    else:
        object_names = list(objects)
        if not object_names or len(set(object_names)) != len(object_names):
            raise LayoutError(f"objects must name distinct object folders, got {object_names}")
    for s in style_names:
        missing = [o for o in object_names if o not in objects_of[s]]
        if missing:
            others = [t for t in style_names if missing[0] in objects_of[t]]
            where = f" (style {others[0]} has it)" if others else ""
            _require_folder(root / s / missing[0], "object",
                            f"every style must hold the same objects{where}; "
                            f"{len(missing)} missing in {root / s}: {missing[:5]}")
        for o in object_names:
            _require_folder(root / s / o, "object", hint)

    cells, skipped = {}, []
    for s in style_names:
        for o in object_names:
            cells[s, o], junk = _read_cell(root, s, o)
            skipped += junk
    if skipped:
        warnings.warn(f"{len(skipped)} non-image file(s) in the cells of {root} are skipped, e.g. "
                      f"{skipped[0]}", CanvasLayoutWarning, stacklevel=2)
    sizes = {key: len(images) for key, images in cells.items()}
    if len(set(sizes.values())) > 1:
        small = min(sizes, key=sizes.get)
        large = max(sizes, key=sizes.get)
        warnings.warn(f"the cells of {root} hold different numbers of images: {sizes[small]} in "
                      f"{root / small[0] / small[1]}, {sizes[large]} in "
                      f"{root / large[0] / large[1]}", CanvasLayoutWarning, stacklevel=2)
    return CanvasLayout(root, tuple(style_names), tuple(object_names), cells)


# ================================================================================================
# splits
# ================================================================================================


def _sha_rank(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}/{key}".encode()).hexdigest()


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5 + 1e-9)


def split_cell(images: Sequence[CanvasImage], fractions: Sequence[float] | None = None,
               ranges: dict[str, Sequence[int]] | None = None,
               seed: int | None = None) -> dict[str, list[CanvasImage]]:
    """Split one cell's images (sorted by number) into ``train`` / ``validation`` / ``test``.

    See the module docstring for the two rules; exactly one of ``fractions`` and ``ranges`` is
    given. Each returned list is sorted by image number.
    """
    if (fractions is None) == (ranges is None):
        raise ValueError("give exactly one of split fractions and split ranges")
    out: dict[str, list[CanvasImage]] = {name: [] for name in SPLITS}
    if ranges is not None:
        for img in images:
            for name, (first, last) in ranges.items():
                if first <= img.number <= last:
                    out[name].append(img)
        return out
    order = list(images)
    if seed is not None:
        order.sort(key=lambda i: _sha_rank(seed, f"{i.style}/{i.object}/{i.number}"))
    n = len(order)
    n_test = _round_half_up(fractions[2] * n)
    n_val = n - n_test if fractions[0] == 0 else _round_half_up(fractions[1] * n)
    n_train = n - n_val - n_test
    if n_train < (1 if fractions[0] > 0 else 0):
        raise LayoutError(f"the cell {images[0].path.parent} has {n} image(s): too few for split "
                          f"fractions {tuple(fractions)} (no training image would be left)")
    out["train"] = order[:n_train]
    out["validation"] = order[n_train : n_train + n_val]
    out["test"] = order[n_train + n_val :]
    return {name: sorted(part, key=lambda i: i.number) for name, part in out.items()}


# ================================================================================================
# the spec and the loaded data
# ================================================================================================


@dataclass
class UnlearnCanvasSet:
    """An UnlearnCanvas tree and what to unlearn from it (a YAML-friendly spec).

    Attributes:
        root: the folder of style folders (``<root>/<Style>/<Object>/<n>.jpg``).
        forget_style: the style to unlearn (every object in it), as its folder name.
        forget_object: the object to unlearn (in every style). At most one of the two; with
            neither, only splits and labelled sets are available (e.g. to train classifiers).
        styles / objects: folders to use, in label order (default: all, sorted by name): a list,
            or a text file with one folder name per line (``slug-pl prepare unlearncanvas`` writes
            ``styles.txt``). Pass :data:`UC_STYLES` to leave out ``Seed_Images`` and the 10 styles
            the published experiments did not use.
        split_fractions: ``(train, validation, test)`` fractions of every cell (sum 1).
        split_ranges: inclusive image-number ranges per split; when given, it replaces
            ``split_fractions``.
        seed: None: fractions take images in number order; an int: a seeded order per cell.
        caption_template: the caption, with ``{object}`` and ``{style}``.
    """

    root: str
    forget_style: str | None = None
    forget_object: str | None = None
    styles: str | list[str] | None = None
    objects: str | list[str] | None = None
    split_fractions: tuple[float, float, float] | None = (0.9, 0.05, 0.05)
    split_ranges: dict[str, list[int]] | None = None
    seed: int | None = None
    caption_template: str = CAPTION_TEMPLATE

    def __post_init__(self):
        if self.forget_style is not None and self.forget_object is not None:
            raise ValueError("give forget_style or forget_object, not both: UnlearnCanvas unlearns "
                             "one style or one object at a time")
        if self.split_ranges is not None:
            self.split_fractions = None
            unknown = sorted(set(self.split_ranges) - set(SPLITS))
            if unknown:
                raise ValueError(f"split_ranges names unknown split(s) {unknown}; use {SPLITS}")
            spans = []
            for name, span in self.split_ranges.items():
                if len(span) != 2 or span[0] > span[1]:
                    raise ValueError(f"split_ranges[{name!r}] must be [first, last] image numbers "
                                     f"with first <= last, got {span}")
                spans.append((span[0], span[1], name))
            spans.sort()
            for (a0, a1, a), (b0, b1, b) in zip(spans, spans[1:]):
                if b0 <= a1:
                    raise ValueError(f"split_ranges overlap: {a} {[a0, a1]} and {b} {[b0, b1]}")
        elif self.split_fractions is not None:
            fr = tuple(float(f) for f in self.split_fractions)
            if len(fr) != 3 or min(fr) < 0 or abs(sum(fr) - 1.0) > 1e-9:
                raise ValueError(f"split_fractions must be three fractions (train, validation, "
                                 f"test) >= 0 that sum to 1, got {self.split_fractions}")
            self.split_fractions = fr
        else:
            raise ValueError("give split_fractions or split_ranges")
        for key in ("{object}", "{style}"):
            if key not in self.caption_template:
                raise ValueError(f"caption_template must contain {key}, got {self.caption_template!r}")

    def load(self) -> CanvasData:
        """Read and check the tree and split it (nothing is decoded yet)."""
        styles = None if self.styles is None else read_name_list(self.styles, "styles")
        objects = None if self.objects is None else read_name_list(self.objects, "objects")
        layout = read_layout(self.root, styles, objects)
        for name, value, names in (("forget_style", self.forget_style, layout.styles),
                                   ("forget_object", self.forget_object, layout.objects)):
            if value is not None and value not in names:
                raise LayoutError(f"{name} {value!r} is not a folder of {layout.root} "
                                  f"(have {list(names)[:8]}{' ...' if len(names) > 8 else ''}); "
                                  f"spell it as the folder is named")
        splits: dict[str, list[CanvasImage]] = {name: [] for name in SPLITS}
        for s in layout.styles:
            for o in layout.objects:
                parts = split_cell(layout.cells[s, o], self.split_fractions, self.split_ranges,
                                   self.seed)
                for name in SPLITS:
                    splits[name] += parts[name]
        return CanvasData(self, layout, {k: tuple(v) for k, v in splits.items()})


@dataclass(frozen=True)
class CanvasData:
    """A split UnlearnCanvas tree (from :meth:`UnlearnCanvasSet.load`)."""

    spec: UnlearnCanvasSet
    layout: CanvasLayout
    splits: dict[str, tuple[CanvasImage, ...]]

    @property
    def kind(self) -> str | None:
        """``"style"``, ``"object"`` or None (nothing to unlearn)."""
        if self.spec.forget_style is not None:
            return "style"
        return "object" if self.spec.forget_object is not None else None

    @property
    def target(self) -> str | None:
        return self.spec.forget_style if self.spec.forget_style is not None else self.spec.forget_object

    def _split(self, split: str) -> tuple[CanvasImage, ...]:
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
        return self.splits[split]

    def is_forget(self, image: CanvasImage) -> bool:
        """Whether ``image`` shows the unlearned style (any object) or object (any style)."""
        if self.kind is None:
            raise ValueError("no forget_style or forget_object was given")
        return (image.style if self.kind == "style" else image.object) == self.target

    def forget(self, split: str = "train") -> list[CanvasImage]:
        """Images of the unlearned style (all objects) or object (all styles) in ``split``."""
        return [img for img in self._split(split) if self.is_forget(img)]

    def retain(self, split: str = "train") -> list[CanvasImage]:
        """Every other image of ``split``: other styles (style unlearning) or other objects."""
        return [img for img in self._split(split) if not self.is_forget(img)]

    def caption(self, image: CanvasImage) -> str:
        return caption(image.style, image.object, self.spec.caption_template)

    def classnames(self, kind: str) -> list[str]:
        """Class names of the labelled sets of ``kind``: style / object phrases in label order."""
        if kind == "style":
            return [style_phrase(s) for s in self.layout.styles]
        if kind == "object":
            return [object_phrase(o) for o in self.layout.objects]
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")

    def label(self, image: CanvasImage, kind: str) -> int:
        """The style or object index of ``image`` (its folder's place in the label order)."""
        if kind == "style":
            return self.layout.styles.index(image.style)
        if kind == "object":
            return self.layout.objects.index(image.object)
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")

    def labelled(self, split: str, kind: str, transform: Callable,
                 name: str | None = None, rules: InputRules = DEFAULT_RULES) -> LoadedSet:
        """Every image of ``split`` decoded (under ``rules``) and labelled by ``kind`` (style or
        object) as a :class:`LoadedSet`: class names are phrases ("Van Gogh"), templates
        :data:`STYLE_TEMPLATES` / :data:`OBJECT_TEMPLATES`."""
        images = self._split(split)
        if not images:
            raise LayoutError(f"the {split} split of {self.layout.root} is empty")
        templates = STYLE_TEMPLATES if kind == "style" else OBJECT_TEMPLATES
        labels = torch.tensor([self.label(img, kind) for img in images])
        return LoadedSet(name or f"{split}_{kind}s", _load_images([i.path for i in images], transform, rules),
                         labels, self.classnames(kind), list(templates))

    def manifest(self) -> dict:
        """A JSON-able record of the data: root, label orders, unlearning target, split rule and
        seed, and every split's images (paths relative to the root)."""
        rel = lambda img: img.path.relative_to(self.layout.root).as_posix()  # noqa: E731
        return {
            "root": str(self.layout.root),
            "styles": list(self.layout.styles),
            "objects": list(self.layout.objects),
            "kind": self.kind,
            "target": self.target,
            "split_fractions": (list(self.spec.split_fractions)
                                if self.spec.split_fractions is not None else None),
            "split_ranges": self.spec.split_ranges,
            "seed": self.spec.seed,
            "caption_template": self.spec.caption_template,
            "counts": {name: len(images) for name, images in self.splits.items()},
            "splits": {name: [rel(i) for i in images] for name, images in self.splits.items()},
        }

    def write_shards(self, out_dir: str | os.PathLike, shard_size: int = 1000) -> dict:
        """Write the unlearning data as webdataset shards under ``out_dir`` (never overwriting).

        Layout::

            forget/train-000000.tar ...          forget pairs of the training split
            retain/train-000000.tar ...          retain pairs of the training split
            validation/styles-000000.tar, validation/objects-000000.tar
            test/styles-000000.tar, test/objects-000000.tar
            styles.json, objects.json            class names (phrases) in label order
            templates.json                       {"styles": [...], "objects": [...]}
            manifest.json                        :meth:`manifest`

        Every sample holds the image file's own bytes (``jpg``/``png``/``webp``), its caption
        (``txt``), a ``cls`` label and ``json`` {style, object, number, path}. ``cls`` is the
        style label in forget / retain / ``styles`` shards of a style unlearning and the object
        label otherwise. Returns the paths (shard sets as brace patterns that
        :func:`slug_pl.data.shards.expand_urls` expands) and the sample counts.
        """
        if self.kind is None:
            raise ValueError("write_shards needs forget_style or forget_object")
        out = Path(out_dir).expanduser()
        if out.exists() and any(out.iterdir()):
            raise FileExistsError(f"refusing to write UnlearnCanvas shards into {out}: the folder "
                                  f"is not empty; choose a new folder")
        result: dict = {"root": str(out), "counts": {}}
        for part, images in (("forget", self.forget("train")), ("retain", self.retain("train"))):
            if not images:
                raise LayoutError(f"the {part} set of the training split of {self.layout.root} is "
                                  f"empty; check the split")
            paths = write_canvas_shards(images, out / part, "train", self.caption,
                                        lambda i: self.label(i, self.kind), shard_size)
            result[part] = brace_pattern(paths)
            result["counts"][part] = len(images)
        for split in ("validation", "test"):
            images = self._split(split)
            for kind in KINDS:
                key = f"{split}_{kind}s"
                if not images:
                    result[key] = None
                    continue
                paths = write_canvas_shards(images, out / split, f"{kind}s", self.caption,
                                            lambda i, k=kind: self.label(i, k), shard_size)
                result[key] = brace_pattern(paths)
                result["counts"][key] = len(images)
        for name, value in (("styles.json", self.classnames("style")),
                            ("objects.json", self.classnames("object")),
                            ("templates.json", {"styles": list(STYLE_TEMPLATES),
                                                "objects": list(OBJECT_TEMPLATES)}),
                            ("manifest.json", self.manifest())):
            write_text(out / name, json.dumps(value, indent=1) + "\n")
            result[name.replace(".", "_")] = str(out / name)
        return result


@dataclass
class CanvasLabelledSet:
    """One labelled style or object set of an UnlearnCanvas tree as an evaluation-set layout
    (``load(transform, name) -> LoadedSet``, like :mod:`slug_pl.data.layouts`), e.g. the
    validation styles for the step search::

        concepts: {canvas: {root: uc, forget_style: Van_Gogh}, kind: style, split: validation}
    """

    canvas: UnlearnCanvasSet
    kind: str = "style"
    split: str = "validation"

    def load(self, transform: Callable, name: str, rules: InputRules = DEFAULT_RULES,
             part: tuple[int, int] = (0, 1)) -> LoadedSet:
        """The set, or with ``part`` ``(r, W)`` its samples ``r::W`` (decoded whole, then taken)."""
        whole = self.canvas.load().labelled(self.split, self.kind, transform, name, rules)
        return whole if part == (0, 1) else whole.take_part(part)


# ================================================================================================
# shards
# ================================================================================================

_SHARD_KEYS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}


def _image_bytes(path: Path, max_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> bytes:
    """The file's bytes, after checking that they are at most ``max_bytes`` (what a shard member
    may hold) and decode (the error names the file)."""
    if path.stat().st_size > max_bytes:
        raise LayoutError(f"image {path} has {path.stat().st_size} bytes, more than the {max_bytes} a "
                          f"shard member may hold (max_member_bytes)")
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
    except Exception as err:
        raise LayoutError(f"image {path} does not decode: {err}") from err
    return data


def write_canvas_shards(images: Sequence[CanvasImage], folder: str | os.PathLike, prefix: str,
                        caption_of: Callable[[CanvasImage], str],
                        label_of: Callable[[CanvasImage], int] | None = None,
                        shard_size: int = 1000) -> list[Path]:
    """Write ``images`` in order as ``folder/<prefix>-000000.tar ...`` (each file atomic, never
    overwriting; at least one shard); sample keys are ``<prefix>-<index>``. Tar members have a
    fixed mtime and owner, so equal inputs give byte-identical shards."""

    def record(numbered: tuple[int, CanvasImage]) -> dict:
        k, img = numbered
        meta = {"style": img.style, "object": img.object, "number": img.number,
                "path": f"{img.style}/{img.object}/{img.path.name}"}
        out = {"__key__": f"{prefix}-{k:06d}", _SHARD_KEYS[img.path.suffix.lower()]: _image_bytes(img.path),
               "txt": caption_of(img).encode("utf-8"), "json": json.dumps(meta, sort_keys=True).encode("utf-8")}
        if label_of is not None:
            out["cls"] = str(label_of(img)).encode("utf-8")
        return out

    return write_shards(folder, prefix, list(enumerate(images)), shard_size, record, owner=SLUG_OWNER,
                        at_least_one=True, atomic=True)
