"""LLaVA as a downstream target: stop a vision-language model from naming a person by editing
its CLIP vision tower.

A ``transformers.LlavaForConditionalGeneration`` embeds a CLIP vision tower
(``openai/clip-vit-large-patch14-336`` in LLaVA-1.5). SLUG computes its gradients on that CLIP
(the Hugging Face family, same weights), edits one tensor of the tower, and this target copies
the tensor into the VLM. What the VLM reads of the tower decides which tensors may be edited:
the language model sees the tower's hidden states at ``vision_feature_layer`` (−2 in LLaVA-1.5,
i.e. the output of all blocks but the last), through the projector; with the ``"default"``
strategy the class token's row is dropped. So the blocks after that layer, ``post_layernorm``
and ``visual_projection`` can never change an answer, and :meth:`LlavaAdapter.reads` keeps them out of
the ranking.

The step is searched on the VLM itself (the target's judge,
:class:`~slug_pl.evaluation.vqa.VqaJudge`, and its search judge
:class:`~slug_pl.evaluation.vqa.VqaSearchJudge`): with the candidate edit copied in,
the VLM is asked to name the people and objects of the validation images; the search's forget
target is ``forget_name_accuracy`` (e.g. ``<= 0``) and its choice keeps the most
``retain_name_accuracy + object_accuracy`` (``search.kept``). Measured on the demo's small LLaVA
(``benchmarks/results/llava_demo_unprotected.md``): at the step where the CLIP stops matching the
identity, the VLM still named it up to 73 % of the time, and the steps applied were 1.2–1.9×
larger. ``search_forget_pairs`` adds the forget set's images of the person to the judge, and the method's
``model.protect_retained`` projects the forget gradient off the main directions of the retain
images' inputs (:mod:`slug_pl.retain_projection`). The CLIP's
own zero-shot metrics are recorded next to the VLM's (``clip_metrics``), with
``forget_name_or_top1`` (:data:`~slug_pl.evaluation.vqa.FORGET_BOTH`), a target for both at once: the VLM's answers on a
few validation images alone can be silenced by a step that leaves the identity in the tower.

Config (``model.init_args.target``)::

    target:
      class_path: slug_pl.targets.Llava
      init_args:
        model: llava-hf/llava-1.5-7b-hf      # or a local save_pretrained folder
        question: What is the name of the person in this image?
        aliases: {Tom Cruise: [Cruise]}
        search_images_per_concept: 20
        save_edited: true                     # <run>/edited_llava/
"""


from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from slug_pl.evaluation.vqa import DEFAULT_OBJECT_QUESTION, DEFAULT_QUESTION, VqaJudge, answer
from slug_pl.families.hf_clip import ProcessorTransform
from slug_pl.safety import read_descriptor
from slug_pl.targets.base import DownstreamAdapter, DownstreamTarget
from slug_pl.targets.saved_copy import save_edited_copy

_CLIP_VISION = "vision_model."


