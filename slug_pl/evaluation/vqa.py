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
from typing import Any, Protocol

import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from slug_pl.context import RunContext
from slug_pl.data.mining import concept_pattern
from slug_pl.edit import LayerEdit, apply_edit, revert_edit
from slug_pl.evaluation.evaluator import Evaluator
from slug_pl.evaluation.target_judge import TargetJudge, TargetReport
from slug_pl.markdown import pct, table
from slug_pl.retain_projection import NATURAL_TOLERANCE, ProtectedInputs, in_batches, unnamed_retain_pairs

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


def prompt_ids(processor, question: str) -> torch.Tensor:
    """The token ids ``(L,)`` of the chat prompt holding one image and ``question``, the image
    placeholder expanded to the VLM's image tokens (the same for every image of one size)."""
    size = processor.image_processor.crop_size
    probe = Image.new("RGB", (size["width"], size["height"]))
    return processor(images=[probe], text=[chat_prompt(processor, question)], return_tensors="pt")["input_ids"][0]


@torch.inference_mode()
def answer(model, processor, pixels: torch.Tensor, question: str, max_new_tokens: int = 16, batch_size: int = 8,
           progress: bool = True, prompt: torch.Tensor | None = None) -> list[str]:
    """Greedy answers to ``question`` about each image of ``pixels`` ``(N, 3, H, W)`` (the
    processor's image preprocessing applied): the new tokens only, special tokens dropped,
    stripped, in order. Every row shares one prompt (``prompt``: its ids from :func:`prompt_ids`,
    computed when not given), so no padding is needed; greedy decoding (``do_sample=False``) makes
    the answers deterministic. The model runs on its own device and dtype (load it in bfloat16 on a
    GPU, float32 on the CPU); the images are cast to it."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    parameter = next(model.parameters())
    prompt = (prompt_ids(processor, question) if prompt is None else prompt).to(parameter.device)
    tokenizer = processor.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers: list[str] = []
    with tqdm(total=len(pixels), desc="asking", unit="img", disable=not progress) as bar:
        for start in range(0, len(pixels), batch_size):
            batch = pixels[start:start + batch_size].to(parameter.device, parameter.dtype)
            ids = prompt.expand(len(batch), -1)
            output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=batch,
                                    max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id)
            answers += [a.strip() for a in processor.batch_decode(output[:, ids.shape[1]:], skip_special_tokens=True)]
            bar.update(len(batch))
    return answers


def ask(model, processor, images: Sequence[Image.Image], question: str, max_new_tokens: int = 16,
        batch_size: int = 8, progress: bool = True) -> list[str]:
    """``question`` about each PIL image: :func:`answer` on the images preprocessed by the
    processor's image processor."""
    if not images:
        return []
    pixels = processor.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
    return answer(model, processor, pixels, question, max_new_tokens, batch_size, progress)


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


# -------------------------------------------------------------------------------- the LLaVA target's judge

#: The VQA metrics a judge returns (fractions): forget over all images of the forgotten
#: identities, retain as the mean over the other identities, objects over all object images.
VQA_METRICS = ("forget_name_accuracy", "retain_name_accuracy", "object_accuracy")
#: With the CLIP's metrics: the larger of the VLM's forget name accuracy and the CLIP's forget
#: top-1, a forget target that holds only when the VLM no longer names the person *and* the CLIP no
#: longer matches the name first (the identity left the tower, not just these images' reading).
FORGET_BOTH = "forget_name_or_top1"
#: The CLIPModel prefix of the vision tower: what a VLM embeds.
CLIP_VISION_PREFIX = "vision_model."


class VlmAdapter(Protocol):
    """What a VQA judge needs of a vision-language adapter."""

    def source(self) -> str: ...

    def reads(self, clip_name: str) -> bool: ...

    def differing(self, clip: nn.Module) -> list[str]: ...

    def mirror(self, clip: nn.Module, clip_names: Sequence[str] | None = None) -> list[str]: ...

    def transplant(self, clip: nn.Module, edits: Sequence[LayerEdit]) -> list[str]: ...

    def image_transform(self): ...

    def answer(self, pixels: torch.Tensor, question: str, progress: bool | None = None) -> list[str]: ...

    def check_finite(self, pixels: torch.Tensor) -> None: ...

    def threads(self): ...

    batch_size: int  # images per call


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


