"""A small LLaVA for the demo world: the world-trained Hugging Face CLIP's vision tower, a tiny
Llama-style language model and LLaVA's projector, trained to name the person (or the object) in
an image. Everything works offline and on a CPU.

The model is a stock ``transformers.LlavaForConditionalGeneration`` with the LLaVA-1.5 settings
(features read at ``vision_feature_layer = -2``, the class token dropped), saved with its
``LlavaProcessor`` (a byte-level BPE tokenizer trained here on the world's names and the
questions, the CLIP's image processor and a LLaVA-1.5-style chat template) into one
``save_pretrained`` folder that ``from_pretrained`` reads back:

- :func:`demo_tokenizer`, :func:`build_llava`: the untrained model, its vision tower copied from a
  ``CLIPModel`` folder (so the CLIP and the VLM form a SLUG pair);
- :func:`train_llava`: the projector and the language model learn to answer
  :data:`~slug_pl.evaluation.vqa.DEFAULT_QUESTION` with the person's name and
  :data:`~slug_pl.evaluation.vqa.DEFAULT_OBJECT_QUESTION` with the object's name on the world's corpus
  images, the vision tower frozen; the folder is scored on the held-out test images;
- :func:`ensure_llava`: the world, its CLIP (:func:`~slug_pl.demo.hf_clip.ensure_hf_clip`) and the
  LLaVA at ``root/llava``, cached by the world's and the CLIP's fingerprints and the settings.
"""

from __future__ import annotations

import inspect
import json
import os
import time
from pathlib import Path

import torch

from slug_pl.atomic import rebuilt_folder, write_text
from slug_pl.demo.hf_clip import METRICS_FILE, _cached_metrics, _say, _sha256, ensure_hf_clip
from slug_pl.demo.training import one_thread, train_epochs, warmup_cosine
from slug_pl.demo.world import WorldSpec, identity_names, object_names, spec_record

#: A LLaVA-1.5-style conversation: ``USER: <image>\n{question}\nASSISTANT: {answer}</s>``.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{{ '\\n' }}"
    "{% else %}ASSISTANT: "
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "</s>{{ '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
SPECIAL_TOKENS = ("<s>", "</s>", "<pad>", "<image>")
#: Bump when the model, the tokenizer or the training changes: invalidates cached folders.
BUILD_VERSION = 1


def demo_tokenizer(names: list[str], objects: list[str], questions: list[str], vocab_size: int = 600):
    """A byte-level BPE tokenizer trained in memory on the chat template's words, ``questions``,
    the identity ``names`` and the ``objects`` (so that a name is a few tokens); see
    :func:`bpe_tokenizer`."""
    text = ["USER: ASSISTANT:", *questions, *(f"{n}. {n}" for n in names), *(f"the {o}. {o}" for o in objects)]
    return bpe_tokenizer(text, vocab_size)


