"""The Stable Diffusion target: the target contract (tests/target_contract.py: what a pipeline
reads, the pair check, the transplant, the saved pipeline, ``slug-pl transplant``, the verdict
over every judge), and what is its own: clip skip and an SD 2.x-shaped encoder, the pair check in
the pipeline's dtype, a half-precision saved copy, ``slug-pl generate``, the final choice by
generations, and a whole run on a tiny CLIP + pipeline.

The tiny pipeline (tests/builders_downstream.py) embeds the text tower of the tiny random
``CLIPModel`` of conftest (2 layers, width 64, 16 positions); it draws noise, which is enough to
check what changes and what does not.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from builders_downstream import tiny_sd_pipeline
from conftest import ON_CPU_AND_GPU, assert_within_sd_demo_bounds, changed_files, save_edited, write_config
from slug_pl.cli import main
from slug_pl.edit import apply_edit, make_edit
from slug_pl.families import HfClip
from slug_pl.targets import StableDiffusion, TargetMismatchError
from slug_pl.evaluation.generation_judge import CandidateScore, combine_judges, order_by_generation
from slug_pl.targets.stable_diffusion import ClipSkipPipeline, prompt_embeddings
from target_contract import PROMPTS, GenerationContract


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_hf_clip):
    """A tiny pipeline whose text encoder is the tiny HF CLIP's text tower."""
    return str(tiny_sd_pipeline(tmp_path_factory.mktemp("sd") / "pipe", text_encoder_dir=tiny_hf_clip))


@pytest.fixture(scope="module")
def sd2_shaped(tmp_path_factory, pipeline):
    """The same pipeline with the text encoder's last layer dropped, as Stable Diffusion 2.x embeds
    OpenCLIP ViT-H/14 (23 of its 24 layers)."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    pipe = StableDiffusionPipeline.from_pretrained(pipeline, safety_checker=None)
    config = pipe.text_encoder.config
    config.num_hidden_layers -= 1
    shorter = CLIPTextModel(config)
    state = {k: v for k, v in pipe.text_encoder.state_dict().items() if not k.startswith("encoder.layers.1.")}
    shorter.load_state_dict(state)
    pipe.text_encoder = shorter
    folder = tmp_path_factory.mktemp("sd2") / "pipe"
    pipe.save_pretrained(folder)
    return str(folder)


@pytest.fixture()
def clip(tiny_hf_clip):
    family = HfClip(model_name=tiny_hf_clip)
    return family, family.load()


def tensors(pipe) -> dict[str, torch.Tensor]:
    """Every tensor of a pipeline's models, ``component.name`` -> a copy."""
    return {f"{part}.{k}": v.detach().clone() for part in ("text_encoder", "unet", "vae")
            for k, v in getattr(pipe, part).state_dict().items()}


