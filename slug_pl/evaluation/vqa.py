"""Evaluating a vision-language assistant (a transformers ``LlavaForConditionalGeneration`` and its
processor) before and after an edit of its CLIP vision tower: does it still name the people and
objects it is shown?

- :func:`ask`: one question about each image, answered by greedy decoding (deterministic);
- :func:`name_matches` / :func:`name_accuracy`: whether an answer names the expected concept;
- :func:`evaluate_vqa`: forget / retain name accuracy and object accuracy as one result dict.

Scoring mirrors the CLIP evaluation: forget = over all images of the forgotten identities, retain =
mean over the other identities of their per-identity accuracy, object = over all object images.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from slug_pl.data.mining import concept_pattern

DEFAULT_QUESTION = "What is the name of the person in this image?"
DEFAULT_OBJECT_QUESTION = "What object is in this image? Answer with a name."


def chat_prompt(processor, question: str) -> str:
    """The model's prompt for one user turn holding an image and ``question``, ending where the
    assistant's answer starts (the processor's chat template with ``add_generation_prompt``)."""
    if getattr(processor, "chat_template", None) is None:
        raise ValueError("the processor has no chat template: load one saved with a chat_template "
                         "(LLaVA-1.5 processors on the Hub carry one), or set processor.chat_template")
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True)


@torch.inference_mode()
def ask(model, processor, images: Sequence[Image.Image], question: str, max_new_tokens: int = 16,
        batch_size: int = 8, progress: bool = True) -> list[str]:
    """``question`` about each image; the answers (new tokens only, special tokens dropped,
    stripped), in order.

    Greedy decoding (``do_sample=False``), so answers are deterministic; prompts are padded on the
    left so that every row's answer starts right after its prompt. The model runs on its own
    device and dtype (load it in bfloat16 on a GPU, float32 on the CPU); images are cast to it.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    prompt = chat_prompt(processor, question)
    parameter = next(model.parameters())
    pad_id = processor.tokenizer.pad_token_id
    if pad_id is None:
        pad_id = processor.tokenizer.eos_token_id
    answers: list[str] = []
    with tqdm(total=len(images), desc="asking", unit="img", disable=not progress) as bar:
        for start in range(0, len(images), batch_size):
            batch = [im.convert("RGB") for im in images[start:start + batch_size]]
            inputs = processor(images=batch, text=[prompt] * len(batch), return_tensors="pt",
                               padding=True, padding_side="left")
            inputs = {k: v.to(parameter.device) for k, v in inputs.items()}
            inputs["pixel_values"] = inputs["pixel_values"].to(parameter.dtype)
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=pad_id)
            new_tokens = output[:, inputs["input_ids"].shape[1]:]
            answers += [a.strip() for a in processor.batch_decode(new_tokens, skip_special_tokens=True)]
            bar.update(len(batch))
    return answers


def name_matches(answer: str, name: str, aliases: Sequence[str] = ()) -> bool:
    """Whether ``answer`` names ``name`` or one of its ``aliases``.

    Rule (the same as forget-set mining's caption rule, :func:`slug_pl.data.mining.concept_pattern`):
    case-insensitive; a name matches only as whole words — the match may neither start nor end
    inside a word (letters, digits, underscore), and the words of a multi-word name may be
    separated by any whitespace. So "It is alice  ABARA." and "Alice Abara's" name "Alice Abara";
    "Al" does not match "Alice", nor "Alice" "Alicent"; "Alice" alone counts only when it is an
    alias.
    """
    return concept_pattern([name, *aliases]).search(answer) is not None


def name_accuracy(answers: Sequence[str], expected: str | Sequence[str],
                  aliases: Mapping[str, Sequence[str]] | None = None) -> float:
    """Fraction of ``answers`` that name their expected concept (:func:`name_matches`).

    ``expected``: one name for every answer, or a name per answer; ``aliases``: name -> other
    accepted names (e.g. ``{"Alice Abara": ["Alice"]}``).
    """
    if not answers:
        raise ValueError("name_accuracy needs at least one answer")
    names = [expected] * len(answers) if isinstance(expected, str) else list(expected)
    if len(names) != len(answers):
        raise ValueError(f"got {len(answers)} answers but {len(names)} expected names")
    aliases = aliases or {}
    hits = [name_matches(a, n, aliases.get(n, ())) for a, n in zip(answers, names)]
    return sum(hits) / len(hits)