def bpe_tokenizer(text: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained in memory on ``text`` (the ``tokenizers`` library):
    special tokens :data:`SPECIAL_TOKENS`, ``<s>`` prepended to every input, left padding (for
    generation)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(text, trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", backend.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", padding_side="left")


def build_llava(clip_folder: str | os.PathLike, tokenizer, hidden_size: int = 128, layers: int = 2,
                heads: int = 4, intermediate_size: int = 512, vision_feature_layer: int = -2,
                vision_feature_select_strategy: str = "default", seed: int = 0):
    """An untrained ``LlavaForConditionalGeneration`` and its ``LlavaProcessor``.

    Vision tower: the ``CLIPModel`` at ``clip_folder`` (its vision tower's weights, bit for bit),
    read at ``vision_feature_layer`` (LLaVA-1.5: −2) with the ``vision_feature_select_strategy``
    (LLaVA-1.5: ``"default"``, the class token dropped). Projector: LLaVA's
    two-layer MLP (GELU). Language model: a Llama of ``layers`` blocks, ``hidden_size`` wide.
    Image processor: the CLIP folder's. Returns ``(model, processor)``.
    """
    from transformers import (CLIPImageProcessor, CLIPModel, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    clip = CLIPModel.from_pretrained(clip_folder, dtype=torch.float32)
    vision = clip.config.vision_config
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=vision_feature_layer,
                         vision_feature_select_strategy=vision_feature_select_strategy)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(clip.vision_model.state_dict())
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    processor = LlavaProcessor(image_processor=CLIPImageProcessor.from_pretrained(clip_folder), tokenizer=tokenizer,
                               patch_size=vision.patch_size,
                               vision_feature_select_strategy=vision_feature_select_strategy,
                               num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
    return model.eval(), processor


# ================================================================================================
# training on the demo world
# ================================================================================================

def world_images(shards: list[str]) -> list[tuple[str, str, object]]:
    """``(kind, name, PIL image)`` of every sample of the world's ``shards`` ("identity" or
    "object", from each sample's json), in shard order."""
    from slug_pl.data.shards import decode_image, expand_urls, iter_raw_samples

    out = []
    for sample in iter_raw_samples(expand_urls(shards)):
        meta = json.loads(sample.fields["json"])
        out.append((meta["kind"], meta["name"], decode_image(sample)))
    return out


def _examples(processor, samples, questions: dict[str, str]) -> tuple[torch.Tensor, list[torch.Tensor], list[int]]:
    """Pixel values ``(N, 3, H, W)``, token ids of prompt + answer + ``</s>`` per sample, and the
    prompt length per sample (the loss covers the answer and the end token only)."""
    from slug_pl.evaluation.vqa import chat_prompt

    tokenizer = processor.tokenizer
    prompts = {}
    for kind, question in questions.items():  # one prompt per kind: its ids are the same for every image
        probe = processor(images=[samples[0][2]], text=[chat_prompt(processor, question)], return_tensors="pt")
        prompts[kind] = probe["input_ids"][0]
    pixels = processor.image_processor(images=[image for _, _, image in samples], return_tensors="pt")["pixel_values"]
    ids, prompt_lengths = [], []
    for kind, name, _ in samples:
        answer = tokenizer(" " + name, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids.append(torch.cat([prompts[kind], torch.tensor(answer)]))
        prompt_lengths.append(len(prompts[kind]))
    return pixels, ids, prompt_lengths


def _batch(ids: list[torch.Tensor], prompt_lengths: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on prompt and padding)."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    labels = torch.full((len(ids), width), -100)
    for row, (x, p) in enumerate(zip(ids, prompt_lengths)):
        input_ids[row, :len(x)], mask[row, :len(x)] = x, 1
        labels[row, p:len(x)] = x[p:]
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def evaluate_llava(world_root: str | os.PathLike, folder: str | os.PathLike, split: str = "test",
                   max_new_tokens: int = 8) -> dict:
    """Name accuracy (fractions) of the LLaVA at ``folder`` on the world's ``split`` images:
    ``identities_name_accuracy`` (every identity image, the naming question) and
    ``objects_name_accuracy`` (every object image, the object question), greedy answers scored by
    :func:`slug_pl.evaluation.vqa.name_accuracy`."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from slug_pl.evaluation.vqa import ask, name_accuracy
    from slug_pl.evaluation.vqa import DEFAULT_OBJECT_QUESTION as OBJECT_QUESTION, DEFAULT_QUESTION as QUESTION

    root = Path(world_root)
    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(folder)
    out = {}
    for what, question in (("identities", QUESTION), ("objects", OBJECT_QUESTION)):
        samples = world_images(sorted(str(p) for p in (root / split).glob(f"{what}-*.tar")))
        answers = ask(model, processor, [im for _, _, im in samples], question, max_new_tokens, batch_size=64,
                      progress=False)
        out[f"{what}_name_accuracy"] = name_accuracy(answers, [name for _, name, _ in samples])
    return out


def train_llava(
    world_root: str | os.PathLike,
    clip_folder: str | os.PathLike,
    out_folder: str | os.PathLike,
    hidden_size: int = 128,
    layers: int = 2,
    heads: int = 4,
    intermediate_size: int = 512,
    vocab_size: int = 600,
    vision_feature_layer: int = -2,
    vision_feature_select_strategy: str = "default",
    epochs: int = 6,
    batch_size: int = 64,
    lr: float = 2e-3,
    weight_decay: float = 0.01,
    warmup_fraction: float = 0.05,
    seed: int = 0,
) -> dict:
    """Build (:func:`build_llava`) and train a small LLaVA on the world's corpus images and save
    it with its processor to ``out_folder`` (``save_pretrained``). Returns the metrics: held-out
    name accuracy on the test identities and objects (:func:`evaluate_llava`), times (s), the
    final loss and the sizes.

    Every corpus image is one example: an identity image asks :data:`~slug_pl.evaluation.vqa.DEFAULT_QUESTION`
    and answers the person's name, an object image asks
    :data:`~slug_pl.evaluation.vqa.DEFAULT_OBJECT_QUESTION` and answers the object's name; the loss is the
    cross-entropy of the answer tokens and ``</s>``. The vision tower stays frozen (it must remain
    the CLIP's); the projector and the language model train with AdamW, linear warmup over
    ``warmup_fraction`` of the steps, then cosine decay to 0. One CPU thread (restored afterwards).
    """
    from slug_pl.evaluation.vqa import DEFAULT_OBJECT_QUESTION as OBJECT_QUESTION, DEFAULT_QUESTION as QUESTION

    world_root = Path(world_root)
    spec = WorldSpec(**json.loads((world_root / "world.json").read_text())["spec"])
    with one_thread():
        t0 = time.perf_counter()
        tokenizer = demo_tokenizer(identity_names(spec), object_names(spec), [QUESTION, OBJECT_QUESTION], vocab_size)
        model, processor = build_llava(clip_folder, tokenizer, hidden_size, layers, heads, intermediate_size,
                                       vision_feature_layer, vision_feature_select_strategy, seed)
        samples = world_images(sorted(str(p) for p in (world_root / "corpus").glob("corpus-*.tar")))
        pixels, ids, prompt_lengths = _examples(processor, samples, {"identity": QUESTION, "object": OBJECT_QUESTION})
        n = len(samples)
        load_seconds = time.perf_counter() - t0
        steps_per_epoch = n // batch_size
        if steps_per_epoch < 1:
            raise ValueError(f"batch_size {batch_size} is larger than the corpus ({n} images)")
        total = steps_per_epoch * epochs
        warmup = max(1, round(warmup_fraction * total))
        _say(f"demo LLaVA: {n} training images; {total} steps of batch {batch_size}")

        model.model.vision_tower.requires_grad_(False)
        trained = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
        schedule = warmup_cosine(optimizer, total, warmup)
        gen = torch.Generator().manual_seed(seed)

        def loss_of(idx, _):
            idx = idx.tolist()
            batch = _batch([ids[i] for i in idx], [prompt_lengths[i] for i in idx], tokenizer.pad_token_id)
            return model(pixel_values=pixels[idx], **batch).loss

        def report(epoch, loss):
            _say(f"demo LLaVA: epoch {epoch + 1}/{epochs} loss {loss:.4f} ({time.perf_counter() - t1:.0f}s)")

        model.train()
        t1 = time.perf_counter()
        final_loss = train_epochs(loss_of, optimizer, schedule, n=n, batch_size=batch_size, epochs=epochs, gen=gen,
                                  report=report)
        train_seconds = time.perf_counter() - t1
        model.eval()
        out_folder = Path(out_folder)
        model.save_pretrained(out_folder)
        processor.save_pretrained(out_folder)
        t2 = time.perf_counter()
        metrics = evaluate_llava(world_root, out_folder, split="test")
        eval_seconds = time.perf_counter() - t2
    metrics.update({
        "train_seconds": round(train_seconds, 2),
        "load_seconds": round(load_seconds, 2),
        "eval_seconds": round(eval_seconds, 2),
        "steps": total,
        "n_images": n,
        "final_loss": final_loss,
        "vocab_size": len(tokenizer),
        "trained_parameters": sum(p.numel() for p in trained),
    })
    _say("demo LLaVA: held-out name accuracy identities {identities_name_accuracy:.3f} objects "
         "{objects_name_accuracy:.3f} after {train_seconds:.0f}s of training".format(**metrics))
    return metrics


def _resolved_train_kwargs(train_kwargs: dict | None) -> dict:
    skip = {"world_root", "clip_folder", "out_folder"}
    defaults = {k: p.default for k, p in inspect.signature(train_llava).parameters.items()
                if k not in skip and p.default is not inspect.Parameter.empty}
    unknown = set(train_kwargs or {}) - set(defaults)
    if unknown:
        raise TypeError(f"unknown LLaVA train_kwargs {sorted(unknown)}; allowed: {sorted(defaults)}")
    return {**defaults, **(train_kwargs or {})}


def ensure_llava(root: str | os.PathLike, spec: WorldSpec = WorldSpec(),  # noqa: B008 (frozen)
                 clip_train_kwargs: dict | None = None, train_kwargs: dict | None = None) -> dict:
    """Build (or reuse) the demo world, its Hugging Face CLIP (``root/hf_clip``, see
    :func:`~slug_pl.demo.hf_clip.ensure_hf_clip`) and a LLaVA trained on it at ``root/llava``, a
    ``save_pretrained`` folder (model + processor) whose vision tower is that CLIP's.

    Training is skipped when the folder was made from the same world and CLIP (fingerprints),
    settings (``train_kwargs``: see :func:`train_llava`), transformers version and
    :data:`BUILD_VERSION`. A new model is trained into a temporary folder and renamed into place
    (a stale one is replaced only then), so the folder is always complete.

    Returns ``{"path": folder, "metrics": {...}, "hf_clip": the CLIP's folder, "world":
    build_world's dict}``; ``metrics`` holds ``identities_name_accuracy`` and
    ``objects_name_accuracy`` (held-out test images, fractions), ``train_seconds`` and ``cache_key``.
    """
    from importlib.metadata import version

    root = Path(root).expanduser().resolve()
    kwargs = _resolved_train_kwargs(train_kwargs)
    clip = ensure_hf_clip(root, spec, clip_train_kwargs)
    folder = root / "llava"
    cache_key = {"world_fingerprint": clip["world"]["fingerprint"], "clip_fingerprint": clip["fingerprint"],
                 "spec": spec_record(spec), "train_kwargs": kwargs, "transformers": version("transformers"),
                 "build_version": BUILD_VERSION}
    metrics = _cached_metrics(folder, cache_key)
    if metrics is not None:
        _say(f"demo LLaVA: reusing {folder}")
    else:
        with rebuilt_folder(folder) as build:
            metrics = train_llava(clip["world"]["root"], clip["path"], build.path, **kwargs)
            metrics |= {"cache_key": cache_key, "fingerprint": _sha256(build.path / "model.safetensors")}
            write_text(build.path / METRICS_FILE, json.dumps(metrics, indent=1, sort_keys=True) + "\n")
    return {"path": str(folder), "metrics": metrics, "hf_clip": clip["path"], "world": clip["world"]}