class VqaJudge(TargetJudge):
    """Judges a VLM adapter (:class:`VlmAdapter`) by its answers: the step search on its name
    accuracy, the order of the found edits, the before/after report (summary block ``"vqa"``).
    Arguments as the LLaVA target's (:class:`~slug_pl.targets.Llava`)."""

    def __init__(self, adapter: "VlmAdapter", question: str = DEFAULT_QUESTION,
                 object_question: str = DEFAULT_OBJECT_QUESTION, aliases: Mapping[str, Sequence[str]] | None = None,
                 search_on_vlm: bool = True, search_images_per_concept: int | None = None, clip_metrics: bool = True,
                 test_images_per_concept: int | None = None, examples: int = 2, search_forget_pairs: bool = False):
        for key, value in (("search_images_per_concept", search_images_per_concept),
                           ("test_images_per_concept", test_images_per_concept)):
            if value is not None and value < 1:
                raise ValueError(f"target {key} must be >= 1 or null (all images), got {value}")
        self.adapter = adapter
        self.question, self.object_question = question, object_question
        self.aliases = {k: list(v) for k, v in (aliases or {}).items()}
        self.search_on_vlm = search_on_vlm
        self.search_images_per_concept = search_images_per_concept
        self.clip_metrics = clip_metrics
        self.test_images_per_concept = test_images_per_concept
        self.examples = examples
        self.search_forget_pairs = search_forget_pairs
        self._images: dict = {}  # stage or ("forget", concept) -> the VLM-preprocessed images

    def ask_groups(self, groups: Mapping[str, torch.Tensor], question: str,
                   progress: bool | None = None) -> dict[str, list[str]]:
        """Answers per concept for images grouped by concept (one batched pass over all of them)."""
        if not groups:
            return {}
        answers = self.adapter.answer(torch.cat(list(groups.values())), question, progress)
        out, start = {}, 0
        for name, images in groups.items():
            out[name], start = answers[start:start + len(images)], start + len(images)
        return out

    def measure(self, images: VqaImages, forget: Sequence[str], progress: bool | None = None) -> dict:
        """Ask both questions about ``images`` and score the answers (:func:`score_vqa`), with the
        answers themselves under ``"answers"`` (identity and object answers per concept)."""
        first = next(iter({**images.identities, **images.objects}.values()))
        self.adapter.check_finite(first)
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
            suite = context.eval_suite(stage)
            if suite is None:
                raise ValueError(f"data.{stage} is not set: the LLaVA target asks about its concept and utility images")
            transform = self.adapter.image_transform()
            rules = context.input_rules
            sets = {"identities": suite.concepts.load(transform, f"{stage}.concepts (LLaVA)", rules)}
            if suite.utility is not None:
                sets["objects"] = suite.utility.load(transform, f"{stage}.utility (LLaVA)", rules)
            grouped = {k: group_by_concept(s.images, s.labels, s.classnames) for k, s in sets.items()}
            self._images[key] = VqaImages(grouped["identities"], grouped.get("objects", {}))
        return self._images[key]

    # -- the search and the verdict ------------------------------------------------------------
    def protected_inputs(self, context: RunContext, limit: int) -> list[ProtectedInputs]:
        """What the retain projection protects: the first ``limit`` retain-set images whose
        captions name no forgotten concept, every patch, through the vision encoder's linear
        layers (in batches of the target's ``batch_size``); tolerance
        :data:`~slug_pl.retain_projection.NATURAL_TOLERANCE`."""
        family, clip = context.family, context.model
        images, _ = unnamed_retain_pairs(context, limit, family.image_transform())
        encode = in_batches(family.encode_image, clip, torch.stack(images), self.adapter.batch_size)
        return [ProtectedInputs("vision", CLIP_VISION_PREFIX + "encoder.", encode, None, len(images), "images",
                                "the retain set's images whose captions name no forgotten concept (not the images "
                                "the VLM is judged on), every patch, into the vision encoder", NATURAL_TOLERANCE)]

    def search_judge(self, context: RunContext, concept: str):
        if not self.search_on_vlm:
            return None
        images = self._search_images(context, concept)
        if concept not in images.identities:
            raise ValueError(f"the validation concept set has no images of {concept!r}: the LLaVA target cannot "
                             f"judge forgetting without them")
        clip_judge = None
        if self.clip_metrics:
            clip_judge = Evaluator.for_concepts(context, "validation", [concept])
        return VqaSearchJudge(self, context.model, images, [concept], clip_judge)

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
            transform = self.adapter.image_transform()
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
                self.adapter.mirror(clip, [edit.name])
                with self.adapter.threads():
                    m = self.measure(images, [concept], progress=False)
            finally:
                revert_edit(clip, edit)
                self.adapter.mirror(clip, [])
            keys.append((m["forget_name_accuracy"], -(m["retain_name_accuracy"] or 0) - (m["object_accuracy"] or 0)))
        return sorted(range(len(edits)), key=lambda i: keys[i])

    def evaluate(self, context: RunContext, edits: Sequence[LayerEdit]) -> TargetReport:
        """Name accuracy on the held-out test sets (validation when there are none), the VLM as
        loaded (before) and with ``edits`` copied in (after); the VLM holds the edits on return."""
        clip, concepts, stage = context.model, list(context.concepts), context.report_stage
        full, cap = self.images(context, stage), self.test_images_per_concept
        images = VqaImages({k: v[:cap] for k, v in full.identities.items()},
                           {k: v[:cap] for k, v in full.objects.items()})
        with self.adapter.threads():
            self.adapter.mirror(clip, [])
            before = self.measure(images, concepts)
            written = self.adapter.transplant(clip, edits)
            after = self.measure(images, concepts)
        block = {
            "question": self.question,
            "object_question": self.object_question,
            "model": self.adapter.source(),
            "evaluated_on": stage,
            "images": images.counts(concepts),
            "before": {k: before[k] for k in VQA_METRICS},
            "after": {k: after[k] for k in VQA_METRICS},
            "per_concept": {name: {"kind": row["kind"], "images": row["images"], "before": row["accuracy"],
                                   "after": after["per_concept"][name]["accuracy"]}
                            for name, row in before["per_concept"].items()},
            "transplanted": written,
        }
        examples = self._examples(before["answers"], after["answers"], block["per_concept"])
        block["examples"] = examples
        # the search's metrics on these images, for the verdict on fresh images (the CLIP's forget
        # top-1 with the edits, as it is, joins the VLM's answers for FORGET_BOTH)
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


