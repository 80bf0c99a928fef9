"""Evaluating a text-to-image model (a diffusers ``StableDiffusionPipeline``) before and after an
edit of its CLIP text encoder.

The pieces, each usable alone:

- :class:`PromptSet`: which prompts are drawn with which seeds, in one documented order;
- :func:`clip_scores`: how well images match their prompts under a CLIP;
- :func:`recognition`: how often an image judge (:class:`ImageJudge`: a CLIP zero-shot classifier,
  :class:`ClipZeroShotJudge`, or a trained classifier, :class:`ClassifierJudge`) recognizes the
  concept a prompt asked for;
- :func:`score_generation`: judging + CLIP score of drawn images as one result dict;
- :func:`image_grid`: before | after images side by side, per concept.

Images are drawn by :func:`slug_pl.pipelines.generate_images` (each from its own seeded generator,
so an image does not depend on how the pairs are batched); the target's judge that uses all this is
:mod:`slug_pl.evaluation.generation_judge`.

Recognition is zero-shot accuracy with the judge's logits, scored by the same code as the CLIP
evaluation (:mod:`slug_pl.evaluation.metrics`): forget = over all images of the forgotten concepts,
retain = mean over the other concepts of their per-concept recognition.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from slug_pl.atomic import atomic_output, write_text
from slug_pl.evaluation.metrics import ZeroShotAccuracy, concept_summary
from slug_pl.evaluation.zeroshot import class_embeddings, fill_template, image_embeddings
from slug_pl.families.base import ModelFamily
from slug_pl.safety import read_descriptor, resolve_inside

DEFAULT_TEMPLATES = ("a photo of {}.",)
DEFAULT_SEEDS = (0, 1, 2, 3)

# ----------------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class GenerationItem:
    """One image to draw: ``prompt`` (about ``concept``) with the initial noise of ``seed``."""

    concept: str
    prompt: str
    seed: int


@dataclass(frozen=True)
class PromptSet:
    """The prompts and seeds of a generation evaluation.

    ``concepts``: the concepts drawn, forgotten ones and retained ones; ``forget``: which of them
    are forgotten (the rest are retained). Each concept's prompts are ``templates`` filled with its
    name (``{}`` or ``{c}``, as in zero-shot classification). Every prompt is drawn with every seed
    of ``seeds``. ``classnames``: the class list a judge chooses among (default: ``concepts``; give
    a longer list, e.g. all identities of a world, to judge among more classes than are drawn).

    Order (:meth:`items`): concepts in the given order, then templates, then seeds, so image
    ``(c, t, s)`` has index ``(c * len(templates) + t) * len(seeds) + s``.
    """

    concepts: tuple[str, ...]
    forget: tuple[str, ...]
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    classnames: tuple[str, ...] | None = None

    def __post_init__(self):
        for name in ("concepts", "forget", "templates", "seeds"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise TypeError(f"PromptSet.{name} must be a list, got the string {value!r}")
            object.__setattr__(self, name, tuple(value))
        if self.classnames is not None:
            object.__setattr__(self, "classnames", tuple(self.classnames))
        if not self.concepts or len(set(self.concepts)) != len(self.concepts):
            raise ValueError(f"PromptSet.concepts must be non-empty and unique, got {list(self.concepts)}")
        unknown = [c for c in self.forget if c not in self.concepts]
        if unknown:
            raise ValueError(f"PromptSet.forget names {unknown}, which are not among the concepts "
                             f"{list(self.concepts)}; list every forgotten concept in concepts too")
        if not self.templates:
            raise ValueError("PromptSet.templates is empty: give at least one, e.g. 'a photo of {}.'")
        check_seeds(self.seeds)
        missing = [c for c in self.concepts if c not in self.judge_classes]
        if missing:
            raise ValueError(f"PromptSet.classnames lacks the concepts {missing}: a judge can only "
                             f"recognize a concept that is one of its classes")

    @property
    def retain(self) -> tuple[str, ...]:
        return tuple(c for c in self.concepts if c not in self.forget)

    @property
    def judge_classes(self) -> tuple[str, ...]:
        return self.classnames if self.classnames is not None else self.concepts

    def prompts(self, concept: str) -> list[str]:
        return [fill_template(t, concept) for t in self.templates]

    def items(self, seeds: Sequence[int] | None = None) -> list[GenerationItem]:
        """Every (concept, prompt, seed) in the documented order; ``seeds`` overrides the set's."""
        seeds = self.seeds if seeds is None else check_seeds(seeds)
        return [GenerationItem(c, p, s) for c in self.concepts for p in self.prompts(c) for s in seeds]


def check_seeds(seeds: Sequence[int]) -> tuple[int, ...]:
    seeds = tuple(seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be a non-empty list of distinct integers, got {list(seeds)}")
    if any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0 for s in seeds):
        raise ValueError(f"seeds must be non-negative integers, got {list(seeds)}")
    return tuple(int(s) for s in seeds)