@dataclass(frozen=True)
class VqaSets:
    """The images of a VQA evaluation.

    ``identities``: identity name -> its images (asked the identity question); ``forget``: the
    forgotten identities (keys of ``identities``; the others are retained); ``objects``: object
    name -> its images (asked the object question); ``aliases``: name -> other accepted names.
    """

    identities: Mapping[str, Sequence[Image.Image]]
    forget: Sequence[str]
    objects: Mapping[str, Sequence[Image.Image]] = field(default_factory=dict)
    aliases: Mapping[str, Sequence[str]] = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.forget, str):
            raise TypeError(f"VqaSets.forget must be a list of names, got the string {self.forget!r}")
        unknown = [n for n in self.forget if n not in self.identities]
        if unknown:
            raise ValueError(f"VqaSets.forget names {unknown}, which have no images in identities "
                             f"({list(self.identities)})")
        empty = [n for n, ims in {**self.identities, **self.objects}.items() if len(ims) == 0]
        if empty:
            raise ValueError(f"VqaSets: no images for {empty}; leave such concepts out")


def score_vqa(question: str, identity_answers: Mapping[str, Sequence[str]], forget: Sequence[str],
              object_answers: Mapping[str, Sequence[str]] | None = None,
              aliases: Mapping[str, Sequence[str]] | None = None,
              examples_per_concept: int = 1) -> dict[str, Any]:
    """The result dict of :func:`evaluate_vqa` from answers grouped by concept (see there)."""
    aliases = aliases or {}
    object_answers = object_answers or {}
    per_concept: dict[str, dict[str, Any]] = {}
    for kind_of, groups in (("identity", identity_answers), ("object", object_answers)):
        for name, answers in groups.items():
            kind = "object" if kind_of == "object" else ("forget" if name in forget else "retain")
            per_concept[name] = {"kind": kind, "images": len(answers),
                                 "accuracy": name_accuracy(answers, name, aliases)}

    def hits(kind):  # (hits, images) summed over the concepts of one kind
        rows = [v for v in per_concept.values() if v["kind"] == kind]
        return sum(v["accuracy"] * v["images"] for v in rows), sum(v["images"] for v in rows)

    forget_hits, forget_n = hits("forget")
    object_hits, object_n = hits("object")
    retain = [v["accuracy"] for v in per_concept.values() if v["kind"] == "retain"]
    return {
        "question": question,
        "forget_name_accuracy": forget_hits / forget_n if forget_n else None,
        "retain_name_accuracy": sum(retain) / len(retain) if retain else None,
        "object_accuracy": object_hits / object_n if object_n else None,
        "per_concept": per_concept,
        "examples": [(name, answer) for groups in (identity_answers, object_answers)
                     for name, answers in groups.items() for answer in list(answers)[:examples_per_concept]],
    }


def evaluate_vqa(model, processor, sets: VqaSets, question: str = DEFAULT_QUESTION,
                 object_question: str = DEFAULT_OBJECT_QUESTION, max_new_tokens: int = 16,
                 batch_size: int = 8, examples_per_concept: int = 1, progress: bool = True) -> dict[str, Any]:
    """Ask ``question`` about every identity image and ``object_question`` about every object image
    of ``sets``, and score the answers with :func:`name_matches`.

    Returns ``{"question", "forget_name_accuracy" (over all images of the forgotten identities),
    "retain_name_accuracy" (mean over the other identities of their accuracy), "object_accuracy"
    (over all object images), "per_concept": {name: {"kind": "forget" | "retain" | "object",
    "images", "accuracy"}}, "examples": [(concept, answer), …] (the first
    ``examples_per_concept`` answers of each concept)}``; accuracies are fractions in [0, 1], None
    where a group has no images.
    """
    def grouped(images_by_name: Mapping[str, Sequence[Image.Image]], asked: str) -> dict[str, list[str]]:
        names = [n for n, ims in images_by_name.items() for _ in ims]
        images = [im for ims in images_by_name.values() for im in ims]
        answers = ask(model, processor, images, asked, max_new_tokens, batch_size, progress) if images else []
        out: dict[str, list[str]] = {n: [] for n in images_by_name}
        for name, answer in zip(names, answers):
            out[name].append(answer)
        return out

    identity_answers = grouped(sets.identities, question)
    object_answers = grouped(sets.objects, object_question)
    return score_vqa(question, identity_answers, list(sets.forget), object_answers, sets.aliases,
                     examples_per_concept)
