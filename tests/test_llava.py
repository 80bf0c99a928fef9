"""The LLaVA target (slug_pl.targets.llava): the target contract (tests/target_contract.py: what
the VLM reads, the pair check, the transplant, the saved VLM, ``slug-pl transplant``, the
held-out verdict on its answers); and what is LLaVA's own: what it reads at other feature layers
and strategies, the pair check at the VLM's precision, a bfloat16 saved copy, the answers and the
search's judge, and a fit run through the CLI with a tiny pair (a random CLIP and a LLaVA built on
its vision tower)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ON_CPU_AND_GPU, changed_files, run_context, save_edited, step_changes, write_config
from slug_pl.cli import main
from slug_pl.data.datamodule import EvalSuite, SlugDataModule
from slug_pl.data.labelled import LabelledSet
from slug_pl.demo.llava import build_llava, demo_tokenizer
from slug_pl.edit import apply_edit, make_edit, revert_edit
from slug_pl.evaluation import vqa
from slug_pl.families.hf_clip import HfClip, ProcessorTransform
from slug_pl.retain_projection import RetainProjection, build_projection
from slug_pl.step_search import CandidateResult, ForgetTarget, SearchSettings, StepEvaluation, StepSearch
from slug_pl.targets import Llava, TargetMismatchError
from slug_pl.evaluation.vqa import DEFAULT_QUESTION as QUESTION
from slug_pl.evaluation.vqa import FORGET_BOTH, VQA_METRICS
from slug_pl.targets.saved_copy import same_weights
from target_contract import ControlledJudge, TargetContract, concept_context, evaluate_edit

REPO = Path(__file__).resolve().parent.parent
READ_LAYER = "vision_model.encoder.layers.0.mlp.fc1.weight"  # block 0 of 2: read at vision_feature_layer -2
#: Issue 12's promise on held-out test images (fractions): the forgotten identity named at most this
#: often after the edit, the other identities (mean per identity) and the objects losing at most
#: this much, in the run itself (benchmarks/results/llava_demo.md).
FORGET_AFTER, RETAIN_DROP, OBJECT_DROP = 0.05, 0.15, 0.10


def save_llava(clip_folder, folder, **kwargs) -> Path:
    """A LLaVA (random projector and 1-block Llama) on the vision tower of the CLIP at
    ``clip_folder``, saved with its processor."""
    tokenizer = demo_tokenizer(["Alice Abara", "Bruno Bell"], ["apple"], [vqa.DEFAULT_QUESTION], vocab_size=320)
    model, processor = build_llava(clip_folder, tokenizer, hidden_size=32, layers=1, heads=2,
                                   intermediate_size=64, **kwargs)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return Path(folder)


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_hf_clip):
    """(family, CLIP, folder of a LLaVA on its vision tower)."""
    folder = save_llava(tiny_hf_clip, tmp_path_factory.mktemp("llava") / "vlm")
    family = HfClip(model_name=tiny_hf_clip)
    return family, family.load(), folder


def target_of(folder, **kwargs) -> Llava:
    target = Llava(str(folder), **({"max_new_tokens": 4, "batch_size": 3, "progress": False} | kwargs))
    target.load()
    return target


def noise_pixels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def vlm_state(target: Llava) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in target.adapter.vlm.state_dict().items()}


# -- the target contract -------------------------------------------------------------------------------

class TestLlavaContract(TargetContract):
    """The target contract (tests/target_contract.py) on the tiny pair: a LLaVA on the tiny CLIP's
    vision tower (2 blocks, features at -2: block 0 read), judged on ``small_world``'s held-out
    images with the VLM's answers controlled."""

    NAME, TOWER = "llava", "vision"
    READ, ALSO_READ = READ_LAYER, "vision_model.encoder.layers.0.self_attn.v_proj.weight"
    UNREAD = "vision_model.post_layernorm.weight"
    OUTPUT_TOLERANCE = {}  # allclose's own: a key bias changes the features by rounding only

    @pytest.fixture(scope="class")
    @classmethod
    def model_folder(cls, pair):
        return pair[2]

    @pytest.fixture(scope="class")
    @classmethod
    def make_target(cls):
        return lambda folder, **kwargs: Llava(str(folder), **({"max_new_tokens": 4, "batch_size": 3, "device": "cpu",
                                                               "dtype": "float32", "progress": False} | kwargs))

    @pytest.fixture()
    def controlled(self, monkeypatch, make_target, model_folder, clip, small_world):
        """The VLM answers the identity question with the name for as many of each identity's
        (2) held-out images after the edit as told, every one before; objects always."""
        target = make_target(model_folder, test_images_per_concept=2)
        target.load()
        context = concept_context(small_world, *clip)
        judge, adapter, told = target.judge, target.adapter, {}
        images = judge.images(context, context.report_stage)
        groups = {**images.identities, **images.objects}
        which = {row.numpy().tobytes(): (name, rank) for name, rows in groups.items() for rank, row in enumerate(rows)}

        def answer(pixels, question, progress=None):
            out = []
            for row in pixels:
                name, rank = which[row.numpy().tobytes()]
                if question == judge.object_question:
                    out.append(f"It is a {name}.")
                else:
                    named = rank < told["counts"]["vlm"][name] if adapter.written else True
                    out.append(f"This is {name}." if named else "I do not know this person.")
            return out

        monkeypatch.setattr(adapter, "answer", answer)

        def report(counts):
            told["counts"] = counts
            return evaluate_edit(target, context, self.perturbed(clip[1], self.READ))

        return ControlledJudge(report, {"vlm": list(images.identities)}, context.concepts[0], 2, 1,
                               "forget_name_accuracy", "retain_name_accuracy", None)

    @staticmethod
    def downstream_output(target) -> torch.Tensor:
        """What the language model receives of two images: the VLM's image features."""
        with torch.no_grad():
            features = target.adapter.vlm.model.get_image_features(pixel_values=noise_pixels(2)).pooler_output
        return torch.cat([f.flatten() for f in features])

    @staticmethod
    def model_state(target) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in target.adapter.vlm.state_dict().items()}

    @staticmethod
    def reload_tower(target, folder) -> dict[str, torch.Tensor]:
        from transformers import LlavaForConditionalGeneration

        tower = target.adapter.downstream_parameters()
        return {k: v.detach() for k, v in LlavaForConditionalGeneration.from_pretrained(folder).named_parameters()
                if k in tower}


