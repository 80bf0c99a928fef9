"""The SDXL demo (:mod:`slug_pl.demo.sdxl`): its pipeline embeds the two world CLIPs' text towers
(the second with its projection) and a UNet that reads both encoders' states and SDXL's
``text_time`` conditioning, trained on what the pipeline itself feeds the UNet; the demo world
refuses a run whose family is not the CLIP of the encoder it edits; and (heavy) the demo, run from
a fresh folder, removes an identity from the generations through either encoder."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import assert_within_sd_demo_bounds, one_thread

from slug_pl.cli import main
from slug_pl.families import HfClip
from slug_pl.targets import StableDiffusionXL, TargetMismatchError

REPO = Path(__file__).resolve().parent.parent
#: Two tiny random CLIPs of different shapes (width, layers, projection), 16 text positions each.
SHAPES = {"first": (32, 2, 16), "second": (48, 3, 24)}


@pytest.fixture(scope="module")
def two_clips(tmp_path_factory) -> tuple[str, str]:
    from transformers import CLIPModel

    from slug_pl.demo.hf_clip import save_clip_folder, tiny_clip_config

    root = tmp_path_factory.mktemp("clips")
    folders = []
    for seed, (name, (width, layers, projection)) in enumerate(SHAPES.items()):
        torch.manual_seed(seed)
        model = CLIPModel(tiny_clip_config(hidden_size=width, layers=layers, heads=2, projection_dim=projection))
        folders.append(str(save_clip_folder(model, root / name)))
    return folders[0], folders[1]


@pytest.fixture(scope="module")
def tiny_build(small_world, two_clips, tmp_path_factory):
    """The demo SDXL pipeline around ``two_clips`` on the small world, its UNet trained 2 steps
    (an untrained VAE: the structure is what is tested), saved; returns (folder, trainer, captions)."""
    from slug_pl.demo.sd import SdTraining, demo_vae, load_world_images, vae_latents
    from slug_pl.demo.sdxl import sdxl_pipeline_trainer

    folder = tmp_path_factory.mktemp("sdxl_demo") / "pipeline"
    with one_thread():
        data = load_world_images(small_world)
        vae = demo_vae(data.pixels.shape[-1]).eval()
        pipe, trainer = sdxl_pipeline_trainer(vae, two_clips, vae_latents(vae, data.pixels), data.captions,
                                              SdTraining(unet_batch_size=8))
        trainer.round(2)
        pipe.save_pretrained(folder)
    return folder, trainer, data.captions


@pytest.mark.parametrize("encoder", [1, 2])
def test_each_encoder_of_the_demo_pipeline_is_its_world_clips_text_tower(tiny_build, two_clips, encoder):
    """The SDXL target pairs each encoder with its CLIP tensor by tensor (``text_encoder_2`` with
    the text projection too) and refuses the other CLIP."""
    target = StableDiffusionXL(str(tiny_build[0]), text_encoder=encoder, device="cpu", progress=False)
    target.load()
    family = HfClip(two_clips[encoder - 1])
    target.check_pair(family, family.load())
    other = HfClip(two_clips[2 - encoder])
    with pytest.raises(TargetMismatchError):
        target.check_pair(other, other.load())
    assert target.reads("text_projection.weight") == (encoder == 2)


def test_the_demo_unet_reads_both_encoders_and_text_time_as_the_pipeline_feeds_them(tiny_build):
    from diffusers import StableDiffusionXLPipeline

    from slug_pl.demo.sd import TIME_EMBED_DIM

    folder, trainer, captions = tiny_build
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    (w1, _, _), (w2, _, p2) = SHAPES.values()
    config = pipe.unet.config
    assert config.addition_embed_type == "text_time"
    assert config.cross_attention_dim == w1 + w2  # both encoders' states side by side
    assert config.projection_class_embeddings_input_dim == p2 + 6 * TIME_EMBED_DIM  # pooled from encoder 2

    # trained on what the pipeline feeds its UNet: its own encoding of the captions, and zeros for
    # a dropped caption, which is what guidance pairs them with (force_zeros_for_empty_prompt)
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(captions[:3], device="cpu",
                                                                   do_classifier_free_guidance=True)
    cond = trainer.cond
    assert torch.allclose(cond.states[:3], embeds, atol=1e-6) and torch.allclose(cond.pooled[:3], pooled, atol=1e-6)
    assert not cond.empty.any() and not cond.empty_pooled.any() and not negative.any() and not negative_pooled.any()
    size = pipe.default_sample_size * pipe.vae_scale_factor  # the image size the pipeline draws by default
    assert cond.time_ids.tolist() == [size, size, 0, 0, size, size] and size == 32

    # the UNet's output depends on each part: the first encoder's states, the second's, the pooled embedding
    def unet(states, text_embeds):
        with torch.no_grad():
            return pipe.unet(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), 500,
                             encoder_hidden_states=states, added_cond_kwargs={
                                 "text_embeds": text_embeds, "time_ids": cond.time_ids[None]}).sample

    reference = unet(embeds[:1], pooled[:1])
    first, second = embeds[:1].clone(), embeds[:1].clone()
    first[..., :w1] = 0
    second[..., w1:] = 0
    for changed in (unet(first, pooled[:1]), unet(second, pooled[:1]), unet(embeds[:1], torch.zeros_like(pooled[:1]))):
        assert not torch.allclose(changed, reference)


def test_the_demo_refuses_a_family_that_is_not_the_edited_encoders_clip(two_clips, tmp_path):
    """The demo world (its paths as ``prepare_data`` leaves them) wants the first CLIP for
    ``text_encoder: 1`` and the second for ``text_encoder: 2``, and names the path to set."""
    from slug_pl.demo.sdxl import StableDiffusionXLDemoWorld
    from slug_pl.targets import StableDiffusion

    pipeline = str(tmp_path / "sdxl_pipeline")
    world = StableDiffusionXLDemoWorld(root=str(tmp_path))
    world.paths = {"pipeline": pipeline, "hf_clip": two_clips[0], "hf_clip_2": two_clips[1]}
    for encoder in (1, 2):
        target = StableDiffusionXL(pipeline, text_encoder=encoder)
        world.check_models(HfClip(two_clips[encoder - 1]), target)
        wanted = re.escape(f"set model.init_args.family.init_args.model_name to {two_clips[encoder - 1]}")
        with pytest.raises(ValueError, match=wanted):
            world.check_models(HfClip(two_clips[2 - encoder]), target)
    with pytest.raises(ValueError, match="init_args.pipeline to"):
        world.check_models(HfClip(two_clips[1]), StableDiffusionXL(str(tmp_path / "other")))
    with pytest.raises(ValueError, match="slug_pl.targets.StableDiffusionXL"):
        world.check_models(HfClip(two_clips[0]), StableDiffusion(pipeline))


@pytest.mark.parametrize("encoder", [2, 1])
def test_the_demo_configs_parse_and_edit_the_intended_encoder(encoder, capsys):
    """``configs/demo_sdxl.yaml`` edits ``text_encoder_2`` with the second CLIP;
    ``demo_sdxl_encoder1.yaml`` added after it edits ``text_encoder`` with the first; both build
    the SDXL demo world and run SLUG's forget gradient without a retain projection."""
    import yaml

    configs = ["--config", str(REPO / "configs" / "demo_sdxl.yaml")]
    if encoder == 1:
        configs += ["--config", str(REPO / "configs" / "demo_sdxl_encoder1.yaml")]
    with pytest.raises(SystemExit) as stop:
        main(["fit", *configs, "--print_config"])
    assert stop.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    model = config["model"]["init_args"]
    target = model["target"]
    assert target["class_path"] == "slug_pl.targets.StableDiffusionXL"
    assert target["init_args"]["text_encoder"] == encoder
    assert target["init_args"]["pipeline"] == ".slug_cache/demo/sdxl_pipeline"
    assert model["family"]["init_args"]["model_name"] == (".slug_cache/demo/hf_clip" if encoder == 1
                                                          else ".slug_cache/demo/hf_clip_2")
    assert config["data"]["class_path"] == "slug_pl.demo.sdxl.StableDiffusionXLDemoWorld"
    assert not target["init_args"].get("protect_retained") and not model.get("protect_retained")


