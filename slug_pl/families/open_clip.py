"""open_clip family: any open_clip model name with a pretrained tag, a local checkpoint or a saved
model directory.

Weights sources (``pretrained``), all through open_clip's own loaders:

- a pretrained tag, e.g. ``model_name="ViT-B-32-quickgelu", pretrained="laion400m_e32"``
  (downloads through open_clip on a machine with network access);
- a local checkpoint file, ``pretrained="path/to/model.safetensors"`` (or ``.pt`` / ``.bin``);
- ``None``: random initialization (tests, benchmarks).

A saved model directory (``config.json`` / ``open_clip_config.json`` plus weights, as written by
``open_clip.push_to_hf_hub`` / ``save_pretrained`` style tools) is loaded with
``model_name="local-dir:path/to/dir"``. Model configs shipped with slug_pl
(``slug_pl/model_configs/*.json``) and any ``model_config`` JSON a user names are registered with
open_clip before loading, exactly like open_clip's own ``model_configs``.

The edited model is saved as such a folder (:meth:`OpenClip.save_edited`): ``open_clip_config.json``
and ``open_clip_model.safetensors``, loaded with ``model_name="local-dir:<folder>"``, or, for a
built-in model name, with ``pretrained="<folder>/open_clip_model.safetensors"``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from collections.abc import Callable, Sequence
from pathlib import Path

import open_clip
import torch
from open_clip.transformer import text_global_pool
from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict
from torch import nn
from safetensors.torch import save_file
from torchvision.transforms import Normalize

from slug_pl.atomic import atomic_folder, write_text
from slug_pl.families.base import DEFAULT_EXCLUDE, ModelFamily, Tower, TowerStages, optional_text
from slug_pl.safety import read_descriptor

SHIPPED_CONFIGS = Path(__file__).resolve().parent.parent / "model_configs"

# Text-tower parameter names of open_clip's CLIP class (CustomTextCLIP prefixes them with "text.").
_TEXT_ROOTS = ("transformer.", "token_embedding", "positional_embedding", "ln_final.",
               "text_projection", "text.")

#: The files of a saved open_clip model folder (what ``local-dir:`` reads).
OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS = "open_clip_config.json", "open_clip_model.safetensors"
LOCAL_DIR = "local-dir:"

#: open_clip's default ranking filter: the shared defaults plus the ViT patch embedding (a
#: convolution that plays the role of the text tower's token embedding).
OPEN_CLIP_EXCLUDE = DEFAULT_EXCLUDE + (r"^visual\.conv1\.",)


def register_model_configs(path: str | os.PathLike | None = None) -> None:
    """Register slug_pl's shipped model configs, and ``path`` (a JSON file or a folder of them)."""
    open_clip.add_model_config(SHIPPED_CONFIGS)
    if path is not None:
        path = Path(path).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"model config not found: {path}. Give an open_clip model config JSON file or a "
                f"folder of them (see slug_pl/model_configs/ for the format)"
            )
        open_clip.add_model_config(path)