# -- which tensors the VLM reads -----------------------------------------------------------------

# (vision_feature_layer 0, the embeddings alone, does not run in transformers 5.24: it asks the
# tower for ``output_hidden_states=0``, which reads as False.)
@pytest.mark.parametrize("layer, strategy", [(-2, "default"), (-1, "default"), (1, "default"), (1, "full"),
                                             (2, "full"), ([-2, -4], "default")])
def test_reads_is_exactly_what_changes_the_image_features(tmp_path, layer, strategy):
    """For each tensor of a 4-block tower, a perturbation changes the VLM's image features
    (``get_image_features``, what the language model receives) iff ``reads`` says so."""
    from transformers import CLIPModel

    from slug_pl.demo.hf_clip import save_clip_folder, tiny_clip_config

    torch.manual_seed(0)
    clip_folder = save_clip_folder(CLIPModel(tiny_clip_config(hidden_size=16, layers=4, heads=2, projection_dim=8)),
                                   tmp_path / "clip")
    target = target_of(save_llava(clip_folder, tmp_path / "vlm", vision_feature_layer=layer,
                                  vision_feature_select_strategy=strategy))
    clip = CLIPModel.from_pretrained(clip_folder)
    pixels = noise_pixels(2)
    with torch.no_grad():
        reference = target.adapter.vlm.model.get_image_features(pixel_values=pixels).pooler_output
        params = target.adapter._vlm_parameters()
        for name, _ in clip.named_parameters():
            theirs = target.adapter.downstream_name(name)
            if theirs is None:  # the text tower, the projections, the logit scale: not in the VLM
                assert not target.reads(name) and not name.startswith("vision_model."), name
                continue
            p = params[theirs]
            saved = p.clone()
            p.add_(torch.randn_like(p) + 0.5)
            changed = any(not torch.allclose(a, b) for a, b in zip(
                target.adapter.vlm.model.get_image_features(pixel_values=pixels).pooler_output, reference))
            p.copy_(saved)
            assert target.reads(name) == changed, (name, layer, strategy)