# -------------------------------------------------------------------------------- generation


# -------------------------------------------------------------------------------- CLIP score


@torch.no_grad()
def clip_scores(family: ModelFamily, model: nn.Module, images: Sequence[Image.Image],
                prompts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """Per-image CLIP score ``100 * max(cos(image, prompt), 0)``, shape ``(N,)``, float32.

    The scale is that of torchmetrics' ``CLIPScore`` (and of the CLIP scores diffusers and the
    unlearning literature report, e.g. ~30 for Stable Diffusion 1.x at 512 px), so numbers compare
    with published ones; its own ``CLIPScore`` is not used because it does not run with
    transformers 5. Cosine: between the unit image embedding and the unit text embedding of the
    prompt (tokenized, and truncated, by ``family.tokenize``).
    """
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts: one prompt per image")
    device = next(model.parameters()).device
    transform = family.image_transform()
    image_emb = image_embeddings(family, model, torch.stack([transform(im) for im in images]), batch_size)
    text_emb = []
    for start in range(0, len(prompts), batch_size):
        tokens = family.tokenize(list(prompts[start:start + batch_size])).to(device)
        text_emb.append(F.normalize(family.encode_text(model, tokens).float(), dim=-1))
    cosine = (image_emb * torch.cat(text_emb)).sum(dim=-1)
    return 100.0 * cosine.clamp(min=0).cpu()


class ImageJudge(Protocol):
    """Something that tells which of ``classnames`` an image shows.

    ``name`` identifies the judge in results; ``logits(images, classnames)`` returns scores
    ``(N, len(classnames))`` whose row-wise argmax is the judged class (only the order matters).
    """

    name: str

    def logits(self, images: Sequence[Image.Image], classnames: Sequence[str]) -> torch.Tensor: ...


class ClipZeroShotJudge:
    """Zero-shot classification by a CLIP (the original, unedited one): the class embeddings of
    :func:`slug_pl.evaluation.zeroshot.class_embeddings` over ``templates``, cosine logits."""

    def __init__(self, family: ModelFamily, model: nn.Module, templates: Sequence[str] = DEFAULT_TEMPLATES,
                 batch_size: int = 64, name: str | None = None):
        self.family, self.model, self.templates, self.batch_size = family, model, tuple(templates), batch_size
        model_id = family.describe().get("model_name") or family.family_name
        self.name = name or f"clip-zeroshot:{model_id}"

    @torch.no_grad()
    def logits(self, images: Sequence[Image.Image], classnames: Sequence[str]) -> torch.Tensor:
        """Cosine logits ``(N, C)``; class embeddings are recomputed each call (cheap, and never
        stale if the model's weights change)."""
        classes = class_embeddings(self.family, self.model, list(classnames), self.templates)
        transform = self.family.image_transform()
        batch = torch.stack([transform(im) for im in images])
        return (image_embeddings(self.family, self.model, batch, self.batch_size) @ classes.T).cpu()


#: Files of a classifier checkpoint folder (see :class:`ClassifierJudge`).
CLASSIFIER_JSON = "classifier.json"
CLASSIFIER_WEIGHTS = "classifier.safetensors"
CLASSIFIER_FORMAT = "slug_pl-classifier/1"


def save_classifier(folder: str | os.PathLike, module: nn.Module, class_path: str,
                    init_args: Mapping[str, Any], classnames: Sequence[str],
                    image_size: tuple[int, int], mean: Sequence[float] = (0.5, 0.5, 0.5),
                    std: Sequence[float] = (0.5, 0.5, 0.5)) -> Path:
    """Write a classifier checkpoint folder readable by :meth:`ClassifierJudge.load` (new files
    only). ``class_path`` names a classifier class of
    :mod:`slug_pl.evaluation.architectures` (a project class or a registered one) and
    ``class_path(**init_args)`` must rebuild ``module``; see :class:`ClassifierJudge`."""
    from safetensors.torch import save_file

    folder = Path(folder)
    spec = {"format": CLASSIFIER_FORMAT, "class_path": class_path, "init_args": dict(init_args),
            "classnames": list(classnames), "image_size": [int(image_size[0]), int(image_size[1])],
            "mean": [float(m) for m in mean], "std": [float(s) for s in std]}
    with atomic_output(folder / CLASSIFIER_WEIGHTS) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, str(tmp))
    write_text(folder / CLASSIFIER_JSON, json.dumps(spec, indent=2) + "\n")
    return folder


