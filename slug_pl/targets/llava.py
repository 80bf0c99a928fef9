"""LLaVA as a downstream target: stop a vision-language model from naming a person by editing
its CLIP vision tower.

A ``transformers.LlavaForConditionalGeneration`` embeds a CLIP vision tower
(``openai/clip-vit-large-patch14-336`` in LLaVA-1.5). SLUG computes its gradients on that CLIP
(the Hugging Face family, same weights), edits one tensor of the tower, and this target copies
the tensor into the VLM. What the VLM reads of the tower decides which tensors may be edited:
the language model sees the tower's hidden states at ``vision_feature_layer`` (−2 in LLaVA-1.5,
i.e. the output of all blocks but the last), through the projector; with the ``"default"``
strategy the class token's row is dropped. So the blocks after that layer, ``post_layernorm``
and ``visual_projection`` can never change an answer, and :meth:`Llava.reads` keeps them out of
the ranking.

The step is searched on the VLM itself (:class:`VqaJudge`): with the candidate edit copied in,
the VLM is asked to name the people and objects of the validation images; the search's forget
target is ``forget_name_accuracy`` (e.g. ``<= 0``) and its choice keeps the most
``retain_name_accuracy + object_accuracy`` (``search.kept``). Measured on the demo's small LLaVA
(``benchmarks/results/llava_demo_unprotected.md``): at the step where the CLIP stops matching the
identity, the VLM still named it up to 73 % of the time, and the steps applied were 1.2–1.9×
larger. ``search_forget_pairs`` adds the forget set's images of the person to the judge, and
``protect_retained`` projects the forget gradient off the main directions of the retain images'
inputs (:mod:`slug_pl.retain_projection`). The CLIP's
own zero-shot metrics are recorded next to the VLM's (``clip_metrics``), with
``forget_name_or_top1`` (:data:`FORGET_BOTH`), a target for both at once: the VLM's answers on a
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
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from slug_pl.context import RunContext
from slug_pl.edit import LayerEdit, apply_edit, revert_edit
from slug_pl.evaluation.vqa import DEFAULT_OBJECT_QUESTION, DEFAULT_QUESTION, chat_prompt, score_vqa
from slug_pl.families.hf_clip import ProcessorTransform
from slug_pl.record import pct, table
from slug_pl.retain_projection import check_tolerance, input_projection
from slug_pl.targets.base import DownstreamTarget, TargetMismatchError, TargetReport
from slug_pl.targets.saved_copy import TensorChange, same_weights, save_edited_copy

#: The naming question (LLaVA-1.5 answers it with a sentence holding the name).
QUESTION = DEFAULT_QUESTION
#: The utility question about object images.
OBJECT_QUESTION = DEFAULT_OBJECT_QUESTION
#: The VQA metrics a judge returns (fractions): forget over all images of the forgotten
#: identities, retain as the mean over the other identities, objects over all object images.
VQA_METRICS = ("forget_name_accuracy", "retain_name_accuracy", "object_accuracy")
#: With the CLIP's metrics: the larger of the VLM's forget name accuracy and the CLIP's forget
#: top-1, a forget target that holds only when the VLM no longer names the person *and* the CLIP no
#: longer matches the name first (the identity left the tower, not just these images' reading).
FORGET_BOTH = "forget_name_or_top1"
_CLIP_VISION = "vision_model."


@dataclass
class VqaImages:
    """Preprocessed images of a VQA evaluation, grouped by concept: name -> pixel values
    ``(n, 3, H, W)`` (float32, the VLM's image processor applied)."""

    identities: dict[str, torch.Tensor]
    objects: dict[str, torch.Tensor]

    def counts(self, forget: Sequence[str]) -> dict[str, int]:
        return {"forget": sum(len(v) for k, v in self.identities.items() if k in forget),
                "retain": sum(len(v) for k, v in self.identities.items() if k not in forget),
                "objects": sum(len(v) for v in self.objects.values())}


def group_by_concept(pixels: torch.Tensor, labels: torch.Tensor, classnames: Sequence[str]) -> dict[str, torch.Tensor]:
    """Images of a labelled set per class name, in set order (classes without images left out)."""
    return {name: pixels[labels == label] for label, name in enumerate(classnames) if (labels == label).any()}


class Llava(DownstreamTarget):
    """A ``LlavaForConditionalGeneration`` (with its processor) whose vision tower is the CLIP's."""

    name = "llava"
    tower = "vision"

    def __init__(
        self,
        model: str,
        question: str = QUESTION,
        object_question: str = OBJECT_QUESTION,
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
        protect_retained: bool = False,
        protect_tolerance: float = 0.3,
        protect_images: int = 2000,
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
            search_on_vlm: the step search runs on the VLM's name accuracy (:class:`VqaJudge`, on
                the validation sets); False: on the CLIP's zero-shot metrics, the VLM then ranking
                the candidates that met the target.
            search_images_per_concept: validation images per retained identity and per object the
                search's judge asks about (the first ones; None: all); the forgotten identity is
                always asked about all its validation images. Bounds the cost of each search
                evaluation.
            clip_metrics: the search's judge also reports the CLIP's zero-shot metrics
                (``forget_top5``, ``retain_top1``, ...) next to the VLM's, and
                ``forget_name_or_top1`` (:data:`FORGET_BOTH`), a forget target for both.
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
            protect_retained: keep the edit off the main directions of what the retain set's
                images feed the tower: the forget gradient of each linear weight of the encoder is
                projected off the span of those inputs (every patch of up to ``protect_images``
                retain images whose captions do not name a forgotten concept), keeping only the
                directions above ``protect_tolerance`` × the largest singular value
                (:mod:`slug_pl.retain_projection`). Only those linear weights are then candidates.
                Not SLUG's gradient as it is: one tensor and one searched step still, along the
                projected direction; ``summary.json``'s ``vqa.protected`` records it.
            protect_tolerance: the fraction of the largest singular value above which an input
                direction is protected. Images are not discrete like prompts: a small tolerance
                protects nearly every direction, so the step that forgets grows until it breaks
                fresh images; 0.3 protects the few directions shared by most images (colours,
                layout) and leaves identity-specific ones.
            protect_images: how many retain images are encoded for the projection.
            search_forget_pairs: the search's judge also asks about the forget set's own images of
                the concept: the person must go unnamed on those too. Fifteen validation images
                leave a step that silences them but not every fresh image; the forget pairs
                (60 per identity in the demo) make the boundary the search finds hold more widely.
        """
        if max_new_tokens < 1 or batch_size < 1:
            raise ValueError(f"target max_new_tokens and batch_size must be >= 1, got {max_new_tokens}, {batch_size}")
        for key, value in (("search_images_per_concept", search_images_per_concept),
                           ("test_images_per_concept", test_images_per_concept)):
            if value is not None and value < 1:
                raise ValueError(f"target {key} must be >= 1 or null (all images), got {value}")
        if dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise ValueError(f"target dtype must be auto, bfloat16, float16 or float32, got {dtype!r}")
        check_tolerance(protect_tolerance, "target protect_tolerance")
        if protect_images < 1:
            raise ValueError(f"target protect_images must be >= 1, got {protect_images}")
        self.protect_retained, self.protect_tolerance, self.protect_images = (protect_retained, protect_tolerance,
                                                                              protect_images)
        self.protection: dict | None = None  # what forget_gradient_projection protected, for the record
        self.search_forget_pairs = search_forget_pairs
        self.model = model
        self.question = question
        self.object_question = object_question
        self.aliases = {k: list(v) for k, v in (aliases or {}).items()}
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.device = device
        self.dtype = dtype
        self.search_on_vlm = search_on_vlm
        self.search_images_per_concept = search_images_per_concept
        self.clip_metrics = clip_metrics
        self.test_images_per_concept = test_images_per_concept
        self.examples = examples
        self.save_edited = save_edited
        self.revision = revision
        self.cache_dir = cache_dir
        self.progress = progress
        if cpu_threads is not None and cpu_threads < 1:
            raise ValueError(f"target cpu_threads must be >= 1 or null, got {cpu_threads}")
        self.cpu_threads = cpu_threads
        self.vlm: nn.Module | None = None
        self.processor = None
        self._config = None
        self._tower_prefix = ""  # the VLM's name of the vision tower's tensors, e.g. "model.vision_tower."
        self._original: dict[str, torch.Tensor] = {}  # VLM name -> its value as loaded (tensors ever written)
        self._written: dict[str, TensorChange] = {}  # VLM name -> the CLIP's value it holds now (float32)
        self._prompts: dict[str, torch.Tensor] = {}  # question -> prompt token ids (1-D)
        self._images: dict[str, VqaImages] = {}

    # -- the downstream model ------------------------------------------------------------------
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

    def check_pair(self, family, clip: nn.Module) -> None:
        """Refuse a CLIP whose vision tower differs from the VLM's, naming the first tensor (the
        comparison is at the VLM's precision and its checkpoint's: llava-hf's checkpoints hold the
        float32 CLIP rounded to float16, also when loaded as float32; see :func:`same_weights`)."""
        mirror = self.downstream_parameters()
        stored = getattr(self.config(), "dtype", None)
        stored = stored if isinstance(stored, torch.dtype) else None
        for name, param in clip.named_parameters():
            theirs = self.downstream_name(name) if family.tower_of(name) == "vision" else None
            if theirs is None:
                continue
            if theirs not in mirror:
                raise TargetMismatchError(
                    f"{self.describe()} has no tensor {theirs!r} (the CLIP's {name!r}): the CLIP is not the one "
                    f"this LLaVA embeds; pair it with the CLIP its vision tower comes from")
            if not same_weights(param, self._original.get(theirs, mirror[theirs]), stored):
                raise TargetMismatchError(
                    f"the CLIP's {name!r} differs from {self.describe()}'s {theirs!r}: the CLIP "
                    f"({family.describe().get('model_name')}) is not the one this LLaVA embeds; use the CLIP its "
                    f"vision tower comes from (openai/clip-vit-large-patch14-336 for LLaVA-1.5)")

    # -- copying the CLIP's tensors into the VLM ---------------------------------------------
    def differing(self, clip: nn.Module) -> list[str]:
        """The CLIP vision tensors read by the VLM whose values differ from the VLM's as loaded
        (the edits the CLIP carries)."""
        params = self._vlm_parameters()
        out = []
        for name, param in clip.named_parameters():
            theirs = self.downstream_name(name) if self.reads(name) else None
            if theirs is not None and not same_weights(param, self._original.get(theirs, params[theirs])):
                out.append(name)
        return out

    @torch.no_grad()
    def mirror(self, clip: nn.Module, clip_names: Sequence[str]) -> list[str]:
        """Make the VLM's tower hold the CLIP's current values of ``clip_names`` (cast to the
        VLM's dtype and device) and its loaded values everywhere else. Returns the VLM names
        written."""
        params = self._vlm_parameters()
        clip_params = dict(clip.named_parameters())
        wanted = {}
        for name in clip_names:
            theirs = self.downstream_name(name)
            if theirs is None or not self.reads(name):
                raise ValueError(f"the edit of {name!r} cannot reach {self.describe()}: it does not read this "
                                 f"tensor (only vision tensors up to vision_feature_layer are read)")
            wanted[theirs] = clip_params[name]
        for theirs, original in self._original.items():
            if theirs not in wanted:
                params[theirs].copy_(original)
        self._written = {}
        for theirs, value in wanted.items():
            self._original.setdefault(theirs, params[theirs].detach().clone())
            params[theirs].copy_(value.detach().to(params[theirs].device, params[theirs].dtype))
            self._written[theirs] = TensorChange(self._original[theirs], value.detach().to("cpu", torch.float32).clone())
        return sorted(wanted)

    def transplant(self, clip: nn.Module, edits: Sequence[LayerEdit]) -> list[str]:
        return self.mirror(clip, [e.name for e in edits])

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """The VLM with its edits and its processor in the new folder ``folder``: a copy of the
        model's folder (a hub id's cached snapshot) in which only the edited tensors change, each
        stored in its file's dtype from the CLIP's float32 value, whatever dtype the VLM runs in
        (:func:`~slug_pl.targets.saved_copy.copy_with_tensors`). A model stored without
        safetensors is saved as it runs instead (``save_pretrained``, in its running dtype).
        Complete or absent; never overwrites (:class:`FileExistsError`)."""
        self.load()
        changes = {theirs[len(self._tower_prefix):]: change for theirs, change in self._written.items()}

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

    # -- asking --------------------------------------------------------------------------------
    def prompt_ids(self, question: str) -> torch.Tensor:
        """The token ids ``(L,)`` of the chat prompt holding one image and ``question`` (the image
        placeholder expanded to the VLM's image tokens), computed once per question."""
        if question not in self._prompts:
            self.load()
            size = self.processor.image_processor.crop_size
            probe = Image.new("RGB", (size["width"], size["height"]))
            inputs = self.processor(images=[probe], text=[chat_prompt(self.processor, question)], return_tensors="pt")
            self._prompts[question] = inputs["input_ids"][0]
        return self._prompts[question]

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

    @torch.inference_mode()
    def answer(self, pixels: torch.Tensor, question: str, progress: bool | None = None) -> list[str]:
        """Greedy answers to ``question`` about each image of ``pixels`` ``(N, 3, H, W)`` (the VLM's
        preprocessing applied), new tokens only, special tokens dropped, stripped. Every row
        shares one prompt, so no padding is needed; the same answers as
        :func:`slug_pl.evaluation.vqa.ask` on the images. ``progress``: a progress bar (None: the
        target's ``progress`` setting)."""
        self.load()
        parameter = next(self.vlm.parameters())
        prompt = self.prompt_ids(question).to(parameter.device)
        tokenizer = self.processor.tokenizer
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        answers: list[str] = []
        show = self.progress if progress is None else progress
        bar = tqdm(total=len(pixels), desc="asking LLaVA", unit="img", disable=not show)
        with self.threads(), bar:
            for start in range(0, len(pixels), self.batch_size):
                batch = pixels[start:start + self.batch_size].to(parameter.device, parameter.dtype)
                ids = prompt.expand(len(batch), -1)
                output = self.vlm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=batch,
                                           max_new_tokens=self.max_new_tokens, do_sample=False,
                                           pad_token_id=pad_id)
                answers += [a.strip() for a in self.processor.batch_decode(output[:, ids.shape[1]:],
                                                                           skip_special_tokens=True)]
                bar.update(len(batch))
        return answers

    def ask_groups(self, groups: Mapping[str, torch.Tensor], question: str,
                   progress: bool | None = None) -> dict[str, list[str]]:
        """Answers per concept for images grouped by concept (one batched pass over all of them)."""
        if not groups:
            return {}
        answers = self.answer(torch.cat(list(groups.values())), question, progress)
        out, start = {}, 0
        for name, images in groups.items():
            out[name], start = answers[start:start + len(images)], start + len(images)
        return out

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

    def measure(self, images: VqaImages, forget: Sequence[str], progress: bool | None = None) -> dict:
        """Ask both questions about ``images`` and score the answers (:func:`score_vqa`), with the
        answers themselves under ``"answers"`` (identity and object answers per concept)."""
        first = next(iter({**images.identities, **images.objects}.values()))
        self.check_finite(first)
        identity_answers = self.ask_groups(images.identities, self.question, progress)
        object_answers = self.ask_groups(images.objects, self.object_question, progress)
        result = score_vqa(self.question, identity_answers, list(forget), object_answers, self.aliases)
        result["answers"] = identity_answers | object_answers
        return result

    def images(self, context: RunContext, stage: str) -> VqaImages:
        """The run's ``stage`` sets, preprocessed by the VLM's image processor (decoded once per
        stage): the concept set's images per identity, the utility set's per object."""
        key = stage
        if key not in self._images:
            self.load()
            suite = context.eval_suite(stage)
            if suite is None:
                raise ValueError(f"data.{stage} is not set: the LLaVA target asks about its concept and utility images")
            transform = ProcessorTransform(self.processor.image_processor)
            rules = context.input_rules
            sets = {"identities": suite.concepts.load(transform, f"{stage}.concepts (LLaVA)", rules)}
            if suite.utility is not None:
                sets["objects"] = suite.utility.load(transform, f"{stage}.utility (LLaVA)", rules)
            grouped = {k: group_by_concept(s.images, s.labels, s.classnames) for k, s in sets.items()}
            self._images[key] = VqaImages(grouped["identities"], grouped.get("objects", {}))
        return self._images[key]

    # -- the search and the verdict ------------------------------------------------------------
    def forget_gradient_projection(self, context: RunContext):
        """With ``protect_retained``: the projection off the main directions of what the retain
        set's images (not naming a forgotten concept) feed the encoder's linear layers; else None."""
        if not self.protect_retained:
            return None
        from slug_pl.data.mining import concept_pattern
        from slug_pl.data.shards import decode_image, iter_raw_samples
        family, clip = context.family, context.model
        names = concept_pattern(list(context.concepts))
        transform, images = family.image_transform(), []
        rules = context.input_rules
        for sample in iter_raw_samples(list(context.retain_urls()), rules):
            if len(images) >= self.protect_images:
                break
            if sample.caption is not None and names.search(sample.caption):
                continue
            images.append(transform(decode_image(sample, rules)))
        if not images:
            raise ValueError("target protect_retained is set but the retain set has no image whose caption leaves "
                             "the forgotten concepts out: point data.retain at ordinary pairs")
        pixels, device = torch.stack(images), next(clip.parameters()).device

        def encode():
            for start in range(0, len(pixels), self.batch_size):
                family.encode_image(clip, pixels[start:start + self.batch_size].to(device))

        projection = input_projection(clip, _CLIP_VISION + "encoder.", encode, None, len(images),
                                      self.protect_tolerance)
        ranks = {name: rank for name, rank in projection.describe()["rank"].items() if self.reads(name)}
        self.protection = {"images": len(images), "tolerance": self.protect_tolerance, "tensors": len(ranks),
                           "rank": ranks}  # the covered tensors the VLM reads: the candidates
        return projection

    def search_judge(self, context: RunContext, concept: str):
        if not self.search_on_vlm:
            return None
        images = self._search_images(context, concept)
        if concept not in images.identities:
            raise ValueError(f"the validation concept set has no images of {concept!r}: the LLaVA target cannot "
                             f"judge forgetting without them")
        clip_judge = None
        if self.clip_metrics:
            from slug_pl.evaluation.evaluator import Evaluator

            clip_judge = Evaluator.for_concepts(context, "validation", [concept])
        return VqaJudge(self, context.model, images, [concept], clip_judge)

    def _search_images(self, context: RunContext, concept: str) -> VqaImages:
        """The validation images one concept's search asks about: all of the concept's, the first
        ``search_images_per_concept`` of each other identity (the run's other forgotten concepts
        left out: neither forgotten nor retained here) and of each object."""
        full, cap = self.images(context, "validation"), self.search_images_per_concept
        others = [c for c in context.concepts if c != concept]
        identities = {k: v if k == concept else v[:cap] for k, v in full.identities.items() if k not in others}
        if self.search_forget_pairs:
            identities[concept] = torch.cat([identities[concept], self._forget_images(context, concept)])
        return VqaImages(identities, {k: v[:cap] for k, v in full.objects.items()})

    def _forget_images(self, context: RunContext, concept: str) -> torch.Tensor:
        """The forget set's images of ``concept``, preprocessed by the VLM's image processor."""
        from slug_pl.data.shards import decode_image, iter_raw_samples

        key = ("forget", concept)
        if key not in self._images:
            transform = ProcessorTransform(self.processor.image_processor)
            urls, rules = list(context.forget_urls(concept)), context.input_rules
            self._images[key] = torch.stack([transform(decode_image(sample, rules))
                                             for sample in iter_raw_samples(urls, rules)])
        return self._images[key]

    @property
    def reorders_candidates(self) -> bool:
        return not self.search_on_vlm

    def rank_candidates(self, context: RunContext, concept: str, edits: Sequence[LayerEdit]) -> list[int] | None:
        """With the search on the CLIP (``search_on_vlm: false``): the candidates by the VLM's
        validation answers, each edit alone: lowest ``forget_name_accuracy`` first, then the most
        ``retain_name_accuracy + object_accuracy``. None (keep the order) when the search already
        ran on the VLM."""
        if not self.reorders_candidates:
            return None
        images, clip = self._search_images(context, concept), context.model
        keys = []
        for edit in edits:
            apply_edit(clip, edit)
            try:
                self.mirror(clip, [edit.name])
                with self.threads():
                    m = self.measure(images, [concept], progress=False)
            finally:
                revert_edit(clip, edit)
                self.mirror(clip, [])
            keys.append((m["forget_name_accuracy"], -(m["retain_name_accuracy"] or 0) - (m["object_accuracy"] or 0)))
        return sorted(range(len(edits)), key=lambda i: keys[i])

    def evaluate(self, context: RunContext, edits: Sequence[LayerEdit]) -> TargetReport:
        """Name accuracy on the held-out test sets (validation when there are none), the VLM as
        loaded (before) and with ``edits`` copied in (after); the VLM holds the edits on return."""
        clip, concepts, stage = context.model, list(context.concepts), context.report_stage
        full, cap = self.images(context, stage), self.test_images_per_concept
        images = VqaImages({k: v[:cap] for k, v in full.identities.items()},
                           {k: v[:cap] for k, v in full.objects.items()})
        with self.threads():
            self.mirror(clip, [])
            before = self.measure(images, concepts)
            written = self.transplant(clip, edits)
            after = self.measure(images, concepts)
        block = {
            "question": self.question,
            "object_question": self.object_question,
            "model": self.model,
            "evaluated_on": stage,
            "images": images.counts(concepts),
            "before": {k: before[k] for k in VQA_METRICS},
            "after": {k: after[k] for k in VQA_METRICS},
            "per_concept": {name: {"kind": row["kind"], "images": row["images"], "before": row["accuracy"],
                                   "after": after["per_concept"][name]["accuracy"]}
                            for name, row in before["per_concept"].items()},
            "transplanted": written,
            "protected": self.protection,
        }
        examples = self._examples(before["answers"], after["answers"], block["per_concept"])
        block["examples"] = examples
        # the search's metrics on these images, for the verdict on fresh images (the CLIP's forget
        # top-1 with the edits, as it is, joins the VLM's answers for FORGET_BOTH)
        from slug_pl.evaluation.evaluator import Evaluator

        clip_after = Evaluator.for_concepts(context, stage, concepts).evaluate(clip)
        held_out = {k: after[k] for k in VQA_METRICS if after[k] is not None} | clip_after
        if held_out.get("forget_name_accuracy") is not None and "forget_top1" in clip_after:
            held_out[FORGET_BOTH] = max(held_out["forget_name_accuracy"], clip_after["forget_top1"])
        return TargetReport("vqa", block, self._sections(block, examples), after=held_out,
                            forget_images=block["images"]["forget"])

    def _examples(self, before: dict[str, list[str]], after: dict[str, list[str]], per_concept: dict) -> list[dict]:
        """``examples`` answers of each forgotten concept, then of the retained identity and the
        object that lost the most (before and after, same images)."""
        def worst(kind):
            rows = [(v["after"] - v["before"], k) for k, v in per_concept.items() if v["kind"] == kind]
            return [min(rows)[1]] if rows else []

        shown = [k for k, v in per_concept.items() if v["kind"] == "forget"] + worst("retain") + worst("object")
        return [{"concept": name, "kind": per_concept[name]["kind"], "before": b, "after": a}
                for name in shown for b, a in list(zip(before[name], after[name]))[:self.examples]]

    def _sections(self, block: dict, examples: list[dict]) -> list[str]:
        where = "held-out test" if block["evaluated_on"] == "test" else "validation"
        n = block["images"]
        lines = ["## LLaVA: does it still name them?", "",
                 f"`{block['model']}` with the edited tensor copied into its vision tower "
                 f"({', '.join(f'`{t}`' for t in block['transplanted'])}); greedy answers on {where} images "
                 f"({n['forget']} of the forgotten identities, {n['retain']} of others, {n['objects']} of objects). "
                 f"Question: “{block['question']}”; objects: “{block['object_question']}”. An answer counts "
                 f"when it contains the expected name (whole words, case-insensitive, aliases allowed).", ""]
        if block.get("protected"):
            p = block["protected"]
            lines += [f"The forget gradient was projected off the main directions (above {p['tolerance']:g} of the "
                      f"largest singular value) of what {p['images']} retain images feed the tower's linear layers "
                      f"(`protect_retained`; {p['tensors']} tensors the VLM reads could be edited). The retain "
                      f"images are the retain set's, not the images judged here.", ""]
        rows = []
        for key, label in zip(VQA_METRICS, ("forgotten identities", "other identities (mean per identity)",
                                             "objects")):
            b, a = block["before"][key], block["after"][key]
            change = f"{100 * (a - b):+.1f}" if a is not None and b is not None else "–"
            rows.append([label, pct(b), pct(a), change])
        lines += table(["name accuracy (%)", "before", "after", "change"], rows) + [""]
        per = block["per_concept"]
        shown = [k for k, v in per.items() if v["kind"] == "forget"]
        shown += sorted((k for k, v in per.items() if v["kind"] != "forget"),
                        key=lambda k: per[k]["after"] - per[k]["before"])[:5]
        lines += ["Per concept (the forgotten ones, then the five that lost the most):", ""]
        lines += table(["concept", "kind", "images", "before %", "after %"],
                       [[k, per[k]["kind"], per[k]["images"], pct(per[k]["before"]), pct(per[k]["after"])]
                        for k in shown]) + [""]
        if examples:
            lines += ["Example answers (same images):", ""]
            lines += table(["concept", "kind", "before", "after"],
                           [[e["concept"], e["kind"], _quote(e["before"]), _quote(e["after"])] for e in examples])
            lines += [""]
        return lines