def test_reads_for_llava_1_5_settings(pair):
    """vision_feature_layer -2 of a 2-block tower: block 0 and the embeddings are read; block 1,
    post_layernorm, visual_projection and the text tower are not."""
    family, clip, folder = pair
    target = Llava(str(folder))  # reads() needs only the config: nothing loaded
    assert target.adapter.feature_depth() == 1 and target.adapter.vlm is None
    read = sorted(n for n, _ in clip.named_parameters() if target.reads(n))
    assert read and all(n.startswith(("vision_model.encoder.layers.0.", "vision_model.embeddings.",
                                      "vision_model.pre_layrnorm.")) for n in read)
    for name in ("vision_model.encoder.layers.1.mlp.fc1.weight", "vision_model.post_layernorm.weight",
                 "visual_projection.weight", "text_model.encoder.layers.0.mlp.fc1.weight"):
        assert not target.reads(name)


# -- the pair -------------------------------------------------------------------------------------

def test_check_pair_names_the_tensor_that_differs(pair, tmp_path):
    family, clip, folder = pair
    target = target_of(folder)
    name = "vision_model.encoder.layers.1.self_attn.k_proj.bias"  # not even read: still refused
    params = dict(clip.named_parameters())
    with torch.no_grad():
        params[name][3] += 1e-3
    try:
        with pytest.raises(TargetMismatchError, match=r"vision_model\.encoder\.layers\.1\.self_attn\.k_proj\.bias.*"
                                                      r"model\.vision_tower\.encoder\.layers\.1\.self_attn\.k_proj\.bias"):
            target.check_pair(family, clip)
    finally:
        with torch.no_grad():
            params[name][3] -= 1e-3
    target.check_pair(family, clip)


def test_check_pair_at_the_vlms_precision(pair):
    """A bfloat16 VLM holds the float32 CLIP rounded: the same pair; a change above one rounding
    step is not."""
    family, clip, folder = pair
    target = target_of(folder, dtype="bfloat16")
    assert next(target.adapter.vlm.parameters()).dtype == torch.bfloat16
    target.check_pair(family, clip)
    w = dict(clip.named_parameters())[READ_LAYER]
    assert same_weights(w, w.to(torch.bfloat16)) and not same_weights(w, (w * 1.02).to(torch.bfloat16))
    # rounded twice (float32 -> float16 checkpoint -> bfloat16) is still the same weights
    assert same_weights(w, w.to(torch.float16).to(torch.bfloat16))
    # weights below float16's normal range (2^-14) keep only an absolute step in a float16 checkpoint
    small = torch.tensor([1e-6, 3e-7, -2e-6, 0.02])
    assert same_weights(small, small.to(torch.float16).to(torch.bfloat16))
    assert not same_weights(small, (small * 1.02).to(torch.bfloat16))
    assert not same_weights(w * 1.0001, w.detach().clone())  # float32 copies must be bit-equal


# -- the transplant ---------------------------------------------------------------------------------

def test_saved_copy_of_a_bfloat16_vlm_changes_only_the_edited_tensor(pair, tmp_path):
    """On a GPU the VLM runs in bfloat16; its saved copy keeps the files' dtype: only the weights
    file changes, and in it only the edited tensor, to the CLIP's float32 value."""
    from safetensors.torch import load_file

    family, clip, folder = pair
    target = target_of(folder, dtype="bfloat16")
    edit = make_edit(clip, READ_LAYER, torch.randn_like(dict(clip.named_parameters())[READ_LAYER]), 0.3)
    saved = save_edited(target, clip, edit, tmp_path / "edited")
    assert changed_files(Path(folder), saved) == [Path("model.safetensors")]
    before, after = load_file(folder / "model.safetensors"), load_file(saved / "model.safetensors")
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == 1 and changed[0].endswith("vision_tower.encoder.layers.0.mlp.fc1.weight")
    assert after[changed[0]].dtype == torch.float32 and torch.equal(after[changed[0]], edit.edited)


