"""Stable Diffusion as a downstream target: unlearn a concept from the CLIP text encoder that a
``StableDiffusionPipeline`` embeds, and prove it on generated images.

**Which CLIP.** A pipeline's text encoder is the text tower of one CLIP, copied unchanged: Stable
Diffusion 1.x embeds ``openai/clip-vit-large-patch14``; 2.x embeds OpenCLIP ViT-H/14
(``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``, in Hugging Face format) *without its last block*
(23 of 24 layers: 2.x conditions on the penultimate layer). SLUG computes its gradients on that
CLIP (image–text pairs need both towers), edits one tensor of the text tower, and copies it into
``pipe.text_encoder``. :meth:`StableDiffusion.check_pair` refuses a CLIP whose text-tower weights
differ from the pipeline's, naming the first tensor that differs.

**What the UNet reads.** The UNet sees only the text encoder's hidden states, as diffusers'
``StableDiffusionPipeline.encode_prompt`` computes them: the prompt's last hidden state, or with
``clip_skip = k`` the hidden state ``k`` layers before the last, in both cases through
``final_layer_norm``; under classifier-free guidance (guidance > 1) also the *empty* negative
prompt's last hidden state (diffusers encodes it without clip skip). So:

- ``text_projection``, the vision tower and ``logit_scale`` are never read;
- CLIP layers the pipeline's encoder does not have (the 24th of ViT-H/14 in SD 2.x) are never read;
- with ``clip_skip = k``, the last ``k`` layers are read only through the negative prompt: read
  when guidance > 1, never when guidance <= 1;
- the embeddings, every other layer and ``final_layer_norm`` are read.

:meth:`StableDiffusion.reads` says exactly this; the ranking keeps only tensors it reads.

**Transplant.** :meth:`StableDiffusion.transplant` copies the edited tensors (CLIP name
``text_model.X`` is the text encoder's ``X``) into the pipeline; every other tensor of the
pipeline stays bit-identical. ``slug-pl transplant`` does the same offline, from a run's
``edit.safetensors``, into a new ``save_pretrained`` folder::

    slug-pl transplant --pipeline models/sd15 --edit lightning_logs/version_0/edit.safetensors \\
        --out models/sd15-unlearned

**Verdict on generations.** The step search runs on the CLIP's own zero-shot metrics, as in the
method. Then each candidate layer's found edit is scored on generations (a small fixed prompt /
seed set, :meth:`StableDiffusion.rank_candidates`): the final choice is the candidate with the
best recognition of the retained concepts among those whose forget recognition is at most
``forget_threshold``. With several judges (the unedited CLIP and a classifier), the concept is
removed only when *every* judge recognizes it at most that often, and retain recognition is the
judges' mean (:func:`combine_judges`): a judge that still sees the concept is never outvoted. :meth:`StableDiffusion.evaluate` then draws every forget and retain prompt
with held-out seeds before and after the edit and reports how often judges (the unedited CLIP
zero-shot, and trained classifiers when configured) recognize the concept, the CLIP score, and a
before/after image grid (summary block ``"generation"``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from slug_pl.context import RunContext
from slug_pl.data.generated import check_pipeline_dir, load_pipeline, resolve_dtype
from slug_pl.edit import EditMismatchError, LayerEdit, apply_edit, load_edits, revert_edit
from slug_pl.evaluation.generation import (
    ClassifierJudge,
    ClipZeroShotJudge,
    PromptSet,
    generate_prompt_set,
    image_grid,
    score_generation,
)
from slug_pl.evaluation.metrics import ZeroShotAccuracy, concept_summary
from slug_pl.evaluation.zeroshot import class_embeddings, image_embeddings
from slug_pl.record import pct, table
from slug_pl.retain_projection import check_tolerance, input_projection
from slug_pl.step_search import reverted
from slug_pl.targets.base import DownstreamTarget, TargetMismatchError, TargetReport
from slug_pl.targets.saved_copy import TensorChange, save_edited_copy

#: The CLIPModel prefix of the text tower; ``text_model.X`` is the pipeline text encoder's ``X``.
CLIP_TEXT_PREFIX = "text_model."
_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.")


# ----------------------------------------------------------------------------- prompt encoding


@torch.no_grad()
def prompt_embeddings(pipe, prompts: Sequence[str], clip_skip: int | None = None) -> torch.Tensor:
    """The text states ``(N, context, width)`` diffusers' ``StableDiffusionPipeline`` feeds the
    UNet for ``prompts``: padded to the tokenizer's ``model_max_length``, the last hidden state
    (``clip_skip`` None or 0) or ``hidden_states[-(clip_skip + 1)]`` through the encoder's
    ``final_layer_norm`` (``StableDiffusionPipeline.encode_prompt``)."""
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
    inputs = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                       truncation=True, return_tensors="pt")
    device = next(encoder.parameters()).device
    mask = inputs.attention_mask.to(device) if getattr(encoder.config, "use_attention_mask", False) else None
    ids = inputs.input_ids.to(device)
    if not clip_skip:
        return encoder(ids, attention_mask=mask)[0]
    hidden = encoder(ids, attention_mask=mask, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
    tower = getattr(encoder, "text_model", encoder)  # transformers < 5 nests the tower one level down
    return tower.final_layer_norm(hidden)


class ClipSkipPipeline:
    """A ``StableDiffusionPipeline`` that conditions on the hidden state ``clip_skip`` layers
    before the text encoder's last, exactly as diffusers defines ``clip_skip`` (the prompt through
    :func:`prompt_embeddings`; under guidance > 1 the empty negative prompt at the last layer).

    diffusers 0.42 cannot apply ``clip_skip`` itself next to transformers 5 (it reaches for
    ``text_encoder.text_model``, which ``CLIPTextModel`` no longer has), so this computes the
    embeddings and passes ``prompt_embeds`` / ``negative_prompt_embeds``. Called like the pipeline
    (``prompt=[...]`` plus the usual keyword arguments).
    """

    def __init__(self, pipe, clip_skip: int):
        self.pipe, self.clip_skip = pipe, clip_skip

    def set_progress_bar_config(self, **kwargs) -> None:
        self.pipe.set_progress_bar_config(**kwargs)

    def __call__(self, prompt: Sequence[str], guidance_scale: float = 7.5, **kwargs):
        embeds = prompt_embeddings(self.pipe, prompt, self.clip_skip)
        negative = prompt_embeddings(self.pipe, [""] * len(prompt)) if guidance_scale > 1 else None
        return self.pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, guidance_scale=guidance_scale,
                         **kwargs)


# ----------------------------------------------------------------------------- the final choice


@dataclass
class CandidateScore:
    """A candidate edit judged on generations (recognition fractions; CLIP score 0–100)."""

    layer: str
    step: float
    forget_recognition: float
    retain_recognition: float | None
    clip_score: float

    def removes(self, threshold: float) -> bool:
        return self.forget_recognition <= threshold


def order_by_generation(scores: Sequence[CandidateScore], threshold: float) -> list[int] | None:
    """Best first: the candidates that remove the concept from generations (forget recognition
    <= ``threshold``) by retain recognition, then CLIP score, highest first; then the others in
    their given (CLIP-side) order. None when no candidate removes it (keep the CLIP-side order)."""
    removing = [i for i, s in enumerate(scores) if s.removes(threshold)]
    if not removing:
        return None
    removing.sort(key=lambda i: (-(scores[i].retain_recognition or 0.0), -scores[i].clip_score, i))
    return removing + [i for i in range(len(scores)) if i not in removing]


# ----------------------------------------------------------------------------- search on generations


class FrozenClipJudge:
    """Zero-shot judge with class embeddings fixed at construction (the CLIP as it is then,
    unedited) and image embeddings from the CLIP as it is when called: exact for a CLIP whose
    edits touch only the text tower, which is all a Stable Diffusion target reads."""

    def __init__(self, family, clip: nn.Module, classnames: Sequence[str], templates: Sequence[str]):
        self.family, self.clip = family, clip
        self.name = f"clip-zeroshot:{family.describe().get('model_name')}"
        self.classnames = list(classnames)
        self.classes = class_embeddings(family, clip, self.classnames, list(templates))

    @torch.no_grad()
    def logits(self, images: Sequence, classnames: Sequence[str]) -> torch.Tensor:
        columns = [self.classnames.index(c) for c in classnames]
        batch = torch.stack([self.family.image_transform()(im) for im in images])
        return (image_embeddings(self.family, self.clip, batch) @ self.classes[columns].T).cpu()


def judge_label(spec: str) -> str:
    """A judge's short name in metric names: ``clip``, or a classifier checkpoint's folder name."""
    return "clip" if spec == "clip" else Path(spec).name


def combine_judges(per_judge: dict[str, dict[str, float]]) -> dict[str, float]:
    """Several judges' metrics as one verdict: ``forget_*`` the **highest** over the judges (the
    concept counts as removed only when every judge misses it), ``retain_*`` the **mean** (what an
    edit keeps, as every judge sees it); each judge's own values follow as ``metric[judge]``."""
    keys = list(next(iter(per_judge.values())))
    out = {}
    for k in keys:
        values = [m[k] for m in per_judge.values() if k in m]
        out[k] = max(values) if k.startswith("forget_") else sum(values) / len(values)
    if len(per_judge) > 1:
        out |= {f"{k}[{name}]": v for name, m in per_judge.items() for k, v in m.items()}
    return out