def differing(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


def generate(pipe, seed: int = 0, prompts=PROMPTS) -> torch.Tensor:
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    return pipe(prompt=list(prompts), num_inference_steps=2, guidance_scale=3.0, generator=generators,
                output_type="pt").images


# ------------------------------------------------------------------------------ the target contract


class TestStableDiffusionContract(GenerationContract):
    """The target contract (tests/target_contract.py) on the tiny pipeline, and ``reads`` in the
    other configurations: clip skip with and without guidance, an SD 2.x-shaped encoder."""

    NAME, TOWER = "stable_diffusion", "text"

    @pytest.fixture(scope="class")
    @classmethod
    def make_target(cls):
        return lambda folder, **kwargs: StableDiffusion(
            str(folder), **({"device": "cpu", "guidance": 3.0, "progress": False} | kwargs))

    @pytest.mark.parametrize("clip_skip, guidance, sd2", [(1, 1.0, False), (1, 3.0, False), (None, 3.0, True)])
    def test_reads_in_other_configurations(self, make_target, pipeline, sd2_shaped, clip, clip_skip, guidance, sd2):
        target = make_target(sd2_shaped if sd2 else pipeline, clip_skip=clip_skip, guidance=guidance)
        self.assert_reads_is_what_changes_the_output(target, *clip)
        if sd2:
            assert not target.reads("text_model.encoder.layers.1.mlp.fc1.weight")  # the dropped layer
            assert target.reads("text_model.final_layer_norm.weight")
        if clip_skip:
            assert target.reads("text_model.final_layer_norm.weight")  # diffusers normalizes the skipped state
            assert target.reads("text_model.encoder.layers.1.mlp.fc1.weight") == (guidance > 1)


# ------------------------------------------------------------------------------ names and reads


def test_only_a_clip_side_search_leaves_the_choice_to_generations(pipeline):
    """search_on: clip re-orders the found edits by generations (the search must find every
    candidate's edit); search_on: generation chose by generations already."""
    assert StableDiffusion(pipeline, device="cpu", search_on="clip").reorders_candidates
    assert not StableDiffusion(pipeline, device="cpu", search_on="generation").reorders_candidates


def test_reads_exactly_the_text_tower_without_projection(pipeline, clip):
    _, model = clip
    target = StableDiffusion(pipeline, device="cpu")
    unread = {n for n, _ in model.named_parameters() if not target.reads(n)}
    other_towers = ("vision_model.", "visual_projection.", "text_projection.")
    assert unread == {n for n, _ in model.named_parameters() if n.startswith(other_towers) or n == "logit_scale"}


def test_ranking_never_offers_a_tensor_the_pipeline_does_not_read(sd2_shaped, clip):
    from slug_pl.ranking import candidates, layer_scores

    family, model = clip
    target = StableDiffusion(sd2_shaped, device="cpu")
    gen = torch.Generator().manual_seed(1)
    params = {n: p.detach() for n, p in model.named_parameters()}
    forget = {n: torch.randn(p.shape, generator=gen) for n, p in params.items()}
    retain = {n: torch.randn(p.shape, generator=gen) for n, p in params.items()}
    scores = layer_scores(family, params, forget, retain, readable=target.reads)
    offered = [s.name for tower in ("vision", "text") for s in candidates(scores, tower, top_k=100, fronts=100)]
    assert offered and all(target.reads(n) for n in offered)
    unread_scored = [s for s in scores if not target.reads(s.name)]
    assert unread_scored and all(s.front == 0 for s in unread_scored)  # shown, never on a front
    assert any(s.name.startswith("text_model.encoder.layers.1.") for s in unread_scored)


def test_clip_skip_embeddings_are_diffusers_rule(pipeline):
    """Without clip skip: diffusers' own ``encode_prompt``. With ``clip_skip = 1`` on a 2-layer
    encoder: the first layer's output through ``final_layer_norm`` — what a 1-layer encoder with
    the same weights computes as its last hidden state."""
    from transformers import CLIPTextModel

    target = StableDiffusion(pipeline, device="cpu")
    target.load()
    pipe = target.adapter.pipe
    ours = prompt_embeddings(pipe, PROMPTS)
    theirs, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False)
    assert torch.equal(ours, theirs)

    config = pipe.text_encoder.config
    config_1 = type(config).from_dict({**config.to_dict(), "num_hidden_layers": 1})
    one_layer = CLIPTextModel(config_1).eval()
    one_layer.load_state_dict({k: v for k, v in pipe.text_encoder.state_dict().items()
                               if not k.startswith("encoder.layers.1.")})
    ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        reference = one_layer(ids).last_hidden_state
    skipped = prompt_embeddings(pipe, PROMPTS, clip_skip=1)
    assert torch.allclose(skipped, reference, atol=1e-6) and not torch.allclose(skipped, ours, atol=1e-3)

    # the wrapper draws with those states, and the empty negative prompt at full depth
    images = generate(ClipSkipPipeline(pipe, 1))
    generators = [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]
    negative, _ = pipe.encode_prompt([""] * len(PROMPTS), "cpu", 1, False)
    direct = pipe(prompt_embeds=reference, negative_prompt_embeds=negative, num_inference_steps=2,
                  guidance_scale=3.0, generator=generators, output_type="pt").images
    assert torch.allclose(images, direct, atol=1e-5)