def _quote(answer: str) -> str:
    return "“" + answer.replace("|", "\\|").replace("\n", " ") + "”"


class VqaJudge:
    """The step search's judge on the VLM: the CLIP's edits copied into its vision tower, the
    VLM asked about the validation images of one concept's search.

    ``evaluate(clip, edited)`` returns ``forget_name_accuracy``, ``retain_name_accuracy``,
    ``object_accuracy`` (fractions; :data:`VQA_METRICS`) and, with ``clip_judge``, the CLIP's own
    zero-shot metrics and :data:`FORGET_BOTH`. The tensors copied are those the CLIP differed in when the judge was made
    (earlier concepts' edits) plus ``edited``; with ``edited`` None every differing tensor is found
    anew. Images and prompts are prepared once.
    """

    def __init__(self, target: Llava, clip: nn.Module, images: VqaImages, forget: Sequence[str], clip_judge=None):
        self.target = target
        self.images = images
        self.forget = list(forget)
        self.clip_judge = clip_judge
        self._base = target.differing(clip)

    def evaluate(self, model: nn.Module, edited: str | None = None) -> dict[str, float]:
        names = self.target.differing(model) if edited is None else sorted(set(self._base) | {edited})
        self.target.mirror(model, names)
        with self.target.threads():  # no progress bars: a search makes dozens of short evaluations
            result = self.target.measure(self.images, self.forget, progress=False)
            metrics = {k: result[k] for k in VQA_METRICS if result[k] is not None}
            if self.clip_judge is not None:
                metrics |= self.clip_judge.evaluate(model, edited)
                metrics[FORGET_BOTH] = max(metrics["forget_name_accuracy"], metrics["forget_top1"])
        return metrics
