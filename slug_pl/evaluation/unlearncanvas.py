"""UnlearnCanvas metrics (UA, IRA, CRA), the classifiers that judge generated images, and the
benchmark's results table.

**The benchmark's definitions**, as read in github.com/OPTML-Group/UnlearnCanvas (commit
920cfd1): ``machine_unlearning/README.md`` (section "Unlearning Accuracy and Retaining Accuracy
Calculation"), ``machine_unlearning/evaluation/quantitative/accuracy.py`` and the samplers in
``machine_unlearning/evaluation/sampling_unlearned_models/`` and
``diffusion_model_finetuning/sampling/stable_diffusion/sample_diffuser_automated.py``:

- *Answer set.* The unlearned model draws one image for every prompt
  ``"A {object} image in {style} style."`` (every style × every object of the benchmark) and every
  seed of :data:`UC_EVAL_SEEDS` (188, 288, 588, 688, 888), with 100 sampling steps, guidance
  scale 9.0 and 512 × 512 pixels (:data:`UC_SAMPLING`). :func:`prompt_grid` lists it.
- *Judges.* A style classifier and an object classifier (ViT-L/16 fine-tuned on UnlearnCanvas)
  label every image; an image counts as correct for a kind when the classifier's top-1 class is
  the one in its prompt.
- *Unlearning a style s\\** (the README's words, made exact here):

  - **UA** (unlearning accuracy) = the fraction of the images prompted with s\\* (every object,
    every seed) whose predicted style is *not* s\\*. Higher is better.
  - **IRA** (in-domain retain accuracy): for every other style s, the fraction of the images
    prompted with s that are predicted as s; IRA is their mean over the other styles.
  - **CRA** (cross-domain retain accuracy): for every object o, the fraction of the images
    prompted with o — among the images not prompted with s\\* ("for other images") — that are
    predicted as o; CRA is their mean over the objects.

  *Unlearning an object o\\**: the same with styles and objects exchanged (UA over the images of
  o\\*, IRA over the other objects, CRA = style accuracy over the images not prompted with o\\*).

  The numbers of images behind each (``n_ua``, ``n_ira``, ``n_cra``) are reported with them. On a
  full grid every concept has the same number of images, so the means over concepts equal the
  plain fractions over those images. (``accuracy.py`` itself computes each object's accuracy over
  every style, the unlearned style included, and each style's over every object; the README's
  aggregation, followed here, takes the retain accuracies over the images not prompted with the
  unlearned concept.)

**Classifiers** (:class:`CanvasClassifier`): anything that maps images ``(N, 3, H, W)`` with
values in [0, 1] to (style logits ``(N, S)``, object logits ``(N, O)``) and names its classes.
:class:`CheckpointClassifier` loads two checkpoints described by small JSON files
(:func:`load_task_classifier`), e.g. the benchmark's own classifiers::

    {"task": "style", "classnames": [... 51 names, sorted, Seed_Images included ...],
     "arch": {"library": "timm", "name": "vit_large_patch16_224"},
     "weights": "style50.safetensors", "image_size": 224, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}

The JSON is data (an allowed architecture by name, :mod:`slug_pl.evaluation.architectures`) and
the weights are safetensors. The benchmark ships its classifiers as torch pickles (``.pth``
holding ``{"model_state_dict": ...}``); convert each once, on a trusted machine, with
``slug-pl convert-checkpoint style50.pth`` (:mod:`slug_pl.convert`, which reads them with
``weights_only=True`` and writes ``style50.safetensors``).
:class:`ZeroShotClassifier` scores with any CLIP-like :class:`~slug_pl.families.base.ModelFamily`,
zero-shot over the style and object names (:mod:`slug_pl.evaluation.zeroshot`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from slug_pl.atomic import atomic_output
from slug_pl.data.unlearncanvas import (
    CAPTION_TEMPLATE,
    KINDS,
    OBJECT_TEMPLATES,
    STYLE_TEMPLATES,
    caption,
    object_phrase,
    style_phrase,
)
from slug_pl.evaluation.architectures import ArchSpec, build_classifier, load_weights
from slug_pl.evaluation.zeroshot import class_embeddings, image_embeddings
from slug_pl.families.base import ModelFamily
from slug_pl.safety import read_descriptor, resolve_inside

#: Seeds of the benchmark's answer set (accuracy.py and the samplers' default ``--seed``).
UC_EVAL_SEEDS = (188, 288, 588, 688, 888)
#: The benchmark's sampling settings for the answer set (the samplers' defaults).
UC_SAMPLING = {"num_inference_steps": 100, "guidance_scale": 9.0, "height": 512, "width": 512}


# ================================================================================================
# the prompt grid and the metrics
# ================================================================================================


@dataclass(frozen=True)
class GridPrompt:
    """One image of the answer set: its style and object (folder names), seed and prompt text."""

    style: str
    object: str
    seed: int
    text: str


def prompt_grid(styles: Sequence[str], objects: Sequence[str], seeds: Sequence[int] = UC_EVAL_SEEDS,
                template: str = CAPTION_TEMPLATE) -> list[GridPrompt]:
    """The answer set's prompts in the benchmark's sampling order: seed, then style, then object."""
    return [GridPrompt(s, o, seed, caption(s, o, template))
            for seed in seeds for s in styles for o in objects]


@dataclass(frozen=True)
class CanvasScores:
    """UA / IRA / CRA of one unlearning (fractions in [0, 1]; NaN when no image counts) with the
    number of images behind each, and the per-concept accuracies the retain means average."""

    kind: str
    target: str
    ua: float
    ira: float
    cra: float
    n_ua: int
    n_ira: int
    n_cra: int
    in_domain: dict[str, float]
    cross_domain: dict[str, float]


def _mean_per_concept(true: Sequence[str], pred: Sequence[str]) -> tuple[float, int, dict[str, float]]:
    """Mean over concepts of the per-concept accuracy, the number of images, per-concept accuracy."""
    hits: dict[str, list[int]] = {}
    for t, p in zip(true, pred):
        hits.setdefault(t, []).append(int(t == p))
    per = {c: sum(h) / len(h) for c, h in hits.items()}
    mean = sum(per.values()) / len(per) if per else math.nan
    return mean, len(true), per


def canvas_scores(kind: str, target: str, prompt_styles: Sequence[str],
                  prompt_objects: Sequence[str], pred_styles: Sequence[str],
                  pred_objects: Sequence[str]) -> CanvasScores:
    """UA, IRA and CRA (module docstring) from each image's prompted and predicted style and object.

    Args:
        kind: ``"style"`` or ``"object"``: what was unlearned.
        target: the unlearned style or object (as named in the prompts' lists).
        prompt_styles / prompt_objects: the style and object each image was prompted with.
        pred_styles / pred_objects: the classifiers' top-1 style and object of each image.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    n = len(prompt_styles)
    if not n or any(len(x) != n for x in (prompt_objects, pred_styles, pred_objects)):
        raise ValueError(f"need one prompted and predicted style and object per image, got lengths "
                         f"{[len(x) for x in (prompt_styles, prompt_objects, pred_styles, pred_objects)]}")
    same_true, same_pred = (prompt_styles, pred_styles) if kind == "style" else (prompt_objects, pred_objects)
    cross_true, cross_pred = (prompt_objects, pred_objects) if kind == "style" else (prompt_styles, pred_styles)
    forget = [t == target for t in same_true]
    if not any(forget):
        raise ValueError(f"no image is prompted with the unlearned {kind} {target!r}; the prompts "
                         f"hold {sorted(set(same_true))[:8]}")
    n_ua = sum(forget)
    ua = sum(f and p != target for f, p in zip(forget, same_pred)) / n_ua
    keep = [i for i in range(n) if not forget[i]]
    ira, n_ira, in_domain = _mean_per_concept([same_true[i] for i in keep], [same_pred[i] for i in keep])
    cra, n_cra, cross = _mean_per_concept([cross_true[i] for i in keep], [cross_pred[i] for i in keep])
    return CanvasScores(kind, target, ua, ira, cra, n_ua, n_ira, n_cra, in_domain, cross)


# ================================================================================================
# classifiers
# ================================================================================================


class CanvasClassifier(Protocol):
    """Judges of generated images: ``styles`` / ``objects`` name the logits' classes in order."""

    styles: list[str]
    objects: list[str]

    def logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``(N, 3, H, W)`` in [0, 1] -> (style logits ``(N, S)``, object logits ``(N, O)``)."""


@torch.no_grad()
def classify(classifier: CanvasClassifier, images: torch.Tensor,
             batch_size: int = 64) -> tuple[list[str], list[str]]:
    """Top-1 style and object names of ``images`` ``(N, 3, H, W)`` in [0, 1]."""
    styles, objects = [], []
    for start in range(0, images.shape[0], batch_size):
        s, o = classifier.logits(images[start : start + batch_size])
        styles += [classifier.styles[i] for i in s.argmax(-1).tolist()]
        objects += [classifier.objects[i] for i in o.argmax(-1).tolist()]
    return styles, objects


def score_images(classifier: CanvasClassifier, images: torch.Tensor, prompts: Sequence[GridPrompt],
                 kind: str, target: str, batch_size: int = 64) -> CanvasScores:
    """Classify generated ``images`` (one per prompt, same order) and compute UA / IRA / CRA."""
    if images.shape[0] != len(prompts):
        raise ValueError(f"{images.shape[0]} images for {len(prompts)} prompts: give one image per prompt")
    for names, what, known in (({p.style for p in prompts}, "style", classifier.styles),
                               ({p.object for p in prompts}, "object", classifier.objects)):
        unknown = sorted(names - set(known))
        if unknown:
            raise ValueError(f"the {what} classifier has no class for prompted {what}(s) {unknown[:5]}; "
                             f"its classes are {list(known)[:8]}")
    pred_s, pred_o = classify(classifier, images, batch_size)
    return canvas_scores(kind, target, [p.style for p in prompts], [p.object for p in prompts],
                         pred_s, pred_o)


@dataclass
class TaskClassifier:
    """One checkpoint classifier (style or object): ``model`` maps normalized images
    ``(N, 3, image_size, image_size)`` to logits over ``classnames``."""

    task: str
    classnames: list[str]
    model: nn.Module
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``(N, 3, H, W)`` in [0, 1] -> logits ``(N, C)``: bilinear (antialiased) resize to
        ``image_size`` if needed, then ``(x - mean) / std``."""
        p = next(self.model.parameters())
        x = images.to(device=p.device, dtype=torch.float32)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              antialias=True, align_corners=False)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return self.model(((x - mean) / std).to(p.dtype)).float()


