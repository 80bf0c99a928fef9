"""The judge of the UnlearnCanvas target: a Stable Diffusion adapter scored the benchmark's way,
UA / IRA / CRA on a style × object prompt grid (definitions in :mod:`slug_pl.evaluation.unlearncanvas`;
the target: :mod:`slug_pl.targets.unlearncanvas`, whose docstring says what is drawn, how it is
judged and what it costs)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields

import torch
from torch import nn
from torchvision.transforms.functional import to_pil_image

from slug_pl.context import RunContext
from slug_pl.data.canvas_datamodule import CanvasGridSource
from slug_pl.edit import LayerEdit, apply_edit, revert_edit, reverted
from slug_pl.evaluation.generation import image_grid
from slug_pl.evaluation.generation_judge import CLIP_TEXT_PREFIX, CandidateScore, order_by_generation
from slug_pl.evaluation.target_judge import TargetJudge, TargetReport
from slug_pl.evaluation.unlearncanvas import (
    CSV_COLUMNS,
    CSV_NAME,
    UC_EVAL_SEEDS,
    CanvasRow,
    CanvasScores,
    CheckpointClassifier,
    GridPrompt,
    ZeroShotClassifier,
    caption,
    comparison_markdown,
    prompt_grid,
    score_images,
)
from slug_pl.markdown import pct, table
from slug_pl.retain_projection import ProtectedInputs, prompt_inputs
from slug_pl.resources import peak_mem_mb, peak_memory

GIB = 2**30


def scores_dict(s: CanvasScores) -> dict:
    """A :class:`CanvasScores` as JSON (fractions; counts of images)."""
    return {"UA": s.ua, "IRA": s.ira, "CRA": s.cra, "n_UA": s.n_ua, "n_IRA": s.n_ira, "n_CRA": s.n_cra,
            "in_domain": dict(s.in_domain), "cross_domain": dict(s.cross_domain)}


def grid_metrics(s: CanvasScores) -> dict[str, float]:
    """The metrics a step search and a run's verdict read from a grid's scores (fractions):
    ``forget_grid_accuracy`` = 1 − UA (how often the unlearned concept is still recognized; the
    forget target is ``forget_grid_accuracy <= value``), ``retain_grid_accuracy`` = (IRA + CRA) / 2,
    and ``UA`` / ``IRA`` / ``CRA``."""
    return {"forget_grid_accuracy": 1.0 - s.ua, "retain_grid_accuracy": (s.ira + s.cra) / 2, "UA": s.ua,
            "IRA": s.ira, "CRA": s.cra}


class CanvasSearchJudge:
    """The step search's judge with ``search_on: generation``: each evaluation transplants the
    CLIP's current text tower and scores the search grid (:func:`grid_metrics`)."""

    def __init__(self, judge: "CanvasJudge", context: RunContext):
        self.judge, self.grid = judge, judge.grid_of(context)
        self.prompts = judge.search_prompts(self.grid)
        self.classifier = judge.classifier(context, self.grid)  # the unedited CLIP's

    def evaluate(self, model: nn.Module, edited: str | None = None) -> dict[str, float]:
        self.judge.adapter.mirror(model)
        return grid_metrics(score_images(self.classifier, self.judge.draw_grid(self.prompts), self.prompts,
                                         self.grid.kind, self.grid.target))



