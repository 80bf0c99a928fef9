"""Stable Diffusion XL as a downstream target: unlearn a concept from either of its two CLIP text
encoders, judged on the images it draws (the same judge as Stable Diffusion's,
:class:`~slug_pl.evaluation.generation_judge.GenerationJudge`).

**Which CLIP.** ``StableDiffusionXLPipeline`` (``stabilityai/stable-diffusion-xl-base-1.0``) embeds
two text towers: ``text_encoder``, the text tower of ``openai/clip-vit-large-patch14``
(``CLIPTextModel``), and ``text_encoder_2``, the text tower and text projection of OpenCLIP ViT-bigG/14
(``laion/CLIP-ViT-bigG-14-laion2B-39B-b160k`` in Hugging Face format, ``CLIPTextModelWithProjection``).
``text_encoder: 1`` or ``2`` says which one the run's CLIP is and the edit changes; the run pairs
the family with that CLIP (checked tensor by tensor). The other encoder stays as it is.

**What the UNet reads** (diffusers' ``StableDiffusionXLPipeline.encode_prompt``): of each encoder the
prompt's *penultimate* hidden state, ``hidden_states[-2]`` (with ``clip_skip = k``,
``hidden_states[-(k + 2)]``), taken **before** ``final_layer_norm``; of ``text_encoder_2`` also the
pooled output, ``text_projection(final_layer_norm(last hidden state)[end of text])``, which
conditions the UNet's ``text_time`` embedding. The negative prompt is all zeros when the pipeline
sets ``force_zeros_for_empty_prompt`` (the base model does); otherwise the empty prompt is encoded
at ``hidden_states[-2]`` (and pooled) under guidance > 1. So:

- ``text_encoder`` (CLIP-L): the embeddings and layers ``0 .. L-2-k`` are read (up to ``L-2`` when
  the empty negative prompt is encoded); its last layer and ``final_layer_norm`` never are;
- ``text_encoder_2`` (bigG): every layer, ``final_layer_norm`` and ``text_projection`` are read
  (the pooled output passes through all of them);
- the CLIP's vision tower and ``logit_scale`` never are.

:meth:`StableDiffusionXLAdapter.reads` says exactly this; the ranking keeps only tensors it reads.
Everything else (loading, the pair check, the one-tensor transplant, the saved copy in which
only that tensor changes, drawing) is :class:`~slug_pl.targets.stable_diffusion.StableDiffusionAdapter`'s,
on the chosen encoder.
"""

from __future__ import annotations

from slug_pl.evaluation.generation_judge import GenerationJudge
from slug_pl.pipelines import check_pipeline_dir
from slug_pl.safety import read_descriptor
from slug_pl.targets.base import DownstreamTarget
from slug_pl.targets.stable_diffusion import _LAYER, StableDiffusionAdapter

#: The CLIP parameter of the text projection, which ``text_encoder_2`` holds under the same name.
TEXT_PROJECTION = "text_projection.weight"


class _PipelineWithClipSkip:
    """An SDXL pipeline called with its own ``clip_skip`` argument (diffusers applies it to SDXL
    correctly next to transformers 5, unlike to SD 1.x/2.x: it never reaches for ``text_model``)."""

    def __init__(self, pipe, clip_skip: int):
        self.pipe, self.clip_skip = pipe, clip_skip

    def set_progress_bar_config(self, **kwargs) -> None:
        self.pipe.set_progress_bar_config(**kwargs)

    @property
    def _progress_bar_config(self) -> dict:
        return getattr(self.pipe, "_progress_bar_config", {})

    def __call__(self, **kwargs):
        return self.pipe(clip_skip=self.clip_skip, **kwargs)