def load_task_classifier(config: str | os.PathLike, device: str | torch.device = "cpu") -> TaskClassifier:
    """Load a checkpoint classifier from its JSON (keys ``task``, ``classnames``, ``arch``,
    ``weights`` (a ``.safetensors`` file inside the JSON's folder), ``image_size``, ``mean``,
    ``std``). The JSON is data: ``arch`` names an allowed architecture with typed arguments
    (:mod:`slug_pl.evaluation.architectures`), nothing is imported by a name it gives."""
    path = Path(config).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"classifier config not found: {path}")
    record = read_descriptor(path, "classifier config")
    missing = [k for k in ("task", "classnames", "arch", "weights", "image_size") if k not in record]
    if missing:
        raise ValueError(f"classifier config {path} lacks {missing}")
    if record["task"] not in KINDS:
        raise ValueError(f"classifier config {path}: task must be one of {KINDS}, got {record['task']!r}")
    if not isinstance(record["weights"], str):
        raise ValueError(f"classifier config {path}: weights must be a file name, got {record['weights']!r}")
    weights = resolve_inside(path.parent, record["weights"], str(path), "weights")
    if not weights.is_file():
        raise FileNotFoundError(f"weights of classifier {path} not found: {weights}")
    model = build_classifier(ArchSpec.from_record(record["arch"], str(path)), len(record["classnames"]))
    load_weights(model, weights, str(path))
    return TaskClassifier(record["task"], list(record["classnames"]), model.to(device).eval(),
                          int(record["image_size"]), tuple(record.get("mean", (0.5, 0.5, 0.5))),
                          tuple(record.get("std", (0.5, 0.5, 0.5))))


