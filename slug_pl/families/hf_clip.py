"""Hugging Face CLIP family: a ``transformers.CLIPModel`` from the hub or a local folder.

``model_name`` is a hub id (``"openai/clip-vit-large-patch14"``, with ``revision`` and
``cache_dir`` passed to ``from_pretrained``) or a local ``save_pretrained`` folder holding the
model (``config.json`` + weights), its tokenizer and its ``CLIPImageProcessor``
(``preprocessor_config.json``). Parameter names are the model's own (``text_model.encoder.
layers.3.mlp.fc1.weight``), the names a ``CLIPTextModel`` (Stable Diffusion's text encoder) or
a ``CLIPVisionModel`` (LLaVA's vision tower) loaded from the same folder shares, minus their
``text_model.`` / ``vision_model.`` prefix.

The towers, as ``CLIPModel`` computes them (transformers 5):

- vision: patch + class embeddings + positions -> ``pre_layrnorm`` -> encoder layers ->
  ``post_layernorm`` of the class token -> ``visual_projection``;
- text: token + position embeddings -> causal encoder layers -> ``final_layer_norm`` -> the
  hidden state at the first ``eos_token_id`` (or, for legacy configs with ``eos_token_id == 2``,
  at the largest token id) -> ``text_projection``.

The edited model is saved as a ``save_pretrained`` folder (:meth:`HfClip.save_edited`):
``CLIPModel.from_pretrained`` and ``CLIPProcessor.from_pretrained`` load it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from fnmatch import fnmatch
from pathlib import Path

import torch
from open_clip.transform import image_transform as open_clip_image_transform
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer, PretrainedConfig
from transformers.masking_utils import create_causal_mask

from slug_pl.atomic import atomic_folder
from slug_pl.families.base import DEFAULT_EXCLUDE, ModelFamily, Tower, TowerStages, optional_text

#: The shared defaults plus Hugging Face's names of the position embeddings and of the ViT patch
#: embedding (a convolution that plays the role of the text tower's token embedding).
HF_CLIP_EXCLUDE = DEFAULT_EXCLUDE + (r"embeddings\.position_embedding", r"embeddings\.patch_embedding")

#: The files of a CLIP folder that transformers reads (model, tokenizer, image processor): the
#: saved edited model keeps only these, so that no weights file of another library (open_clip's,
#: TensorFlow's, Flax's) is left in it holding the unedited tensor.
HF_CLIP_FILES = ("config.json", "model*.safetensors", "model*.safetensors.index.json", "vocab.json",
                 "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "added_tokens.json", "preprocessor_config.json", "processor_config.json")

_VISION_ROOTS = ("vision_model.", "visual_projection.")
_TEXT_ROOTS = ("text_model.", "text_projection.")


class ProcessorTransform:
    """PIL image -> ``(3, H, W)`` float tensor through a ``CLIPImageProcessor`` (resize the
    shortest side, center crop, rescale to [0, 1], normalize), exactly as the processor computes
    ``pixel_values``. A class rather than a closure so data-loader workers can pickle it."""

    def __init__(self, processor: CLIPImageProcessor):
        self.processor = processor

    def __call__(self, image) -> torch.Tensor:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]


class HfClip(ModelFamily):
    """``transformers.CLIPModel`` (OpenAI CLIP checkpoints on the hub, or a local folder)."""

    family_name = "hf_clip"

    def __init__(
        self,
        model_name: str = "openai/clip-vit-base-patch32",
        revision: str | None = None,
        cache_dir: str | None = None,
        exclude: Sequence[str] = HF_CLIP_EXCLUDE,
        include: Sequence[str] = (),
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
    ):
        """
        Args:
            model_name: a hub id (e.g. ``"openai/clip-vit-large-patch14"``) or a local
                ``save_pretrained`` folder with the model, tokenizer and image processor.
            revision: hub branch, tag or commit (None: the default branch).
            cache_dir: where Hugging Face caches downloads (None: its default).
            exclude / include: rankable-tensor filter (see :class:`ModelFamily`).
            image_mean / image_std: normalization statistics, one per RGB channel; None: the
                folder's image processor's.
        """
        super().__init__(exclude=exclude, include=include, image_mean=image_mean, image_std=image_std)
        self.model_name = model_name
        self.revision = optional_text(revision)
        self.cache_dir = optional_text(cache_dir)
        self._config_dict: dict | None = None
        self._tokenizer: CLIPTokenizer | None = None
        self._processor: CLIPImageProcessor | None = None

    # -- loading -------------------------------------------------------------------------------
    def _source(self) -> str:
        """The local folder (expanded) when ``model_name`` names one, else the hub id."""
        local = Path(self.model_name).expanduser()
        if local.is_dir():
            return str(local)
        if _looks_like_path(self.model_name):
            raise FileNotFoundError(
                f"CLIP model folder not found: {local}. Give an existing save_pretrained folder (model, "
                f"tokenizer, CLIPImageProcessor) or a hub id such as 'openai/clip-vit-base-patch32'"
            )
        return self.model_name

    def _from_pretrained(self, load: Callable, what: str, **kwargs):
        """``load(source, revision=, cache_dir=, **kwargs)``, with one-line errors naming the source."""
        source = self._source()
        try:
            return load(source, revision=self.revision, cache_dir=self.cache_dir, **kwargs)
        except OSError as err:
            if Path(source).is_dir():
                raise FileNotFoundError(
                    f"{source} has no readable {what}: give a save_pretrained folder of a CLIPModel with its "
                    f"tokenizer and CLIPImageProcessor ({str(err).splitlines()[0]})"
                ) from err
            raise FileNotFoundError(
                f"cannot load the {what} of {source!r}: not a local folder, and not a hub model that is "
                f"cached{'' if _offline() else ' or reachable'} ({str(err).splitlines()[0]})"
            ) from err

    def _config(self) -> dict:
        """The folder's ``config.json`` as a dict, checked to describe a full ``CLIPModel`` (so that
        ``from_pretrained`` never silently re-initializes another model's weights)."""
        if self._config_dict is None:
            config, _ = self._from_pretrained(PretrainedConfig.get_config_dict, "model config (config.json)")
            model_type = config.get("model_type")
            if model_type is None:
                raise FileNotFoundError(
                    f"{self.model_name} has no model config (config.json): give the save_pretrained folder "
                    f"of a CLIPModel"
                )
            if model_type != "clip":
                raise ValueError(
                    f"{self.model_name} holds a {model_type!r} model, not a CLIPModel (model_type 'clip'): "
                    f"give the folder of the full CLIP model (both towers), as CLIPModel.save_pretrained "
                    f"writes it"
                )
            self._config_dict = config
        return self._config_dict

    def load(self) -> nn.Module:
        self._config()
        model = self._from_pretrained(CLIPModel.from_pretrained, "model weights", dtype=torch.float32)
        return model.eval()

    def describe(self) -> dict[str, object]:
        return {
            "family": self.family_name,
            "model_name": self.model_name,
            "revision": str(self.revision),
            **self.image_normalization(),
        }

    def save_edited(self, model: nn.Module, edits, folder: str | os.PathLike) -> Path:
        """The ``save_pretrained`` folder of the edited model, which ``CLIPModel.from_pretrained``
        and ``CLIPProcessor.from_pretrained`` load: the base's folder (a hub id's cached snapshot)
        copied with only the edited tensors rewritten, each in its file's dtype
        (:func:`~slug_pl.targets.saved_copy.save_edited_copy`; a base without safetensors is saved
        as loaded instead), keeping only :data:`HF_CLIP_FILES`. An image processor given other
        ``image_mean`` / ``image_std`` is saved with them, as the run used it."""
        from slug_pl.targets.saved_copy import TensorChange, save_edited_copy

        changes = {e.name: TensorChange(e.original, e.edited) for e in edits}

        def save_running(tmp: Path) -> None:
            model.save_pretrained(tmp)
            self._get_tokenizer().save_pretrained(tmp)

        with atomic_folder(folder) as tmp:
            copy = save_edited_copy(self._folder(), tmp / "copy", changes, save_running)
            for path in copy.iterdir():
                if path.is_file() and any(fnmatch(path.name, pattern) for pattern in HF_CLIP_FILES):
                    path.rename(tmp / path.name)
            shutil.rmtree(copy)
            if self.image_mean is not None or self.image_std is not None:
                self._image_processor().save_pretrained(tmp)
        return Path(folder)

    def _folder(self) -> Path:
        """The local folder the model loads from (for a hub id, its snapshot in the cache)."""
        source = self._source()
        if Path(source).is_dir():
            return Path(source)
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, revision=self.revision, cache_dir=self.cache_dir, local_files_only=True))

    # -- inputs --------------------------------------------------------------------------------
    def context_length(self) -> int:
        """The text tower's number of positions (``max_position_embeddings``)."""
        return int(self._config()["text_config"].get("max_position_embeddings", 77))

    def _get_tokenizer(self) -> CLIPTokenizer:
        if self._tokenizer is None:
            tokenizer = self._from_pretrained(CLIPTokenizer.from_pretrained, "tokenizer")
            vocab_size = self._config()["text_config"].get("vocab_size", 49408)
            # a folder without tokenizer files loads as an empty 2-token tokenizer, without error
            if not 256 < len(tokenizer) <= vocab_size:
                raise FileNotFoundError(
                    f"{self.model_name} has no usable tokenizer ({len(tokenizer)} tokens for a text tower "
                    f"of {vocab_size}): save the model's CLIPTokenizer into the folder (vocab.json + "
                    f"merges.txt, or tokenizer.json)"
                )
            self._tokenizer = tokenizer
        return self._tokenizer

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids ``(len(texts), context_length)``, long: start token, text, end token, then the
        tokenizer's pad token (truncation keeps the end token)."""
        return self._get_tokenizer()(list(texts), padding="max_length", truncation=True,
                                     max_length=self.context_length(), return_tensors="pt")["input_ids"]

    def _image_processor(self) -> CLIPImageProcessor:
        if self._processor is None:
            overrides = {k: v for k, v in (("image_mean", self.image_mean), ("image_std", self.image_std))
                         if v is not None}
            self._processor = self._from_pretrained(
                CLIPImageProcessor.from_pretrained, "image processor (preprocessor_config.json)", **overrides)
        return self._processor

    def image_transform(self) -> Callable:
        """The folder's ``CLIPImageProcessor`` (with ``image_mean`` / ``image_std`` if given), as a
        PIL -> ``(3, H, W)`` callable."""
        return ProcessorTransform(self._image_processor())

    def train_image_transform(self) -> Callable:
        """open_clip's training transform (random resized crop, scale 0.9–1, bicubic) at the
        processor's crop size, normalized with its statistics."""
        crop = self._image_processor().crop_size
        norm = self.image_normalization()
        return open_clip_image_transform((crop["height"], crop["width"]), is_train=True, mean=norm["image_mean"],
                                         std=norm["image_std"])

    def image_normalization(self) -> dict[str, list[float]]:
        processor = self._image_processor()
        return {"image_mean": [float(v) for v in processor.image_mean],
                "image_std": [float(v) for v in processor.image_std]}

    # -- forward -------------------------------------------------------------------------------
    def encode_image(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        if _recompute_here(model):
            return self._stages(model, "vision", checkpointed=True).run(images)
        return model.get_image_features(pixel_values=images).pooler_output

    def encode_text(self, model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        if _recompute_here(model):
            return self._stages(model, "text", checkpointed=True).run(tokens)
        return model.get_text_features(input_ids=tokens).pooler_output

    def logit_scale(self, model: nn.Module) -> torch.Tensor:
        return model.logit_scale.exp()

    # -- structure -----------------------------------------------------------------------------
    def tower_of(self, name: str) -> Tower | None:
        if name.startswith(_VISION_ROOTS):
            return "vision"
        if name.startswith(_TEXT_ROOTS):
            return "text"
        return None  # logit_scale

    def tower_stages(self, model: nn.Module, tower: Tower) -> TowerStages:
        """The tower split at its encoder layers, computing exactly what ``CLIPModel`` computes
        (see the module docstring): stage 0 ends after ``pre_layrnorm`` (vision) or the embeddings
        (text); text layers run with the causal mask; the head pools and projects."""
        return self._stages(model, tower, checkpointed=False)

    def enable_activation_checkpointing(self, model: nn.Module) -> None:
        """Recompute each encoder layer's activations in backward.

        transformers' own switch (``activation_checkpointing_enable``) acts only in training mode
        (``GradientCheckpointingLayer`` checks ``self.training``), and the gradient pass runs in
        eval mode. So this sets transformers' switch (which then acts in training mode) and, in
        eval mode with gradients on, :meth:`encode_image` / :meth:`encode_text` run the tower
        stage by stage with every layer under ``torch.utils.checkpoint`` (``use_reentrant=False``).
        """
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:  # transformers releases before the switch's rename (5.17 has only the old name)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def _stages(self, model: nn.Module, tower: Tower, checkpointed: bool) -> TowerStages:
        run_layer = _checkpointed_layer if checkpointed else _plain_layer
        if tower == "vision":
            vision = model.vision_model
            return TowerStages(
                embed=lambda pixels: vision.pre_layrnorm(vision.embeddings(pixels)),
                blocks=[(lambda x, layer=layer: run_layer(layer, x, None)) for layer in vision.encoder.layers],
                head=lambda x, _: model.visual_projection(vision.post_layernorm(x[:, 0, :])),
                first_block=_first_block("vision_model.", len(vision.encoder.layers),
                                         embed_roots=("vision_model.embeddings.", "vision_model.pre_layrnorm.")),
            )
        text = model.text_model

        def causal_block(x, layer):
            # (config, inputs_embeds, attention_mask, no cache): positional, as the cache argument's
            # name changed between transformers 5 releases (past_key_values in 5.17, cache later)
            mask = create_causal_mask(text.config, x, None, None)
            return run_layer(layer, x, mask, is_causal=True)

        def head(x, tokens):
            pooled = text.final_layer_norm(x)[torch.arange(x.shape[0], device=x.device), _eos_positions(text, tokens)]
            return model.text_projection(pooled)

        return TowerStages(
            embed=lambda tokens: text.embeddings(input_ids=tokens),
            blocks=[(lambda x, layer=layer: causal_block(x, layer)) for layer in text.encoder.layers],
            head=head,
            first_block=_first_block("text_model.", len(text.encoder.layers), embed_roots=("text_model.embeddings.",)),
        )


def _eos_positions(text_model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Per row, the position ``CLIPTextModel`` pools at: the first ``eos_token_id``, or (legacy
    configs with ``eos_token_id == 2``) the largest token id."""
    ids = tokens.int()
    if text_model.eos_token_id == 2:
        return ids.argmax(dim=-1)
    return (ids == text_model.eos_token_id).int().argmax(dim=-1)


def _first_block(tower_prefix: str, n: int, embed_roots: tuple[str, ...]) -> Callable[[str], int]:
    layers = tower_prefix + "encoder.layers."

    def first_block(name: str) -> int:
        if name.startswith(layers):
            return int(name[len(layers):].split(".", 1)[0])
        if name.startswith(embed_roots):
            return 0
        return n  # head: final / post layer norm, projection

    return first_block


def _plain_layer(layer: nn.Module, x: torch.Tensor, mask, **kwargs) -> torch.Tensor:
    return layer(x, mask, **kwargs)


def _checkpointed_layer(layer: nn.Module, x: torch.Tensor, mask, **kwargs) -> torch.Tensor:
    return checkpoint(layer, x, mask, use_reentrant=False, **kwargs)


def _recompute_here(model: nn.Module) -> bool:
    """Whether this family must checkpoint the layers itself: checkpointing is on, gradients are
    being recorded, and the model is in eval mode (where transformers does not checkpoint)."""
    switch = getattr(model, "is_activation_checkpointing", None)
    if switch is None:  # transformers releases before the rename (5.17): the old name
        switch = model.is_gradient_checkpointing
    return switch and not model.training and torch.is_grad_enabled()


def _looks_like_path(name: str) -> bool:
    """A hub id is ``name`` or ``namespace/name``; anything else is meant as a folder."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}
