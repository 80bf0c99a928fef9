"""The downstream-target contract: the checks every target passes, in the style of diffusers'
``PipelineTesterMixin`` (and of the families' :class:`FamilyContract`, tests/test_families.py).
:class:`TargetContract` holds the checks; each target's test class inherits them and supplies a
tiny downstream model paired with a tiny CLIP, what the downstream model outputs, and a way to
feed its judge controlled measurements.

**Mechanics** (the adapter): ``reads`` is exactly what changes the downstream model's output;
the pair check accepts the paired CLIP and refuses another, naming a tensor; ``transplant``
changes exactly the edited tensors and ``mirror(clip, [])`` restores the model as loaded, bit for
bit; the saved copy reloads with the plain library and differs from the original folder only in
the files holding the edited tensor; the offline path (``apply_edit_file``, ``slug-pl
transplant``) accepts the edit computed on the model's own CLIP and refuses another, naming the
tensor; ``name`` / ``tower`` / ``source`` / ``describe`` say what was loaded.

**Verdicts** (the judge): fed controlled measurements (:class:`ControlledJudge`: how many images
of each concept each judge still recognizes after the edit), the report's verdict and the run's
held-out verdict (:func:`~slug_pl.record.held_out_verdict` on :attr:`TargetReport.after`) are
*not met* when any judge still recognizes the forgotten concept above the threshold, are met at
the threshold under every judge, and the report's retained metric is the documented mean over the
judges of the mean over the retained concepts, computed here by hand.

Inherited by ``TestStableDiffusionContract`` (tests/test_stable_diffusion.py), ``TestSdxlContract``
(tests/test_sdxl.py, through each text encoder), ``TestLlavaContract`` (tests/test_llava.py) and
``TestUnlearnCanvasContract`` (tests/test_unlearncanvas_target.py); a new target's tests inherit
it too (:class:`PipelineContract` / :class:`GenerationContract` for a diffusers pipeline).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import changed_files
from slug_pl.cli import main
from slug_pl.edit import EditMismatchError, apply_edit, make_edit, revert_edit, save_edits
from slug_pl.evaluation.final import BeforeAfter
from slug_pl.evaluation.target_judge import TargetReport
from slug_pl.record import held_out_verdict
from slug_pl.step_search import ForgetTarget
from slug_pl.targets import TargetMismatchError


@dataclass
class ControlledJudge:
    """A target's judge fed controlled measurements.

    Attributes:
        report: ``report(counts)``: the target's :class:`TargetReport` (its judge's own
            ``evaluate``, the drawing or answering and the judges controlled) when, after the edit, each judge recognizes ``counts[judge][concept]``
            of the :attr:`images` images of each concept it rates (before the edit: every image).
        concepts: judge -> the concepts it rates (the judges rating :attr:`forgotten` decide
            whether it is forgotten; every judge's other concepts are the retained ones).
        forgotten: the forgotten concept.
        images: images of each concept each judge rates (after the edit).
        threshold: the forget threshold in images: forgotten when every judge recognizes it in at
            most this many (the target is configured with ``threshold / images``).
        held_out_metric: the :attr:`TargetReport.after` metric a run's forget target names to be
            checked on the held-out images (``forget_top1``, ``forget_name_accuracy``, ...).
        retained_metric: the :attr:`TargetReport.after` metric of what the edit keeps.
        verdict: the report's own verdict (its block's ``met``), or None when the target's report
            has none and the run's held-out verdict is the verdict.
    """

    report: Callable[[dict[str, dict[str, int]]], TargetReport]
    concepts: dict[str, list[str]]
    forgotten: str
    images: int
    threshold: int
    held_out_metric: str
    retained_metric: str
    verdict: Callable[[TargetReport], bool] | None

    @property
    def deciders(self) -> list[str]:
        """The judges that rate the forgotten concept."""
        return [j for j, cs in self.concepts.items() if self.forgotten in cs]

    def counts(self, forgotten: dict[str, int], retained: Callable[[str, str], int] | None = None) -> dict:
        """Recognized images per judge and concept: ``forgotten[judge]`` of the forgotten concept,
        ``retained(judge, concept)`` (default: all) of every other."""
        return {j: {c: forgotten[j] if c == self.forgotten else (retained(j, c) if retained else self.images)
                    for c in cs} for j, cs in self.concepts.items()}

    def held_out(self, report: TargetReport) -> dict | None:
        """The run's held-out verdict of the forget target ``held_out_metric <= threshold`` from
        this report (the record's own rule), the CLIP's metrics lacking the metric."""
        clip_side = BeforeAfter("test", {}, {"forget_top1": 0.0}, {}, forget_images=-1)
        return held_out_verdict(ForgetTarget(self.held_out_metric, self.threshold / self.images), clip_side,
                                report.after, report.forget_images)


#: Prompts whose text states a text-to-image pipeline's UNet is fed (:meth:`PipelineContract.downstream_output`).
PROMPTS = ["a photo of Alice Abara.", "a red apple on a table."]


def tower_tensors(family, clip, tower: str) -> list[str]:
    """The CLIP's parameters of ``tower``, in order."""
    return [n for n, _ in clip.named_parameters() if family.tower_of(n) == tower]


def noise(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def assert_reads_is_what_changes(target, family, clip, output: Callable, changed: Callable | None = None) -> None:
    """Perturb each CLIP tensor alone: ``mirror`` copies it iff ``reads`` says so; written into the
    downstream model whatever ``reads`` says, it changes ``output(target)`` (``changed(new,
    reference)``, default: any bit) iff ``reads`` says so; ``mirror(clip, [])`` restores the
    output."""
    changed = changed or (lambda new, reference: not torch.equal(new, reference))
    adapter = target.adapter
    target.check_pair(family, clip)
    params = adapter.downstream_parameters()
    reference = output(target)
    read = []
    for k, (name, param) in enumerate(clip.named_parameters()):
        theirs = adapter.downstream_name(name)
        if theirs is None or theirs not in params:  # nothing of the downstream model holds it
            assert not target.reads(name), name
            continue
        edit = make_edit(clip, name, noise(param.shape, k), 0.5)
        apply_edit(clip, edit)
        try:
            assert adapter.mirror(clip) == ([theirs] if target.reads(name) else []), name
            adapter.write(theirs, param)  # whatever reads says
            moved = changed(output(target), reference)
        finally:
            revert_edit(clip, edit)
            adapter.mirror(clip, [])
        assert moved == target.reads(name), (name, "changes" if moved else "does not change", "the output; reads says",
                                              target.reads(name))
        read += [name] if moved else []
    assert read, "no tensor changes the output"
    assert torch.equal(output(target), reference)


def files_holding(folder: Path, value: torch.Tensor) -> list[Path]:
    """The safetensors files of ``folder`` (relative paths) holding a tensor equal to ``value`` in
    the file's dtype (a float16 variant holds the float32 weights rounded)."""
    out = []
    for path in sorted(folder.rglob("*.safetensors")):
        tensors = load_file(str(path))
        if any(t.shape == value.shape and torch.equal(t, value.to(t.dtype)) for t in tensors.values()):
            out.append(path.relative_to(folder))
    return out


def assert_copy_changes_only(original: Path, copy_: Path, loaded: torch.Tensor, edited: torch.Tensor) -> None:
    """``copy_`` holds the files of ``original``, byte for byte but for those holding the tensor
    whose value was ``loaded``; in each of them only that tensor differs, now ``edited`` (the
    CLIP's float32 value in the file's dtype)."""
    changed = changed_files(original, copy_)
    assert changed and changed == files_holding(original, loaded), (changed, files_holding(original, loaded))
    for file in changed:
        before, after = load_file(str(original / file)), load_file(str(copy_ / file))
        assert before.keys() == after.keys(), file
        differs = [k for k in before if not torch.equal(before[k], after[k])]
        assert len(differs) == 1, (file, differs)
        assert torch.equal(after[differs[0]], edited.to(after[differs[0]].dtype)), file


class TargetContract:
    """Checks every downstream target (:class:`~slug_pl.targets.base.DownstreamTarget`) passes. A
    subclass provides:

    - fixtures ``model_folder`` (the tiny downstream model's folder), ``clip`` (``(family, model)``:
      the paired tiny CLIP, by default conftest's tiny HF CLIP; tests restore it), ``make_target`` (``make_target(folder, **kwargs)``:
      the target of a model folder on the CPU in float32, not loaded) and ``controlled`` (a
      :class:`ControlledJudge`);
    - ``downstream_output(target)`` (what the downstream model computes from the tower: what the
      UNet is fed, the image features), ``model_state(target)`` (every tensor of the downstream
      model, not only the tower's; the tower's under their ``downstream_parameters`` names) and
      ``reload_tower(target, folder)`` (the tower's tensors of a saved folder, loaded with the
      plain library, named as ``downstream_parameters`` names them);
    - ``NAME`` and ``TOWER`` (what the target says it is), ``READ`` and ``ALSO_READ`` (two CLIP
      weight matrices it reads, not equal to any other tensor), ``UNREAD`` (a CLIP tensor it never
      reads), ``OUTPUT_TOLERANCE`` (None: any change of the output counts; else
      ``allclose`` keyword arguments: a change below them is rounding, e.g. a key bias that the
      softmax cancels).
    """

    NAME: str
    TOWER: str
    READ: str
    ALSO_READ: str
    UNREAD: str
    OUTPUT_TOLERANCE: dict | None = None

    # -- fixtures ---------------------------------------------------------------------------------
    @pytest.fixture(scope="class")
    @classmethod
    def clip(cls, tiny_hf_clip):
        """The paired CLIP; by default conftest's tiny HF CLIP, whose towers the tiny pipeline and
        the tiny LLaVA embed."""
        from slug_pl.families import HfClip

        family = HfClip(model_name=tiny_hf_clip)
        return family, family.load()

    @pytest.fixture(scope="class")
    @classmethod
    def target(cls, make_target, model_folder):
        target = make_target(model_folder)
        target.load()
        return target

    # -- helpers (also for a subclass's own configurations) -----------------------------------------
    def changed(self, output: torch.Tensor, reference: torch.Tensor) -> bool:
        if self.OUTPUT_TOLERANCE is None:
            return not torch.equal(output, reference)
        return not torch.allclose(output, reference, **self.OUTPUT_TOLERANCE)

    def assert_reads_is_what_changes_the_output(self, target, family, clip) -> None:
        assert_reads_is_what_changes(target, family, clip, self.downstream_output, self.changed)

    def perturbed(self, clip, name: str, seed: int = 0):
        edit = make_edit(clip, name, noise(clip.get_parameter(name).shape, seed), 0.5)
        assert not torch.equal(edit.edited, edit.original)
        return edit

    # -- the model: what it is -----------------------------------------------------------------------
    def test_name_tower_source_and_description_say_what_is_loaded(self, target, model_folder, clip):
        family, model = clip
        assert target.name == self.NAME and target.tower == target.adapter.tower == self.TOWER
        assert target.source() == target.adapter.source() == str(model_folder)
        assert str(model_folder) in target.describe() and target.describe() == target.adapter.describe()
        assert type(target.adapter).recognizes(Path(model_folder))  # slug-pl transplant picks this adapter
        # the tower's tensors map one to one onto the downstream model's; nothing else maps, nothing
        # else is read
        params = target.adapter.downstream_parameters()
        tower = tower_tensors(family, model, self.TOWER)
        mapped = [target.adapter.downstream_name(n) for n in tower]
        assert sorted(m for m in mapped if m is not None) == sorted(params)
        others = [n for n, _ in model.named_parameters() if n not in tower]
        assert all(target.adapter.downstream_name(n) is None and not target.reads(n) for n in others)
        assert target.reads(self.READ) and target.reads(self.ALSO_READ) and not target.reads(self.UNREAD)

    def test_reads_is_exactly_what_changes_the_downstream_output(self, target, clip):
        self.assert_reads_is_what_changes_the_output(target, *clip)

    def test_the_model_loads_at_its_first_use_and_not_before(self, make_target, model_folder, clip):
        """Naming the target, giving it the run's device and asking what it reads leave the model
        unloaded (the ranks of a run that never use it never hold it); the pair check, its first
        use in a run, loads it."""
        family, model = clip
        target = make_target(model_folder)
        target.use_run_device("cpu")
        assert str(model_folder) in target.describe() and target.source() == str(model_folder)
        assert any(target.reads(n) for n, _ in model.named_parameters())
        assert not target.adapter.loaded
        target.check_pair(family, model)
        assert target.adapter.loaded

    # -- the pair ---------------------------------------------------------------------------------
    def test_pair_check_accepts_its_clip_and_refuses_another_naming_a_tensor(self, target, clip):
        family, model = clip
        target.check_pair(family, model)
        param = model.get_parameter(self.READ)
        value = param[0, 0].item()
        with torch.no_grad():
            param[0, 0] += 1e-2 * (abs(value) + 1)  # one weight, above any dtype's rounding
        try:
            with pytest.raises(TargetMismatchError, match=re.escape(f"'{self.READ}'")):
                target.check_pair(family, model)
        finally:
            with torch.no_grad():
                param[0, 0] = value
        target.check_pair(family, model)  # restored exactly: the same CLIP again
        # what the downstream model does not hold (the other tower, projections) does not matter
        unheld = [p for n, p in model.named_parameters() if target.adapter.downstream_name(n) is None]
        assert unheld
        with torch.no_grad():
            for p in unheld:
                p.add_(1.0)
        try:
            target.check_pair(family, model)
        finally:
            with torch.no_grad():
                for p in unheld:
                    p.sub_(1.0)
        other = copy.deepcopy(model)  # another CLIP of the same shape
        with torch.no_grad():
            for k, p in enumerate(other.parameters()):
                p.copy_(noise(p.shape, 100 + k) * 0.02)
        tower = "|".join(re.escape(n) for n in tower_tensors(family, model, self.TOWER))
        with pytest.raises(TargetMismatchError, match=f"'({tower})'"):
            target.check_pair(family, other)

    # -- holding the CLIP's edits --------------------------------------------------------------------
    def test_transplant_changes_exactly_the_edited_tensors_and_mirror_restores_all(self, target, clip):
        family, model = clip
        adapter = target.adapter
        loaded = self.model_state(target)
        edits = [self.perturbed(model, self.READ, 1), self.perturbed(model, self.ALSO_READ, 2)]
        theirs = [adapter.downstream_name(e.name) for e in edits]
        for e in edits:
            apply_edit(model, e)
        try:
            # the CLIP differs in both; a transplant of one copies that one only
            assert target.transplant(model, edits[:1]) == theirs[:1]
            differs = lambda: sorted(k for k, v in self.model_state(target).items()  # noqa: E731
                                     if not torch.equal(loaded[k], v))
            assert differs() == theirs[:1]
            assert torch.equal(adapter.downstream_parameters()[theirs[0]], edits[0].edited)
            assert target.transplant(model, edits) == differs() == sorted(theirs)
            assert target.transplant(model, edits[1:]) == differs() == theirs[1:]  # the first is restored
            assert target.transplant(model, edits) == differs() == sorted(theirs)
        finally:
            for e in reversed(edits):
                revert_edit(model, e)
            assert adapter.mirror(model, []) == []
        state = self.model_state(target)
        assert state.keys() == loaded.keys()
        assert [k for k in loaded if not torch.equal(loaded[k], state[k])] == []  # as loaded, bit for bit
        assert adapter.written == {}
        unread = make_edit(model, self.UNREAD, torch.ones_like(model.get_parameter(self.UNREAD)), 0.1)
        with pytest.raises(TargetMismatchError, match="cannot reach"):
            target.transplant(model, [unread])

    # -- the saved copy -----------------------------------------------------------------------------
    def test_saved_copy_reloads_with_the_edited_tensor_and_changes_only_its_files(self, target, clip, model_folder,
                                                                                    tmp_path):
        _, model = clip
        edit = self.perturbed(model, self.READ, 3)
        theirs = target.adapter.downstream_name(self.READ)
        apply_edit(model, edit)
        try:
            target.transplant(model, [edit])
            saved = target.save_pretrained(tmp_path / "edited")
            with pytest.raises(FileExistsError):
                target.save_pretrained(saved)
        finally:
            revert_edit(model, edit)
            target.adapter.mirror(model, [])
        assert_copy_changes_only(Path(model_folder), Path(saved), edit.original, edit.edited)
        loaded, reloaded = target.adapter.downstream_parameters(), self.reload_tower(target, saved)
        assert reloaded.keys() == loaded.keys()
        assert [k for k in loaded if not torch.equal(loaded[k], reloaded[k])] == [theirs]
        assert torch.equal(reloaded[theirs], edit.edited)

    # -- the offline path ---------------------------------------------------------------------------
    def test_an_edit_file_is_applied_only_to_the_model_it_was_computed_on(self, make_target, clip, model_folder,
                                                                          tmp_path, capsys):
        _, model = clip
        edit = self.perturbed(model, self.READ, 4)
        fresh = make_target(model_folder).adapter
        theirs = fresh.downstream_name(self.READ)
        assert fresh.apply_edit_file([edit]) == [theirs]
        assert torch.equal(fresh.downstream_parameters()[theirs], edit.edited)
        assert list(fresh.written) == [theirs]
        # an edit computed on other weights (here: on the edited CLIP) is refused, naming the tensor
        apply_edit(model, edit)
        try:
            stale = self.perturbed(model, self.READ, 5)
        finally:
            revert_edit(model, edit)
        other = make_target(model_folder).adapter
        with pytest.raises(EditMismatchError, match=re.escape(f"'{theirs}'")):
            other.apply_edit_file([stale])
        unread = make_edit(model, self.UNREAD, torch.ones_like(model.get_parameter(self.UNREAD)), 0.1)
        with pytest.raises(EditMismatchError, match=re.escape(f"'{self.UNREAD}' has no counterpart")):
            other.apply_edit_file([unread])

        # slug-pl transplant: the same rules, and a copy in which only the edited tensor changes
        save_edits(tmp_path / "stale.safetensors", [stale], {})
        assert main(["transplant", "--into", str(model_folder), "--edit", str(tmp_path / "stale.safetensors"),
                     "--out", str(tmp_path / "never")]) == 2
        assert theirs in capsys.readouterr().err and not (tmp_path / "never").exists()
        save_edits(tmp_path / "edit.safetensors", [edit], {})
        out = tmp_path / "by_command"
        assert main(["transplant", "--into", str(model_folder), "--edit", str(tmp_path / "edit.safetensors"),
                     "--out", str(out)]) == 0
        assert_copy_changes_only(Path(model_folder), out, edit.original, edit.edited)

    # -- the verdict ----------------------------------------------------------------------------------
    def test_a_concept_any_judge_still_recognizes_is_not_forgotten(self, controlled):
        c = controlled
        assert c.deciders and c.threshold < c.images
        for still in c.deciders:  # each judge alone, the others recognizing nothing
            report = c.report(c.counts({j: c.threshold + 1 if j == still else 0 for j in c.deciders}))
            if c.verdict is not None:
                assert c.verdict(report) is False, still
            held = c.held_out(report)
            assert held is not None, f"{c.held_out_metric} missing from the report's held-out metrics {report.after}"
            assert held == {"met": False, "value": (c.threshold + 1) / c.images, "images": c.images}, still

    def test_a_concept_at_the_threshold_under_every_judge_is_forgotten(self, controlled):
        c = controlled
        report = c.report(c.counts({j: c.threshold for j in c.deciders}))
        if c.verdict is not None:
            assert c.verdict(report) is True
        assert c.held_out(report) == {"met": True, "value": c.threshold / c.images, "images": c.images}

    def test_the_retained_metric_is_the_mean_over_judges_of_the_mean_over_concepts(self, controlled):
        c = controlled
        judges = list(c.concepts)
        recognized = lambda j, concept: (judges.index(j) + 2 * c.concepts[j].index(concept) + 1) % (c.images + 1)  # noqa: E731
        counts = c.counts({j: 0 for j in c.deciders}, recognized)
        retained = {j: [counts[j][x] / c.images for x in cs if x != c.forgotten] for j, cs in c.concepts.items()}
        assert len({v for vs in retained.values() for v in vs}) > 1  # a judge's or a concept's alone would differ
        by_hand = sum(sum(v) / len(v) for v in retained.values()) / len(retained)
        report = c.report(counts)
        assert report.after[c.retained_metric] == pytest.approx(by_hand, abs=1e-9)
        if c.verdict is not None:
            assert c.verdict(report) is True  # the forgotten concept is recognized nowhere


# ------------------------------------------------------------------------------ shared by the targets


def concept_context(world: dict, family, clip, stages=("validation", "test")):
    """The run context of forgetting ``world``'s first identity, with its validation and test
    concept and utility sets."""
    import json

    from conftest import run_context
    from slug_pl.data.datamodule import EvalSuite, SlugDataModule
    from slug_pl.data.labelled import LabelledSet

    names = json.loads(Path(world["identities_json"]).read_text())
    split = {"validation": "val", "test": "test"}
    suites = {stage: EvalSuite(LabelledSet(world[f"{split[stage]}_identities"], world["identities_json"]),
                               LabelledSet(world[f"{split[stage]}_objects"], world["objects_json"]))
              for stage in stages}
    return run_context(SlugDataModule(concepts=names[:1], **suites), family, clip)


def evaluate_edit(target, context, edit) -> TargetReport:
    """The target's report of ``edit`` as a run makes it (the CLIP carrying the edit, transplanted,
    then evaluated); the CLIP and the downstream model are restored afterwards."""
    apply_edit(context.model, edit)
    try:
        target.transplant(context.model, [edit])
        return target.evaluate(context, [edit])
    finally:
        revert_edit(context.model, edit)
        target.adapter.mirror(context.model, [])


#: A text-to-image target's judge configured for the verdict checks (:func:`controlled_generation`):
#: two judges, a threshold of 1 image in 4 (2 templates x 2 seeds per concept), the search on
#: generations (so the run's held-out verdict is the generations').
GENERATION_VERDICTS = {"judges": ["clip", "classifier"], "forget_threshold": 0.25, "search_on": "generation",
                       "seeds": [0, 1], "forget_templates": ["a photo of {}.", "{} in a picture."],
                       "retain_concepts": 2, "progress": False}


def _keyed_image(key: int):
    from PIL import Image

    return Image.new("RGB", (32, 32), (key % 256, key // 256, 128))


def controlled_generation(monkeypatch, target, context, edit) -> ControlledJudge:
    """A text-to-image target's :class:`~slug_pl.evaluation.generation_judge.GenerationJudge`
    (configured with :data:`GENERATION_VERDICTS`) fed controlled measurements: the adapter's
    ``draw`` returns images that remember their concept, rank among the concept's images and
    whether the pipeline held the edit, and the two judges recognize as many of each concept's
    images after the edit as told (every image before). Each report is the judge's own
    ``evaluate`` of ``edit`` (the CLIP's unedited value is restored afterwards)."""
    judge, adapter = target.judge, target.adapter
    concept_of = {i.prompt: i.concept for s in judge.prompt_sets(context, list(context.concepts)) for i in s.items()}
    drawn, told = [], {}

    def draw(prompts, seeds, output_type="pil"):
        after, ranks, images = bool(adapter.written), {}, []
        for prompt in prompts:
            concept = concept_of[prompt]
            drawn.append((concept, ranks.setdefault(concept, 0), after))
            ranks[concept] += 1
            images.append(_keyed_image(len(drawn) - 1))
        return images

    class Recognizes:
        def __init__(self, name):
            self.name = name

        def logits(self, images, classnames):
            out = torch.zeros(len(images), len(classnames))
            for row, image in enumerate(images):
                r, g, _ = image.getpixel((0, 0))
                concept, rank, after = drawn[r + 256 * g]
                hit = rank < told["counts"][self.name][concept] if after else True
                column = classnames.index(concept)
                out[row, column if hit else (column + 1) % len(classnames)] = 1.0
            return out

    judges = [Recognizes(name) for name in GENERATION_VERDICTS["judges"]]
    monkeypatch.setattr(adapter, "draw", draw)
    monkeypatch.setattr(judge, "judges", lambda family, model, templates: judges)

    def report(counts):
        told["counts"] = counts
        return evaluate_edit(target, context, edit)

    def verdict(report: TargetReport) -> bool:
        met = report.block["target"]["met"]
        assert ("**removed**" if met else "**NOT removed**") in "\n".join(report.sections)
        return met

    sets = judge.prompt_sets(context, list(context.concepts))
    concepts = [c for s in sets for c in s.concepts]
    per_concept = len(GENERATION_VERDICTS["forget_templates"]) * len(GENERATION_VERDICTS["seeds"])
    return ControlledJudge(report, {name: concepts for name in GENERATION_VERDICTS["judges"]}, concepts[0],
                           per_concept, round(GENERATION_VERDICTS["forget_threshold"] * per_concept),
                           "forget_top1", "retain_top1", verdict)


class PipelineContract(TargetContract):
    """The contract of a target on a diffusers pipeline folder, edited through one text encoder
    (``adapter.encoder``); its output is what a ``StableDiffusionPipeline``'s UNet is fed. By
    default the pipeline is the test module's ``pipeline`` fixture, embedding the tiny HF CLIP's
    text tower."""

    READ, ALSO_READ = "text_model.encoder.layers.0.mlp.fc1.weight", "text_model.encoder.layers.1.self_attn.v_proj.weight"
    UNREAD = "text_projection.weight"

    @pytest.fixture(scope="class")
    @classmethod
    def model_folder(cls, pipeline):
        return pipeline

    @staticmethod
    def downstream_output(target) -> torch.Tensor:
        """What the UNet is fed: the prompts' states, and the empty prompt's under guidance > 1."""
        from slug_pl.targets.stable_diffusion import prompt_embeddings

        adapter = target.adapter
        states = [prompt_embeddings(adapter.pipe, PROMPTS, adapter.clip_skip)]
        if adapter.generation["guidance"] > 1:
            states.append(prompt_embeddings(adapter.pipe, [""] * len(PROMPTS)))
        return torch.cat(states)

    @staticmethod
    def model_state(target) -> dict[str, torch.Tensor]:
        """Every tensor of the pipeline's models: the edited encoder's under its own names (as
        ``downstream_parameters`` names them), every other model's as ``<component>.<name>``."""
        adapter = target.adapter
        out = {}
        for part, module in adapter.pipe.components.items():
            if isinstance(module, torch.nn.Module):
                prefix = "" if part == adapter.encoder else f"{part}."
                out |= {prefix + k: v.detach().clone() for k, v in module.state_dict().items()}
        return out

    @staticmethod
    def reload_tower(target, folder) -> dict[str, torch.Tensor]:
        """The edited encoder of the pipeline folder ``folder``, loaded with diffusers alone."""
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(folder)
        return {k: v.detach() for k, v in getattr(pipe, target.adapter.encoder).named_parameters()}


class GenerationContract(PipelineContract):
    """The contract of a text-to-image target judged by its generations
    (:class:`~slug_pl.evaluation.generation_judge.GenerationJudge`): its verdicts from
    :func:`controlled_generation` on ``small_world``'s concepts."""

    @pytest.fixture()
    def controlled(self, monkeypatch, make_target, model_folder, clip, small_world):
        target = make_target(model_folder, **GENERATION_VERDICTS)
        context = concept_context(small_world, *clip, stages=("validation",))
        return controlled_generation(monkeypatch, target, context, self.perturbed(clip[1], self.READ))