class ClassifierJudge:
    """A trained image classifier as a judge.

    Checkpoint format: a folder with

    - ``classifier.json``: ``{"format": "slug_pl-classifier/1", "class_path": "pkg.module.Class",
      "init_args": {...}, "classnames": [...], "image_size": [H, W], "mean": [3 floats],
      "std": [3 floats]}``; instead of ``class_path`` and ``init_args``, ``"arch": {"library":
      "timm" | "torchvision" | "slug_pl", "name": ..., "kwargs": {...}}`` (its outputs: one per
      class name);
    - ``classifier.safetensors``: the module's ``state_dict``.

    The folder is data, never code: ``class_path`` is looked up among the project's classifier
    classes (and those registered by the user's own code), ``arch`` among timm's and
    torchvision's architectures, with typed arguments
    (:mod:`slug_pl.evaluation.architectures`); the weights are read from safetensors only.
    The module maps images ``(B, 3, H, W)`` — RGB resized to ``image_size`` (bicubic), scaled to
    [0, 1], normalized by ``mean``/``std`` — to logits ``(B, len(classnames))``. :meth:`logits`
    keeps the columns of the requested class names, so top-1 is chosen among those classes only
    (as for the CLIP judge).
    """

    def __init__(self, module: nn.Module, classnames: Sequence[str], image_size: tuple[int, int],
                 mean: Sequence[float], std: Sequence[float], name: str = "classifier",
                 batch_size: int = 64):
        self.module, self.classnames, self.name, self.batch_size = module.eval(), list(classnames), name, batch_size
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    @classmethod
    def load(cls, folder: str | os.PathLike, device: str | torch.device = "cpu") -> "ClassifierJudge":
        from slug_pl.evaluation.architectures import ArchSpec, build_classifier, load_weights

        folder = Path(folder)
        spec_path, weights_path = folder / CLASSIFIER_JSON, folder / CLASSIFIER_WEIGHTS
        for path in (spec_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"classifier checkpoint {folder} lacks {path.name}: a checkpoint "
                                        f"folder holds {CLASSIFIER_JSON} and {CLASSIFIER_WEIGHTS} "
                                        f"(write one with slug_pl.evaluation.generation.save_classifier)")
            resolve_inside(folder, path.name, str(folder), "checkpoint file")
        spec = read_descriptor(spec_path, "classifier checkpoint")
        described = "arch" in spec or "class_path" in spec
        missing = [k for k in ("classnames", "image_size", "mean", "std") if k not in spec]
        if spec.get("format") != CLASSIFIER_FORMAT or missing or not described:
            raise ValueError(f"{spec_path} is not a {CLASSIFIER_FORMAT} file (format "
                             f"{spec.get('format')!r}, missing keys {missing + ([] if described else ['class_path'])})")
        if "arch" in spec:
            module = build_classifier(ArchSpec.from_record(spec["arch"], str(spec_path)), len(spec["classnames"]))
        else:
            module = build_classifier(ArchSpec("slug_pl", spec["class_path"], spec.get("init_args", {}),
                                               str(spec_path)))
        load_weights(module, weights_path, str(spec_path))
        return cls(module.to(device), spec["classnames"], spec["image_size"], spec["mean"], spec["std"],
                   name=f"classifier:{folder.name}")

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        height, width = self.image_size
        resized = image.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (pixels - self.mean) / self.std

    @torch.no_grad()
    def logits(self, images: Sequence[Image.Image], classnames: Sequence[str]) -> torch.Tensor:
        unknown = [c for c in classnames if c not in self.classnames]
        if unknown:
            raise ValueError(f"the classifier {self.name} has no class {unknown}; its classes are "
                             f"{self.classnames}")
        columns = [self.classnames.index(c) for c in classnames]
        device = next(self.module.parameters()).device
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = torch.stack([self.preprocess(im) for im in images[start:start + self.batch_size]])
            out.append(self.module(batch.to(device)).float()[:, columns].cpu())
        return torch.cat(out)


def recognition(judge: ImageJudge, images: Sequence[Image.Image], concept_labels: Sequence[str],
                classnames: Sequence[str], forget: Sequence[str]) -> dict[str, Any]:
    """How often ``judge`` recognizes each image as its intended concept (top-1 among ``classnames``).

    ``concept_labels[i]``: the concept image ``i`` was drawn for (one of ``classnames``);
    ``forget``: the forgotten concepts. Returns fractions in [0, 1] (None where there is no image):

    - ``forget_recognition``: over all images of the forgotten concepts;
    - ``retain_recognition``: mean over the other concepts with images of their recognition;
    - ``per_concept``: ``{concept: recognition}`` for every concept with images.
    """
    classnames = list(classnames)
    unknown = sorted({c for c in concept_labels if c not in classnames})
    if unknown:
        raise ValueError(f"images are labelled with {unknown}, which are not among the judge's "
                         f"classes {classnames}")
    if len(images) != len(concept_labels):
        raise ValueError(f"got {len(images)} images but {len(concept_labels)} concept labels")
    labels = torch.tensor([classnames.index(c) for c in concept_labels], dtype=torch.long)
    logits = judge.logits(images, classnames)
    metric = ZeroShotAccuracy(num_classes=len(classnames))
    metric.update(logits, labels)
    result = metric.compute()
    summary = concept_summary(result, [classnames.index(c) for c in forget if c in classnames])
    per_class = result["per_class_top1"]
    present = [c for c in classnames if c in set(concept_labels)]
    return {
        "forget_recognition": summary.get("forget_top1"),
        "retain_recognition": summary.get("retain_top1"),
        "per_concept": {c: per_class[classnames.index(c)].item() for c in present},
    }