def save_task_classifier(model: nn.Module, config: str | os.PathLike, *, task: str,
                         classnames: Sequence[str], arch: dict, image_size: int,
                         mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5),
                         extra: dict | None = None) -> Path:
    """Save ``model`` as ``<config stem>.safetensors`` next to the JSON ``config`` (both atomic,
    never overwriting); :func:`load_task_classifier` reads them back. ``arch``: an ``arch`` record
    of :mod:`slug_pl.evaluation.architectures`. ``extra`` is stored too."""
    from safetensors.torch import save_file

    config = Path(config)
    weights = config.with_suffix(".safetensors")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_output(weights) as tmp:
        save_file(state, str(tmp))
    record = {"task": task, "classnames": list(classnames), "arch": arch, "weights": weights.name,
              "image_size": image_size, "mean": list(mean), "std": list(std), **(extra or {})}
    with atomic_output(config) as tmp:
        tmp.write_text(json.dumps(record, indent=1) + "\n")
    return config


class CheckpointClassifier:
    """The benchmark's judge: a style and an object checkpoint classifier (JSON configs)."""

    def __init__(self, style: str | os.PathLike, object: str | os.PathLike,
                 device: str | torch.device = "cpu"):
        self.style = load_task_classifier(style, device)
        self.object = load_task_classifier(object, device)
        for part, want in ((self.style, "style"), (self.object, "object")):
            if part.task != want:
                raise ValueError(f"the {want} classifier's config says task {part.task!r}")
        self.styles, self.objects = self.style.classnames, self.object.classnames

    def logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.style.logits(images), self.object.logits(images)


