"""The judge of a text-to-image target (Stable Diffusion 1.x/2.x, SDXL): is the concept gone from
the images the pipeline draws, and do the other concepts still come out?

It works through an image adapter (:class:`ImageAdapter`: the pipeline with the CLIP's edit
transplanted, drawing prompts with seeds) and never touches a pipeline itself, so every
text-to-image adapter reuses it.

**The search.** ``search_on: clip`` (default) searches each candidate's step on the CLIP's
zero-shot metrics, as in the method; then each candidate layer's found edit is drawn on a small
prompt / seed set (:meth:`GenerationJudge.rank_candidates`) and the final choice is the candidate
with the best recognition of the retained concepts among those whose forget recognition is at
most ``forget_threshold`` (:func:`order_by_generation`). ``search_on: generation`` searches the step
on those generations themselves (:class:`GenerationSearchJudge`).

**Several judges.** Recognition is judged by the unedited CLIP zero-shot and/or classifier
checkpoints. The concept is removed only when *every* judge recognizes it at most
``forget_threshold`` of the time, and retain recognition is the judges' mean
(:func:`combine_judges`): a judge that still sees the concept is never outvoted.

**The verdict.** :meth:`GenerationJudge.evaluate` draws every forget and retain prompt with
held-out seeds before and after the edit and reports how often each judge recognizes the concept,
the CLIP score, and a before/after image grid (summary block ``"generation"``).

**What the retain projection protects** (the method's ``model.protect_retained``,
:mod:`slug_pl.retain_projection`): the retained concepts' prompts (the report's retain prompts),
through the text tower at every position the UNet reads (:meth:`GenerationJudge.protected_inputs`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from slug_pl.context import RunContext
from slug_pl.edit import LayerEdit, apply_edit, revert_edit, reverted
from slug_pl.evaluation.generation import (
    ClassifierJudge,
    ClipZeroShotJudge,
    PromptSet,
    image_grid,
    score_generation,
)
from slug_pl.evaluation.metrics import ZeroShotAccuracy, concept_summary
from slug_pl.evaluation.zeroshot import class_embeddings, image_embeddings
from slug_pl.markdown import pct, table
from slug_pl.retain_projection import ProtectedInputs, prompt_inputs
from slug_pl.evaluation.target_judge import TargetJudge, TargetReport

#: The CLIPModel prefix of the text tower: what a text-to-image pipeline embeds.
CLIP_TEXT_PREFIX = "text_model."


class ImageAdapter(Protocol):
    """What a generation judge needs of a text-to-image adapter."""

    #: The pipeline's kind in report headings ("Stable Diffusion", "Stable Diffusion XL").
    title: str

    def source(self) -> str: ...

    def downstream_name(self, clip_name: str) -> str | None: ...

    def mirror(self, clip: nn.Module, clip_names: Sequence[str] | None = None) -> list[str]: ...

    def draw(self, prompts: Sequence[str], seeds: Sequence[int], output_type: str = "pil"): ...

    def settings(self) -> dict: ...


# ----------------------------------------------------------------------------- the final choice


@dataclass
class CandidateScore:
    """A candidate edit judged on generations (recognition fractions; CLIP score 0–100)."""

    layer: str
    step: float
    forget_recognition: float
    retain_recognition: float | None
    clip_score: float

    def removes(self, threshold: float) -> bool:
        return self.forget_recognition <= threshold


def order_by_generation(scores: Sequence[CandidateScore], threshold: float) -> list[int] | None:
    """Best first: the candidates that remove the concept from generations (forget recognition
    <= ``threshold``) by retain recognition, then CLIP score, highest first; then the others in
    their given (CLIP-side) order. None when no candidate removes it (keep the CLIP-side order)."""
    removing = [i for i, s in enumerate(scores) if s.removes(threshold)]
    if not removing:
        return None
    removing.sort(key=lambda i: (-(scores[i].retain_recognition or 0.0), -scores[i].clip_score, i))
    return removing + [i for i in range(len(scores)) if i not in removing]


# ----------------------------------------------------------------------------- several judges


class FrozenClipJudge:
    """Zero-shot judge with class embeddings fixed at construction (the CLIP as it is then,
    unedited) and image embeddings from the CLIP as it is when called: exact for a CLIP whose
    edits touch only the text tower, which is all a text-to-image target reads."""

    def __init__(self, family, clip: nn.Module, classnames: Sequence[str], templates: Sequence[str]):
        self.family, self.clip = family, clip
        self.name = f"clip-zeroshot:{family.describe().get('model_name')}"
        self.classnames = list(classnames)
        self.classes = class_embeddings(family, clip, self.classnames, list(templates))

    @torch.no_grad()
    def logits(self, images: Sequence, classnames: Sequence[str]) -> torch.Tensor:
        columns = [self.classnames.index(c) for c in classnames]
        batch = torch.stack([self.family.image_transform()(im) for im in images])
        return (image_embeddings(self.family, self.clip, batch) @ self.classes[columns].T).cpu()


def judge_label(spec: str) -> str:
    """A judge's short name in metric names: ``clip``, or a classifier checkpoint's folder name."""
    return "clip" if spec == "clip" else Path(spec).name


def combine_judges(per_judge: dict[str, dict[str, float]]) -> dict[str, float]:
    """Several judges' metrics as one verdict: ``forget_*`` the **highest** over the judges (the
    concept counts as removed only when every judge misses it), ``retain_*`` the **mean** (what an
    edit keeps, as every judge sees it); each judge's own values follow as ``metric[judge]``."""
    keys = list(next(iter(per_judge.values())))
    out = {}
    for k in keys:
        values = [m[k] for m in per_judge.values() if k in m]
        out[k] = max(values) if k.startswith("forget_") else sum(values) / len(values)
    if len(per_judge) > 1:
        out |= {f"{k}[{name}]": v for name, m in per_judge.items() for k, v in m.items()}
    return out


