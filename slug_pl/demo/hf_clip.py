"""A Hugging Face CLIP for the demo world: tokenizer, tiny config and a saved-model folder.

``transformers.CLIPModel`` folders are what Stable Diffusion (its text tower) and LLaVA (its
vision tower) are built from, so the demo trains one directly, from random initialization.
Everything here works offline:

- :func:`write_clip_tokenizer` writes a ``CLIPTokenizer`` (``vocab.json``, ``merges.txt``,
  ``tokenizer_config.json``) generated from open_clip's bundled BPE file. Its token ids equal
  open_clip's for every text, except the padding: open_clip pads with id 0 (the byte token
  ``!``), this tokenizer pads with ``<|endoftext|>`` (id 49407), like OpenAI's own Hugging Face
  release. The padding cannot change a text embedding: the text tower is causal, and the config
  of :func:`tiny_clip_config` sets ``eos_token_id = 49407``, so ``CLIPTextModel`` pools at the
  *first* ``<|endoftext|>`` (the true end of the text), which attends to nothing after it.
  (transformers keeps a legacy rule for ``eos_token_id == 2``: pool at the largest id, which is
  the first 49407 too.)
- :func:`tiny_clip_config` gives a small ``CLIPConfig``; :func:`save_clip_folder` writes a model
  with its tokenizer and ``CLIPImageProcessor`` into one ``save_pretrained`` folder, which
  ``CLIPModel`` / ``CLIPTextModel`` / ``CLIPVisionModel`` / ``CLIPTokenizer`` /
  ``CLIPImageProcessor.from_pretrained(folder)`` read back.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
from pathlib import Path

from slug_pl.atomic import write_text

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
#: id of ``<|endoftext|>``: the last of the 49408 ids (open_clip calls it ``<end_of_text>``)
EOS_TOKEN_ID = 49407
BOS_TOKEN_ID = 49406
VOCAB_SIZE = 49408
_NUM_MERGES = VOCAB_SIZE - 2 * 256 - 2  # the merges open_clip's SimpleTokenizer uses


def _bpe_vocab_and_merges() -> tuple[list[str], list[str]]:
    """Token strings in id order and merge rules ("a b") in rank order, built exactly like
    open_clip's ``SimpleTokenizer`` from its bundled ``bpe_simple_vocab_16e6.txt.gz``, with the
    special tokens under their Hugging Face names."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1 : _NUM_MERGES + 1]  # line 0 is a version header
    byte_symbols = list(bytes_to_unicode().values())
    vocab = byte_symbols + [s + "</w>" for s in byte_symbols]
    vocab += ["".join(m.split()) for m in merges]
    vocab += [BOS_TOKEN, EOS_TOKEN]
    assert len(vocab) == VOCAB_SIZE and vocab.index(EOS_TOKEN) == EOS_TOKEN_ID
    return vocab, merges


def write_clip_tokenizer(folder: str | os.PathLike, context_length: int) -> Path:
    """Write a ``CLIPTokenizer`` into ``folder`` (created if needed): ``vocab.json``,
    ``merges.txt`` and ``tokenizer_config.json`` with ``model_max_length = context_length``.

    Token ids equal open_clip's; padding is ``<|endoftext|>`` (49407) instead of open_clip's 0
    (see the module docstring). Files are written atomically and never overwrite; returns
    ``folder``.
    """
    if context_length < 3:
        raise ValueError(f"context_length must be >= 3 (start, one token, end), got {context_length}")
    folder = Path(folder)
    vocab, merges = _bpe_vocab_and_merges()
    write_text(folder / "vocab.json",
               json.dumps({token: i for i, token in enumerate(vocab)}, ensure_ascii=False))
    write_text(folder / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": context_length,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
    }
    write_text(folder / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
    return folder


def tiny_clip_config(
    hidden_size: int = 96,
    layers: int = 3,
    heads: int = 3,
    projection_dim: int = 64,
    image_size: int = 32,
    patch_size: int = 8,
    context_length: int = 16,
    mlp_ratio: int = 4,
):
    """A small ``transformers.CLIPConfig``: both towers ``hidden_size`` wide with ``layers``
    blocks of ``heads`` heads (the demo's open_clip ``slug-demo-vit`` shape by default), quick
    GELU, the full 49408-token vocabulary, ``context_length`` text positions, images of
    ``image_size`` pixels cut into ``patch_size`` patches, and the initial logit scale 1/0.07.

    The text config's special ids match :func:`write_clip_tokenizer` (pooling at the first
    ``<|endoftext|>``, see the module docstring).
    """
    from transformers import CLIPConfig

    tower = {"hidden_size": hidden_size, "intermediate_size": mlp_ratio * hidden_size,
             "num_hidden_layers": layers, "num_attention_heads": heads,
             "projection_dim": projection_dim, "hidden_act": "quick_gelu"}
    text = {**tower, "vocab_size": VOCAB_SIZE, "max_position_embeddings": context_length,
            "bos_token_id": BOS_TOKEN_ID, "eos_token_id": EOS_TOKEN_ID, "pad_token_id": EOS_TOKEN_ID}
    vision = {**tower, "image_size": image_size, "patch_size": patch_size}
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)


def clip_image_processor(image_size: int):
    """A ``CLIPImageProcessor`` for ``image_size``-pixel images: resize the shortest side
    (bicubic), center crop, rescale to [0, 1], normalize with OpenAI's CLIP mean / std (the same
    statistics open_clip uses by default)."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": image_size},
                              crop_size={"height": image_size, "width": image_size})


def save_clip_folder(model, folder: str | os.PathLike) -> Path:
    """Save a ``CLIPModel`` with its tokenizer and image processor into ``folder`` as one
    ``save_pretrained`` folder, sized from the model's config (text positions, image size).

    The folder is written beside ``folder`` under a temporary name and renamed into place, so
    it is complete or absent; an existing ``folder`` is never overwritten
    (:class:`FileExistsError`). Returns ``folder``.
    """
    folder = Path(folder)
    if folder.exists():
        raise FileExistsError(f"refusing to overwrite {folder}: choose a new folder or move it away")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        model.save_pretrained(tmp)
        write_clip_tokenizer(tmp, model.config.text_config.max_position_embeddings)
        clip_image_processor(model.config.vision_config.image_size).save_pretrained(tmp)
        os.rename(tmp, folder)  # fails if ``folder`` appeared meanwhile (a non-empty folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