# ------------------------------------------------------------------------------ the pair check


def test_pair_check_refuses_a_clip_with_fewer_layers(pipeline, clip):
    """A CLIP with the pipeline's weights but one layer fewer: the pipeline's second layer is not
    its (the contract checks the rest of the pair check)."""
    from transformers import CLIPModel

    from slug_pl.demo.hf_clip import tiny_clip_config

    family, model = clip
    target = StableDiffusion(pipeline, device="cpu")
    shallow = CLIPModel(tiny_clip_config(hidden_size=64, layers=1, heads=2, projection_dim=32))
    shallow.load_state_dict({k: v for k, v in model.state_dict().items() if ".encoder.layers.1." not in k})
    with pytest.raises(TargetMismatchError,
                       match=r"has 'encoder\.layers\.1\.self_attn\.k_proj\.weight', which the CLIP"):
        target.check_pair(family, shallow)


def test_pair_check_compares_in_the_pipelines_dtype(pipeline, clip):
    family, model = clip
    target = StableDiffusion(pipeline, device="cpu", dtype="bfloat16")
    target.check_pair(family, model)  # the bfloat16 pipeline holds the CLIP's weights rounded
    with torch.no_grad():  # a change below bfloat16's resolution is invisible to the pipeline ...
        model.text_model.final_layer_norm.weight[0] *= 1 + 2**-12
    target.check_pair(family, model)
    with torch.no_grad():  # ... a larger one is not
        model.text_model.final_layer_norm.weight[0] *= 1.1
    with pytest.raises(TargetMismatchError, match="final_layer_norm.weight"):
        target.check_pair(family, model)


# ------------------------------------------------------------------------------ transplant


def test_saved_copy_of_a_half_precision_pipeline_changes_only_the_edited_tensor(pipeline, clip, tmp_path):
    """On a GPU the pipeline runs in float16; its saved copy must not be: every file but the text
    encoder's weights is copied byte for byte, and there only the edited tensor changes, to the
    CLIP's float32 value (not the value rounded to the running dtype)."""
    from diffusers import StableDiffusionPipeline

    family, model = clip
    target = StableDiffusion(pipeline, device="cpu", dtype="bfloat16")
    target.check_pair(family, model)
    name = "text_model.encoder.layers.1.mlp.fc1.weight"
    noise = torch.randn(model.get_parameter(name).shape, generator=torch.Generator().manual_seed(3))
    edit = make_edit(model, name, noise, 0.3)
    out = save_edited(target, model, edit, tmp_path / "edited")
    source = Path(pipeline)
    assert changed_files(source, out) == [Path("text_encoder/model.safetensors")]
    original = tensors(StableDiffusionPipeline.from_pretrained(source, safety_checker=None))
    saved = tensors(StableDiffusionPipeline.from_pretrained(out, safety_checker=None))
    assert differing(original, saved) == ["text_encoder.encoder.layers.1.mlp.fc1.weight"]
    assert saved["text_encoder.encoder.layers.1.mlp.fc1.weight"].dtype == torch.float32
    assert torch.equal(saved["text_encoder.encoder.layers.1.mlp.fc1.weight"], edit.edited)
    # the running pipeline holds the edit rounded to bfloat16, which the copy does not
    assert not torch.equal(edit.edited.to(torch.bfloat16).float(), edit.edited)


# ------------------------------------------------------------------------------ generate