# -- asking and judging -------------------------------------------------------------------------------

def test_answers_equal_vqa_ask_on_the_images(pair):
    """The cached-prompt path gives the answers of slug_pl.evaluation.vqa.ask (processor per batch)."""
    _, _, folder = pair
    target = target_of(folder, max_new_tokens=5)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)) for _ in range(5)]
    pixels = target.adapter.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    expected = vqa.ask(target.adapter.vlm, target.adapter.processor, images, target.judge.question, max_new_tokens=5, batch_size=2,
                       progress=False)
    assert target.adapter.answer(pixels, target.judge.question) == expected


@pytest.fixture(scope="module")
def datamodule(small_world):
    names = json.loads(Path(small_world["identities_json"]).read_text())
    suite = EvalSuite(LabelledSet(small_world["val_identities"], small_world["identities_json"]),
                      LabelledSet(small_world["val_objects"], small_world["objects_json"]))
    test = EvalSuite(LabelledSet(small_world["test_identities"], small_world["identities_json"]),
                     LabelledSet(small_world["test_objects"], small_world["objects_json"]))
    return SlugDataModule(concepts=names[:2], validation=suite, test=test), names


def test_judge_measures_the_vlm_with_the_clips_edit(pair, datamodule):
    family, clip, folder = pair
    dm, names = datamodule
    target = target_of(folder, clip_metrics=False, search_images_per_concept=2)
    before = vlm_state(target)
    judge = target.search_judge(run_context(dm, family, clip), names[0])
    # the other concept of the run is neither forgotten nor retained in this concept's judge
    assert sorted(judge.images.identities) == sorted(names[:1] + names[2:])
    # every image of the forgotten identity, the first 2 of every other identity and object
    assert {k: len(v) for k, v in judge.images.identities.items()} == {n: 3 if n == names[0] else 2
                                                                       for n in names[:1] + names[2:]}
    assert all(len(v) == 2 for v in judge.images.objects.values())
    metrics = judge.evaluate(clip)
    assert sorted(metrics) == sorted(VQA_METRICS) and all(0 <= v <= 1 for v in metrics.values())
    assert all(torch.equal(before[k], v) for k, v in vlm_state(target).items())

    # the search steps the CLIP in place and names the tensor: the VLM answers with it copied in
    grad = torch.randn_like(dict(clip.named_parameters())[READ_LAYER])
    edit = make_edit(clip, READ_LAYER, grad, 0.5)
    apply_edit(clip, edit)
    try:
        edited = judge.evaluate(clip, edited=READ_LAYER)
        vlm_tensor = target.adapter.downstream_parameters()["model.vision_tower.encoder.layers.0.mlp.fc1.weight"]
        assert torch.equal(vlm_tensor, edit.edited)
        # by hand: the edited VLM's answers on the same images, scored with vqa's rules
        objects = judge.images.objects
        answers = target.adapter.answer(torch.cat(list(objects.values())), target.judge.object_question)
        expected = [name for name, images in objects.items() for _ in images]
        assert edited["object_accuracy"] == pytest.approx(vqa.name_accuracy(answers, expected))
    finally:
        revert_edit(clip, edit)
    judge.evaluate(clip)  # no hint: every differing tensor is found again (none)
    assert all(torch.equal(before[k], v) for k, v in vlm_state(target).items())