class GenerationSearchJudge:
    """The step search's judge with ``search_on: generation``: each evaluation transplants the
    CLIP's current text tower into the pipeline, draws the candidate-scoring prompt sets
    (search seeds) and scores them with **every** configured judge like zero-shot accuracy:
    ``forget_top1/5`` over the concept's images, ``retain_top1/5`` the mean over the other
    concepts (fractions), combined over the judges by :func:`combine_judges` (forget: the
    highest, retain: the mean; each judge's own as ``metric[judge]``)."""

    def __init__(self, target: "StableDiffusion", context: RunContext, concept: str):
        self.target = target
        self.sets = target.prompt_sets(context, [concept], search=True)
        self.classnames, templates = target._concept_set(context)
        family, clip = context.family, context.model
        live = target.judges(family, clip, templates)
        # the CLIP judge must stay the unedited CLIP while the search edits its text tower
        self.judges = {judge_label(spec): (FrozenClipJudge(family, clip, self.classnames, templates)
                                           if spec == "clip" else judge)
                       for spec, judge in zip(target.judge_specs, live)}

    def evaluate(self, model: nn.Module, edited: str | None = None) -> dict[str, float]:
        self.target.mirror(model)
        per_judge: dict[str, dict[str, float]] = {name: {} for name in self.judges}
        for prompt_set, images in zip(self.sets, self.target.draw(self.sets)):
            labels = torch.tensor([self.classnames.index(i.concept) for i in prompt_set.items()])
            forget_ids = [self.classnames.index(c) for c in prompt_set.forget]
            for name, judge in self.judges.items():
                metric = ZeroShotAccuracy(len(self.classnames))
                metric.update(judge.logits(images, self.classnames), labels)
                per_judge[name] |= concept_summary(metric.compute(), forget_ids)
        return combine_judges(per_judge)