class GenerationSearchJudge:
    """The step search's judge with ``search_on: generation``: each evaluation transplants the
    CLIP's current text tower into the pipeline, draws the candidate-scoring prompt sets
    (search seeds) and scores them with **every** configured judge like zero-shot accuracy:
    ``forget_top1/5`` over the concept's images, ``retain_top1/5`` the mean over the other
    concepts (fractions), combined over the judges by :func:`combine_judges` (forget: the
    highest, retain: the mean; each judge's own as ``metric[judge]``)."""

    def __init__(self, judge: "GenerationJudge", context: RunContext, concept: str):
        self.judge = judge
        self.sets = judge.prompt_sets(context, [concept], search=True)
        self.classnames, templates = judge.concept_set(context)
        family, clip = context.family, context.model
        live = judge.judges(family, clip, templates)
        # the CLIP judge must stay the unedited CLIP while the search edits its text tower
        self.judges = {judge_label(spec): (FrozenClipJudge(family, clip, self.classnames, templates)
                                           if spec == "clip" else judge_)
                       for spec, judge_ in zip(judge.judge_specs, live)}

    def evaluate(self, model: nn.Module, edited: str | None = None) -> dict[str, float]:
        self.judge.adapter.mirror(model)
        per_judge: dict[str, dict[str, float]] = {name: {} for name in self.judges}
        for prompt_set, images in zip(self.sets, self.judge.draw(self.sets)):
            labels = torch.tensor([self.classnames.index(i.concept) for i in prompt_set.items()])
            forget_ids = [self.classnames.index(c) for c in prompt_set.forget]
            for name, judge in self.judges.items():
                metric = ZeroShotAccuracy(len(self.classnames))
                metric.update(judge.logits(images, self.classnames), labels)
                per_judge[name] |= concept_summary(metric.compute(), forget_ids)
        return combine_judges(per_judge)


# ----------------------------------------------------------------------------- the judge