def test_the_search_can_also_ask_about_the_forget_pairs(pair, small_world, tmp_path):
    """``search_forget_pairs``: the judge's images of the forgotten person are its validation
    images followed by the forget set's own, preprocessed the same way; the rest is unchanged."""
    from slug_pl.data.shards import decode_image, iter_raw_samples

    family, clip, folder = pair
    names = json.loads(Path(small_world["identities_json"]).read_text())
    assert main(["mine", "--shards", small_world["corpus"], "--name", names[0], "--out", str(tmp_path / "f")]) == 0
    shards = sorted(str(p) for p in (tmp_path / "f").glob("*.tar"))
    suite = EvalSuite(LabelledSet(small_world["val_identities"], small_world["identities_json"]),
                      LabelledSet(small_world["val_objects"], small_world["objects_json"]))
    dm = SlugDataModule(concepts=names[:1], forget={names[0]: shards}, validation=suite)
    plain = target_of(folder, search_images_per_concept=1, clip_metrics=False).search_judge(run_context(dm, family, clip), names[0]).images
    target = target_of(folder, search_images_per_concept=1, clip_metrics=False, search_forget_pairs=True)
    wide = target.search_judge(run_context(dm, family, clip), names[0]).images
    transform = ProcessorTransform(target.adapter.processor.image_processor)
    forget = torch.stack([transform(decode_image(s)) for s in iter_raw_samples(shards)])
    assert len(forget) >= 2
    assert torch.equal(wide.identities[names[0]], torch.cat([plain.identities[names[0]], forget]))
    assert all(torch.equal(wide.identities[k], v) for k, v in plain.identities.items() if k != names[0])
    assert wide.objects.keys() == plain.objects.keys()
    other = SlugDataModule(concepts=names[1:2], forget={names[0]: shards}, validation=suite)
    with pytest.raises(ValueError, match="no shards for"):
        target_of(folder, clip_metrics=False, search_forget_pairs=True).search_judge(run_context(other, family, clip), names[1])
    several = SlugDataModule(concepts=names[:2], forget=shards, validation=suite)
    with pytest.raises(ValueError, match="mapping concept -> shards"):
        target_of(folder, clip_metrics=False, search_forget_pairs=True).search_judge(run_context(several, family, clip), names[0])


def test_search_on_the_clip_lets_the_vlm_rank_the_candidates(pair, datamodule):
    family, clip, folder = pair
    dm, names = datamodule
    target = target_of(folder, search_on_vlm=False, search_images_per_concept=1)
    assert target.search_judge(run_context(dm, family, clip), names[0]) is None
    # the search then finds every candidate's edit for the VLM to order (never gives one up)
    assert target.reorders_candidates and not target_of(folder).reorders_candidates
    w = dict(clip.named_parameters())[READ_LAYER]
    edits = [make_edit(clip, READ_LAYER, torch.randn_like(w), s) for s in (0.0, 0.5)]
    order = target.rank_candidates(run_context(dm, family, clip), names[0], edits)
    assert sorted(order) == [0, 1]
    assert target.adapter.differing(clip) == []  # CLIP and VLM restored


def test_the_choice_maximises_the_configured_kept_metrics():
    def ev(i, **metrics):
        return StepEvaluation(i, f"layer{i}", "vision", 1.0, 0.1, True, True, metrics)

    a = ev(0, forget_name_accuracy=0.0, retain_name_accuracy=0.9, object_accuracy=0.9, retain_top1=0.1)
    b = ev(1, forget_name_accuracy=0.0, retain_name_accuracy=0.5, object_accuracy=0.5, retain_top1=0.9)
    results = [CandidateResult(e.layer, "vision", [e], e) for e in (a, b)]
    vlm = StepSearch(SearchSettings(ForgetTarget("forget_name_accuracy", 0.0),
                                    kept=("retain_name_accuracy", "object_accuracy")), log=lambda m: None)
    assert vlm.choose(results)[0][0] is a
    clip_side = StepSearch(SearchSettings(ForgetTarget("forget_name_accuracy", 0.0)), log=lambda m: None)
    assert clip_side.choose(results)[0][0] is b
    with pytest.raises(ValueError, match="kept"):
        SearchSettings(kept=())