def test_generate_command_writes_shards_usable_as_a_forget_set(pipeline, tiny_hf_clip, tmp_path):
    from slug_pl.data.labelled import load_pairs
    from slug_pl.data.shards import decode_image, iter_raw_samples

    out = tmp_path / "forget"
    prompt = "a photo of Alice Abara."
    assert main(["generate", "--pipeline", pipeline, "--prompt", prompt, "--n", "3", "--out", str(out),
                 "--steps", "2", "--seed", "7", "--device", "cpu"]) == 0
    shards = sorted(str(p) for p in out.glob("*.tar"))
    samples = list(iter_raw_samples(shards))
    assert [json.loads(s.fields["json"])["seed"] for s in samples] == [7, 8, 9]
    assert all(s.caption == prompt for s in samples)
    assert all(decode_image(s).size == (32, 32) for s in samples)
    family = HfClip(model_name=tiny_hf_clip)
    images, tokens = load_pairs(shards, family.image_transform(), family.tokenize)[:2]
    assert images.shape == (3, 3, 32, 32) and torch.equal(tokens[0], family.tokenize([prompt])[0])


# ------------------------------------------------------------------------------ the final choice


def test_order_by_generation_prefers_retain_among_edits_that_remove_the_concept():
    scores = [CandidateScore("a", 1.0, 0.50, 0.95, 30.0),   # keeps most, but the concept is still drawn
              CandidateScore("b", 1.0, 0.10, 0.70, 29.0),
              CandidateScore("c", 1.0, 0.00, 0.80, 25.0),
              CandidateScore("d", 1.0, 0.05, 0.80, 26.0)]  # ties c on retain, better CLIP score
    assert order_by_generation(scores, threshold=0.1) == [3, 2, 1, 0]
    assert order_by_generation(scores, threshold=0.0) == [2, 0, 1, 3]
    assert order_by_generation(scores[:1], threshold=0.1) is None  # none removes it: CLIP-side order


def test_combined_judges_remove_only_what_every_judge_misses():
    """With several judges (the CLIP and a classifier), the concept counts as forgotten only when
    every judge misses it: forget is the highest recognition, retain the mean; each judge's own
    numbers stay readable. One judge is passed through unchanged."""
    clip = {"forget_top1": 0.0, "forget_top5": 0.25, "retain_top1": 0.9, "retain_top5": 1.0}
    classifier = {"forget_top1": 0.75, "forget_top5": 1.0, "retain_top1": 0.7, "retain_top5": 0.9}
    both = combine_judges({"clip": clip, "sd_classifier": classifier})
    assert both["forget_top1"] == 0.75 and both["forget_top5"] == 1.0  # the classifier still sees it
    assert both["retain_top1"] == pytest.approx(0.8) and both["retain_top5"] == pytest.approx(0.95)
    assert both["forget_top1[clip]"] == 0.0 and both["retain_top1[sd_classifier]"] == 0.7
    assert combine_judges({"clip": clip}) == clip


# ------------------------------------------------------------------------------ a whole run


def sd_fit(tmp_path: Path, world: dict, clip_folder: str, concept: str, search: dict, target: dict,
           accelerator: str = "cpu", forget_target: dict | None = None, model: dict | None = None) -> Path:
    """Mine ``concept``'s forget set and run ``slug-pl fit`` with the tiny HF CLIP and a Stable
    Diffusion target (``target``: its init_args; ``model``: more of SLUG's init_args) in
    ``tmp_path`` (the working folder); returns the run folder."""
    assert main(["mine", "--shards", world["corpus"], "--name", concept, "--out", "forget"]) == 0
    config = write_config(tmp_path, world, "unused", "forget/forget-000000.tar",
                          search={"towers": ["text"], "save_checkpoint": False, **search},
                          forget_target=forget_target or {})
    raw = yaml.safe_load(config.read_text())
    raw["model"]["init_args"]["family"] = {"class_path": "slug_pl.families.HfClip",
                                           "init_args": {"model_name": clip_folder}}
    raw["model"]["init_args"]["target"] = {"class_path": "slug_pl.targets.StableDiffusion", "init_args": target}
    raw["model"]["init_args"].update(model or {})
    raw["trainer"]["accelerator"] = accelerator
    config.write_text(yaml.safe_dump(raw))
    assert main(["fit", "--config", str(config)]) == 0
    return tmp_path / "lightning_logs" / "version_0"


