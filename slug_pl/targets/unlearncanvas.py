"""UnlearnCanvas as a downstream target: a Stable Diffusion pipeline (handled exactly as
:class:`~slug_pl.targets.stable_diffusion.StableDiffusion` handles it: which text-encoder tensors
the UNet reads, the pair check, the one-tensor transplant, the saved pipeline) judged the
benchmark's way.

**The evaluation** (definitions in :mod:`slug_pl.evaluation.unlearncanvas`): the pipeline draws
one image for every prompt ``"A {object} image in {style} style."`` over the whole style × object
grid of the run's tree (:meth:`~slug_pl.data.canvas_datamodule.UnlearnCanvasDataModule.canvas_grid`)
and every seed of ``seeds`` (default :data:`~slug_pl.evaluation.unlearncanvas.UC_EVAL_SEEDS`,
the benchmark's 188, 288, 588, 688, 888), in the benchmark's order (seed, style, object), each
image from its own seeded generator (:func:`~slug_pl.evaluation.generation.generate_images`),
once with the edit reverted and once with it transplanted: the same prompts and seeds. A style
and an object classifier label every image (two checkpoint classifiers given by their JSON
configs, :class:`~slug_pl.evaluation.unlearncanvas.CheckpointClassifier`; or, without them, the
unedited CLIP zero-shot, :class:`~slug_pl.evaluation.unlearncanvas.ZeroShotClassifier`), and
:func:`~slug_pl.evaluation.unlearncanvas.canvas_scores` gives UA, IRA and CRA with the number of
images behind each.

**The unlearning's cost**, as the benchmark's table reports it: ``time_s`` = the run's wall time
of the gradient pass and the step search (the method's ``timings``, read when the evaluation
starts, so the report's own generations are not counted); ``peak_memory_gb`` = the process's peak
memory up to then (:func:`~slug_pl.methods.base.peak_memory`: the accelerator's allocator on CUDA,
the resident set size on a CPU, which includes loading the pipeline and the data); ``storage_gb``
= the bytes of the edited tensors in the pipeline's dtype, what must be stored to apply the edit.
GB here are 2**30 bytes.

**The record** (:class:`~slug_pl.targets.base.TargetReport` with key ``"unlearncanvas"``): the
summary block (scores before and after, per-concept accuracies, prompts, seeds, classifiers,
cost, verdict ``UA >= ua_target``), two rows of ``unlearncanvas.csv`` in the run folder
(written by the run record: the unedited pipeline and the edited one),
and report sections with the rows next to the published rows of other methods
(:func:`~slug_pl.evaluation.unlearncanvas.comparison_markdown`, quoted with their source and marked
"published, not measured here").

**The search.** With ``search_on: clip`` (default) the step search runs on the CLIP's zero-shot
metrics over the run's labelled sets (docs/design.md §1); each candidate layer's found edit is
then drawn on a small grid (``search_seeds``, the first ``search_objects`` objects, every style)
and the final choice is the candidate with the highest (IRA + CRA) / 2 among those whose UA is at
least ``ua_target`` (:func:`~slug_pl.targets.stable_diffusion.order_by_generation` with forget
recognition = 1 − UA). With ``search_on: generation`` the step search itself judges that grid
(:func:`grid_metrics`): use ``target_metric: forget_grid_accuracy`` (= 1 − UA, e.g. ``target_value:
0.2`` for UA >= 80 %) and ``kept: [IRA, CRA]`` (the choice among candidates keeps the most of
both). The run's held-out verdict of such a target is then read from the report's grid (the
held-out ``seeds``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

import torch
from torch import nn
from torchvision.transforms.functional import to_pil_image

from slug_pl.context import RunContext
from slug_pl.data.canvas_datamodule import CanvasData
from slug_pl.edit import LayerEdit, apply_edit, revert_edit
from slug_pl.evaluation.generation import generate_images, image_grid
from slug_pl.evaluation.unlearncanvas import (
    CSV_COLUMNS,
    CSV_NAME,
    UC_EVAL_SEEDS,
    UC_SAMPLING,
    CanvasRow,
    CanvasScores,
    CheckpointClassifier,
    GridPrompt,
    ZeroShotClassifier,
    comparison_markdown,
    prompt_grid,
    score_images,
)
from slug_pl.record import pct, table
from slug_pl.step_search import reverted
from slug_pl.targets.base import TargetReport
from slug_pl.targets.stable_diffusion import CandidateScore, StableDiffusion, order_by_generation

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

    def __init__(self, target: "UnlearnCanvas", context: RunContext):
        self.target, self.grid = target, target.grid_of(context)
        self.prompts = target.search_prompts(self.grid)
        self.classifier = target.classifier(context, self.grid)  # the unedited CLIP's

    def evaluate(self, model: nn.Module, edited: str | None = None) -> dict[str, float]:
        self.target.mirror(model)
        return grid_metrics(score_images(self.classifier, self.target.draw_grid(self.prompts), self.prompts,
                                         self.grid.kind, self.grid.target))


class UnlearnCanvas(StableDiffusion):
    """A Stable Diffusion pipeline scored on the UnlearnCanvas prompt grid (UA / IRA / CRA).

    The run's data module must be an
    :class:`~slug_pl.data.canvas_datamodule.UnlearnCanvasDataModule` (it names the grid).
    """

    name = "unlearncanvas"

    def __init__(
        self,
        pipeline: str,
        style_classifier: str | None = None,
        object_classifier: str | None = None,
        seeds: list[int] = UC_EVAL_SEEDS,
        search_seeds: list[int] = (100,),
        search_objects: int | None = None,
        ua_target: float = 0.8,
        steps: int = UC_SAMPLING["num_inference_steps"],
        guidance: float = UC_SAMPLING["guidance_scale"],
        batch_size: int = 8,
        height: int | None = None,
        width: int | None = None,
        search_on: str = "clip",
        grid_objects: int = 4,
        clip_skip: int | None = None,
        device: str | None = None,
        dtype: str | None = None,
        save_edited: bool = False,
        progress: bool = True,
    ):
        """
        Args:
            pipeline: a ``StableDiffusionPipeline.save_pretrained`` folder whose text encoder is
                the run's CLIP's text tower (for the benchmark: its fine-tuned SD 1.5).
            style_classifier / object_classifier: JSON configs of the two checkpoint classifiers
                (:func:`~slug_pl.evaluation.unlearncanvas.load_task_classifier`); both or
                neither. Neither: the unedited CLIP judges zero-shot over the style and object
                names.
            seeds: the report's seeds; every grid prompt is drawn with each, before and after.
            search_seeds: seeds of the search's grid (keep them apart from ``seeds``).
            search_objects: the search's grid draws the first this many objects (every style);
                None: all.
            ua_target: the edit counts as unlearning the concept when UA after is at least this.
            steps / guidance / batch_size / height / width: sampling (the benchmark: 100 steps,
                guidance 9.0, 512 px, :data:`~slug_pl.evaluation.unlearncanvas.UC_SAMPLING`;
                None size: the pipeline's).
            search_on: ``clip`` or ``generation`` (module docstring).
            grid_objects: objects shown in the before | after figure (the unlearned concept's
                rows, first seed).
            clip_skip / device / dtype / save_edited / progress: as
                :class:`~slug_pl.targets.stable_diffusion.StableDiffusion`.
        """
        if (style_classifier is None) != (object_classifier is None):
            raise ValueError("target: give both style_classifier and object_classifier (JSON configs), or neither "
                             "to judge with the unedited CLIP zero-shot")
        if not 0.0 <= ua_target <= 1.0:
            raise ValueError(f"target ua_target is a fraction in [0, 1], got {ua_target}")
        if search_objects is not None and (isinstance(search_objects, bool) or search_objects < 1):
            raise ValueError(f"target search_objects must be a positive number of objects or null, got {search_objects!r}")
        super().__init__(pipeline, clip_skip=clip_skip, seeds=seeds, search_seeds=search_seeds, steps=steps,
                         guidance=guidance, batch_size=batch_size, height=height, width=width,
                         forget_threshold=1.0 - ua_target, search_on=search_on, grid_seeds=grid_objects,
                         device=device, dtype=dtype, save_edited=save_edited, progress=progress)
        self.style_classifier, self.object_classifier = style_classifier, object_classifier
        self.search_objects, self.grid_objects = search_objects, grid_objects
        self.ua_target = ua_target
        self._checkpoint: CheckpointClassifier | None = None
        #: concept -> each candidate's {layer, step, UA, IRA, CRA} on the search grid (rank_candidates)
        self.candidate_grid: dict[str, list[dict]] = {}

    def describe(self) -> str:
        return f"the Stable Diffusion pipeline {self.pipeline} (UnlearnCanvas)"

    # -- what is drawn and who judges it -------------------------------------------------------
    @staticmethod
    def grid_of(context: RunContext):
        """The run's :class:`~slug_pl.data.canvas_datamodule.CanvasGrid` (its data must be an
        UnlearnCanvas data module, which names the grid)."""
        if not isinstance(context.data, CanvasData):
            raise TypeError(f"the UnlearnCanvas target needs an UnlearnCanvas data module "
                            f"(data.class_path: slug_pl.data.canvas_datamodule.UnlearnCanvasDataModule), "
                            f"got {type(context.data).__name__}")
        return context.data.canvas_grid()

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
        g = self.generation
        return generate_images(self.generator(), [p.text for p in prompts], [p.seed for p in prompts],
                               steps=g["steps"], guidance=g["guidance"], batch_size=g["batch_size"],
                               height=g["height"], width=g["width"], progress=self.progress, output_type="pt")

    def classifier(self, context: RunContext, grid):
        """The judge: the checkpoint classifiers (loaded once), or the CLIP zero-shot (the run's
        family) with class embeddings computed now (call it with the CLIP unedited)."""
        if self.style_classifier is None:
            return ZeroShotClassifier(context.family, context.model, grid.styles, grid.objects)
        if self._checkpoint is None:
            self._checkpoint = CheckpointClassifier(self.style_classifier, self.object_classifier, self.resolved_device())
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
                self.mirror(clip)
                images = self.draw_grid(prompts)
            finally:
                revert_edit(clip, edit)
                self.mirror(clip)
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
        from slug_pl.methods.base import peak_mem_mb, peak_memory

        timings = dict(context.timings)
        memory = peak_memory(next(context.model.parameters()).device)
        element = torch.empty(0, dtype=self.dtype).element_size()
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
        self.mirror(clip)
        after = self.draw_grid(prompts)
        with reverted(clip, edits):
            self.mirror(clip)
            before = self.draw_grid(prompts)
            judge = self.classifier(context, grid)
            scored = {"before": score_images(judge, before, prompts, grid.kind, grid.target),
                      "after": score_images(judge, after, prompts, grid.kind, grid.target)}
        self.mirror(clip)
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
            "pipeline": str(self.pipeline),
            "transplanted": [self.downstream_name(e.name) for e in edits],
            "settings": {**self.generation, "clip_skip": self.clip_skip, "search_on": self.search_on,
                         "search_seeds": list(self.search_seeds), "search_objects": self.search_objects,
                         "device": str(self.resolved_device()), "dtype": str(self.dtype).removeprefix("torch.")},
            "candidates": self.candidate_grid,
            "data": context.data.record(),
        }
        figures = [self._figure(grid, prompts, before, after)]
        # the held-out verdict of a forget target on the grid (target_metric: forget_grid_accuracy)
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