class LlavaAdapter(DownstreamAdapter):
    """A ``LlavaForConditionalGeneration`` (with its processor) whose vision tower is a CLIP's:
    loaded once, answering questions about images (greedy), holding the CLIP's edited tensors,
    saved with only those changed."""

    name = "llava"
    tower = "vision"

    def __init__(self, model: str, max_new_tokens: int = 16, batch_size: int = 16, device: str = "auto",
                 dtype: str = "auto", revision: str | None = None, cache_dir: str | None = None,
                 progress: bool = True, cpu_threads: int | None = None):
        """
        Args:
            model: a hub id or a local ``save_pretrained`` folder (see :class:`Llava`).
            max_new_tokens / batch_size: greedy decoding length of an answer; images per call.
            device / dtype / revision / cache_dir / progress / cpu_threads: see :class:`Llava`.
        """
        super().__init__()
        if max_new_tokens < 1 or batch_size < 1:
            raise ValueError(f"target max_new_tokens and batch_size must be >= 1, got {max_new_tokens}, {batch_size}")
        if dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise ValueError(f"target dtype must be auto, bfloat16, float16 or float32, got {dtype!r}")
        if cpu_threads is not None and cpu_threads < 1:
            raise ValueError(f"target cpu_threads must be >= 1 or null, got {cpu_threads}")
        self.model = model
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.device, self.dtype = device, dtype
        self.revision, self.cache_dir = revision, cache_dir
        self.progress, self.cpu_threads = progress, cpu_threads
        self.vlm: nn.Module | None = None
        self.processor = None
        self._config = None
        self._tower_prefix = ""  # the VLM's name of the vision tower's tensors, e.g. "model.vision_tower."
        self._prompts: dict[str, torch.Tensor] = {}  # question -> prompt token ids (1-D)

    # -- the model -------------------------------------------------------------------------------
    def _source(self) -> str:
        local = Path(self.model).expanduser()
        if local.is_dir():
            return str(local)
        if self.model.startswith(("/", ".", "~")) or self.model.count("/") > 1:
            raise FileNotFoundError(f"target model folder not found: {local}. Give a save_pretrained folder of a "
                                    f"LlavaForConditionalGeneration and its processor, or a hub id such as "
                                    f"'llava-hf/llava-1.5-7b-hf'")
        return self.model

    def config(self):
        """The VLM's ``LlavaConfig`` (read without loading the weights)."""
        if self._config is None:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(self._source(), revision=self.revision, cache_dir=self.cache_dir)
            if getattr(config, "model_type", None) != "llava":
                raise ValueError(f"target model {self.model} is a {config.model_type!r} model, not LLaVA "
                                 f"(model_type 'llava'); give a LlavaForConditionalGeneration folder or hub id")
            if getattr(config.vision_config, "model_type", None) != "clip_vision_model":
                raise ValueError(f"target model {self.model} has a {config.vision_config.model_type!r} vision tower; "
                                 f"SLUG's LLaVA target needs a CLIP vision tower (clip_vision_model)")
            self._config = config
        return self._config

    def _device_dtype(self) -> tuple[torch.device, torch.dtype]:
        device = self.resolved_device()
        if self.dtype == "auto":
            return device, torch.bfloat16 if device.type == "cuda" else torch.float32
        return device, getattr(torch, self.dtype)

    @property
    def loaded(self) -> bool:
        return self.vlm is not None

    def load(self) -> None:
        if self.vlm is not None:
            return
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        self.config()
        device, dtype = self._device_dtype()
        source = self._source()
        self.vlm = LlavaForConditionalGeneration.from_pretrained(
            source, dtype=dtype, revision=self.revision, cache_dir=self.cache_dir).to(device).eval()
        self.processor = AutoProcessor.from_pretrained(source, revision=self.revision, cache_dir=self.cache_dir)
        tower = self.vlm.model.vision_tower
        self._tower_prefix = next(n for n, m in self.vlm.named_modules() if m is tower) + "."

    def describe(self) -> str:
        return f"the LLaVA model {self.model}"

    def source(self) -> str:
        return str(self.model)

    def pairing_hint(self) -> str:
        return "use the CLIP its vision tower comes from (openai/clip-vit-large-patch14-336 for LLaVA-1.5)"

    def stored_dtype(self) -> torch.dtype | None:
        """llava-hf's checkpoints hold the float32 CLIP rounded to float16 (their config's dtype),
        also when the VLM runs in float32."""
        stored = getattr(self.config(), "dtype", None)
        return stored if isinstance(stored, torch.dtype) else None

    @classmethod
    def recognizes(cls, folder: Path) -> bool:
        config = folder / "config.json"
        return config.is_file() and read_descriptor(config, "model config").get("model_type") == "llava"

    def _vlm_parameters(self) -> dict[str, nn.Parameter]:
        self.load()
        return dict(self.vlm.named_parameters())

    def downstream_name(self, clip_name: str) -> str | None:
        """``vision_model.<rest>`` -> the VLM's ``<tower>.<rest>`` (``model.vision_tower.<rest>``
        in transformers 5; a ``vision_model.`` level inside the tower is followed too); None for
        the text tower, the projections and the logit scale."""
        if not clip_name.startswith(_CLIP_VISION):
            return None
        params = self._vlm_parameters()
        rest = clip_name[len(_CLIP_VISION):]
        for name in (self._tower_prefix + rest, self._tower_prefix + _CLIP_VISION + rest):
            if name in params:
                return name
        # a tensor the VLM lacks: harmless if it is never read (e.g. dropped last layers), else a mismatch
        return self._tower_prefix + rest if self.reads(clip_name) else None

    def feature_depth(self) -> int:
        """How many encoder blocks the VLM's features pass through: the deepest hidden state it
        reads, ``vision_feature_layer`` (an index, or a list of them, into the ``N + 1`` hidden
        states: 0 = the embeddings after ``pre_layrnorm``, k = after block k − 1)."""
        config = self.config()
        n = config.vision_config.num_hidden_layers
        layers = config.vision_feature_layer
        layers = [layers] if isinstance(layers, int) else list(layers)
        depth = []
        for layer in layers:
            if not -(n + 1) <= layer <= n:
                raise ValueError(f"{self.model}: vision_feature_layer {layer} is outside the {n + 1} hidden states "
                                 f"of its {n}-block vision tower")
            depth.append(layer % (n + 1))
        return max(depth)

    def reads(self, clip_name: str) -> bool:
        """Blocks ``0 .. depth − 1`` (:meth:`feature_depth`), the patch / position embeddings and
        ``pre_layrnorm`` are read; the class embedding too unless the VLM reads only the
        embeddings and drops the class token (strategy ``"default"``); later blocks,
        ``post_layernorm``, ``visual_projection`` and the text tower never are. Nor is any key
        bias: it adds the same ``q·b`` to every attention logit of a query, which the softmax
        cancels."""
        if not clip_name.startswith(_CLIP_VISION):
            return False
        rest = clip_name[len(_CLIP_VISION):]
        depth = self.feature_depth()
        if rest.startswith("encoder.layers."):
            return int(rest.split(".")[2]) < depth and not rest.endswith("self_attn.k_proj.bias")
        if rest.startswith("embeddings.class_embedding"):
            return depth > 0 or self.config().vision_feature_select_strategy == "full"
        return rest.startswith(("embeddings.", "pre_layrnorm."))

    def downstream_parameters(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self._vlm_parameters().items() if n.startswith(self._tower_prefix)}

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """The VLM with its edits and its processor in the new folder ``folder``: a copy of the
        model's folder (a hub id's cached snapshot) in which only the edited tensors change, each
        stored in its file's dtype from the CLIP's float32 value, whatever dtype the VLM runs in
        (:func:`~slug_pl.targets.saved_copy.copy_with_tensors`). A model stored without
        safetensors is saved as it runs instead (``save_pretrained``, in its running dtype).
        Complete or absent; never overwrites (:class:`FileExistsError`)."""
        self.load()
        changes = {theirs[len(self._tower_prefix):]: change for theirs, change in self.written.items()}

        def save_running(tmp: Path) -> None:
            self.vlm.save_pretrained(tmp)
            self.processor.save_pretrained(tmp)

        return save_edited_copy(self._folder(), folder, changes, save_running)

    def _folder(self) -> Path:
        """The local folder the VLM was loaded from (for a hub id, its snapshot in the cache)."""
        source = self._source()
        if Path(source).is_dir():
            return Path(source)
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, revision=self.revision, cache_dir=self.cache_dir,
                                      local_files_only=True))

    # -- asking ----------------------------------------------------------------------------------
    def image_transform(self) -> ProcessorTransform:
        """The VLM's own image preprocessing (PIL image -> pixel values ``(3, H, W)``)."""
        self.load()
        return ProcessorTransform(self.processor.image_processor)

    @contextmanager
    def threads(self) -> Iterator[None]:
        """``cpu_threads`` torch threads inside the block when the VLM is on the CPU."""
        before = torch.get_num_threads()
        if self.cpu_threads is not None and next(self.vlm.parameters()).device.type == "cpu":
            torch.set_num_threads(self.cpu_threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def answer(self, pixels: torch.Tensor, question: str, progress: bool | None = None) -> list[str]:
        """Greedy answers to ``question`` about each image of ``pixels`` ``(N, 3, H, W)`` (the VLM's
        preprocessing applied): :func:`slug_pl.evaluation.vqa.answer` with this adapter's decoding
        settings. ``progress``: a progress bar (None: the adapter's ``progress`` setting)."""
        self.load()
        return answer(self.vlm, self.processor, pixels, question, self.max_new_tokens, self.batch_size,
                      self.progress if progress is None else progress, self._prompt(question))

    def _prompt(self, question: str) -> torch.Tensor:
        if question not in self._prompts:
            from slug_pl.evaluation.vqa import prompt_ids

            self._prompts[question] = prompt_ids(self.processor, question)
        return self._prompts[question]

    @torch.no_grad()
    def check_finite(self, pixels: torch.Tensor) -> None:
        """Raise FloatingPointError when the VLM's image features are not finite (a step that
        broke the tower: generation would answer garbage without an error)."""
        parameter = next(self.vlm.parameters())
        batch = pixels[:self.batch_size].to(parameter.device, parameter.dtype)
        features = self.vlm.model.get_image_features(pixel_values=batch).pooler_output
        if not all(torch.isfinite(f).all() for f in features):
            raise FloatingPointError(f"non-finite image features in {self.describe()}: the edited vision tower is "
                                     f"broken")



class Llava(DownstreamTarget):
    """A LLaVA whose vision tower is the CLIP's, judged by its answers: the :class:`LlavaAdapter`
    with a :class:`~slug_pl.evaluation.vqa.VqaJudge`.

    What it protects when the method keeps the edit off what must stay (``model.protect_retained``,
    :mod:`slug_pl.retain_projection`): the retain set's images whose captions name no forgotten
    concept, every patch, through the vision encoder; recommended tolerance 0.3 (images are not
    discrete like prompts: a small tolerance protects nearly every direction, so the step that
    forgets grows until it breaks fresh images; 0.3 protects the few directions most images share,
    colours and layout, and leaves identity-specific ones)."""

    def __init__(
        self,
        model: str,
        question: str = DEFAULT_QUESTION,
        object_question: str = DEFAULT_OBJECT_QUESTION,
        aliases: dict[str, list[str]] | None = None,
        max_new_tokens: int = 16,
        batch_size: int = 16,
        device: str = "auto",
        dtype: str = "auto",
        search_on_vlm: bool = True,
        search_images_per_concept: int | None = None,
        clip_metrics: bool = True,
        test_images_per_concept: int | None = None,
        examples: int = 2,
        save_edited: bool = False,
        revision: str | None = None,
        cache_dir: str | None = None,
        progress: bool = True,
        cpu_threads: int | None = None,
        search_forget_pairs: bool = False,
    ):
        """
        Args:
            model: a hub id (``llava-hf/llava-1.5-7b-hf``) or a local ``save_pretrained`` folder
                of a ``LlavaForConditionalGeneration`` with its processor (and chat template).
            question: asked about every identity image; an answer is right when it contains the
                identity's name (whole words, case-insensitive) or an alias.
            object_question: asked about every image of the utility (object) set.
            aliases: name -> other accepted names (e.g. ``{"Tom Cruise": ["Cruise"]}``).
            max_new_tokens: greedy decoding length of an answer.
            batch_size: images per ``generate`` call.
            device: ``"auto"`` (the device of the run's CLIP pass; outside a run CUDA when
                available, else CPU) or a torch device string.
            dtype: ``"auto"`` (bfloat16 on a GPU, float32 on the CPU), ``"bfloat16"``,
                ``"float16"`` or ``"float32"``.
            search_on_vlm: the step search runs on the VLM's name accuracy (:class:`~slug_pl.evaluation.vqa.VqaSearchJudge`, on
                the validation sets); False: on the CLIP's zero-shot metrics, the VLM then ranking
                the candidates that met the target.
            search_images_per_concept: validation images per retained identity and per object the
                search's judge asks about (the first ones; None: all); the forgotten identity is
                always asked about all its validation images. Bounds the cost of each search
                evaluation.
            clip_metrics: the search's judge also reports the CLIP's zero-shot metrics
                (``forget_top5``, ``retain_top1``, ...) next to the VLM's, and
                ``forget_name_or_top1`` (:data:`~slug_pl.evaluation.vqa.FORGET_BOTH`), a forget target for both.
            test_images_per_concept: held-out images per concept of the before/after evaluation
                (None: all).
            examples: example answers per concept (before / after) in ``report.md``.
            save_edited: write the edited VLM into the run folder (``edited_llava/``).
            revision / cache_dir: passed to ``from_pretrained`` for a hub id.
            progress: progress bars while asking (the before / after evaluation; the search's many
                short evaluations never show one).
            cpu_threads: torch CPU threads while this target measures on the CPU (the VLM's answers
                and the judge's CLIP metrics; restored afterwards); None leaves torch's setting. On
                shared cores 1 is several times faster than 2 (measured: 200 answers of the demo
                LLaVA in 1.5 s with 1 thread, 7.3 s with 2).
            search_forget_pairs: the search's judge also asks about the forget set's own images of
                the concept: the person must go unnamed on those too. Fifteen validation images
                leave a step that silences them but not every fresh image; the forget pairs
                (60 per identity in the demo) make the boundary the search finds hold more widely.
        """
        adapter = LlavaAdapter(model, max_new_tokens, batch_size, device, dtype, revision, cache_dir, progress,
                               cpu_threads)
        judge = VqaJudge(adapter, question, object_question, aliases, search_on_vlm, search_images_per_concept,
                         clip_metrics, test_images_per_concept, examples, search_forget_pairs)
        super().__init__(adapter, judge, save_edited)