class VqaSearchJudge:
    """The step search's judge on the VLM: the CLIP's edits copied into its vision tower, the
    VLM asked about the validation images of one concept's search.

    ``evaluate(clip, edited)`` returns ``forget_name_accuracy``, ``retain_name_accuracy``,
    ``object_accuracy`` (fractions; :data:`VQA_METRICS`) and, with ``clip_judge``, the CLIP's own
    zero-shot metrics and :data:`FORGET_BOTH`. The tensors copied are those the CLIP differed in when the judge was made
    (earlier concepts' edits) plus ``edited``; with ``edited`` None every differing tensor is found
    anew. Images and prompts are prepared once.
    """

    def __init__(self, judge: VqaJudge, clip: nn.Module, images: VqaImages, forget: Sequence[str], clip_judge=None):
        self.judge, self.adapter = judge, judge.adapter
        self.images = images
        self.forget = list(forget)
        self.clip_judge = clip_judge
        self._base = self.adapter.differing(clip)

    def evaluate(self, model: nn.Module, edited: str | None = None) -> dict[str, float]:
        names = self.adapter.differing(model) if edited is None else sorted(set(self._base) | {edited})
        self.adapter.mirror(model, names)
        with self.adapter.threads():  # no progress bars: a search makes dozens of short evaluations
            result = self.judge.measure(self.images, self.forget, progress=False)
            metrics = {k: result[k] for k in VQA_METRICS if result[k] is not None}
            if self.clip_judge is not None:
                metrics |= self.clip_judge.evaluate(model, edited)
                metrics[FORGET_BOTH] = max(metrics["forget_name_accuracy"], metrics["forget_top1"])
        return metrics