class ZeroShotClassifier:
    """CLIP zero-shot judge: logits = unit image embedding · unit class embeddings, as defined in
    :mod:`slug_pl.evaluation.zeroshot`, with classes the style / object phrases ("Van Gogh").

    ``styles`` / ``objects`` are folder names; images are turned into PIL images and preprocessed
    with the family's own evaluation transform.
    """

    def __init__(self, family: ModelFamily, model: nn.Module, styles: Sequence[str],
                 objects: Sequence[str], style_templates: Sequence[str] = STYLE_TEMPLATES,
                 object_templates: Sequence[str] = OBJECT_TEMPLATES, batch_size: int = 256):
        self.family, self.model, self.batch_size = family, model, batch_size
        self.styles, self.objects = list(styles), list(objects)
        self.transform = family.image_transform()
        self.style_emb = class_embeddings(family, model, [style_phrase(s) for s in styles], style_templates)
        self.object_emb = class_embeddings(family, model, [object_phrase(o) for o in objects], object_templates)

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from torchvision.transforms.functional import to_pil_image

        batch = torch.stack([self.transform(to_pil_image(img.clamp(0, 1).cpu())) for img in images])
        emb = image_embeddings(self.family, self.model, batch, self.batch_size)
        return emb @ self.style_emb.T, emb @ self.object_emb.T


# ================================================================================================
# the results table
# ================================================================================================

CSV_NAME = "unlearncanvas.csv"
CSV_COLUMNS = ("method", "target", "kind", "UA", "IRA", "CRA", "n_UA", "n_IRA", "n_CRA", "time_s",
               "peak_memory_gb", "storage_gb")


@dataclass(frozen=True)
class CanvasRow:
    """One row of ``unlearncanvas.csv``: accuracies are fractions in [0, 1]; ``time_s`` the
    unlearning's wall time, ``peak_memory_gb`` its peak accelerator (or process) memory,
    ``storage_gb`` what must be stored to apply it (None when not measured)."""

    method: str
    target: str
    kind: str
    ua: float
    ira: float
    cra: float
    n_ua: int
    n_ira: int
    n_cra: int
    time_s: float | None = None
    peak_memory_gb: float | None = None
    storage_gb: float | None = None

    @classmethod
    def from_scores(cls, method: str, scores: CanvasScores, time_s: float | None = None,
                    peak_memory_gb: float | None = None, storage_gb: float | None = None) -> CanvasRow:
        return cls(method, scores.target, scores.kind, scores.ua, scores.ira, scores.cra,
                   scores.n_ua, scores.n_ira, scores.n_cra, time_s, peak_memory_gb, storage_gb)

    def values(self) -> list[str]:
        """The CSV cells in :data:`CSV_COLUMNS` order (empty for None; floats with repr precision)."""
        return ["" if v is None else repr(float(v)) if isinstance(v, float) else str(v)
                for v in (getattr(self, f.name) for f in fields(self))]


def _parse_row(cells: dict[str, str]) -> CanvasRow:
    def num(text: str, kind=float):
        return None if text == "" else kind(text)

    return CanvasRow(cells["method"], cells["target"], cells["kind"], float(cells["UA"]),
                     float(cells["IRA"]), float(cells["CRA"]), int(cells["n_UA"]), int(cells["n_IRA"]),
                     int(cells["n_CRA"]), num(cells["time_s"]), num(cells["peak_memory_gb"]),
                     num(cells["storage_gb"]))