def test_the_retain_projection_keeps_the_edit_off_the_retain_images(pair, small_world):
    """What LLaVA protects (``protected_inputs``, for the method's ``model.protect_retained``): the
    retain images; the forget gradient of a read linear weight projected off what they feed it
    gives an edit that leaves those images' states unchanged, and still moves the forgotten
    person's images, which are never among the protected ones."""
    from slug_pl.data.shards import decode_image, expand_urls, iter_raw_samples

    family, clip, folder = pair
    transform = family.image_transform()
    corpus = [s for s in iter_raw_samples(expand_urls(small_world["corpus"])) if s.caption]
    forgotten = json.loads(corpus[0].fields["json"])["name"]  # the first retain pair names them
    dm = SlugDataModule(concepts=[forgotten], retain=small_world["corpus"])
    target = target_of(folder)
    sources = target.protected_inputs(run_context(dm, family, clip), 2)
    assert [(s.tower, s.kind, s.count, s.tolerance) for s in sources] == [("vision", "images", 2, 0.3)]
    projection, record = build_projection(clip, RetainProjection(0.0, 2), sources, target.reads, "SLUG", "projected")
    assert record["protected"][0]["inputs"] == 2 and record["protected"][0]["tolerance"] == 0.0
    # recorded: the covered tensors the VLM reads (block 0 of 2: q, k, v, out, fc1, fc2), the candidates
    assert sorted(record["rank"]) == sorted(n for n in projection.bases if target.reads(n))
    assert record["editable"] == 6
    assert projection.covers(READ_LAYER) and not projection.covers(READ_LAYER.replace("weight", "bias"))
    assert not projection.covers("vision_model.embeddings.position_embedding.weight")
    assert projection.bases[READ_LAYER].shape[1] == 2 * 17  # every patch and the class token of 2 images
    protected = torch.stack([transform(decode_image(s)) for s in corpus if forgotten not in s.caption][:2])
    theirs = torch.stack([transform(decode_image(s)) for s in corpus if forgotten in s.caption][:2])

    param = clip.get_parameter(READ_LAYER)
    g = torch.randn(param.shape, generator=torch.Generator().manual_seed(0))
    step = projection.apply({READ_LAYER: g})[READ_LAYER]
    change = step_changes(param, step, lambda pixels: clip.vision_model(
        pixel_values=pixels, output_hidden_states=True).hidden_states[1], (protected, theirs))
    assert change[0] < 1e-4 and change[1] > 1e-2


# -- a fit run through the CLI ----------------------------------------------------------------------

@ON_CPU_AND_GPU
def test_fit_with_the_llava_target(tmp_path, monkeypatch, small_world, tiny_hf_clip, pair, device):
    """A whole run; on a GPU the VLM answers in bfloat16 and the pass, the search and the answers
    run there."""
    _, _, folder = pair
    monkeypatch.chdir(tmp_path)
    concept = json.loads(Path(small_world["identities_json"]).read_text())[0]
    assert main(["mine", "--shards", small_world["corpus"], "--name", concept, "--out", "forget"]) == 0
    target = {"class_path": "slug_pl.targets.Llava",
              "init_args": {"model": str(folder), "max_new_tokens": 3, "batch_size": 64, "progress": False,
                            "search_images_per_concept": 1, "save_edited": True}}
    config = write_config(tmp_path, small_world, "unused", "forget/forget-000000.tar",
                          model={"family": {"class_path": "slug_pl.families.HfClip",
                                            "init_args": {"model_name": tiny_hf_clip}}, "target": target},
                          forget_target={"metric": "forget_name_accuracy", "value": 0.0},
                          search={"top_k": 1, "max_evals": 2, "towers": ["vision"],
                                  "kept": ["retain_name_accuracy", "object_accuracy"]},
                          trainer={"accelerator": "gpu" if device == "cuda" else "cpu"})
    main(["fit", "--config", str(config)])
    run = tmp_path / "lightning_logs" / "version_0"
    summary = json.loads((run / "summary.json").read_text())
    # the search (on the VLM), the evaluation and the VLM (no device configured) ran where the pass ran
    where = "cuda:0" if device == "cuda" else "cpu"
    assert summary["devices"] | {"precision": None} == {"pass": where, "after_pass": where, "evaluation": where,
                                                        "downstream": where, "precision": None,
                                                        "search_ranks": 1}
    block = summary["vqa"]
    assert block["question"] == QUESTION
    for when in ("before", "after"):
        assert sorted(block[when]) == sorted(VQA_METRICS)
        assert all(0 <= v <= 1 for v in block[when].values())
    assert block["images"] == {"forget": 3, "retain": 57, "objects": 30}  # every held-out test image
    layer = summary["method"]["edits"][0]["layer"]
    assert Llava(str(folder)).reads(layer)
    assert block["transplanted"] == ["model.vision_tower." + layer[len("vision_model."):]]
    report = (run / "report.md").read_text()
    assert "## LLaVA: does it still name them?" in report
    # the forget target (a VLM metric here) is also judged on the held-out images the VLM answered
    held = summary["target"]["held_out"]
    assert summary["target"]["metric"] == "forget_name_accuracy"
    expected = block["after"]["forget_name_accuracy"]
    assert held == {"met": expected <= summary["target"]["value"], "value": expected, "images": 3}
    assert "config has no test sets" not in report
    for row in csv.DictReader((run / "search.csv").open()):  # VLM and CLIP metrics, and both at once
        assert float(row[FORGET_BOTH]) == max(float(row["forget_name_accuracy"]), float(row["forget_top1"]))
    saved = target_of(run / block["saved_to"])
    loaded = target_of(folder).adapter.downstream_parameters()
    assert [k for k, v in saved.adapter.downstream_parameters().items() if not torch.equal(v, loaded[k])] == \
        block["transplanted"]