@ON_CPU_AND_GPU
def test_fit_with_the_target_judges_generations_and_saves_the_edited_pipeline(
        tmp_path, monkeypatch, small_world, tiny_hf_clip, pipeline, device):
    """A whole run; on a GPU the pipeline draws in float16 and the pass, the search and the
    generations run there."""
    from diffusers import StableDiffusionPipeline

    concept = json.loads(Path(small_world["identities_json"]).read_text())[0]
    monkeypatch.chdir(tmp_path)
    run = sd_fit(tmp_path, small_world, tiny_hf_clip, concept, {"top_k": 2, "max_evals": 2}, {
        "pipeline": pipeline, "retain_concepts": 2, "seeds": [0, 1], "search_seeds": [5], "steps": 2,
        "guidance": 3.0, "batch_size": 4, "forget_threshold": 1.0, "save_edited": True,
        "progress": False}, accelerator="gpu" if device == "cuda" else "cpu", forget_target={"value": 1.0})
    summary = json.loads((run / "summary.json").read_text())
    # the search, the evaluation and the pipeline (no device configured) ran where the pass ran
    where = "cuda:0" if device == "cuda" else "cpu"
    assert summary["devices"] | {"precision": None} == {"pass": where, "after_pass": where, "evaluation": where,
                                                        "downstream": where, "precision": None,
                                                        "search_ranks": 1}
    generation = summary["generation"]
    assert generation["prompts"] == 3 * 2 and generation["seeds"] == [0, 1]  # 3 concepts × 2 templates
    for side in ("before", "after"):
        scores = generation[side]
        assert set(scores) == {"forget_recognition", "retain_recognition", "clip_score", "forget_clip_score",
                               "retain_clip_score"}
        assert 0 <= scores["forget_recognition"] <= 1 and 0 <= scores["retain_recognition"] <= 1
        assert 0 <= scores["forget_clip_score"] <= 100 and 0 <= scores["retain_clip_score"] <= 100
        # all prompts: 2 forget and 4 retain prompts, each drawn with 2 seeds
        mean = (2 * scores["forget_clip_score"] + 4 * scores["retain_clip_score"]) / 6
        assert scores["clip_score"] == pytest.approx(mean)

    # the choice: among the candidates scored on generations (all "remove" at threshold 1), the best retain
    chosen = summary["method"]["edits"][0]["layer"]
    candidates = generation["candidates"][concept]
    assert len(candidates) == 2 and all(c["layer"].startswith("text_model.") for c in candidates)
    order = order_by_generation([CandidateScore(c["layer"], c["step"], c["forget_recognition"],
                                                c["retain_recognition"], c["clip_score"]) for c in candidates], 1.0)
    assert chosen == candidates[order[0]]["layer"]

    # the saved pipeline differs from the original in exactly the chosen tensor
    original = tensors(StableDiffusionPipeline.from_pretrained(pipeline, safety_checker=None))
    edited = tensors(StableDiffusionPipeline.from_pretrained(run / "edited_stable_diffusion", safety_checker=None))
    assert differing(original, edited) == ["text_encoder." + chosen.removeprefix("text_model.")]
    assert generation["transplanted"] == [chosen.removeprefix("text_model.")]
    report = (run / "report.md").read_text()
    assert "## Generation (Stable Diffusion)" in report and (run / "generation_grid.png").is_file()
    ranking = (run / "ranking.csv").read_text()
    assert "text_model.encoder" in ranking and "vision_model" not in ranking  # towers: [text]