def read_rows(path: str | os.PathLike) -> list[CanvasRow]:
    """The rows of an ``unlearncanvas.csv`` (its header must be :data:`CSV_COLUMNS`)."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != CSV_COLUMNS:
            raise ValueError(f"{path} is not an UnlearnCanvas results table: header "
                             f"{reader.fieldnames}, expected {list(CSV_COLUMNS)}")
        return [_parse_row(row) for row in reader]


def write_row(path: str | os.PathLike, row: CanvasRow) -> Path:
    """Add ``row`` to the results table at ``path`` (created with its header if absent).

    The file is replaced atomically by a copy that holds every earlier row unchanged plus the new
    one, so a reader never sees a half-written table; a file at ``path`` that is not such a table
    (another header) is refused, never overwritten.
    """
    path = Path(path)
    old = b""
    if path.exists():
        read_rows(path)  # refuses anything but a results table
        old = path.read_bytes()
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    if not old:
        writer.writerow(CSV_COLUMNS)
    writer.writerow(row.values())
    with atomic_output(path, overwrite=bool(old)) as tmp:
        tmp.write_bytes(old + buf.getvalue().encode("utf-8"))
    return path


@dataclass(frozen=True)
class PublishedRow:
    """A method's published UnlearnCanvas results (percent, means over all style / object
    unlearnings; None where the source gives none), with the source they are quoted from."""

    method: str
    style: tuple[float, float, float] | None  # UA, IRA, CRA (%)
    object: tuple[float, float, float] | None
    time_s: float | None
    memory_gb: float | None
    storage_gb: float | None
    source: str


_UC_TABLE = ("github.com/OPTML-Group/UnlearnCanvas, assets/mu_results.png at commit 920cfd1 "
             "(the UnlearnCanvas paper's Table 3 as an image; means over all style and all "
             "object unlearnings)")

#: Rows quoted from the sources named in them; published, not measured here.
PUBLISHED: tuple[PublishedRow, ...] = (
    PublishedRow("ESD", (98.58, 80.97, 93.96), (92.15, 55.78, 44.23), 6163, 17.8, 4.3, _UC_TABLE),
    PublishedRow("FMN", (88.48, 56.77, 46.60), (45.64, 90.63, 73.46), 350, 17.9, 4.2, _UC_TABLE),
    PublishedRow("UCE", (98.40, 60.22, 47.71), (94.31, 39.35, 34.67), 434, 5.1, 1.7, _UC_TABLE),
    PublishedRow("CA", (60.82, 96.01, 92.70), (46.67, 90.11, 81.97), 734, 10.1, 4.2, _UC_TABLE),
    PublishedRow("SalUn", (86.26, 90.39, 95.08), (86.91, 96.35, 99.59), 667, 30.8, 4.0, _UC_TABLE),
    PublishedRow("SLUG (style unlearning, reported)", None, None, 39, 3.6, 0.04,
                 "SLUG paper (Cai et al., arXiv 2407.11867), as reported; not checked against "
                 "the paper's table here"),
)


def _pct(x: float | None) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def _num(x: float | None) -> str:
    return "" if x is None else f"{x:g}"


def comparison_markdown(rows: Sequence[CanvasRow],
                        published: Sequence[PublishedRow] = PUBLISHED) -> str:
    """A markdown table in the benchmark's layout: measured ``rows`` (one unlearning target each,
    with the number of images behind each accuracy) next to ``published`` rows (means over all
    targets, marked "published, not measured here" with their source). Accuracies in percent."""
    head = ("| Method | Style UA ↑ | Style IRA ↑ | Style CRA ↑ | Object UA ↑ | Object IRA ↑ | "
            "Object CRA ↑ | Time (s) ↓ | Memory (GB) ↓ | Storage (GB) ↓ | Source |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        accs = [f"{_pct(v)} (n={n})" for v, n in ((r.ua, r.n_ua), (r.ira, r.n_ira), (r.cra, r.n_cra))]
        style, obj = (accs, [""] * 3) if r.kind == "style" else ([""] * 3, accs)
        lines.append(f"| {r.method} ({r.kind}: {r.target}) | " + " | ".join(style + obj) + " | "
                     + " | ".join(_num(v) for v in (r.time_s, r.peak_memory_gb, r.storage_gb))
                     + " | measured here, one target |")
    for p in published:
        cells = []
        for part in (p.style, p.object):
            cells += [f"{v:.2f}" for v in part] if part is not None else [""] * 3
        lines.append(f"| {p.method} | " + " | ".join(cells) + " | "
                     + " | ".join("" if v is None else str(v)  # as printed in the source
                                  for v in (p.time_s, p.memory_gb, p.storage_gb))
                     + f" | published, not measured here: {p.source} |")
    return "\n".join(lines) + "\n"
