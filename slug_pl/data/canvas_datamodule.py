"""An UnlearnCanvas tree as the data of a SLUG run: forget / retain pairs for the gradient pass and
labelled style and object sets for the step search and the held-out report.

A thin :class:`~slug_pl.data.datamodule.SlugDataModule` over
:class:`~slug_pl.data.unlearncanvas.UnlearnCanvasSet` (the layout reader, splits and captions
are there): ``prepare_data`` writes the split tree once as webdataset shards
(:meth:`~slug_pl.data.unlearncanvas.CanvasData.write_shards`) into a cache folder keyed by what
determines them, and ``setup`` points the SlugDataModule machinery at them:

- ``forget``: the training images of the unlearned style (every object) or object (every style),
  captioned ``"A {object} image in {style} style."``; ``retain``: every other training image;
- ``concepts``: the unlearned style's (or object's) caption phrase, e.g. ``"Van Gogh"``;
- the *concept set* of validation and test is the labelled set of the unlearned kind (the style
  names for a style unlearning, the object names for an object unlearning), so the CLIP-side
  zero-shot metrics (docs/design.md §2) read: ``forget_top1`` = how often the CLIP names the
  unlearned style in held-out images of it, ``retain_top1`` = the mean over the other styles;
- the *utility set* is the labelled set of the other kind (objects for a style unlearning).

The split rule and its seed, the label orders and every split's image list are recorded in the
cache folder's ``manifest.json`` (:meth:`~slug_pl.data.unlearncanvas.CanvasData.manifest`) and
summarized by :meth:`UnlearnCanvasDataModule.record`.

A downstream target that draws the benchmark's prompt grid reads what to draw from
:meth:`UnlearnCanvasDataModule.canvas_grid` (see :mod:`slug_pl.targets.unlearncanvas`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from slug_pl.atomic import atomic_folder, file_slug
from slug_pl.data.datamodule import EvalSuite, SlugDataModule
from slug_pl.data.labelled import LabelledSet
from slug_pl.data.unlearncanvas import (
    CAPTION_TEMPLATE,
    OBJECT_TEMPLATES,
    STYLE_TEMPLATES,
    CanvasData,
    UnlearnCanvasSet,
    object_phrase,
    style_phrase,
)

#: Bump when the shard layout written here changes: invalidates cached shard folders.
SHARDS_VERSION = 1
#: The file that marks a complete shard folder (written last, before the rename into place).
DONE_FILE = "shards.json"


@dataclass(frozen=True)
class CanvasGrid:
    """What an UnlearnCanvas evaluation draws and whom it unlearns: the unlearned ``kind``
    (``"style"`` / ``"object"``), its folder name ``target``, every style and object folder name
    in label order, and the prompt ``template`` (the captions the model was trained on)."""

    kind: str
    target: str
    styles: tuple[str, ...]
    objects: tuple[str, ...]
    template: str = CAPTION_TEMPLATE


@runtime_checkable
class CanvasGridSource(Protocol):
    """What the UnlearnCanvas target needs of a run's data beyond :class:`~slug_pl.context.RunData`:
    the prompt grid, and a record of where the canvas came from."""

    def canvas_grid(self) -> CanvasGrid: ...

    def record(self) -> dict: ...


class UnlearnCanvasDataModule(SlugDataModule):
    """Forget one style (in every object) or one object (in every style) of an UnlearnCanvas tree."""

    def __init__(
        self,
        root: str,
        forget_style: str | None = None,
        forget_object: str | None = None,
        styles: str | list[str] | None = None,
        objects: str | list[str] | None = None,
        split_fractions: tuple[float, float, float] | None = (0.9, 0.05, 0.05),
        split_ranges: dict[str, list[int]] | None = None,
        seed: int | None = None,
        caption_template: str = CAPTION_TEMPLATE,
        shards_dir: str = ".slug_cache/unlearncanvas",
        shard_size: int = 1000,
        batch_size: int = 32,
        retain_batch_size: int | None = None,
        num_workers: int = 0,
        eval_batch_size: int = 256,
        bad_samples: str = "stop",
    ):
        """
        Args:
            root / forget_style / forget_object / styles / objects / split_fractions /
                split_ranges / seed / caption_template: the tree and what to unlearn, as
                :class:`~slug_pl.data.unlearncanvas.UnlearnCanvasSet` (exactly one of
                ``forget_style`` and ``forget_object``, spelled as its folder).
            shards_dir: cache folder of the written shards (one subfolder per tree, split and
                target; reused while the images' names, sizes and times are unchanged).
            shard_size: samples per shard file.
            batch_size / retain_batch_size / num_workers / eval_batch_size / bad_samples: as in
                :class:`~slug_pl.data.datamodule.SlugDataModule`.
        """
        if (forget_style is None) == (forget_object is None):
            raise ValueError("data.init_args: give forget_style (unlearn one style in every object) or "
                             "forget_object (one object in every style), exactly one")
        self.canvas = UnlearnCanvasSet(root, forget_style, forget_object, styles, objects, split_fractions,
                                       split_ranges, seed, caption_template)
        concept = style_phrase(forget_style) if forget_style is not None else object_phrase(forget_object)
        super().__init__(concepts=[concept], batch_size=batch_size, retain_batch_size=retain_batch_size,
                         num_workers=num_workers, eval_batch_size=eval_batch_size, bad_samples=bad_samples)
        if shard_size < 1:
            raise ValueError(f"data.shard_size must be >= 1, got {shard_size}")
        self.shards_dir = Path(shards_dir).expanduser()
        self.shard_size = shard_size
        self.paths: dict | None = None

    # -- the shards ----------------------------------------------------------------------------
    def _cache_key(self, data: CanvasData) -> str:
        """SHA-256 over the manifest (tree, labels, target, split rule and seed, every split's
        images) and each image's size and modification time."""
        h = hashlib.sha256(json.dumps({"version": SHARDS_VERSION, "shard_size": self.shard_size,
                                       "manifest": data.manifest()}, sort_keys=True).encode())
        for img in data.layout.images():
            st = img.path.stat()
            h.update(f"{img.path}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        return h.hexdigest()

    def _shards_folder(self, data: CanvasData) -> Path:
        return self.shards_dir / f"{data.kind}-{file_slug(data.target)}-{self._cache_key(data)[:16]}"

    def _ensure_shards(self) -> dict:
        """Write the shards (or reuse them) and return where everything lies."""
        data = self.canvas.load()
        folder = self._shards_folder(data)
        if not (folder / DONE_FILE).is_file():
            try:
                with atomic_folder(folder, empty_ok=True) as tmp:
                    result = data.write_shards(tmp, self.shard_size)
                    (tmp / DONE_FILE).write_text(json.dumps({"counts": result["counts"]}, indent=1) + "\n")
            except FileExistsError:  # written meanwhile by another process: keep that one
                if not (folder / DONE_FILE).is_file():
                    raise
        counts = json.loads((folder / DONE_FILE).read_text())["counts"]
        shards = lambda sub, prefix: sorted(str(p) for p in (folder / sub).glob(f"{prefix}-*.tar"))  # noqa: E731
        return {"folder": str(folder), "counts": counts,
                "grid": CanvasGrid(data.kind, data.target, data.layout.styles, data.layout.objects,
                                   self.canvas.caption_template),
                "forget": shards("forget", "train"), "retain": shards("retain", "train"),
                **{f"{split}_{kind}": shards(split, kind) for split in ("validation", "test")
                   for kind in ("styles", "objects")}}

    def prepare_data(self) -> None:
        self.paths = self._ensure_shards()

    def setup(self, stage: str) -> None:
        if self.paths is None:  # prepare_data ran in another process (DDP): read the cache
            self.paths = self._ensure_shards()
        p, folder = self.paths, Path(self.paths["folder"])
        self.forget, self.retain = p["forget"], p["retain"]
        same, cross = ("styles", "objects") if p["grid"].kind == "style" else ("objects", "styles")
        templates = {"styles": list(STYLE_TEMPLATES), "objects": list(OBJECT_TEMPLATES)}

        def labelled(split: str, kind: str) -> LabelledSet:
            return LabelledSet(p[f"{split}_{kind}"], str(folder / f"{kind}.json"), templates[kind])

        self.suites = {split: EvalSuite(labelled(split, same), labelled(split, cross)) if p[f"{split}_{same}"]
                       else None for split in ("validation", "test")}
        super().setup(stage)

    def check(self, stage: str, pair_sets=(), processes: int = 1) -> None:
        if self.paths is not None:  # the shards exist once written (prepare_data / setup)
            super().check(stage, pair_sets, processes)

    # -- what targets and records read ---------------------------------------------------------
    def canvas_grid(self) -> CanvasGrid:
        """The unlearned kind and target and the tree's styles and objects (folder names)."""
        if self.paths is None:
            self.paths = self._ensure_shards()
        return self.paths["grid"]

    def record(self) -> dict:
        """Where the shards lie, how many images each part holds, and the split rule with its seed
        (the full per-image lists are in the shard folder's ``manifest.json``)."""
        spec = self.canvas
        return {"root": spec.root, "shards": self.paths["folder"] if self.paths else None,
                "counts": self.paths["counts"] if self.paths else None,
                "split_fractions": list(spec.split_fractions) if spec.split_fractions is not None else None,
                "split_ranges": spec.split_ranges, "split_seed": spec.seed,
                "caption_template": spec.caption_template}