def test_fit_protecting_the_retained_prompts_leaves_their_text_states_unchanged(
        tmp_path, monkeypatch, small_world, tiny_hf_clip, pipeline):
    """model.protect_retained with a Stable Diffusion target: the forget gradient is projected off
    what the retained prompts (the target's protected inputs) feed the text encoder, so the edited
    pipeline encodes them as before (every position the UNet reads) while the forgotten concept's
    prompts move; only projectable tensors are candidates."""
    from diffusers import StableDiffusionPipeline

    identities = json.loads(Path(small_world["identities_json"]).read_text())
    concept = identities[0]
    monkeypatch.chdir(tmp_path)
    run = sd_fit(tmp_path, small_world, tiny_hf_clip, concept, {"top_k": 3, "max_evals": 2}, {
        "pipeline": pipeline, "retain_concepts": 2, "seeds": [0], "search_seeds": [5], "steps": 2,
        "guidance": 3.0, "batch_size": 8, "forget_threshold": 1.0, "device": "cpu", "save_edited": True,
        "progress": False}, forget_target={"value": 1.0}, model={"protect_retained": {"tolerance": 1e-6}})
    summary = json.loads((run / "summary.json").read_text())
    record = summary["method"]["retain_projection"]
    assert record["departure"] == "a departure from SLUG's plain gradient" and len(record["protected"]) == 1
    protected = record["protected"][0]
    assert (protected["tower"], protected["kind"]) == ("text", "prompts")
    assert protected["inputs"] == 2 * 2 and protected["tolerance"] == 1e-6  # 2 retained concepts × 2 templates
    assert protected["concepts"] == identities[1:3]
    assert "protected" not in summary["generation"]  # the method's record, not the target's
    chosen = summary["method"]["edits"][0]["layer"]
    assert chosen.endswith("_proj.weight") or chosen.endswith((".fc1.weight", ".fc2.weight", "embedding.weight"))
    import csv

    rows = list(csv.DictReader((run / "ranking.csv").open()))
    editable = {r["name"] for r in rows if r["readable"] == "True"}
    projectable = (".q_proj.weight", ".k_proj.weight", ".v_proj.weight", ".out_proj.weight", ".fc1.weight",
                   ".fc2.weight", "_embedding.weight")
    assert editable and all(name.endswith(projectable) for name in editable)  # only what can be projected
    assert any(r["name"].endswith("layer_norm1.weight") and r["readable"] == "False" for r in rows)
    retained = [t.format(c) for c in identities[1:3] for t in ("a photo of {}.", "{} in a picture.")]
    original = StableDiffusionPipeline.from_pretrained(pipeline, safety_checker=None)
    edited = StableDiffusionPipeline.from_pretrained(run / "edited_stable_diffusion", safety_checker=None)
    change = lambda prompts: float((prompt_embeddings(edited, prompts) - prompt_embeddings(original, prompts)).norm()
                                   / prompt_embeddings(original, prompts).norm())  # noqa: E731
    assert change(retained) < 1e-4
    assert change([t.format(concept) for t in ("a photo of {}.", "{} in a picture.")]) > 10 * change(retained)
    report = (run / "report.md").read_text()
    assert "## Retain projection: a departure from SLUG's plain gradient" in report
    assert "| text | 4 prompts | the prompts of 2 retained concepts" in report


