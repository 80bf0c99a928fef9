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

**Transplant.** :meth:`StableDiffusionAdapter.transplant` copies the edited tensors (CLIP name
``text_model.X`` is the text encoder's ``X``) into the pipeline; every other tensor of the
pipeline stays bit-identical. ``slug-pl transplant`` does the same offline, from a run's
``edit.safetensors``, into a new folder (:mod:`slug_pl.transplant`)::

    slug-pl transplant --into models/sd15 --edit lightning_logs/version_0/edit.safetensors \\
        --out models/sd15-unlearned

**Verdict on generations**: the target's judge, :class:`~slug_pl.evaluation.generation_judge.GenerationJudge`
(the step search, the choice among candidates by generations, the before/after report), which
every text-to-image adapter shares (SDXL: :mod:`slug_pl.targets.sdxl`).
"""


from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from slug_pl.evaluation.generation_judge import CLIP_TEXT_PREFIX, GenerationJudge
from slug_pl.pipelines import check_pipeline_dir, generate_images, load_pipeline, pipeline_class_name, resolve_dtype
from slug_pl.safety import read_descriptor
from slug_pl.targets.base import DownstreamAdapter, DownstreamTarget, TargetMismatchError
from slug_pl.targets.saved_copy import save_edited_copy

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


# ----------------------------------------------------------------------------- the adapter


class StableDiffusionAdapter(DownstreamAdapter):
    """A diffusers ``StableDiffusionPipeline`` folder whose text encoder is a CLIP's text tower:
    loaded once, drawing prompts with seeds (its generation settings), holding the CLIP's edited
    tensors, saved with only those changed."""

    name = "stable_diffusion"
    tower = "text"
    title = "Stable Diffusion"
    #: The diffusers pipeline class a folder of this adapter holds (``model_index.json``).
    pipeline_class = "StableDiffusionPipeline"
    #: The pipeline's attribute and sub-folder holding the CLIP text tower.
    encoder = "text_encoder"

    def __init__(self, pipeline: str, clip_skip: int | None = None, steps: int = 50, guidance: float = 7.5,
                 batch_size: int = 8, height: int | None = None, width: int | None = None,
                 device: str | None = None, dtype: str | None = None, progress: bool = True):
        """
        Args:
            pipeline: the pipeline folder (``save_pretrained`` layout).
            clip_skip: condition on the hidden state this many layers before the last (diffusers'
                ``clip_skip``); None: the last.
            steps / guidance / batch_size / height / width: how it draws (scheduler steps,
                classifier-free guidance scale, prompts per call, image size; None: the pipeline's).
            device / dtype: where it runs (None: the run's device) and its dtype (None: float16 on
                CUDA, else float32).
            progress: a progress bar over drawn images.
        """
        super().__init__()
        if clip_skip is not None and (isinstance(clip_skip, bool) or clip_skip < 0):
            raise ValueError(f"target clip_skip must be a non-negative number of layers or null, got {clip_skip!r}")
        for key, value in (("steps", steps), ("batch_size", batch_size)):
            if isinstance(value, bool) or value < 1:
                raise ValueError(f"target {key} must be a positive integer, got {value!r}")
        self.pipeline = pipeline
        self.clip_skip = clip_skip or None
        self.generation = {"steps": steps, "guidance": guidance, "batch_size": batch_size, "height": height,
                           "width": width}
        self.device = device
        self._dtype = dtype
        self.progress = progress
        self.pipe = None
        self._config: dict | None = None
        self._prefix = ""

    def source(self) -> str:
        return str(self.pipeline)

    def describe(self) -> str:
        return f"the {self.title} pipeline {self.pipeline}"

    def pairing_hint(self) -> str:
        return ("pair it with the CLIP its text encoder comes from (Stable Diffusion 1.x embeds "
                "openai/clip-vit-large-patch14, 2.x OpenCLIP ViT-H/14 in Hugging Face format)")

    @property
    def dtype(self) -> torch.dtype:
        """The pipeline's dtype: as configured, else float16 on CUDA and float32 elsewhere."""
        return resolve_dtype(self._dtype, str(self.resolved_device()))

    def settings(self) -> dict:
        """How it draws, for the record."""
        return {**self.generation, "clip_skip": self.clip_skip, "device": str(self.resolved_device()),
                "dtype": str(self.dtype).removeprefix("torch.")}

    @classmethod
    def recognizes(cls, folder: Path) -> bool:
        return (folder / "model_index.json").is_file() and pipeline_class_name(folder) == cls.pipeline_class

    # -- the pipeline ----------------------------------------------------------------------------
    @property
    def loaded(self) -> bool:
        return self.pipe is not None

    def load(self) -> None:
        if self.pipe is not None:
            return
        layers = self.text_layers()
        if self.clip_skip is not None and self.clip_skip >= layers:
            raise ValueError(f"target clip_skip {self.clip_skip} leaves no layer of the {layers}-layer text "
                             f"encoder of {self.pipeline}; use at most {layers - 1}")
        self.pipe = load_pipeline(self.pipeline, str(self.resolved_device()), self.dtype, expected=self.pipeline_class)
        names = [n for n, _ in getattr(self.pipe, self.encoder).named_parameters()]
        self._prefix = CLIP_TEXT_PREFIX if names and names[0].startswith(CLIP_TEXT_PREFIX) else ""

    def text_config(self) -> dict:
        """The encoder's ``config.json`` (read once, without loading weights)."""
        if self._config is None:
            path = check_pipeline_dir(self.pipeline) / self.encoder / "config.json"
            if not path.is_file():
                raise FileNotFoundError(f"{self.pipeline} has no {self.encoder}/config.json: give a "
                                        f"{self.title} pipeline folder with a CLIP text encoder")
            self._config = read_descriptor(path, "text encoder config")
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
        if rest is None:
            return None
        self.load()  # the loaded encoder's names say whether they keep a text_model. level
        return self._prefix + rest

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
        return dict(getattr(self.pipe, self.encoder).named_parameters())

    def check_pair(self, family, clip: nn.Module) -> None:
        """Raise :class:`TargetMismatchError` naming the first text-encoder tensor that the CLIP
        lacks or holds with other values (compared in the pipeline's dtype: a float16 pipeline
        holds the CLIP's weights rounded to float16)."""
        mirror = self.downstream_parameters()
        clip_params = dict(clip.named_parameters())
        model = family.describe().get("model_name")
        for theirs, other in mirror.items():
            name = self._clip_name(theirs)
            if name not in clip_params:
                raise TargetMismatchError(
                    f"the {self.encoder} of {self.pipeline} has {theirs!r}, which the CLIP ({model}) lacks: the CLIP "
                    f"is not the one this pipeline embeds; {self.pairing_hint()}")
            if not self.same(clip_params[name], self._loaded.get(theirs, other)):
                raise TargetMismatchError(
                    f"the CLIP's {name!r} differs from the {self.encoder}'s {theirs!r} in {self.pipeline}: the "
                    f"CLIP ({model}) is not the one this pipeline embeds; {self.pairing_hint()}")

    def _relative(self, theirs: str) -> str:
        """A tensor of the encoder by its name inside the encoder's files (without the loaded
        model's ``text_model.`` level, which older checkpoints lack)."""
        return theirs[len(self._prefix):] if theirs.startswith(self._prefix) else theirs

    def _clip_name(self, theirs: str) -> str:
        """The CLIP parameter a tensor of the encoder mirrors."""
        return CLIP_TEXT_PREFIX + self._relative(theirs)

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write the pipeline with the tensors written into it into the new folder ``folder``: a
        copy of the pipeline folder in which only those tensors change, each stored in its file's
        dtype from the CLIP's float32 value, whatever dtype the pipeline runs in
        (:func:`~slug_pl.targets.saved_copy.copy_with_tensors`). A pipeline stored without
        safetensors is saved as it runs instead (``save_pretrained``, in its running dtype).
        Complete or absent; an existing folder is refused."""
        self.load()
        changes = {self._relative(theirs): change for theirs, change in self.written.items()}
        return save_edited_copy(check_pipeline_dir(self.pipeline), folder, changes, self.pipe.save_pretrained,
                                within=self.encoder)

    # -- drawing -------------------------------------------------------------------------------
    def generator(self):
        """What draws images: the pipeline, or it under :class:`ClipSkipPipeline`."""
        self.load()
        return self.pipe if self.clip_skip is None else ClipSkipPipeline(self.pipe, self.clip_skip)

    def draw(self, prompts: Sequence[str], seeds: Sequence[int], output_type: str = "pil"):
        """The images of ``prompts`` (one per prompt, each from its own seeded generator), with the
        tensors the pipeline holds now: PIL images, or a tensor ``(N, 3, H, W)`` in [0, 1] with
        ``output_type="pt"``."""
        g = self.generation
        return generate_images(self.generator(), list(prompts), list(seeds), steps=g["steps"], guidance=g["guidance"],
                               batch_size=g["batch_size"], height=g["height"], width=g["width"],
                               progress=self.progress, output_type=output_type)


# ----------------------------------------------------------------------------- the target


class StableDiffusion(DownstreamTarget):
    """A Stable Diffusion 1.x/2.x pipeline judged by its generations: the
    :class:`StableDiffusionAdapter` with a :class:`~slug_pl.evaluation.generation_judge.GenerationJudge`.

    What it protects when the method keeps the edit off what must stay (``model.protect_retained``,
    :mod:`slug_pl.retain_projection`): the retained concepts' prompts (the report's retain prompts,
    ``retain_concepts`` × ``retain_templates``), through the text tower at every position the UNet
    reads; recommended tolerance 0.05."""

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
            search_seeds: seeds of the search's generations (:meth:`~slug_pl.evaluation.generation_judge.GenerationJudge.rank_candidates`, and the
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
                them decide (:func:`~slug_pl.evaluation.generation_judge.combine_judges`: the search's forget metric is the highest
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
        """
        adapter = StableDiffusionAdapter(pipeline, clip_skip, steps, guidance, batch_size, height, width, device,
                                         dtype, progress)
        judge = GenerationJudge(adapter, forget_templates, retain_templates, retain_concepts, seeds, search_seeds,
                                search_templates, search_retain_concepts, judges, forget_threshold, search_on,
                                grid_seeds)
        super().__init__(adapter, judge, save_edited)