# -------------------------------------------------------------------------------- evaluation


def score_generation(images: Sequence[Image.Image], prompt_set: PromptSet, judge: ImageJudge,
                     clip_family: ModelFamily, clip_model: nn.Module,
                     seeds: Sequence[int] | None = None) -> dict[str, Any]:
    """Judge and CLIP-score the images of ``prompt_set.items(seeds)``, drawn in that order:
    ``{"judge", "prompts", "seeds", "forget_recognition", "retain_recognition", "clip_score",
    "per_concept": {concept: {"forget", "images", "recognition", "clip_score"}}}`` (recognition
    fractions, CLIP score 0–100)."""
    items = prompt_set.items(seeds)
    if len(images) != len(items):
        raise ValueError(f"got {len(images)} images for {len(items)} (prompt, seed) pairs of the prompt set")
    concepts = [i.concept for i in items]
    recognized = recognition(judge, images, concepts, prompt_set.judge_classes, prompt_set.forget)
    scores = clip_scores(clip_family, clip_model, images, [i.prompt for i in items])
    per_concept = {}
    for concept in prompt_set.concepts:
        rows = [k for k, c in enumerate(concepts) if c == concept]
        per_concept[concept] = {"forget": concept in prompt_set.forget, "images": len(rows),
                                "recognition": recognized["per_concept"][concept],
                                "clip_score": scores[rows].mean().item()}
    return {
        "judge": judge.name,
        "prompts": len(prompt_set.concepts) * len(prompt_set.templates),
        "seeds": list(prompt_set.seeds if seeds is None else seeds),
        "forget_recognition": recognized["forget_recognition"],
        "retain_recognition": recognized["retain_recognition"],
        "clip_score": scores.mean().item(),
        "per_concept": per_concept,
    }


FORGET_COLOUR = (180, 20, 20)
RETAIN_COLOUR = (20, 20, 20)


def image_grid(before: Sequence[Sequence[Image.Image]], after: Sequence[Sequence[Image.Image]],
               row_labels: Sequence[str], forget_rows: int = 0, titles: tuple[str, str] = ("before", "after"),
               cell: int = 96, font_size: int = 14) -> Image.Image:
    """Rows of images, "before" images on the left, "after" images on the right, a label per row.

    ``before[r]`` and ``after[r]`` are row ``r``'s images (the same count in every row), shown as
    ``cell``×``cell`` squares (small images are enlarged without smoothing). The first
    ``forget_rows`` rows are the forgotten concepts: their labels are red and a line separates them
    from the retained rows below.
    """
    if not (len(before) == len(after) == len(row_labels)) or not row_labels:
        raise ValueError(f"image_grid needs the same number (> 0) of before rows ({len(before)}), after "
                         f"rows ({len(after)}) and labels ({len(row_labels)})")
    per_row = len(before[0])
    if per_row == 0 or any(len(r) != per_row for r in list(before) + list(after)):
        raise ValueError("every before/after row of image_grid must hold the same number (> 0) of images")
    font = ImageFont.load_default(size=font_size)
    pad, gap = 4, 16
    label_width = max(int(font.getlength(label)) for label in row_labels) + 2 * pad
    header = font_size + 3 * pad
    half = per_row * (cell + pad)
    grid = Image.new("RGB", (label_width + 2 * half + gap, header + len(row_labels) * (cell + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for k, title in enumerate(titles):
        draw.text((label_width + k * (half + gap) + pad, pad), title, fill=RETAIN_COLOUR, font=font)
    for r, label in enumerate(row_labels):
        top = header + r * (cell + pad)
        colour = FORGET_COLOUR if r < forget_rows else RETAIN_COLOUR
        draw.text((pad, top + cell // 2 - font_size // 2), label, fill=colour, font=font)
        for k, row in enumerate((before[r], after[r])):
            for j, image in enumerate(row):
                left = label_width + k * (half + gap) + j * (cell + pad)
                grid.paste(image.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST), (left, top))
    if 0 < forget_rows < len(row_labels):
        y = header + forget_rows * (cell + pad) - pad // 2 - 1
        draw.line([(0, y), (grid.width, y)], fill=FORGET_COLOUR, width=2)
    return grid
