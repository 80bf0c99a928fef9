"""Writing files the way hub repositories hold them: JSON configs, safetensors weights under the
repositories' own tensor names (with their ``fp16`` variants or in shards with an index), and
the CLIP tokenizer files.

The stand-ins of :mod:`slug_pl.testing.standins` are built from these, so that a loader reads a
stand-in through the same code path as the real download:

- **tensor names.** The hub checkpoints were written by transformers 4, which nested a CLIP tower
  one level down (``text_model.embeddings...`` in a ``CLIPTextModel`` checkpoint,
  ``vision_tower.vision_model...`` and ``language_model.model...`` in LLaVA's). transformers 5
  writes the flat names and renames the old ones while loading. :func:`renamed` turns a state
  dict back into the hub's names, so the stand-ins exercise that renaming.
- **variants.** diffusers reads ``<stem>.fp16.safetensors`` when asked for
  ``variant="fp16"``; :func:`write_weights` writes it next to the full-precision file, as the
  hub repositories that have variants hold them.
- **shards.** Large checkpoints are split into ``model-0000i-of-0000n.safetensors`` with a
  ``model.safetensors.index.json`` naming the file of every tensor (:func:`write_shards`).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

#: The metadata transformers and diffusers write into every safetensors file.
SAFETENSORS_METADATA = {"format": "pt"}


def write_json(path: str | os.PathLike, record: Mapping) -> Path:
    """Write ``record`` as indented JSON to ``path`` (parent folders created); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return path


def write_safetensors(state: Mapping[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Save ``state`` (moved to the CPU, made contiguous) as a safetensors file at ``path``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({name: t.detach().cpu().contiguous() for name, t in state.items()}, str(path),
              metadata=SAFETENSORS_METADATA)
    return path


def half(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Floating-point tensors in float16, others unchanged (what an ``fp16`` variant holds)."""
    return {name: t.half() if t.is_floating_point() else t for name, t in state.items()}


def write_weights(state: Mapping[str, torch.Tensor], folder: str | os.PathLike, stem: str,
                  fp16_variant: bool = False) -> list[Path]:
    """``<folder>/<stem>.safetensors`` and, with ``fp16_variant``, ``<stem>.fp16.safetensors``
    (``stem``: ``model`` for a transformers component, ``diffusion_pytorch_model`` for a
    diffusers one). Returns the files written."""
    folder = Path(folder)
    files = [write_safetensors(state, folder / f"{stem}.safetensors")]
    if fp16_variant:
        files.append(write_safetensors(half(state), folder / f"{stem}.fp16.safetensors"))
    return files


def shard_name(index: int, count: int) -> str:
    """The transformers shard file name: ``model-00001-of-00003.safetensors``."""
    return f"model-{index:05d}-of-{count:05d}.safetensors"


def write_shards(state: Mapping[str, torch.Tensor], folder: str | os.PathLike, count: int) -> Path:
    """Split ``state`` into ``count`` shards (consecutive runs of its tensors, in order) with a
    ``model.safetensors.index.json`` naming each tensor's shard and the total byte size, as
    ``save_pretrained`` writes a checkpoint above its shard size. Returns the index file."""
    names = list(state)
    if not 1 <= count <= len(names):
        raise ValueError(f"cannot split {len(names)} tensors into {count} shards")
    folder = Path(folder)
    weight_map: dict[str, str] = {}
    for i in range(count):
        part = names[i * len(names) // count:(i + 1) * len(names) // count]
        file = shard_name(i + 1, count)
        write_safetensors({name: state[name] for name in part}, folder / file)
        weight_map |= {name: file for name in part}
    total = sum(t.numel() * t.element_size() for t in state.values())
    return write_json(folder / "model.safetensors.index.json",
                      {"metadata": {"total_size": total}, "weight_map": weight_map})


def renamed(state: Mapping[str, torch.Tensor], rules: Sequence[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """``state`` under other names: each name takes the first rule ``(prefix, replacement)``
    whose ``prefix`` starts it (``""`` matches every name); names no rule matches are kept."""
    out = {}
    for name, tensor in state.items():
        for prefix, replacement in rules:
            if name.startswith(prefix):
                name = replacement + name[len(prefix):]
                break
        out[name] = tensor
    return out


# ------------------------------------------------------------------------------ CLIP tokenizer


#: What the CLIP repositories' ``special_tokens_map.json`` name, but the padding token.
_CLIP_SPECIAL = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}


@functools.lru_cache(maxsize=1)
def _clip_tokenizer_source() -> Path:
    """A folder (made once per process) with the CLIP tokenizer's ``vocab.json``,
    ``merges.txt`` and ``tokenizer.json``: open_clip's BPE under OpenAI's Hugging Face names
    (:func:`slug_pl.demo.hf_clip.write_clip_tokenizer`)."""
    from transformers import CLIPTokenizer

    from slug_pl.demo.hf_clip import write_clip_tokenizer

    folder = Path(tempfile.mkdtemp(prefix="slug-clip-tokenizer-"))
    write_clip_tokenizer(folder, 77)
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    (folder / "tokenizer.json").write_text(tokenizer.backend_tokenizer.to_str(), encoding="utf-8")
    return folder


def write_clip_tokenizer_files(folder: str | os.PathLike, pad_token: str = "<|endoftext|>",
                               tokenizer_json: bool = True, model_max_length: int = 77) -> Path:
    """The tokenizer files of a CLIP repository in ``folder``: ``vocab.json``, ``merges.txt``,
    ``special_tokens_map.json``, ``tokenizer_config.json`` and, with ``tokenizer_json``,
    ``tokenizer.json`` (the model repositories hold it; the pipelines' ``tokenizer/`` folders do
    not). ``pad_token``: OpenAI's ``<|endoftext|>``, or ``!`` in the OpenCLIP-derived tokenizers
    of Stable Diffusion 2.x and SDXL's ``tokenizer_2`` (open_clip pads with id 0, the ``!``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    source = _clip_tokenizer_source()
    for name in ("vocab.json", "merges.txt") + (("tokenizer.json",) if tokenizer_json else ()):
        shutil.copyfile(source / name, folder / name)
    special = {**_CLIP_SPECIAL, "pad_token": pad_token}
    write_json(folder / "special_tokens_map.json", special)
    write_json(folder / "tokenizer_config.json",
               {"tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length,
                "do_lower_case": True, "errors": "replace", "add_prefix_space": False, **special})
    return folder
