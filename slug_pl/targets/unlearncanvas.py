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
memory up to then (:func:`~slug_pl.resources.peak_memory`: the accelerator's allocator on CUDA,
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
least ``ua_target`` (:func:`~slug_pl.evaluation.generation_judge.order_by_generation` with forget
recognition = 1 − UA). With ``search_on: generation`` the step search itself judges that grid
(:func:`~slug_pl.evaluation.canvas_judge.grid_metrics`): use ``forget_target: {metric:
forget_grid_accuracy, value: 0.2}`` (1 − UA at most 0.2: UA >= 80 %) and ``search.kept: [IRA, CRA]`` (the choice among candidates keeps the most of
both). The run's held-out verdict of such a target is then read from the report's grid (the
held-out ``seeds``).
"""


from __future__ import annotations

from slug_pl.evaluation.canvas_judge import CanvasJudge
from slug_pl.evaluation.unlearncanvas import UC_EVAL_SEEDS, UC_SAMPLING
from slug_pl.targets.base import DownstreamTarget
from slug_pl.targets.stable_diffusion import StableDiffusionAdapter


class UnlearnCanvas(DownstreamTarget):
    """A Stable Diffusion pipeline scored on the UnlearnCanvas prompt grid (UA / IRA / CRA): the
    :class:`~slug_pl.targets.stable_diffusion.StableDiffusionAdapter` with a
    :class:`~slug_pl.evaluation.canvas_judge.CanvasJudge`.

    The run's data module must be an
    :class:`~slug_pl.data.canvas_datamodule.UnlearnCanvasDataModule` (it names the grid).

    What it protects when the method keeps the edit off what must stay (``model.protect_retained``,
    :mod:`slug_pl.retain_projection`): the grid's prompts of every other style (or object), through
    the text tower at every position the UNet reads; recommended tolerance 0.05.
    """

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
        adapter = StableDiffusionAdapter(pipeline, clip_skip, steps, guidance, batch_size, height, width, device,
                                         dtype, progress)
        judge = CanvasJudge(adapter, style_classifier, object_classifier, seeds, search_seeds, search_objects,
                            ua_target, search_on, grid_objects)
        super().__init__(adapter, judge, save_edited, name="unlearncanvas")