class StableDiffusionXLAdapter(StableDiffusionAdapter):
    """A ``StableDiffusionXLPipeline`` folder, edited through one of its two text encoders."""

    name = "stable_diffusion_xl"
    title = "Stable Diffusion XL"
    pipeline_class = "StableDiffusionXLPipeline"

    def __init__(self, pipeline: str, text_encoder: int = 2, clip_skip: int | None = None, steps: int = 50,
                 guidance: float = 5.0, batch_size: int = 4, height: int | None = None, width: int | None = None,
                 device: str | None = None, dtype: str | None = None, progress: bool = True):
        """
        Args:
            pipeline: the SDXL pipeline folder.
            text_encoder: which encoder the run's CLIP is and the edit changes: 1 (``text_encoder``,
                CLIP ViT-L/14) or 2 (``text_encoder_2``, OpenCLIP ViT-bigG/14).
            clip_skip / steps / guidance / batch_size / height / width / device / dtype / progress:
                as :class:`~slug_pl.targets.stable_diffusion.StableDiffusionAdapter` (``clip_skip``:
                layers skipped before SDXL's penultimate one).
        """
        if text_encoder not in (1, 2) or isinstance(text_encoder, bool):
            raise ValueError(f"target text_encoder must be 1 (text_encoder, CLIP ViT-L/14) or 2 (text_encoder_2, "
                             f"OpenCLIP ViT-bigG/14), got {text_encoder!r}")
        super().__init__(pipeline, clip_skip, steps, guidance, batch_size, height, width, device, dtype, progress)
        self.text_encoder = text_encoder
        self.encoder = "text_encoder" if text_encoder == 1 else "text_encoder_2"
        self._index: dict | None = None

    def pairing_hint(self) -> str:
        clip = "openai/clip-vit-large-patch14" if self.text_encoder == 1 else "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"
        return (f"pair it with the CLIP its {self.encoder} comes from ({clip}), or choose the other encoder with "
                f"text_encoder: {3 - self.text_encoder}")

    def settings(self) -> dict:
        return {**super().settings(), "text_encoder": self.encoder}

    def negative_prompt_encoded(self) -> bool:
        """Whether the empty negative prompt is encoded (guidance > 1 and the pipeline does not
        zero it: ``force_zeros_for_empty_prompt`` false in ``model_index.json``)."""
        if self._index is None:
            self._index = read_descriptor(check_pipeline_dir(self.pipeline) / "model_index.json", "pipeline index")
        return self.generation["guidance"] > 1 and not self._index.get("force_zeros_for_empty_prompt", True)

    def downstream_name(self, clip_name: str) -> str | None:
        if clip_name == TEXT_PROJECTION:
            return TEXT_PROJECTION if self.text_encoder == 2 else None
        return super().downstream_name(clip_name)

    def reads(self, clip_name: str) -> bool:
        """Whether a change of ``clip_name`` can change what SDXL draws (module docstring)."""
        if self.text_encoder == 2:
            return clip_name == TEXT_PROJECTION or self._tower_name(clip_name) is not None
        rest = self._tower_name(clip_name)
        if rest is None:
            return False
        layer = _LAYER.match(rest)
        if layer is None:  # embeddings are read; final_layer_norm never (the states are taken before it)
            return not rest.startswith("final_layer_norm.")
        deepest = self.text_layers() - 2 - (self.clip_skip or 0)
        if self.negative_prompt_encoded():
            deepest = max(deepest, self.text_layers() - 2)
        return int(layer.group(1)) <= deepest

    def _clip_name(self, theirs: str) -> str:
        return theirs if theirs == TEXT_PROJECTION else super()._clip_name(theirs)

    def generator(self):
        self.load()
        return self.pipe if self.clip_skip is None else _PipelineWithClipSkip(self.pipe, self.clip_skip)


class StableDiffusionXL(DownstreamTarget):
    """An SDXL pipeline judged by its generations, edited through ``text_encoder`` 1 or 2: the
    :class:`StableDiffusionXLAdapter` with the Stable Diffusion judge
    (:class:`~slug_pl.evaluation.generation_judge.GenerationJudge`; its options are
    :class:`~slug_pl.targets.StableDiffusion`'s; it protects what Stable Diffusion does, through
    the paired CLIP's text tower)."""

    def __init__(
        self,
        pipeline: str,
        text_encoder: int = 2,
        clip_skip: int | None = None,
        forget_templates: list[str] | None = None,
        retain_templates: list[str] | None = None,
        retain_concepts: list[str] | int | None = None,
        seeds: list[int] = (1000, 1001, 1002, 1003),
        search_seeds: list[int] = (100, 101),
        search_templates: int = 1,
        search_retain_concepts: int | None = None,
        steps: int = 50,
        guidance: float = 5.0,
        batch_size: int = 4,
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
            pipeline: a ``StableDiffusionXLPipeline`` folder.
            text_encoder: 1 (``text_encoder``, paired with ``openai/clip-vit-large-patch14``) or 2
                (``text_encoder_2``, paired with ``laion/CLIP-ViT-bigG-14-laion2B-39B-b160k``).
            guidance / batch_size: SDXL's usual guidance (5.0) and a batch that fits 1024 px.
            the rest: as :class:`~slug_pl.targets.StableDiffusion`.
        """
        adapter = StableDiffusionXLAdapter(pipeline, text_encoder, clip_skip, steps, guidance, batch_size, height,
                                           width, device, dtype, progress)
        judge = GenerationJudge(adapter, forget_templates, retain_templates, retain_concepts, seeds, search_seeds,
                                search_templates, search_retain_concepts, judges, forget_threshold, search_on,
                                grid_seeds)
        super().__init__(adapter, judge, save_edited)

    @property
    def text_encoder(self) -> int:
        """Which encoder the run's CLIP is and the edit changes: 1 (``text_encoder``) or 2
        (``text_encoder_2``)."""
        return self.adapter.text_encoder

