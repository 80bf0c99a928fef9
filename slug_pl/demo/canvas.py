"""A synthetic UnlearnCanvas: the demo world's objects painted in six procedural styles, written as
``<root>/<Style>/<Object>/<n>.png`` so :mod:`slug_pl.data.unlearncanvas` reads it like the
benchmark, and small style / object classifiers that judge it as the benchmark's ViT-L
classifiers judge the real one.

**Styles** (pure numpy on the 32 × 32 render of :func:`slug_pl.demo.world.render_object`, each
visually distinct at that size, with a little per-image jitter):

- ``Posterize``: smoothed, saturated, every channel quantized to three levels (flat poster colours);
- ``Pencil_Sketch``: cream paper, dark strokes along the edges tinted by the object's colour,
  hatching in dark areas;
- ``Pointillism``: a warm cream ground covered with round dots of the scene's colours, saturated,
  on a staggered, jittered grid;
- ``Watercolor``: blurred, paler washes on cool white paper with pigment blotches, darker rims
  and paper grain;
- ``Mosaic``: 4 × 4-pixel tiles of the scene's mean colours between dark grout lines;
- ``Neon``: glowing edges in the scene's hues, brightened to full saturation, on a near-black ground.

Everything is deterministic: an image's random stream is seeded by (canvas seed, style, object,
number) only and PNGs are written with fixed encoder settings, so equal :class:`CanvasSpec` give
byte-identical files. The canvas is built in a temporary folder and renamed into place, and
reused when its ``canvas.json`` matches the spec (as :func:`slug_pl.demo.world.build_world`).

:func:`train_canvas_classifiers` trains a small CNN (:class:`CanvasCNN`) per kind on the training
split, saves each as safetensors + JSON and loads them back through
:class:`slug_pl.evaluation.unlearncanvas.CheckpointClassifier` to measure held-out accuracy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from slug_pl.atomic import rebuilt_folder
from slug_pl.demo.training import descend, one_thread
from slug_pl.demo.world import WorldSpec, object_names, render_object

logger = logging.getLogger(__name__)

#: Bump when a style, the layout or the file encoding changes: invalidates cached canvases.
CANVAS_VERSION = 1

CANVAS_STYLES = ("Posterize", "Pencil_Sketch", "Pointillism", "Watercolor", "Mosaic", "Neon")

_PAPER = np.array([0.96, 0.94, 0.88])  # cream drawing paper
_WARM_CANVAS = np.array([0.98, 0.90, 0.70])  # Pointillism's ground
_COOL_PAPER = np.array([0.90, 0.94, 0.99])  # Watercolor's paper


@dataclass(frozen=True)
class CanvasSpec:
    """Everything that determines a synthetic canvas: equal specs give byte-identical trees.

    ``styles`` are names of :data:`CANVAS_STYLES` (folder names, in this order); the objects are
    the first ``n_objects`` of the demo world's object classes (folders named with a capital:
    ``Apple``); every (style, object) cell holds ``images_per_cell`` images ``1.png`` ... of
    ``image_size`` pixels.
    """

    seed: int = 0
    styles: tuple[str, ...] = CANVAS_STYLES
    n_objects: int = 10
    images_per_cell: int = 20
    image_size: int = 32

    def __post_init__(self):
        unknown = [s for s in self.styles if s not in CANVAS_STYLES]
        if unknown or not self.styles or len(set(self.styles)) != len(self.styles):
            raise ValueError(f"styles must be distinct names of {CANVAS_STYLES}, got {self.styles}")
        WorldSpec(n_objects=self.n_objects, image_size=self.image_size)  # checks both
        if self.images_per_cell < 1:
            raise ValueError(f"images_per_cell must be >= 1, got {self.images_per_cell}")


def canvas_objects(spec: CanvasSpec = CanvasSpec()) -> list[str]:
    """Object folder names in label order: the world's object classes with a capital letter."""
    return [name.capitalize() for name in object_names(WorldSpec(n_objects=spec.n_objects))]


# ================================================================================================
# styles: float RGB arrays (H, W, 3) in [0, 1] -> the same
# ================================================================================================


def _blur(img: np.ndarray, passes: int = 1) -> np.ndarray:
    """3 × 3 box blur with edge padding, ``passes`` times."""
    for _ in range(passes):
        p = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
        h, w = img.shape[:2]
        img = sum(p[i : i + h, j : j + w] for i in range(3) for j in range(3)) / 9.0
    return img


def _edges(img: np.ndarray) -> np.ndarray:
    """Sobel gradient magnitude, the largest over the colour channels, (H, W) in [0, ~1]."""
    p = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
    gx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
    gy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
    return np.sqrt(gx**2 + gy**2).max(axis=-1) / 4.0