class OpenClip(ModelFamily):
    """open_clip CLIP / CustomTextCLIP models."""

    family_name = "open_clip"

    def __init__(
        self,
        model_name: str = "ViT-B-32-quickgelu",
        pretrained: str | None = None,
        model_config: str | None = None,
        cache_dir: str | None = None,
        exclude: Sequence[str] = OPEN_CLIP_EXCLUDE,
        include: Sequence[str] = (),
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
    ):
        """
        Args:
            model_name: an open_clip model name (``open_clip.list_models()``), a name from a
                registered ``model_config``, or ``local-dir:<folder>``.
            pretrained: a pretrained tag of that model, a local checkpoint path, or None
                (random init).
            model_config: optional JSON file or folder of open_clip model configs to register.
            cache_dir: where open_clip caches downloaded weights.
            exclude / include: rankable-tensor filter (see :class:`ModelFamily`).
            image_mean / image_std: normalization statistics, one per RGB channel; None: the
                model's own (its saved folder's or pretrained tag's preprocess config, else
                open_clip's default, OpenAI's CLIP statistics).
        """
        super().__init__(exclude=exclude, include=include, image_mean=image_mean, image_std=image_std)
        self.model_name = model_name
        self.pretrained = optional_text(pretrained)
        self.model_config = optional_text(model_config)
        self.cache_dir = optional_text(cache_dir)
        register_model_configs(model_config)
        self._tokenizer = None
        self._transform = None
        self._train_transform = None

    def _is_local_file(self) -> bool:
        suffixes = {".pt", ".bin", ".safetensors", ".pth"}
        return self.pretrained is not None and (os.sep in self.pretrained or Path(self.pretrained).suffix in suffixes)

    def load(self) -> nn.Module:
        register_model_configs(self.model_config)  # again: a spawned DDP process starts without them
        if self._is_local_file() and not Path(self.pretrained).expanduser().is_file():
            raise FileNotFoundError(
                f"checkpoint not found: {self.pretrained}. Give an existing .pt/.safetensors file, "
                f"an open_clip pretrained tag (open_clip.list_pretrained()), or null for random init"
            )
        pretrained = str(Path(self.pretrained).expanduser()) if self._is_local_file() else self.pretrained
        model, self._train_transform, preprocess = open_clip.create_model_and_transforms(
            self.model_name, pretrained=pretrained, cache_dir=self.cache_dir,
            image_mean=self.image_mean, image_std=self.image_std,
        )
        self._transform = preprocess
        return model.eval()

    def describe(self) -> dict[str, object]:
        return {
            "family": self.family_name,
            "model_name": self.model_name,
            "pretrained": str(self.pretrained),
            **self.image_normalization(),
        }

    def save_edited(self, model: nn.Module, edits, folder: str | os.PathLike) -> Path:
        """The folder open_clip loads as ``local-dir:<folder>``: ``open_clip_config.json`` (the
        base's model and preprocessing config: a ``local-dir:`` base's own file, else the
        registered model config with the preprocessing this family uses) and
        ``open_clip_model.safetensors`` (the edited model's state dict, as open_clip holds it).
        With a built-in model name the weights file also loads as ``pretrained=``. (A base whose
        text tower reads a Hugging Face tokenizer from its folder keeps it there: the saved folder
        holds no tokenizer files.)"""
        config = self._open_clip_config()
        with atomic_folder(folder) as tmp:
            write_text(tmp / OPEN_CLIP_CONFIG, json.dumps(config, indent=2) + "\n")
            save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                      str(tmp / OPEN_CLIP_WEIGHTS), metadata={"format": "pt"})
        return Path(folder)

    def _open_clip_config(self) -> dict:
        """``{"model_cfg": ..., "preprocess_cfg": ...}`` of the base model, as ``local-dir:`` reads it."""
        if self.model_name.startswith(LOCAL_DIR):
            folder = Path(self.model_name.removeprefix(LOCAL_DIR)).expanduser()
            return read_descriptor(folder / OPEN_CLIP_CONFIG, "open_clip config")
        register_model_configs(self.model_config)
        return {"model_cfg": open_clip.get_model_config(self.model_name),
                "preprocess_cfg": asdict(self._preprocess_cfg())}

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        if self._tokenizer is None:
            register_model_configs(self.model_config)  # a spawned process (a data-loader worker) starts without them
            self._tokenizer = open_clip.get_tokenizer(self.model_name)
        return self._tokenizer(list(texts))

    def image_transform(self) -> Callable:
        """The evaluation preprocessing open_clip would build for this model and weights: the
        model config's ``preprocess_cfg``, overridden by the pretrained tag's mean / std /
        interpolation / resize mode and by ``image_mean`` / ``image_std`` if given, at the tower's
        image size (no weights are loaded)."""
        if self._transform is None:
            if self.model_name.startswith(LOCAL_DIR):
                self.load()  # the folder's own config decides; loading sets the transform
                return self._transform
            self._transform = image_transform_v2(self._preprocess_cfg(), is_train=False)
        return self._transform

    def train_image_transform(self) -> Callable:
        """open_clip's training preprocessing for this model (``is_train=True``, default
        augmentation: random resized crop, scale 0.9–1), what the authors' retain batches use."""
        if self.model_name.startswith(LOCAL_DIR):
            if self._train_transform is None:
                self.load()  # the folder's own config decides; loading sets the transform
            return self._train_transform
        return image_transform_v2(self._preprocess_cfg(), is_train=True)

    def _preprocess_cfg(self) -> PreprocessCfg:
        register_model_configs(self.model_config)
        model_cfg = open_clip.get_model_config(self.model_name)
        if model_cfg is None:
            raise ValueError(
                f"unknown open_clip model {self.model_name!r}: pick one of open_clip.list_models() "
                f"or register a config JSON with model_config"
            )
        cfg = merge_preprocess_dict(asdict(PreprocessCfg()), model_cfg.get("preprocess_cfg", {}))
        if self.pretrained and not self._is_local_file():
            cfg = merge_preprocess_dict(cfg, open_clip.get_pretrained_cfg(self.model_name, self.pretrained))
        cfg["size"] = model_cfg["vision_cfg"].get("image_size", cfg["size"])
        cfg.update({k: v for k, v in (("mean", self.image_mean), ("std", self.image_std)) if v is not None})
        return PreprocessCfg(**cfg)

    def image_normalization(self) -> dict[str, list[float]]:
        normalize = next(t for t in self.image_transform().transforms if isinstance(t, Normalize))
        return {"image_mean": [float(v) for v in normalize.mean], "image_std": [float(v) for v in normalize.std]}

    def encode_image(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return model.encode_image(images)

    def encode_text(self, model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        return model.encode_text(tokens)

    def logit_scale(self, model: nn.Module) -> torch.Tensor:
        return model.logit_scale.exp()

    def enable_activation_checkpointing(self, model: nn.Module) -> None:
        model.set_grad_checkpointing(True)

    def tower_stages(self, model: nn.Module, tower: Tower) -> TowerStages | None:
        """Stages of open_clip's ``CLIP`` towers (ViT image tower, built-in text transformer);
        None for other architectures (ResNet towers, ``CustomTextCLIP``)."""
        if tower == "vision":
            visual = getattr(model, "visual", None)
            if type(visual).__name__ != "VisionTransformer":
                return None
            return _transformer_stages(
                visual.transformer,
                embed=visual._embeds,
                head=lambda x, _: _project(visual._pool(x)[0], visual.proj),
                prefix="visual.transformer.resblocks.",
                embed_roots=("visual.conv1", "visual.class_embedding", "visual.positional_embedding",
                             "visual.ln_pre", "visual.patch_dropout"),
            )
        if not hasattr(model, "token_embedding") or not hasattr(model, "transformer"):
            return None

        def embed(tokens):
            cast = model.transformer.get_cast_dtype()
            return model.token_embedding(tokens).to(cast) + model.positional_embedding.to(cast)

        def head(x, tokens):
            x = text_global_pool(model.ln_final(x), tokens, model.text_pool_type,
                                 eos_token_id=getattr(model, "text_eos_id", None))
            if isinstance(model.text_projection, nn.Linear):
                return model.text_projection(x)
            return _project(x, model.text_projection)

        return _transformer_stages(model.transformer, embed=embed, head=head, prefix="transformer.resblocks.",
                                   embed_roots=("token_embedding", "positional_embedding"),
                                   attn_mask=model.attn_mask)

    def tower_of(self, name: str) -> Tower | None:
        if name.startswith("visual."):
            return "vision"
        if name.startswith(_TEXT_ROOTS):
            return "text"
        return None


def _project(x: torch.Tensor, proj) -> torch.Tensor:
    return x if proj is None else x @ proj


def _transformer_stages(transformer, embed, head, prefix: str, embed_roots: tuple[str, ...],
                        attn_mask=None) -> TowerStages:
    """Stages over an open_clip ``Transformer``, converting to its (batch-first or not) layout."""
    to_blocks = (lambda x: x) if transformer.batch_first else (lambda x: x.transpose(0, 1).contiguous())
    from_blocks = (lambda x: x) if transformer.batch_first else (lambda x: x.transpose(0, 1))
    n = len(transformer.resblocks)

    def first_block(name: str) -> int:
        if name.startswith(prefix):
            return int(name[len(prefix):].split(".", 1)[0])
        if name.startswith(embed_roots):
            return 0
        return n  # head: final norm, pooling, projection

    blocks = [
        (lambda x, blk=blk: blk(x, attn_mask=attn_mask)) for blk in transformer.resblocks
    ]
    return TowerStages(
        embed=lambda inputs: to_blocks(embed(inputs)),
        blocks=blocks,
        head=lambda x, inputs: head(from_blocks(x), inputs),
        first_block=first_block,
    )