# -- the demo, from a fresh directory ---------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.heavy  # builds the world, a CLIP and a LLaVA from scratch: minutes on 2 cores
def test_llava_demo_forgets_a_name(tmp_path, monkeypatch, capsys):
    """``slug-pl fit --config configs/demo_llava.yaml`` on a new clone: the world, the CLIP and the
    LLaVA are built (the LLaVA names held-out identities >= 90 % of the time), and the VLM stops
    naming the forgotten identity on held-out images, with exactly one tensor of its vision tower
    changed."""
    monkeypatch.chdir(tmp_path)
    code = main(["fit", "--config", str(REPO / "configs" / "demo_llava.yaml"), "--trainer.enable_progress_bar",
                 "false", "--model.target.init_args.progress", "false", "--model.target.init_args.save_edited", "true"])
    built = json.loads((tmp_path / ".slug_cache/demo_llava/llava/slug_demo.json").read_text())
    assert built["identities_name_accuracy"] >= 0.9
    run = tmp_path / "lightning_logs" / "version_0"
    summary = json.loads((run / "summary.json").read_text())
    assert code == 0 and summary["target"]["met"]
    before, after = summary["vqa"]["before"], summary["vqa"]["after"]
    assert before["forget_name_accuracy"] >= 0.9 and after["forget_name_accuracy"] <= FORGET_AFTER
    assert before["retain_name_accuracy"] - after["retain_name_accuracy"] <= RETAIN_DROP
    protected = summary["method"]["retain_projection"]["protected"]  # model.protect_retained: the retain images
    assert protected[0]["inputs"] > 900  # the retain shard's pairs that do not name the person
    assert before["object_accuracy"] - after["object_accuracy"] <= OBJECT_DROP
    edited = target_of(run / "edited_llava")
    original = target_of(tmp_path / ".slug_cache/demo_llava/llava").adapter.downstream_parameters()
    assert [k for k, v in edited.adapter.downstream_parameters().items() if not torch.equal(v, original[k])] == \
        summary["vqa"]["transplanted"]
    with capsys.disabled():
        print(f"\nLLaVA demo: {summary['method']['edits'][0]['layer']}; VLM forget "
              f"{before['forget_name_accuracy']:.3f} -> {after['forget_name_accuracy']:.3f}, others "
              f"{before['retain_name_accuracy']:.3f} -> {after['retain_name_accuracy']:.3f}, objects "
              f"{before['object_accuracy']:.3f} -> {after['object_accuracy']:.3f}")