# ------------------------------------------------------------------------------ the demo


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory):
    """One fresh folder for both encoders' runs (the world, both CLIPs and the pipeline are built
    by the first and reused by the second)."""
    return tmp_path_factory.mktemp("sdxl_demo_run")


@pytest.mark.slow
@pytest.mark.heavy  # builds a second CLIP and the SDXL pipeline (tens of minutes on shared cores): `pytest -m heavy`
@pytest.mark.parametrize("encoder", [2, 1])
def test_sdxl_demo_removes_the_identity_from_generations(demo_folder, monkeypatch, capsys, encoder):
    """``slug-pl fit --config configs/demo_sdxl.yaml`` (with ``demo_sdxl_encoder1.yaml`` and the
    Stable Diffusion demo's retain projection, ``model.protect_retained: {tolerance: 0.05}``, for
    ``text_encoder: 1``: without it the others' CLIP score drops 5.6 %, past the 5 % bound,
    benchmarks/results/sdxl_demo.md) from a fresh folder: on held-out seeds the forgotten identity is recognized
    in at most 10 % of its generations (from at least 90 %), the others lose at most 15 points on
    average under both judges, and their CLIP score drops by at most 5 %; the edited pipeline
    reloads and differs from the built one in one tensor of the chosen encoder."""
    from diffusers import StableDiffusionXLPipeline

    monkeypatch.chdir(demo_folder)
    configs = ["--config", str(REPO / "configs" / "demo_sdxl.yaml")]
    if encoder == 1:
        configs += ["--config", str(REPO / "configs" / "demo_sdxl_encoder1.yaml"),
                    "--model.protect_retained", json.dumps({"tolerance": 0.05})]
    out = demo_folder / f"encoder{encoder}"
    code = main(["fit", *configs, "--trainer.default_root_dir", str(out), "--trainer.enable_progress_bar", "false",
                 "--model.target.init_args.progress", "false"])
    run = out / "lightning_logs" / "version_0"
    summary = json.loads((run / "summary.json").read_text())
    build = json.loads((demo_folder / ".slug_cache/demo/sdxl_pipeline/slug_demo_sd.json").read_text())
    assert build["recognition"]["min"] >= 0.9  # every identity drawn recognizably (by both CLIPs) before any edit
    assert code == 0
    generation = summary["generation"]
    assert_within_sd_demo_bounds(generation)
    assert len(generation["judges"]) == 2  # the CLIP and the classifier
    b, a = generation["before"]["retain_clip_score"], generation["after"]["retain_clip_score"]

    edited = StableDiffusionXLPipeline.from_pretrained(run / "edited_stable_diffusion_xl")
    built = StableDiffusionXLPipeline.from_pretrained(demo_folder / ".slug_cache/demo/sdxl_pipeline")
    differs = [f"{part}.{n}" for part in ("text_encoder", "text_encoder_2", "unet")
               for n, p in getattr(edited, part).named_parameters()
               if not torch.equal(p, getattr(built, part).get_parameter(n))]
    layer = summary["method"]["edits"][0]["layer"]
    assert len(differs) == 1 and differs[0].startswith("text_encoder." if encoder == 1 else "text_encoder_2.")
    with capsys.disabled():
        print(f"\nSDXL demo, text_encoder {encoder}: layer {layer}; " + "; ".join(
            f"{n}: forget {r['before']['forget_recognition']:.3f} -> {r['after']['forget_recognition']:.3f}, "
            f"retain {r['before']['retain_recognition']:.3f} -> {r['after']['retain_recognition']:.3f}"
            for n, r in generation["judges"].items()) + f"; CLIP score {b:.2f} -> {a:.2f}")