def test_fit_with_the_step_search_on_generations(tmp_path, monkeypatch, small_world, tiny_hf_clip, pipeline):
    import csv

    from builders_downstream import TinyClassifier
    from slug_pl.evaluation.generation import save_classifier

    identities = json.loads(Path(small_world["identities_json"]).read_text())
    concept = identities[0]
    torch.manual_seed(0)
    classifier = save_classifier(tmp_path / "judge", TinyClassifier(len(identities)),
                                 "builders_downstream.TinyClassifier", {"num_classes": len(identities)}, identities,
                                 image_size=(8, 8))
    monkeypatch.chdir(tmp_path)
    run = sd_fit(tmp_path, small_world, tiny_hf_clip, concept,
                 {"top_k": 2, "max_evals": 2}, {
                     "pipeline": pipeline, "retain_concepts": 2, "seeds": [0], "search_seeds": [5, 6], "steps": 2,
                     "guidance": 3.0, "batch_size": 4, "search_on": "generation",
                     "judges": ["clip", str(classifier)], "device": "cpu", "progress": False},
                 forget_target={"metric": "forget_top1", "value": 1.0})
    summary = json.loads((run / "summary.json").read_text())
    generation = summary["generation"]
    assert generation["settings"]["search_on"] == "generation" and generation["candidates"] == {}
    # the search judged generations, so the held-out verdict is the generations' (held-out seeds:
    # the highest recognition of the concept over the judges, 2 templates × 1 seed), not the CLIP's
    held = summary["target"]["held_out"]
    assert held["value"] == max(j["after"]["forget_recognition"] for j in generation["judges"].values())
    assert held["images"] == 2 and held["met"] == (held["value"] <= 1.0)
    rows = list(csv.DictReader((run / "search.csv").open()))
    assert rows and all(r["layer"].startswith("text_model.") for r in rows)
    # the search judged generations: the concept's 2 templates × 2 search seeds = 4 images, so its
    # recognition is a multiple of 1/4; the 2 retained concepts (1 template × 2 seeds each) average
    # halves: quarters too
    for key in ("forget_top1", "retain_top1"):
        assert all(4 * float(r[f"{key}[{j}]"]) == round(4 * float(r[f"{key}[{j}]"])) for r in rows
                   for j in ("clip", "judge"))
    # both judges decide: forget is the highest of the two, retain their mean
    for r in rows:
        assert float(r["forget_top1"]) == max(float(r["forget_top1[clip]"]), float(r["forget_top1[judge]"]))
        assert float(r["retain_top1"]) == pytest.approx((float(r["retain_top1[clip]"])
                                                         + float(r["retain_top1[judge]"])) / 2, abs=1e-5)
    assert generation["target"]["met"] == all(j["after"]["forget_recognition"] <= 0.1
                                              for j in generation["judges"].values())
    assert not any(r.get("utility_top1") for r in rows)  # no utility set on the generation side
    # each judge's per-concept recognition: its retain figure is their mean over the other concepts
    # (the top-level per_concept is the first judge's)
    first = next(iter(generation["judges"].values()))
    assert {c: v["after"] for c, v in first["per_concept"].items()} == {
        c: v["recognition_after"] for c, v in generation["per_concept"].items()}
    for judged in generation["judges"].values():
        others = [v for c, v in judged["per_concept"].items() if not generation["per_concept"][c]["forget"]]
        for when in ("before", "after"):
            assert judged[when]["retain_recognition"] == pytest.approx(sum(v[when] for v in others) / len(others))


def test_frozen_clip_judge_keeps_judging_with_the_unedited_text_tower(clip):
    """During a generation-side step search the CLIP carries the candidate edit; the judge must
    still be the unedited CLIP: class embeddings fixed before the edit, images through the
    (unedited) vision tower."""
    from PIL import Image

    from slug_pl.evaluation.generation import ClipZeroShotJudge
    from slug_pl.evaluation.generation_judge import FrozenClipJudge

    family, model = clip
    classes, templates = ["Alice Abara", "Bruno Bell", "Chen Wu"], ["a photo of {}.", "{} in a picture."]
    gen = torch.Generator().manual_seed(0)
    images = [Image.fromarray((torch.rand(32, 32, 3, generator=gen) * 255).byte().numpy()) for _ in range(4)]
    frozen, live = FrozenClipJudge(family, model, classes, templates), ClipZeroShotJudge(family, model, templates)
    unedited = live.logits(images, classes)
    assert torch.allclose(frozen.logits(images, classes), unedited, atol=1e-6)
    assert torch.allclose(frozen.logits(images, classes[::-1]), unedited.flip(1), atol=1e-6)

    name = "text_model.encoder.layers.1.mlp.fc2.weight"
    apply_edit(model, make_edit(model, name, torch.randn(model.get_parameter(name).shape, generator=gen), 1.0))
    assert not torch.allclose(live.logits(images, classes), unedited, atol=1e-3)  # the edited CLIP judges otherwise
    assert torch.allclose(frozen.logits(images, classes), unedited, atol=1e-6)


# ------------------------------------------------------------------------------ the demo


REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_demo_build_trains_the_judge_in_a_second_process_as_it_would_here(small_world, tiny_hf_clip, tmp_path):
    """The demo build trains its classifier judge in a spawned process alongside the UNet: the
    saved judge must be the one this process trains from the same inputs (the portraits and their
    reconstructions by the saved VAE), bit for bit, and score what the build reports."""
    from diffusers import AutoencoderKL

    from slug_pl.demo.sd import (SdTraining, WorldClassifier, _labelled_identities, build_sd_pipeline,
                                 load_world_images, train_classifier)
    from slug_pl.evaluation.generation import ClassifierJudge

    s = SdTraining(vae_steps=4, unet_steps=4, max_unet_steps=4, classifier_steps=12, verify_seeds=(0,), verify_steps=2)
    metrics = build_sd_pipeline(tiny_hf_clip, small_world, tmp_path / "pipe", tmp_path / "judge", s)

    data = load_world_images(small_world)
    portraits, labels = data.pixels[data.identity >= 0], data.identity[data.identity >= 0]
    vae = AutoencoderKL.from_pretrained(tmp_path / "pipe" / "vae")
    with torch.no_grad():
        recon = vae.decode(vae.encode(portraits).latent_dist.mean).sample.clamp(-1, 1)
    here = train_classifier(torch.cat([portraits, recon]), torch.cat([labels, labels]), 20, s)
    saved = ClassifierJudge.load(tmp_path / "judge")
    assert isinstance(saved.module, WorldClassifier)
    mine, theirs = here.state_dict(), saved.module.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    test_pixels, test_labels = _labelled_identities(small_world, "test")
    with torch.no_grad():
        accuracy = (here(test_pixels).argmax(-1) == test_labels).float().mean().item()
    assert metrics["classifier_test_accuracy"] == pytest.approx(accuracy, abs=1e-6)


@pytest.mark.heavy  # the pipeline's build alone took 16 minutes on one shared core: `pytest -m heavy`
def test_sd_demo_removes_the_identity_from_generations(tmp_path, monkeypatch, capsys):
    """``slug-pl fit --config configs/demo_sd.yaml`` from a fresh directory (world, CLIP, pipeline
    and classifier built there): on held-out seeds the forgotten identity is recognized in at most
    10 % of its generations (from at least 90 %), the others lose at most 15 points on average
    under both judges, and the CLIP score drops by at most 5 %."""
    from diffusers import StableDiffusionPipeline

    monkeypatch.chdir(tmp_path)
    code = main(["fit", "--config", str(REPO / "configs" / "demo_sd.yaml"), "--trainer.enable_progress_bar", "false",
                 "--model.target.init_args.progress", "false"])
    run = tmp_path / "lightning_logs" / "version_0"
    summary = json.loads((run / "summary.json").read_text())
    build = json.loads((tmp_path / ".slug_cache/demo/sd_pipeline/slug_demo_sd.json").read_text())
    assert build["recognition"]["min"] >= 0.9  # every identity drawn recognizably before any edit
    assert code == 0
    generation = summary["generation"]
    assert_within_sd_demo_bounds(generation)
    assert len(generation["judges"]) == 2  # the CLIP and the classifier
    b, a = generation["before"]["retain_clip_score"], generation["after"]["retain_clip_score"]
    reloaded = StableDiffusionPipeline.from_pretrained(run / "edited_stable_diffusion", safety_checker=None)
    assert reloaded.text_encoder.config.hidden_size == 96
    with capsys.disabled():
        print(f"\nSD demo: layer {summary['method']['edits'][0]['layer']}; " + "; ".join(
            f"{n}: forget {r['before']['forget_recognition']:.3f} -> {r['after']['forget_recognition']:.3f}, "
            f"retain {r['before']['retain_recognition']:.3f} -> {r['after']['retain_recognition']:.3f}"
            for n, r in generation["judges"].items()) + f"; CLIP score {b:.2f} -> {a:.2f}")