class GenerationJudge(TargetJudge):
    """Judges a text-to-image adapter by the images it draws (module docstring)."""

    def __init__(
        self,
        adapter: ImageAdapter,
        forget_templates: Sequence[str] | None = None,
        retain_templates: Sequence[str] | None = None,
        retain_concepts: Sequence[str] | int | None = None,
        seeds: Sequence[int] = (1000, 1001, 1002, 1003),
        search_seeds: Sequence[int] = (100, 101),
        search_templates: int = 1,
        search_retain_concepts: int | None = None,
        judges: Sequence[str] = ("clip",),
        forget_threshold: float = 0.1,
        search_on: str = "clip",
        grid_seeds: int = 4,
    ):
        """Arguments as the target's of the same names (:class:`~slug_pl.targets.StableDiffusion`)."""
        if not 0.0 <= forget_threshold <= 1.0:
            raise ValueError(f"target forget_threshold is a fraction in [0, 1], got {forget_threshold}")
        if search_on not in ("clip", "generation"):
            raise ValueError(f"target search_on must be 'clip' or 'generation', got {search_on!r}")
        if not judges:
            raise ValueError("target judges is empty: give 'clip' and/or classifier checkpoint folders")
        for name, value in (("search_templates", search_templates), ("grid_seeds", grid_seeds)):
            if isinstance(value, bool) or value < 1:
                raise ValueError(f"target {name} must be a positive integer, got {value!r}")
        self.adapter = adapter
        self.forget_templates = list(forget_templates) if forget_templates else None
        self.retain_templates = list(retain_templates) if retain_templates else None
        self.retain_concepts = retain_concepts
        self.seeds, self.search_seeds = tuple(seeds), tuple(search_seeds)
        self.search_templates, self.search_retain_concepts = search_templates, search_retain_concepts
        self.judge_specs = list(judges)
        self.forget_threshold = forget_threshold
        self.search_on = search_on
        self.grid_seeds = grid_seeds
        self._judges: dict[str, object] = {}
        #: concept -> every candidate's scores on generations (filled by rank_candidates)
        self.candidate_scores: dict[str, list[CandidateScore]] = {}

    # -- what is drawn and who judges it -------------------------------------------------------
    @staticmethod
    def concept_set(context: RunContext) -> tuple[list[str], list[str]]:
        """The class names judges choose among and their zero-shot templates (the run's
        validation concept set)."""
        concept_set = context.eval_sets("validation")["concepts"]
        return list(concept_set.classnames), list(concept_set.templates)

    def prompt_sets(self, context: RunContext, forget: Sequence[str], search: bool = False) -> list[PromptSet]:
        """The forget prompt set and the retain prompt set (one each; retain may be absent).

        ``search``: the search's sets (``search_seeds``; every forget template, the first
        ``search_templates`` retain templates and the first ``search_retain_concepts`` retained
        concepts); else the report's.
        """
        classnames, templates = self.concept_set(context)
        unknown = [c for c in forget if c not in classnames]
        if unknown:
            raise ValueError(f"the concepts {unknown} are not in the concept set's class list; the judges "
                             f"choose among {classnames[:5]}...")
        others = [c for c in classnames if c not in forget]
        if isinstance(self.retain_concepts, int) and not isinstance(self.retain_concepts, bool):
            retain = others[: self.retain_concepts]
        elif self.retain_concepts is None:
            retain = others
        else:
            retain = list(self.retain_concepts)
            bad = [c for c in retain if c not in others]
            if bad:
                raise ValueError(f"target retain_concepts {bad} are forgotten or not in the concept set's class list")
        forget_templates = self.forget_templates or templates
        retain_templates = self.retain_templates or forget_templates
        seeds = self.seeds
        if search:  # the forgotten concepts' prompts are few: all of them, so that no phrasing is missed
            retain_templates = retain_templates[: self.search_templates]
            retain = retain[: self.search_retain_concepts] if self.search_retain_concepts is not None else retain
            seeds = self.search_seeds
        sets = [PromptSet(list(forget), list(forget), forget_templates, seeds, classnames)]
        if retain:
            sets.append(PromptSet(retain, [], retain_templates, seeds, classnames))
        return sets

    def draw(self, sets: Sequence[PromptSet]) -> list[list]:
        """The images of each prompt set, in its order (the adapter as it is now)."""
        out = []
        for s in sets:
            items = s.items()
            out.append(self.adapter.draw([i.prompt for i in items], [i.seed for i in items]))
        return out

    def judges(self, family, clip: nn.Module, templates: Sequence[str]) -> list:
        """The configured judges (the CLIP one judges with ``clip`` as it is when called)."""
        out = []
        for spec in self.judge_specs:
            if spec == "clip":
                out.append(ClipZeroShotJudge(family, clip, templates))
            else:
                if spec not in self._judges:
                    self._judges[spec] = ClassifierJudge.load(spec, device=next(clip.parameters()).device)
                out.append(self._judges[spec])
        return out

    @staticmethod
    def score(images: Sequence[list], sets: Sequence[PromptSet], judge, family, clip: nn.Module) -> dict:
        """Scores of drawn prompt sets (forget set first, then the retain set if any):
        ``forget_recognition``, ``retain_recognition`` (fractions, see
        :func:`~slug_pl.evaluation.generation.recognition`), ``clip_score`` (0–100, mean over
        every image), ``forget_clip_score`` / ``retain_clip_score`` (over each set's images), and
        ``per_concept``."""
        results = [score_generation(im, s, judge, family, clip) for im, s in zip(images, sets)]
        counts = [len(im) for im in images]
        retain = results[1] if len(results) > 1 else {}
        return {
            "forget_recognition": results[0]["forget_recognition"],
            "retain_recognition": retain.get("retain_recognition"),
            "clip_score": sum(r["clip_score"] * n for r, n in zip(results, counts)) / sum(counts),
            "forget_clip_score": results[0]["clip_score"],
            "retain_clip_score": retain.get("clip_score"),
            "per_concept": {c: v for r in results for c, v in r["per_concept"].items()},
        }

    # -- the search ----------------------------------------------------------------------------
    def protected_inputs(self, context: RunContext, limit: int) -> list[ProtectedInputs]:
        """What the retain projection protects: the retained concepts' prompts (the report's
        retain prompts, ``retain_concepts`` × ``retain_templates``, concept by concept; the first
        ``limit``) through the text tower at every position (the UNet reads every position's
        state)."""
        retained = [s for s in self.prompt_sets(context, list(context.concepts)) if not s.forget]
        prompts = [(c, p) for s in retained for c in s.concepts for p in s.prompts(c)][:limit]
        if not prompts:
            raise ValueError("model.protect_retained is set but there is no retained concept to protect: the concept "
                             "set holds only the forgotten concepts")
        concepts = list(dict.fromkeys(c for c, _ in prompts))
        return [prompt_inputs(context, [p for _, p in prompts], CLIP_TEXT_PREFIX,
                              f"the prompts of {len(concepts)} retained concepts (the retain prompts the generation "
                              f"section judges: their recognition is kept by construction; concepts outside the "
                              f"concept set are not protected), every position the UNet reads", concepts)]

    def search_judge(self, context: RunContext, concept: str):
        """With ``search_on: generation``, a :class:`GenerationSearchJudge` of ``concept``; else
        None (the search runs on the CLIP's zero-shot metrics)."""
        if self.search_on != "generation":
            return None
        return GenerationSearchJudge(self, context, concept)

    @property
    def reorders_candidates(self) -> bool:
        return self.search_on != "generation"

    def rank_candidates(self, context: RunContext, concept: str, edits: Sequence[LayerEdit]) -> list[int] | None:
        """Draw the candidate-scoring prompt sets with each edit transplanted alone; order by
        :func:`order_by_generation` (judged with the CLIP unedited by every judge, combined as
        :func:`combine_judges` does: forget the highest, retain the mean). None with
        ``search_on: generation``: the search itself chose by these generations."""
        if not self.reorders_candidates:
            return None
        family, clip = context.family, context.model
        sets = self.prompt_sets(context, [concept], search=True)
        drawn = []
        for edit in edits:
            apply_edit(clip, edit)
            try:
                self.adapter.mirror(clip)
                drawn.append(self.draw(sets))
            finally:
                revert_edit(clip, edit)
                self.adapter.mirror(clip)
        judges = self.judges(family, clip, self.concept_set(context)[1])
        scores = []
        for edit, images in zip(edits, drawn):
            judged = [self.score(images, sets, judge, family, clip) for judge in judges]
            retain = [s["retain_recognition"] for s in judged if s["retain_recognition"] is not None]
            scores.append(CandidateScore(edit.name, edit.step, max(s["forget_recognition"] for s in judged),
                                         sum(retain) / len(retain) if retain else None, judged[0]["clip_score"]))
        self.candidate_scores[concept] = scores
        return order_by_generation(scores, self.forget_threshold)

    # -- the verdict ---------------------------------------------------------------------------
    def evaluate(self, context: RunContext, edits: Sequence[LayerEdit]) -> TargetReport:
        """Every forget and retain prompt with the held-out ``seeds``, before (edits reverted) and
        after; judged and CLIP-scored with the unedited CLIP. The pipeline carries the edits on
        return."""
        family, clip = context.family, context.model
        sets = self.prompt_sets(context, list(context.concepts))
        self.adapter.mirror(clip)  # the edits, as the CLIP carries them (already there after transplant)
        after = self.draw(sets)
        with reverted(clip, edits):
            self.adapter.mirror(clip)
            before = self.draw(sets)
            templates = self.concept_set(context)[1]
            judged = {}
            for judge in self.judges(family, clip, templates):
                judged[judge.name] = {"before": self.score(before, sets, judge, family, clip),
                                      "after": self.score(after, sets, judge, family, clip)}
        self.adapter.mirror(clip)
        return self.report(sets, judged, before, after, [self.adapter.downstream_name(e.name) for e in edits])

    def report(self, sets: Sequence[PromptSet], judged: dict, before: list, after: list,
               transplanted: list[str]) -> TargetReport:
        """The ``"generation"`` block, report sections and grid from the drawn and judged images;
        the concept counts as removed only when every judge recognizes it at most
        ``forget_threshold`` of the time."""
        keys = ("forget_recognition", "retain_recognition", "clip_score", "forget_clip_score", "retain_clip_score")
        primary = next(iter(judged))
        b, a = judged[primary]["before"], judged[primary]["after"]
        met = all(r["after"]["forget_recognition"] <= self.forget_threshold for r in judged.values())
        per_concept = {c: {"forget": v["forget"], "images": v["images"],
                           "recognition_before": v["recognition"],
                           "recognition_after": a["per_concept"][c]["recognition"],
                           "clip_score_before": v["clip_score"], "clip_score_after": a["per_concept"][c]["clip_score"]}
                       for c, v in b["per_concept"].items()}
        block = {
            "judge": primary,
            "prompts": sum(len(s.concepts) * len(s.templates) for s in sets),
            "seeds": list(self.seeds),
            "before": {k: b[k] for k in keys},
            "after": {k: a[k] for k in keys},
            "target": {"rule": f"forget_recognition <= {self.forget_threshold:g} under every judge", "met": met},
            "judges": {name: {"before": {k: r["before"][k] for k in keys[:2]},
                              "after": {k: r["after"][k] for k in keys[:2]},
                              "per_concept": {c: {"before": v["recognition"],
                                                  "after": r["after"]["per_concept"][c]["recognition"]}
                                              for c, v in r["before"]["per_concept"].items()}}
                       for name, r in judged.items()},
            "per_concept": per_concept,
            "pipeline": self.adapter.source(),
            "transplanted": transplanted,
            "settings": {**self.adapter.settings(), "search_on": self.search_on,
                         "search_seeds": list(self.search_seeds), "forget_threshold": self.forget_threshold},
            "candidates": {c: [vars(s) | {"removes": s.removes(self.forget_threshold)} for s in scores]
                           for c, scores in self.candidate_scores.items()},
        }
        held_out, forget_images = {}, None
        if self.search_on == "generation":  # the search judged generations: so does the held-out verdict
            held_out = combine_judges({name: {"forget_top1": r["after"]["forget_recognition"],
                                              "retain_top1": r["after"]["retain_recognition"]}
                                       for name, r in judged.items()})
            forget_images = sum(v["images"] for v in b["per_concept"].values() if v["forget"])
        return TargetReport("generation", block, self.sections(block), [self.grid(sets, before, after)],
                            after=held_out, forget_images=forget_images)

    def grid(self, sets: Sequence[PromptSet], before: list, after: list) -> tuple[str, str, object]:
        """Forget rows then retain rows: each concept's first prompt with the first ``grid_seeds``
        held-out seeds, before | after."""
        rows_before, rows_after, labels = [], [], []
        for s, b, a in zip(sets, before, after):
            per_concept = len(s.templates) * len(s.seeds)
            take = min(self.grid_seeds, len(s.seeds))
            for k, concept in enumerate(s.concepts):
                rows_before.append(b[k * per_concept: k * per_concept + take])
                rows_after.append(a[k * per_concept: k * per_concept + take])
                labels.append(f"{'forget' if concept in s.forget else 'retain'}: {concept}")
        grid = image_grid(rows_before, rows_after, labels, forget_rows=len(sets[0].concepts))
        return ("Generations before | after the edit (forget rows first; held-out seeds)", "generation_grid.png", grid)

    def sections(self, block: dict) -> list[str]:
        g = block["settings"]
        rows = []
        for name, r in block["judges"].items():
            for k in ("forget_recognition", "retain_recognition"):
                bv, av = r["before"][k], r["after"][k]
                rows.append([f"{k.replace('_', ' ')} ({name})", pct(bv), pct(av),
                             f"{100 * (av - bv):+.1f}" if bv is not None and av is not None else "–"])
        for key, what in (("forget_clip_score", "forget prompts"), ("retain_clip_score", "retain prompts"),
                          ("clip_score", "all prompts")):
            bc, ac = block["before"][key], block["after"][key]
            if bc is not None and ac is not None:
                rows.append([f"CLIP score, {what} (0–100, unedited CLIP)", f"{bc:.2f}", f"{ac:.2f}",
                             f"{100 * (ac - bc) / bc:+.1f} %" if bc else "–"])
        verdict = "**removed**" if block["target"]["met"] else "**NOT removed**"
        lines = [
            f"## Generation ({self.adapter.title})", "",
            f"The edit was transplanted into the text encoder of `{block['pipeline']}` "
            f"(`{', '.join(block['transplanted'])}`; every other tensor unchanged). {block['prompts']} prompts, "
            f"seeds {block['seeds']}, {g['steps']} steps, guidance {g['guidance']:g}"
            + (f", clip skip {g['clip_skip']}" if g.get("clip_skip") else "")
            + f"; step search on {'generations' if g['search_on'] == 'generation' else 'the CLIP zero-shot metrics'}"
            + f". The concept is {verdict} from generations ({block['target']['rule']}: "
            + ", ".join(f"`{name}`" for name in block["judges"])
            + "). Recognition in %: how often a judge names the prompt's concept.", "",
            *table(["metric", "before", "after", "change"], rows), "",
        ]
        for concept, scores in block["candidates"].items():
            lines += [f"Candidates for {concept!r} scored on generations (search seeds; the choice is the best "
                      f"retain recognition among those that remove the concept):", "",
                      *table(["layer", "step", "forget recognition", "retain recognition", "CLIP score", "removes"],
                             [[f"`{s['layer']}`", f"{s['step']:.4g}", pct(s["forget_recognition"]),
                               pct(s["retain_recognition"]), f"{s['clip_score']:.2f}", "yes" if s["removes"] else "no"]
                              for s in scores]), ""]
        return lines