# ----------------------------------------------------------------------------- the target


class StableDiffusion(DownstreamTarget):
    """A diffusers ``StableDiffusionPipeline`` folder whose text encoder is the CLIP's text tower."""

    name = "stable_diffusion"
    tower = "text"

    def __init__(
        self,
        pipeline: str,
        clip_skip: int | None = None,
        forget_templates: list[str] | None = None,
        retain_templates: list[str] | None = None,
        retain_concepts: list[str] | int | None = None,
        seeds: list[int] = (1000, 1001, 1002, 1003),
        search_seeds: list[int] = (100, 101),
        search_templates: int = 1,
        search_retain_concepts: int | None = None,
        steps: int = 50,
        guidance: float = 7.5,
        batch_size: int = 8,
        height: int | None = None,
        width: int | None = None,
        judges: list[str] = ("clip",),
        forget_threshold: float = 0.1,
        search_on: str = "clip",
        grid_seeds: int = 4,
        device: str | None = None,
        dtype: str | None = None,
        save_edited: bool = False,
        progress: bool = True,
        protect_retained: bool | int = False,
        protect_tolerance: float = 0.05,
    ):
        """
        Args:
            pipeline: a ``StableDiffusionPipeline.save_pretrained`` folder (a local folder: download
                a hub model once, e.g. with ``hf download``, see docs/recipes.md).
            clip_skip: condition on the hidden state this many layers before the last (diffusers'
                ``clip_skip``); None: the last.
            forget_templates: prompt templates (``{}`` = the concept) for the forgotten concepts;
                None: the concept set's zero-shot templates.
            retain_templates: the same for the retained concepts; None: ``forget_templates``.
            retain_concepts: the retained concepts drawn: a list, a number (the first ones of the
                concept set's class list other than the forgotten), or None (all of them).
            seeds: held-out seeds of the final before/after report (each prompt with each seed).
            search_seeds: seeds of the search's generations (:meth:`rank_candidates`, and the
                step search with ``search_on: generation``); keep them apart from ``seeds`` so
                the report is on fresh generations.
            search_templates: the search draws the retained concepts with the first this many
                templates (the forgotten concepts with every template).
            search_retain_concepts: the search draws the first this many retained concepts
                (None: the same as the report).
            steps / guidance / batch_size / height / width: generation settings (DDIM or the
                pipeline's scheduler steps, classifier-free guidance scale, prompts per call,
                image size; None: the pipeline's).
            judges: who recognizes concepts in generations: ``"clip"`` (the unedited CLIP,
                zero-shot over the concept set's class names and templates) or a classifier
                checkpoint folder (:class:`~slug_pl.evaluation.generation.ClassifierJudge`). All of
                them decide (:func:`combine_judges`: the search's forget metric is the highest
                recognition over the judges, its retain metric the mean); the first is the
                summary's headline ``before``/``after``; every one is reported.
            forget_threshold: the concept counts as removed from generations when every judge
                recognizes it in at most this fraction of its images.
            search_on: what the step search measures: ``clip`` (the CLIP's zero-shot metrics, as
                in the method; candidates then chosen by generations) or ``generation`` (the
                search-seed generations themselves, judged by every judge: ``forget_top1/5``
                = recognition of the concept, ``retain_top1/5`` of the others; slower, and the
                CLIP-side target is then a generation target).
            grid_seeds: images per row in the before/after grid.
            device / dtype: where the pipeline runs (default: the device of the run's CLIP pass;
                outside a run CUDA when available) and its dtype
                (``float16`` / ``bfloat16`` / ``float32``; default float16 on CUDA, else float32).
            save_edited: also write the edited pipeline into the run folder
                (``edited_stable_diffusion/``, a ``save_pretrained`` folder; the size of the model).
            progress: show a progress bar over generated images.
            protect_retained: keep the edit off the retained concepts' prompts (the report's retain
                prompts: ``retain_concepts`` × ``retain_templates``): the forget gradient of every
                text-encoder weight is projected off the inputs those prompts feed it at every
                position the UNet reads (:mod:`slug_pl.retain_projection`), so at the found step
                their text states stay as they were; only linear weights and embedding tables
                (what can be projected) are then candidates. A change to the method's update
                direction, recorded in the run (``generation.protected``). A number protects only
                the first that many retained concepts (the others then show what an unprotected
                concept loses).
            protect_tolerance: the projection drops input directions whose singular value is below
                this fraction of the largest (0: the exact span).
        """
        if clip_skip is not None and (isinstance(clip_skip, bool) or clip_skip < 0):
            raise ValueError(f"target clip_skip must be a non-negative number of layers or null, got {clip_skip!r}")
        if not 0.0 <= forget_threshold <= 1.0:
            raise ValueError(f"target forget_threshold is a fraction in [0, 1], got {forget_threshold}")
        if search_on not in ("clip", "generation"):
            raise ValueError(f"target search_on must be 'clip' or 'generation', got {search_on!r}")
        if not judges:
            raise ValueError("target judges is empty: give 'clip' and/or classifier checkpoint folders")
        for name, value in (("steps", steps), ("batch_size", batch_size), ("search_templates", search_templates),
                            ("grid_seeds", grid_seeds)):
            if isinstance(value, bool) or value < 1:
                raise ValueError(f"target {name} must be a positive integer, got {value!r}")
        self.pipeline = pipeline
        self.clip_skip = clip_skip or None
        self.forget_templates = list(forget_templates) if forget_templates else None
        self.retain_templates = list(retain_templates) if retain_templates else None
        self.retain_concepts = retain_concepts
        self.seeds, self.search_seeds = tuple(seeds), tuple(search_seeds)
        self.search_templates, self.search_retain_concepts = search_templates, search_retain_concepts
        self.generation = {"steps": steps, "guidance": guidance, "batch_size": batch_size, "height": height,
                           "width": width}
        self.judge_specs = list(judges)
        self.forget_threshold = forget_threshold
        self.search_on = search_on
        self.grid_seeds = grid_seeds
        self.device = device
        self._dtype = dtype
        self.save_edited = save_edited
        self.progress = progress
        if not isinstance(protect_retained, bool) and protect_retained < 1:
            raise ValueError(f"target protect_retained is true, false or a positive number of concepts, "
                             f"got {protect_retained}")
        check_tolerance(protect_tolerance, "target protect_tolerance")
        self.protect_retained, self.protect_tolerance = protect_retained, protect_tolerance
        self.protection: dict | None = None  # what forget_gradient_projection protected, for the record
        self.pipe = None
        self._config: dict | None = None
        self._prefix = ""
        #: text-encoder name -> (its value as loaded, the float32 value last copied in from the CLIP),
        #: for every tensor ever written: what :meth:`save_pretrained` changes in the saved copy
        self._written: dict[str, TensorChange] = {}
        self._judges: dict[str, object] = {}
        #: concept -> every candidate's scores on generations (filled by rank_candidates)
        self.candidate_scores: dict[str, list[CandidateScore]] = {}

    def describe(self) -> str:
        return f"the Stable Diffusion pipeline {self.pipeline}"

    def source(self) -> str:
        return str(self.pipeline)

    @property
    def dtype(self) -> torch.dtype:
        """The pipeline's dtype: as configured, else float16 on CUDA and float32 elsewhere."""
        return resolve_dtype(self._dtype, str(self.resolved_device()))

    # -- the downstream model ------------------------------------------------------------------
    def load(self) -> None:
        if self.pipe is not None:
            return
        layers = self.text_layers()
        if self.clip_skip is not None and self.clip_skip >= layers:
            raise ValueError(f"target clip_skip {self.clip_skip} leaves no layer of the {layers}-layer text "
                             f"encoder of {self.pipeline}; use at most {layers - 1}")
        self.pipe = load_pipeline(self.pipeline, str(self.resolved_device()), self.dtype)
        names = [n for n, _ in self.pipe.text_encoder.named_parameters()]
        self._prefix = CLIP_TEXT_PREFIX if names and names[0].startswith(CLIP_TEXT_PREFIX) else ""

    def text_config(self) -> dict:
        """The pipeline's ``text_encoder/config.json`` (read once, without loading weights)."""
        if self._config is None:
            path = check_pipeline_dir(self.pipeline) / "text_encoder" / "config.json"
            if not path.is_file():
                raise FileNotFoundError(f"{self.pipeline} has no text_encoder/config.json: give a Stable "
                                        f"Diffusion pipeline folder with a CLIP text encoder")
            self._config = json.loads(path.read_text(encoding="utf-8"))
        return self._config

    def text_layers(self) -> int:
        """Number of layers of the pipeline's text encoder."""
        return int(self.text_config()["num_hidden_layers"])

    def _tower_name(self, clip_name: str) -> str | None:
        """``clip_name`` without the ``text_model.`` prefix, if the pipeline's encoder has that
        tensor (None: another tower, a projection, or a layer the pipeline dropped)."""
        if not clip_name.startswith(CLIP_TEXT_PREFIX):
            return None
        rest = clip_name[len(CLIP_TEXT_PREFIX):]
        layer = _LAYER.match(rest)
        if layer is not None and int(layer.group(1)) >= self.text_layers():
            return None
        return rest

    def downstream_name(self, clip_name: str) -> str | None:
        rest = self._tower_name(clip_name)
        return None if rest is None else self._prefix + rest

    def reads(self, clip_name: str) -> bool:
        """Whether a change of ``clip_name`` can change a generation (see the module docstring)."""
        rest = self._tower_name(clip_name)
        if rest is None:
            return False
        layer = _LAYER.match(rest)
        if layer is None or self.clip_skip is None:
            return True  # embeddings, final_layer_norm, any layer without clip skip
        if int(layer.group(1)) < self.text_layers() - self.clip_skip:
            return True
        return self.generation["guidance"] > 1  # only the negative prompt, encoded at full depth

    def downstream_parameters(self) -> dict[str, torch.Tensor]:
        self.load()
        return dict(self.pipe.text_encoder.named_parameters())

    def check_pair(self, family, clip: nn.Module) -> None:
        """Raise :class:`TargetMismatchError` naming the first text-encoder tensor that the CLIP
        lacks or holds with other values (compared in the pipeline's dtype: a float16 pipeline
        holds the CLIP's weights rounded to float16)."""
        mirror = self.downstream_parameters()
        clip_params = dict(clip.named_parameters())
        model = family.describe().get("model_name")
        for theirs, other in mirror.items():
            name = CLIP_TEXT_PREFIX + theirs[len(self._prefix):]
            if name not in clip_params:
                raise TargetMismatchError(
                    f"the text encoder of {self.pipeline} has {theirs!r}, which the CLIP ({model}) lacks: the CLIP "
                    f"is not the one this pipeline embeds; pair it with the CLIP its text encoder comes from")
            mine = clip_params[name].detach()
            if mine.shape != other.shape or not torch.equal(mine.to("cpu", other.dtype), other.detach().cpu()):
                raise TargetMismatchError(
                    f"the CLIP's {name!r} differs from the text encoder's {theirs!r} in {self.pipeline}: the "
                    f"CLIP ({model}) is not the one this pipeline embeds (Stable Diffusion 1.x embeds "
                    f"openai/clip-vit-large-patch14, 2.x OpenCLIP ViT-H/14 in Hugging Face format)")

    @torch.no_grad()
    def transplant(self, clip: nn.Module, edits: Sequence[LayerEdit]) -> list[str]:
        self.load()
        mirror = dict(self.pipe.text_encoder.named_parameters())
        clip_params = dict(clip.named_parameters())
        changed = []
        for edit in edits:
            theirs = self.downstream_name(edit.name)
            if theirs is None or theirs not in mirror:
                raise TargetMismatchError(
                    f"the edit of {edit.name!r} has no counterpart in the text encoder of {self.pipeline}: "
                    f"it cannot change a generation; edit a tensor the pipeline reads (search.towers [text])")
            self.write(theirs, clip_params[edit.name])
            changed.append(theirs)
        return changed

    @torch.no_grad()
    def write(self, theirs: str, value: torch.Tensor) -> None:
        """Set the text encoder's ``theirs`` to ``value`` (cast to the pipeline's device and
        dtype), remembering its loaded value and ``value`` in float32 for :meth:`save_pretrained`."""
        target = dict(self.pipe.text_encoder.named_parameters())[theirs]
        loaded = self._written[theirs].original if theirs in self._written else target.detach().cpu().clone()
        self._written[theirs] = TensorChange(loaded, value.detach().to("cpu", torch.float32).clone())
        target.copy_(value.detach().to(target.device, target.dtype))

    @torch.no_grad()
    def mirror(self, clip: nn.Module) -> list[str]:
        """Copy every CLIP text-tower tensor whose value differs from the pipeline's (in its dtype)
        into the pipeline; returns the text-encoder names copied. With the CLIP the pipeline was
        checked against, this transplants exactly the edits the CLIP carries now."""
        clip_params = dict(clip.named_parameters())
        changed = []
        for theirs, target in self.downstream_parameters().items():
            value = clip_params[CLIP_TEXT_PREFIX + theirs[len(self._prefix):]]
            if not torch.equal(value.detach().to(target.device, target.dtype), target):
                self.write(theirs, value)
                changed.append(theirs)
        return changed

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write the pipeline with the tensors written into it (:meth:`write`) into the new folder
        ``folder``: a copy of the pipeline folder in which only those tensors change, each stored
        in its file's dtype from the CLIP's float32 value, whatever dtype the pipeline runs in
        (:func:`~slug_pl.targets.saved_copy.copy_with_tensors`). A pipeline stored without
        safetensors is saved as it runs instead (``save_pretrained``, in its running dtype).
        Complete or absent; an existing folder is refused."""
        self.load()
        changes = {theirs[len(self._prefix):]: change for theirs, change in self._written.items()}
        return save_edited_copy(check_pipeline_dir(self.pipeline), folder, changes, self.pipe.save_pretrained,
                                within="text_encoder")

    # -- generation ----------------------------------------------------------------------------
    def generator(self):
        """What draws images: the pipeline, or it under :class:`ClipSkipPipeline`."""
        self.load()
        return self.pipe if self.clip_skip is None else ClipSkipPipeline(self.pipe, self.clip_skip)

    def _concept_set(self, context: RunContext) -> tuple[list[str], list[str]]:
        """The class names judges choose among and their zero-shot templates (the run's
        validation concept set)."""
        concept_set = context.eval_sets("validation")["concepts"]
        return list(concept_set.classnames), list(concept_set.templates)

    def prompt_sets(self, context: RunContext, forget: Sequence[str], search: bool = False) -> list[PromptSet]:
        """The forget prompt set and the retain prompt set (one each; retain may be absent).

        ``search``: the search's sets (``search_seeds``; every forget template, the first
        ``search_templates`` retain templates and the first ``search_retain_concepts`` retained
        concepts); else the report's.
        """
        classnames, templates = self._concept_set(context)
        unknown = [c for c in forget if c not in classnames]
        if unknown:
            raise ValueError(f"the concepts {unknown} are not in the concept set's class list; the judges "
                             f"choose among {classnames[:5]}...")
        others = [c for c in classnames if c not in forget]
        if isinstance(self.retain_concepts, int) and not isinstance(self.retain_concepts, bool):
            retain = others[: self.retain_concepts]
        elif self.retain_concepts is None:
            retain = others
        else:
            retain = list(self.retain_concepts)
            bad = [c for c in retain if c not in others]
            if bad:
                raise ValueError(f"target retain_concepts {bad} are forgotten or not in the concept set's class list")
        forget_templates = self.forget_templates or templates
        retain_templates = self.retain_templates or forget_templates
        seeds = self.seeds
        if search:  # the forgotten concepts' prompts are few: all of them, so that no phrasing is missed
            retain_templates = retain_templates[: self.search_templates]
            retain = retain[: self.search_retain_concepts] if self.search_retain_concepts is not None else retain
            seeds = self.search_seeds
        sets = [PromptSet(list(forget), list(forget), forget_templates, seeds, classnames)]
        if retain:
            sets.append(PromptSet(retain, [], retain_templates, seeds, classnames))
        return sets

    def draw(self, sets: Sequence[PromptSet]) -> list[list]:
        """The images of each prompt set, in its order."""
        g = self.generation
        return [generate_prompt_set(self.generator(), s, steps=g["steps"], guidance=g["guidance"],
                                    batch_size=g["batch_size"], height=g["height"], width=g["width"],
                                    progress=self.progress) for s in sets]

    def forget_gradient_projection(self, context: RunContext):
        """With ``protect_retained``: the projection off what the retained concepts' prompts feed
        the text tower at every position (the UNet reads every position's state); else None."""
        if not self.protect_retained:
            return None
        family, clip = context.family, context.model
        retained = [s for s in self.prompt_sets(context, list(context.concepts)) if not s.forget]
        kept = [c for s in retained for c in s.concepts]
        if not isinstance(self.protect_retained, bool):
            kept = kept[: self.protect_retained]
        prompts = [p for s in retained for c in s.concepts if c in kept for p in s.prompts(c)]
        if not prompts:
            raise ValueError("target protect_retained is set but there is no retained concept to protect: "
                             "the concept set holds only the forgotten concepts")
        tokens = family.tokenize(prompts).to(next(clip.parameters()).device)
        projection = input_projection(clip, CLIP_TEXT_PREFIX, lambda: family.encode_text(clip, tokens),
                                      torch.ones(tokens.shape, dtype=torch.bool), len(prompts),
                                      self.protect_tolerance)
        self.protection = {"concepts": kept, "prompts": len(prompts), "tolerance": self.protect_tolerance,
                           "tensors": len(projection.describe()["rank"])}
        return projection

    def judges(self, family, clip: nn.Module, templates: Sequence[str]) -> list:
        """The configured judges (the CLIP one judges with ``clip`` as it is when called)."""
        out = []
        for spec in self.judge_specs:
            if spec == "clip":
                out.append(ClipZeroShotJudge(family, clip, templates))
            else:
                if spec not in self._judges:
                    self._judges[spec] = ClassifierJudge.load(spec, device=next(clip.parameters()).device)
                out.append(self._judges[spec])
        return out

    def search_judge(self, context: RunContext, concept: str):
        """With ``search_on: generation``, a :class:`GenerationSearchJudge` of ``concept``; else
        None (the search runs on the CLIP's zero-shot metrics)."""
        if self.search_on != "generation":
            return None
        return GenerationSearchJudge(self, context, concept)

    @staticmethod
    def score(images: Sequence[list], sets: Sequence[PromptSet], judge, family, clip: nn.Module) -> dict:
        """Scores of drawn prompt sets (forget set first, then the retain set if any):
        ``forget_recognition``, ``retain_recognition`` (fractions, see
        :func:`~slug_pl.evaluation.generation.recognition`), ``clip_score`` (0–100, mean over
        every image), ``forget_clip_score`` / ``retain_clip_score`` (over each set's images), and
        ``per_concept``."""
        results = [score_generation(im, s, judge, family, clip) for im, s in zip(images, sets)]
        counts = [len(im) for im in images]
        retain = results[1] if len(results) > 1 else {}
        return {
            "forget_recognition": results[0]["forget_recognition"],
            "retain_recognition": retain.get("retain_recognition"),
            "clip_score": sum(r["clip_score"] * n for r, n in zip(results, counts)) / sum(counts),
            "forget_clip_score": results[0]["clip_score"],
            "retain_clip_score": retain.get("clip_score"),
            "per_concept": {c: v for r in results for c, v in r["per_concept"].items()},
        }

    # -- the search and the verdict ------------------------------------------------------------
    @property
    def reorders_candidates(self) -> bool:
        return self.search_on != "generation"

    def rank_candidates(self, context: RunContext, concept: str, edits: Sequence[LayerEdit]) -> list[int] | None:
        """Draw the candidate-scoring prompt sets with each edit transplanted alone; order by
        :func:`order_by_generation` (judged with the CLIP unedited by every judge, combined as
        :func:`combine_judges` does: forget the highest, retain the mean). None with
        ``search_on: generation``: the search itself chose by these generations."""
        if not self.reorders_candidates:
            return None
        family, clip = context.family, context.model
        sets = self.prompt_sets(context, [concept], search=True)
        drawn = []
        for edit in edits:
            apply_edit(clip, edit)
            try:
                self.mirror(clip)
                drawn.append(self.draw(sets))
            finally:
                revert_edit(clip, edit)
                self.mirror(clip)
        judges = self.judges(family, clip, self._concept_set(context)[1])
        scores = []
        for edit, images in zip(edits, drawn):
            judged = [self.score(images, sets, judge, family, clip) for judge in judges]
            retain = [s["retain_recognition"] for s in judged if s["retain_recognition"] is not None]
            scores.append(CandidateScore(edit.name, edit.step, max(s["forget_recognition"] for s in judged),
                                         sum(retain) / len(retain) if retain else None, judged[0]["clip_score"]))
        self.candidate_scores[concept] = scores
        return order_by_generation(scores, self.forget_threshold)

    def evaluate(self, context: RunContext, edits: Sequence[LayerEdit]) -> TargetReport:
        """Every forget and retain prompt with the held-out ``seeds``, before (edits reverted) and
        after; judged and CLIP-scored with the unedited CLIP. The pipeline carries the edits on
        return."""
        family, clip = context.family, context.model
        sets = self.prompt_sets(context, list(context.concepts))
        self.mirror(clip)  # the edits, as the CLIP carries them (already there after transplant)
        after = self.draw(sets)
        with reverted(clip, edits):
            self.mirror(clip)
            before = self.draw(sets)
            templates = self._concept_set(context)[1]
            judged = {}
            for judge in self.judges(family, clip, templates):
                judged[judge.name] = {"before": self.score(before, sets, judge, family, clip),
                                      "after": self.score(after, sets, judge, family, clip)}
        self.mirror(clip)
        return self._report(sets, judged, before, after, [self.downstream_name(e.name) for e in edits])

    def _report(self, sets: Sequence[PromptSet], judged: dict, before: list, after: list,
                transplanted: list[str]) -> TargetReport:
        keys = ("forget_recognition", "retain_recognition", "clip_score", "forget_clip_score", "retain_clip_score")
        primary = next(iter(judged))
        b, a = judged[primary]["before"], judged[primary]["after"]
        met = all(r["after"]["forget_recognition"] <= self.forget_threshold for r in judged.values())
        per_concept = {c: {"forget": v["forget"], "images": v["images"],
                           "recognition_before": v["recognition"],
                           "recognition_after": a["per_concept"][c]["recognition"],
                           "clip_score_before": v["clip_score"], "clip_score_after": a["per_concept"][c]["clip_score"]}
                       for c, v in b["per_concept"].items()}
        block = {
            "judge": primary,
            "prompts": sum(len(s.concepts) * len(s.templates) for s in sets),
            "seeds": list(self.seeds),
            "before": {k: b[k] for k in keys},
            "after": {k: a[k] for k in keys},
            "target": {"rule": f"forget_recognition <= {self.forget_threshold:g} under every judge", "met": met},
            "judges": {name: {"before": {k: r["before"][k] for k in keys[:2]},
                              "after": {k: r["after"][k] for k in keys[:2]},
                              "per_concept": {c: {"before": v["recognition"],
                                                  "after": r["after"]["per_concept"][c]["recognition"]}
                                              for c, v in r["before"]["per_concept"].items()}}
                       for name, r in judged.items()},
            "per_concept": per_concept,
            "pipeline": str(self.pipeline),
            "transplanted": transplanted,
            "settings": {**self.generation, "clip_skip": self.clip_skip, "search_on": self.search_on,
                         "search_seeds": list(self.search_seeds),
                         "forget_threshold": self.forget_threshold, "device": str(self.resolved_device()),
                         "dtype": str(self.dtype).removeprefix("torch.")},
            "candidates": {c: [vars(s) | {"removes": s.removes(self.forget_threshold)} for s in scores]
                           for c, scores in self.candidate_scores.items()},
            "protected": self.protection,
        }
        held_out, forget_images = {}, None
        if self.search_on == "generation":  # the search judged generations: so does the held-out verdict
            held_out = combine_judges({name: {"forget_top1": r["after"]["forget_recognition"],
                                              "retain_top1": r["after"]["retain_recognition"]}
                                       for name, r in judged.items()})
            forget_images = sum(v["images"] for v in b["per_concept"].values() if v["forget"])
        return TargetReport("generation", block, self._sections(block), [self._grid(sets, before, after)],
                            after=held_out, forget_images=forget_images)

    def _grid(self, sets: Sequence[PromptSet], before: list, after: list) -> tuple[str, str, object]:
        """Forget rows then retain rows: each concept's first prompt with the first ``grid_seeds``
        held-out seeds, before | after."""
        rows_before, rows_after, labels = [], [], []
        for s, b, a in zip(sets, before, after):
            per_concept = len(s.templates) * len(s.seeds)
            take = min(self.grid_seeds, len(s.seeds))
            for k, concept in enumerate(s.concepts):
                rows_before.append(b[k * per_concept: k * per_concept + take])
                rows_after.append(a[k * per_concept: k * per_concept + take])
                labels.append(f"{'forget' if concept in s.forget else 'retain'}: {concept}")
        grid = image_grid(rows_before, rows_after, labels, forget_rows=len(sets[0].concepts))
        return ("Generations before | after the edit (forget rows first; held-out seeds)", "generation_grid.png", grid)

    def _sections(self, block: dict) -> list[str]:
        g = block["settings"]
        rows = []
        for name, r in block["judges"].items():
            for k in ("forget_recognition", "retain_recognition"):
                bv, av = r["before"][k], r["after"][k]
                rows.append([f"{k.replace('_', ' ')} ({name})", pct(bv), pct(av),
                             f"{100 * (av - bv):+.1f}" if bv is not None and av is not None else "–"])
        for key, what in (("forget_clip_score", "forget prompts"), ("retain_clip_score", "retain prompts"),
                          ("clip_score", "all prompts")):
            bc, ac = block["before"][key], block["after"][key]
            if bc is not None and ac is not None:
                rows.append([f"CLIP score, {what} (0–100, unedited CLIP)", f"{bc:.2f}", f"{ac:.2f}",
                             f"{100 * (ac - bc) / bc:+.1f} %" if bc else "–"])
        verdict = "**removed**" if block["target"]["met"] else "**NOT removed**"
        lines = [
            "## Generation (Stable Diffusion)", "",
            f"The edit was transplanted into the text encoder of `{block['pipeline']}` "
            f"(`{', '.join(block['transplanted'])}`; every other tensor unchanged). {block['prompts']} prompts, "
            f"seeds {block['seeds']}, {g['steps']} steps, guidance {g['guidance']:g}"
            + (f", clip skip {g['clip_skip']}" if g["clip_skip"] else "")
            + f"; step search on {'generations' if g['search_on'] == 'generation' else 'the CLIP zero-shot metrics'}"
            + f". The concept is {verdict} from generations ({block['target']['rule']}: "
            + ", ".join(f"`{name}`" for name in block["judges"])
            + "). Recognition in %: how often a judge names the prompt's concept.", "",
            *table(["metric", "before", "after", "change"], rows), "",
        ]
        if block.get("protected"):
            p = block["protected"]
            lines += [f"The forget gradient was projected off what the {p['prompts']} retained prompts feed the "
                      f"text encoder (`protect_retained`, tolerance {p['tolerance']:g}; {p['tensors']} tensors "
                      f"could be edited): the edit leaves their text states unchanged up to that tolerance. "
                      f"These are the retain prompts judged above, so their recognition is kept by construction; "
                      f"concepts left out of the concept set are not protected.", ""]
        for concept, scores in block["candidates"].items():
            lines += [f"Candidates for {concept!r} scored on generations (search seeds; the choice is the best "
                      f"retain recognition among those that remove the concept):", "",
                      *table(["layer", "step", "forget recognition", "retain recognition", "CLIP score", "removes"],
                             [[f"`{s['layer']}`", f"{s['step']:.4g}", pct(s["forget_recognition"]),
                               pct(s["retain_recognition"]), f"{s['clip_score']:.2f}", "yes" if s["removes"] else "no"]
                              for s in scores]), ""]
        return lines


# ----------------------------------------------------------------------------- slug-pl transplant


def transplant_edit_file(pipeline: str | os.PathLike, edit: str | os.PathLike, out: str | os.PathLike,
                         dtype: str = "float32") -> list[str]:
    """Copy the tensors of a run's ``edit.safetensors`` into the Stable Diffusion pipeline
    ``pipeline`` and save it to the new folder ``out`` (:meth:`StableDiffusion.save_pretrained`:
    only the edited tensors change); returns the text-encoder names changed.

    Each edited tensor must map to the pipeline's text encoder and its original (the edit's
    ``original/<name>``) must equal the pipeline's tensor (in the pipeline's dtype), so an edit
    computed on another CLIP is refused (:class:`~slug_pl.edit.EditMismatchError`).
    """
    target = StableDiffusion(str(pipeline), device="cpu", dtype=dtype)
    edits, _ = load_edits(edit)
    target.load()
    mirror = target.downstream_parameters()
    changed = []
    with torch.no_grad():
        for e in edits:
            theirs = target.downstream_name(e.name)
            if theirs is None or theirs not in mirror:
                raise EditMismatchError(f"{edit}: {e.name!r} has no counterpart in the text encoder of {pipeline} "
                                        f"(only the CLIP's text tower, text_model.*, is embedded)")
            tensor = mirror[theirs]
            if tensor.shape != e.original.shape or not torch.equal(e.original.to(tensor.dtype), tensor.detach()):
                raise EditMismatchError(f"{edit}: the pipeline's {theirs!r} is not the original {e.name!r} the edit "
                                        f"was computed on: the edit belongs to another CLIP (or was applied already)")
            target.write(theirs, e.edited)
            changed.append(theirs)
    target.save_pretrained(out)
    return changed


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--pipeline", required=True, metavar="DIR",
                        help="the Stable Diffusion pipeline folder whose text encoder the edit's CLIP is")
    parser.add_argument("--edit", required=True, metavar="FILE", help="a run's edit.safetensors")
    parser.add_argument("--out", required=True, metavar="DIR", help="new folder for the edited pipeline")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                        help="dtype the pipeline is loaded in to check the edit (default float32); the saved "
                             "copy keeps its files' own dtypes (a pipeline without safetensors files is saved "
                             "in this dtype)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``slug-pl transplant``: returns 0, or 2 on bad input."""
    parser = argparse.ArgumentParser(
        prog="slug-pl transplant",
        description="Copy a SLUG edit of a CLIP text tower into the Stable Diffusion pipeline that embeds it "
                    "and save the edited pipeline (StableDiffusionPipeline.from_pretrained reads it).")
    add_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    try:
        changed = transplant_edit_file(args.pipeline, args.edit, args.out, dtype=args.dtype)
    except (EditMismatchError, FileExistsError, FileNotFoundError, ValueError) as err:
        print(f"slug-pl transplant: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {args.pipeline} with {', '.join('text_encoder.' + c for c in changed)} edited")
    return 0