def _saturate(img: np.ndarray, amount: float) -> np.ndarray:
    grey = img.mean(axis=-1, keepdims=True)
    return np.clip(grey + amount * (img - grey), 0.0, 1.0)


def _posterize(img, rng):
    smooth = _saturate(_blur(img, 1), rng.uniform(1.4, 1.7))
    return np.round(smooth * 2.0) / 2.0


def _pencil_sketch(img, rng):
    h, w = img.shape[:2]
    paper = np.clip(_PAPER + rng.normal(0, 0.015, 3), 0, 1)
    stroke = np.clip(_edges(img) * rng.uniform(2.2, 2.8), 0, 1)[..., None]
    ink = 0.55 * np.array([0.20, 0.20, 0.22]) + 0.45 * img * 0.6
    y, x = np.mgrid[0:h, 0:w]
    hatch = (((x + y) % 4) == 0) & (img.mean(-1) < 0.45)
    out = paper * (1 - stroke) + ink * stroke
    out[hatch] = out[hatch] * 0.75
    return np.clip(out + rng.normal(0, 0.01, out.shape), 0, 1)


def _pointillism(img, rng):
    h, w = img.shape[:2]
    ss = 4  # dots are drawn at 4x resolution and box-filtered down: round, anti-aliased
    ground = np.clip(_WARM_CANVAS + rng.normal(0, 0.015, 3), 0, 1)
    big = np.broadcast_to(ground, (h * ss, w * ss, 3)).copy()
    colour = _saturate(_blur(img, 1), 2.0)
    y, x = (np.mgrid[0 : h * ss, 0 : w * ss] + 0.5) / ss
    for cy in np.arange(0.5, h, 3.0):
        for cx in np.arange(0.5 + 1.5 * (int(cy) // 3 % 2), w, 3.0):  # staggered rows
            py, px = cy + rng.uniform(-0.5, 0.5), cx + rng.uniform(-0.5, 0.5)
            dot = (x - px) ** 2 + (y - py) ** 2 <= rng.uniform(1.0, 1.3) ** 2
            big[dot] = colour[int(np.clip(py, 0, h - 1)), int(np.clip(px, 0, w - 1))]
    return big.reshape(h, ss, w, ss, 3).mean(axis=(1, 3))


def _smooth_noise(rng, h: int, w: int, cells: int) -> np.ndarray:
    """Low-frequency noise (H, W) in about [-1, 1]: a coarse random grid, bilinearly upsampled."""
    grid = rng.uniform(-1, 1, (cells + 1, cells + 1))
    ys, xs = np.linspace(0, cells, h), np.linspace(0, cells, w)
    y0, x0 = np.minimum(ys.astype(int), cells - 1), np.minimum(xs.astype(int), cells - 1)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    a, b = grid[y0][:, x0], grid[y0][:, x0 + 1]
    c, d = grid[y0 + 1][:, x0], grid[y0 + 1][:, x0 + 1]
    return (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy


def _watercolor(img, rng):
    h, w = img.shape[:2]
    wash = _saturate(_blur(img, 2), 0.75)
    out = 0.55 * wash + 0.45 * _COOL_PAPER
    out = out * (1 + 0.10 * _smooth_noise(rng, h, w, 4))[..., None]
    out = out - 0.35 * np.clip(_edges(wash), 0, 1)[..., None] * (1 - wash)
    return np.clip(out + rng.normal(0, 0.02, (h, w, 1)), 0, 1)


def _mosaic(img, rng):
    h, w = img.shape[:2]
    tile = 4
    out = np.empty_like(img)
    for ty in range(0, h, tile):
        for tx in range(0, w, tile):
            mean = img[ty : ty + tile, tx : tx + tile].reshape(-1, 3).mean(0)
            out[ty : ty + tile, tx : tx + tile] = np.clip(mean + rng.normal(0, 0.035, 3), 0, 1)
    y, x = np.mgrid[0:h, 0:w]
    grout = (y % tile == 0) | (x % tile == 0)
    out[grout] = np.array([0.16, 0.15, 0.14]) + rng.normal(0, 0.01, 3)
    return np.clip(out, 0, 1)


def _neon(img, rng):
    h, w = img.shape[:2]
    hue = img / np.maximum(img.max(axis=-1, keepdims=True), 0.05)  # full brightness, same hue
    hue = _saturate(hue, 1.8)
    line = np.clip(_edges(img) * 3.0, 0, 1)[..., None]
    glow = _blur(line * hue, 2)
    ground = np.clip(np.array([0.03, 0.02, 0.07]) + rng.normal(0, 0.01, 3), 0, 1)
    return np.clip(ground + 0.9 * line * hue + 0.8 * glow, 0, 1)


STYLE_RENDERERS = {
    "Posterize": _posterize,
    "Pencil_Sketch": _pencil_sketch,
    "Pointillism": _pointillism,
    "Watercolor": _watercolor,
    "Mosaic": _mosaic,
    "Neon": _neon,
}


def render_canvas_image(spec: CanvasSpec, style: str, obj: str, number: int) -> np.ndarray:
    """Image ``number`` of the cell (style, object): uint8 ``(size, size, 3)``. Its random stream
    depends only on (seed, style, object, number)."""
    s = CANVAS_STYLES.index(style)
    o = canvas_objects(spec).index(obj)
    rng = np.random.default_rng([spec.seed, 7, s, o, number])
    world = WorldSpec(n_objects=spec.n_objects, image_size=spec.image_size)
    scene, _ = render_object(world, obj.lower(), rng)
    out = STYLE_RENDERERS[style](scene.astype(np.float64) / 255.0, rng)
    return np.clip(np.round(out * 255.0), 0, 255).astype(np.uint8)


# ================================================================================================
# building the tree
# ================================================================================================


def _spec_record(spec: CanvasSpec) -> dict:
    """The spec as it reads back from ``canvas.json`` (tuples become lists)."""
    return json.loads(json.dumps({"canvas_version": CANVAS_VERSION, "spec": dataclasses.asdict(spec)}))


def _fingerprint(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != "canvas.json"):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def read_canvas(root: str | os.PathLike) -> dict | None:
    """The ``canvas.json`` of a built canvas at ``root``, or None."""
    try:
        return json.loads((Path(root) / "canvas.json").read_text())
    except (OSError, ValueError):
        return None


def _matches(root: Path, spec: CanvasSpec) -> bool:
    record = read_canvas(root)
    return record is not None and all(record.get(k) == v for k, v in _spec_record(spec).items())


def _result(root: Path, spec: CanvasSpec, fingerprint: str, built: bool) -> dict:
    return {"root": str(root), "styles": list(spec.styles), "objects": canvas_objects(spec),
            "images_per_cell": spec.images_per_cell, "fingerprint": fingerprint, "built": built}


def _build_into(folder: Path, spec: CanvasSpec) -> str:
    for style in spec.styles:
        for obj in canvas_objects(spec):
            cell = folder / style / obj
            cell.mkdir(parents=True)
            for n in range(1, spec.images_per_cell + 1):
                Image.fromarray(render_canvas_image(spec, style, obj, n), mode="RGB").save(
                    cell / f"{n}.png", format="PNG", compress_level=6, optimize=False)
    fingerprint = _fingerprint(folder)
    record = {**_spec_record(spec), "fingerprint": fingerprint}
    (folder / "canvas.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return fingerprint


def build_canvas(root: str | os.PathLike, spec: CanvasSpec = CanvasSpec()) -> dict:
    """Build the synthetic canvas at ``root`` (or reuse it if ``root/canvas.json`` matches).

    Layout: ``<root>/<Style>/<Object>/<n>.png`` (n = 1 .. images_per_cell) and ``canvas.json``
    (spec, version, a SHA-256 over every file). Built in a temporary folder next to ``root`` and
    renamed into place; a canvas of another spec at ``root`` is replaced, any other existing
    ``root`` is refused. Returns root, styles, objects, images_per_cell, fingerprint and whether
    it was built now (``built``).
    """
    root = Path(root).expanduser().resolve()
    if _matches(root, spec):
        return _result(root, spec, read_canvas(root)["fingerprint"], built=False)
    if root.exists() and (read_canvas(root) is None and any(root.iterdir())):
        raise FileExistsError(f"{root} exists and is not a synthetic canvas (no canvas.json); "
                              f"choose another folder")
    logger.info("synthetic canvas: building %s", root)
    with rebuilt_folder(root, keep=lambda: _matches(root, spec)) as build:  # keep: built concurrently
        fingerprint = _build_into(build.path, spec)
    if not build.swapped:
        return _result(root, spec, read_canvas(root)["fingerprint"], built=False)
    return _result(root, spec, fingerprint, built=True)


# ================================================================================================
# classifiers
# ================================================================================================


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class CanvasCNN(nn.Module):
    """A small torchvision-style CNN (``features`` then ``classifier``) for 32 × 32 images:
    32 -> 16 (stride-2 conv) -> 8 -> 4 (max pools), global average pool, linear head."""

    def __init__(self, num_classes: int, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            _conv(3, width, stride=2), _conv(width, 2 * width), nn.MaxPool2d(2),
            _conv(2 * width, 4 * width), nn.MaxPool2d(2), _conv(4 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


_MEAN = _STD = (0.5, 0.5, 0.5)


def _to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> float ``(3, H, W)`` in [0, 1]."""
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and shifts of up to 2 pixels (reflect padding)."""
    flip = torch.rand(x.shape[0], generator=gen) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    pad = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    dy, dx = torch.randint(0, 5, (2,), generator=gen).tolist()
    return pad[..., dy : dy + x.shape[-2], dx : dx + x.shape[-1]]


def _train_one(images: torch.Tensor, labels: torch.Tensor, num_classes: int, steps: int,
               batch_size: int, lr: float, width: int, seed: int) -> CanvasCNN:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = CanvasCNN(num_classes, width)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    x_all = (images - 0.5) / 0.5
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, x_all.shape[0], (batch_size,), generator=gen)
        loss = nn.functional.cross_entropy(model(_augment(x_all[idx], gen)), labels[idx])
        descend(loss, opt, sched)
    return model.eval()


def train_canvas_classifiers(root: str | os.PathLike, out_dir: str | os.PathLike, *,
                             split_fractions: tuple[float, float, float] = (0.75, 0.0, 0.25),
                             split_seed: int | None = 0, steps: int = 300, batch_size: int = 64,
                             lr: float = 4e-3, width: int = 16, seed: int = 0,
                             views: Callable[[torch.Tensor], torch.Tensor] | None = None,
                             views_name: str | None = None) -> dict:
    """Train a :class:`CanvasCNN` for styles and one for objects on the training split of the
    canvas at ``root``; save ``out_dir/{style,object}.{json,safetensors}`` (never overwriting);
    load them back through :class:`~slug_pl.evaluation.unlearncanvas.CheckpointClassifier` and
    measure top-1 accuracy on the held-out test split.

    ``views``: a function of the training images ``(N, 3, H, W)`` in [0, 1] that returns another
    view of each (the same shape, e.g. a VAE's reconstructions, the look of generated images);
    the classifiers then train on both, with the same labels. ``views_name`` names it in the
    saved configs.

    Runs on one CPU thread (``torch.set_num_threads(1)``, restored afterwards). Returns
    ``{"style": {"config", "accuracy", "n_test"}, "object": {...}, "train_images", "time_s"}``.
    """
    from slug_pl.data.unlearncanvas import UnlearnCanvasSet
    from slug_pl.evaluation.unlearncanvas import (
        CheckpointClassifier,
        classify,
        save_task_classifier,
    )

    start = time.perf_counter()
    with one_thread():
        data = UnlearnCanvasSet(str(root), split_fractions=split_fractions, seed=split_seed).load()
        train = data.labelled("train", "style", _to_tensor)
        object_labels = torch.tensor([data.label(i, "object") for i in data.splits["train"]])
        out = Path(out_dir)
        images = train.images
        if views is not None:
            images = torch.cat([images, views(images).clamp(0, 1)])
            object_labels = torch.cat([object_labels, object_labels])
        style_labels = train.labels.repeat(images.shape[0] // len(train.labels))
        configs = {}
        for kind, labels, names in (("style", style_labels, data.layout.styles),
                                    ("object", object_labels, data.layout.objects)):
            model = _train_one(images, labels, len(names), steps, batch_size, lr, width, seed)
            configs[kind] = save_task_classifier(
                model, out / f"{kind}.json", task=kind, classnames=list(names),
                arch={"library": "slug_pl", "name": "slug_pl.demo.canvas.CanvasCNN",
                      "kwargs": {"width": width}},
                image_size=train.images.shape[-1], mean=_MEAN, std=_STD,
                extra={"trained_on": {"root": str(root), "split_fractions": list(split_fractions),
                                      "split_seed": split_seed, "steps": steps, "seed": seed,
                                      "views": views_name if views is not None else None}})
        judge = CheckpointClassifier(configs["style"], configs["object"])
        test = data.splits["test"]
        images = data.labelled("test", "style", _to_tensor).images
        pred_s, pred_o = classify(judge, images)
        acc = {"style": np.mean([p == i.style for p, i in zip(pred_s, test)]),
               "object": np.mean([p == i.object for p, i in zip(pred_o, test)])}
    result = {kind: {"config": str(configs[kind]), "accuracy": float(acc[kind]), "n_test": len(test)}
              for kind in ("style", "object")}
    result.update(train_images=len(data.splits["train"]), time_s=time.perf_counter() - start)
    return result