class CanvasJudge(TargetJudge):
    """Judges a Stable Diffusion adapter on the UnlearnCanvas prompt grid (UA / IRA / CRA; module
    docstring). The run's data must be an
    :class:`~slug_pl.data.canvas_datamodule.UnlearnCanvasDataModule` (it names the grid).
    Arguments as the target's (:class:`~slug_pl.targets.UnlearnCanvas`)."""

    def __init__(self, adapter, style_classifier: str | None = None, object_classifier: str | None = None,
                 seeds: Sequence[int] = UC_EVAL_SEEDS, search_seeds: Sequence[int] = (100,),
                 search_objects: int | None = None, ua_target: float = 0.8, search_on: str = "clip",
                 grid_objects: int = 4):
        if (style_classifier is None) != (object_classifier is None):
            raise ValueError("target: give both style_classifier and object_classifier (JSON configs), or neither "
                             "to judge with the unedited CLIP zero-shot")
        if not 0.0 <= ua_target <= 1.0:
            raise ValueError(f"target ua_target is a fraction in [0, 1], got {ua_target}")
        if search_objects is not None and (isinstance(search_objects, bool) or search_objects < 1):
            raise ValueError(f"target search_objects must be a positive number of objects or null, got {search_objects!r}")
        if search_on not in ("clip", "generation"):
            raise ValueError(f"target search_on must be 'clip' or 'generation', got {search_on!r}")
        if isinstance(grid_objects, bool) or grid_objects < 1:
            raise ValueError(f"target grid_objects must be a positive integer, got {grid_objects!r}")
        self.adapter = adapter
        self.seeds, self.search_seeds = tuple(seeds), tuple(search_seeds)
        self.search_on = search_on
        self.forget_threshold = 1.0 - ua_target  # candidates remove the concept when 1 - UA is at most this
        self.style_classifier, self.object_classifier = style_classifier, object_classifier
        self.search_objects, self.grid_objects = search_objects, grid_objects
        self.ua_target = ua_target
        self._checkpoint: CheckpointClassifier | None = None
        #: concept -> each candidate's {layer, step, UA, IRA, CRA} on the search grid (rank_candidates)
        self.candidate_grid: dict[str, list[dict]] = {}

    @property
    def reorders_candidates(self) -> bool:
        return self.search_on != "generation"

    # -- what is drawn and who judges it -------------------------------------------------------
    @staticmethod
    def grid_of(context: RunContext):
        """The run's :class:`~slug_pl.data.canvas_datamodule.CanvasGrid` (its data must be an
        UnlearnCanvas data module, which names the grid)."""
        if not isinstance(context.data, CanvasGridSource):
            raise TypeError(f"the UnlearnCanvas target needs an UnlearnCanvas data module "
                            f"(data.class_path: slug_pl.data.canvas_datamodule.UnlearnCanvasDataModule), "
                            f"got {type(context.data).__name__}")
        return context.data.canvas_grid()

    def protected_inputs(self, context: RunContext, limit: int) -> list[ProtectedInputs]:
        """What the retain projection protects: the grid's prompts of every other style (a style
        unlearned) or object (an object unlearned), style by style then object (the first
        ``limit``), through the text tower at every position the UNet reads."""
        grid = self.grid_of(context)
        kept = [(s, o) for s in grid.styles for o in grid.objects
                if (s if grid.kind == "style" else o) != grid.target][:limit]
        if not kept:
            raise ValueError(f"model.protect_retained is set but the grid has no {grid.kind} besides {grid.target!r} "
                             f"to protect")
        others = list(dict.fromkeys(s if grid.kind == "style" else o for s, o in kept))
        return [prompt_inputs(context, [caption(s, o, grid.template) for s, o in kept], CLIP_TEXT_PREFIX,
                              f"the grid's prompts of {len(others)} other {grid.kind}s (in-domain and cross-domain "
                              f"retain prompts), every position the UNet reads", others)]

    def report_prompts(self, grid) -> list[GridPrompt]:
        """The report's answer set: every style × object prompt with every seed of ``seeds``."""
        return prompt_grid(grid.styles, grid.objects, self.seeds, grid.template)

    def search_prompts(self, grid) -> list[GridPrompt]:
        """The search's grid: every style × the first ``search_objects`` objects, ``search_seeds``."""
        objects = grid.objects if self.search_objects is None else grid.objects[: self.search_objects]
        if grid.kind == "object" and grid.target not in objects:
            objects = (*objects, grid.target)  # the unlearned object is always drawn
        return prompt_grid(grid.styles, objects, self.search_seeds, grid.template)

    def draw_grid(self, prompts: Sequence[GridPrompt]) -> torch.Tensor:
        """The images of ``prompts`` in order: ``(N, 3, H, W)`` float32 in [0, 1] on the CPU."""
        return self.adapter.draw([p.text for p in prompts], [p.seed for p in prompts], output_type="pt")

    def classifier(self, context: RunContext, grid):
        """The judge: the checkpoint classifiers (loaded once), or the CLIP zero-shot (the run's
        family) with class embeddings computed now (call it with the CLIP unedited)."""
        if self.style_classifier is None:
            return ZeroShotClassifier(context.family, context.model, grid.styles, grid.objects)
        if self._checkpoint is None:
            self._checkpoint = CheckpointClassifier(self.style_classifier, self.object_classifier,
                                                    self.adapter.resolved_device())
        return self._checkpoint

    def classifier_name(self) -> dict[str, str]:
        if self.style_classifier is None:
            return {"style": "clip-zeroshot (the unedited CLIP)", "object": "clip-zeroshot (the unedited CLIP)"}
        return {"style": str(self.style_classifier), "object": str(self.object_classifier)}

    # -- the search ----------------------------------------------------------------------------
    def search_judge(self, context: RunContext, concept: str):
        return CanvasSearchJudge(self, context) if self.search_on == "generation" else None

    def rank_candidates(self, context: RunContext, concept: str, edits: Sequence[LayerEdit]) -> list[int] | None:
        """Draw the search grid with each candidate edit transplanted alone; best first among those
        with UA >= ``ua_target``, by (IRA + CRA) / 2 (None: none reaches it, or ``search_on:
        generation``, where the search itself chose by these generations)."""
        if not self.reorders_candidates:
            return None
        grid, clip = self.grid_of(context), context.model
        prompts = self.search_prompts(grid)
        judge = self.classifier(context, grid)  # before any edit: the unedited CLIP
        scores, rows = [], []
        for edit in edits:
            apply_edit(clip, edit)
            try:
                self.adapter.mirror(clip)
                images = self.draw_grid(prompts)
            finally:
                revert_edit(clip, edit)
                self.adapter.mirror(clip)
            s = score_images(judge, images, prompts, grid.kind, grid.target)
            # no CLIP score here: candidates with equal retain accuracy keep the CLIP-side order
            scores.append(CandidateScore(edit.name, edit.step, 1.0 - s.ua, (s.ira + s.cra) / 2, 0.0))
            rows.append({"layer": edit.name, "step": edit.step, "UA": s.ua, "IRA": s.ira, "CRA": s.cra,
                         "images": len(prompts), "reaches_ua_target": s.ua >= self.ua_target})
        self.candidate_grid[concept] = rows
        return order_by_generation(scores, self.forget_threshold)

    # -- the report ----------------------------------------------------------------------------
    def cost(self, context: RunContext, edits: Sequence[LayerEdit]) -> dict:
        """Time, peak memory and storage of the unlearning (module docstring): the method's
        timings so far (None when it has none)."""
        timings = dict(context.timings)
        memory = peak_memory(next(context.model.parameters()).device)
        element = torch.empty(0, dtype=self.adapter.dtype).element_size()
        return {"time_s": sum(timings.values()) if timings else None,
                "timings_s": timings,
                "peak_memory_gb": peak_mem_mb(memory) / 1024,
                "memory": memory,
                "storage_gb": sum(e.edited.numel() for e in edits) * element / GIB,
                "method": context.method}

    def evaluate(self, context: RunContext, edits: Sequence[LayerEdit]) -> TargetReport:
        """UA / IRA / CRA of the report's grid before (edits reverted) and after, with the two rows
        of ``unlearncanvas.csv`` (the record writes them into the run folder). The pipeline
        carries the edits on return."""
        cost = self.cost(context, edits)
        grid, clip, concepts = self.grid_of(context), context.model, list(context.concepts)
        prompts = self.report_prompts(grid)
        self.adapter.mirror(clip)
        after = self.draw_grid(prompts)
        with reverted(clip, edits):
            self.adapter.mirror(clip)
            before = self.draw_grid(prompts)
            judge = self.classifier(context, grid)
            scored = {"before": score_images(judge, before, prompts, grid.kind, grid.target),
                      "after": score_images(judge, after, prompts, grid.kind, grid.target)}
        self.adapter.mirror(clip)
        method = cost["method"].upper()  # "SLUG", as in the benchmark's table
        rows = [CanvasRow.from_scores("unedited pipeline", scored["before"]),
                CanvasRow.from_scores(method, scored["after"], cost["time_s"], cost["peak_memory_gb"],
                                      cost["storage_gb"])]
        met = scored["after"].ua >= self.ua_target
        block = {
            "kind": grid.kind, "target": grid.target, "concepts": list(concepts),
            "classifier": self.classifier_name(),
            "prompt_template": grid.template, "styles": list(grid.styles), "objects": list(grid.objects),
            "seeds": list(self.seeds), "prompts": len(prompts),
            "before": scores_dict(scored["before"]), "after": scores_dict(scored["after"]),
            "rows": [dict(zip(CSV_COLUMNS, (getattr(r, f.name) for f in fields(r)))) for r in rows],
            "csv": CSV_NAME,
            "cost": {k: cost[k] for k in ("time_s", "timings_s", "peak_memory_gb", "storage_gb", "memory")},
            "verdict": {"rule": f"UA >= {self.ua_target:g}", "met": met},
            "pipeline": self.adapter.source(),
            "transplanted": [self.adapter.downstream_name(e.name) for e in edits],
            "settings": {**self.adapter.settings(), "search_on": self.search_on,
                         "search_seeds": list(self.search_seeds), "search_objects": self.search_objects},
            "candidates": self.candidate_grid,
            "data": context.data.record(),
        }
        figures = [self._figure(grid, prompts, before, after)]
        # the held-out verdict of a forget target on the grid (forget_target.metric: forget_grid_accuracy)
        return TargetReport("unlearncanvas", block, self._sections(block, rows), figures,
                            after=grid_metrics(scored["after"]), forget_images=scored["after"].n_ua,
                            tables={CSV_NAME: (list(CSV_COLUMNS), [list(r.values()) for r in rows])})

    def _figure(self, grid, prompts: Sequence[GridPrompt], before: torch.Tensor, after: torch.Tensor):
        """Rows: the unlearned concept with the first ``grid_objects`` of the other kind, then the
        same of one retained concept; first seed; before | after."""
        seed = prompts[0].seed
        index = {(p.style, p.object): i for i, p in enumerate(prompts) if p.seed == seed}
        if grid.kind == "style":
            kept = next(s for s in grid.styles if s != grid.target)
            cells = [[(s, o) for o in grid.objects[: self.grid_objects]] for s in (grid.target, kept)]
        else:
            kept = next(o for o in grid.objects if o != grid.target)
            cells = [[(s, o) for s in grid.styles[: self.grid_objects]] for o in (grid.target, kept)]
        pick = lambda images, row: [to_pil_image(images[index[c]]) for c in row]  # noqa: E731
        labels = [f"forget: {grid.target}", f"retain: {kept}"]
        figure = image_grid([pick(before, r) for r in cells], [pick(after, r) for r in cells], labels, forget_rows=1)
        what = "objects" if grid.kind == "style" else "styles"
        return (f"UnlearnCanvas generations before | after (first {len(cells[0])} {what}, seed {seed})",
                "unlearncanvas_grid.png", figure)

    def _sections(self, block: dict, rows: Sequence[CanvasRow]) -> list[str]:
        g, b, a = block["settings"], block["before"], block["after"]
        other = "object" if block["kind"] == "style" else "style"
        verdict = "**reached**" if block["verdict"]["met"] else "**NOT reached**"
        score_rows = []
        for key, what in (("UA", f"UA: prompts of the unlearned {block['kind']} not classified as it"),
                          ("IRA", f"IRA: the other {block['kind']}s classified correctly"),
                          ("CRA", f"CRA: {other}s classified correctly (other {block['kind']}s' prompts)")):
            score_rows.append([what, pct(b[key]), pct(a[key]), f"{100 * (a[key] - b[key]):+.1f}", a[f"n_{key}"]])
        cost = block["cost"]
        return [
            "## UnlearnCanvas", "",
            f"The edit was transplanted into the text encoder of `{block['pipeline']}` "
            f"(`{', '.join(block['transplanted'])}`). The pipeline drew the benchmark's prompt "
            f"`{block['prompt_template']}` for every style × object of the tree ({len(block['styles'])} × "
            f"{len(block['objects'])}) with seeds {block['seeds']} ({block['prompts']} images each, before and "
            f"after; {g['steps']} steps, guidance {g['guidance']:g}); classifiers: style `{block['classifier']['style']}`, "
            f"object `{block['classifier']['object']}`. Unlearned {block['kind']}: **{block['target']}**; "
            f"the target {block['verdict']['rule']} is {verdict}. Accuracies in %.", "",
            *table(["metric", "before", "after", "change (points)", "images"], score_rows), "",
            f"Cost of the unlearning (gradient pass and step search): "
            f"{'time not measured' if cost['time_s'] is None else format(cost['time_s'], '.1f') + ' s'}, peak memory "
            f"{cost['peak_memory_gb']:.2f} GB ({'CPU resident set' if cost['memory'].get('device') == 'cpu' else 'accelerator'}), "
            f"storage {cost['storage_gb'] * 1024:.3f} MB (the edited tensors in the pipeline's dtype).", "",
            f"`{block['csv'] or CSV_NAME}` next to the published UnlearnCanvas results (published rows are "
            f"means over every style or object unlearning of the real benchmark, quoted from their source, "
            f"**not measured here**; the rows measured here are one target on this pipeline and tree):", "",
            *comparison_markdown(rows).rstrip("\n").split("\n"), "",
        ] + self._candidate_lines(block)

    @staticmethod
    def _candidate_lines(block: dict) -> list[str]:
        lines = []
        for concept, rows in block["candidates"].items():
            lines += [f"Candidates for {concept!r} on the search grid (the choice: the best (IRA + CRA) / 2 among "
                      f"those reaching the UA target):", "",
                      *table(["layer", "step", "UA", "IRA", "CRA", "reaches target"],
                             [[f"`{r['layer']}`", f"{r['step']:.4g}", pct(r["UA"]), pct(r["IRA"]), pct(r["CRA"]),
                               "yes" if r["reaches_ua_target"] else "no"] for r in rows]), ""]
        return lines
