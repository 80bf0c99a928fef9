"""The hub stand-ins (:mod:`slug_pl.testing.standins`) load with the classes that load the real
repositories, run, and share their CLIP's tensors as the real pairs do; then the project's own
loaders on each of them, and the refusal, naming what is supported, of the pipelines slug_pl does
not handle (SD 3, Flux)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from slug_pl.testing import standins as si


def _generator():
    return torch.Generator().manual_seed(0)


def _params(module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in module.named_parameters()}


def _text_tower_shared(encoder, clip, with_projection: bool = False) -> None:
    """Every tensor of a pipeline's text encoder equals the CLIP's of the same name, bit for bit
    (transformers 5's ``CLIPTextModel`` names its tensors without the ``text_model.`` that
    ``CLIPModel`` and ``CLIPTextModelWithProjection`` put before them)."""
    clip_params = _params(clip)
    for name, tensor in _params(encoder).items():
        clip_name = name if name.startswith(("text_model.", "text_projection.")) else "text_model." + name
        assert torch.equal(tensor, clip_params[clip_name]), name
    assert with_projection == ("text_projection.weight" in _params(encoder))


def _model_index(path) -> dict:
    return json.loads((path / "model_index.json").read_text())


# --------------------------------------------------------------------------- the stand-ins


def test_stable_diffusion_1_5(standin):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPModel

    sd = standin(si.SD15)
    index = _model_index(sd.path)
    assert index["safety_checker"] == ["stable_diffusion", "StableDiffusionSafetyChecker"]
    assert json.loads((sd.path / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == "PNDMScheduler"
    pipe = StableDiffusionPipeline.from_pretrained(sd.path)
    assert type(pipe.safety_checker).__name__ == "StableDiffusionSafetyChecker"
    assert type(pipe.feature_extractor).__name__ == "CLIPImageProcessor"
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"
    image = pipe("a photo of a cat", num_inference_steps=2, generator=_generator()).images[0]
    assert image.size == (64, 64)
    _text_tower_shared(pipe.text_encoder, CLIPModel.from_pretrained(sd.clip))
    # the hub checkpoint nests the checker's tower twice; transformers renames it on load
    from safetensors.torch import load_file
    stored = load_file(str(sd.path / "safety_checker" / "model.safetensors"))
    loaded = pipe.safety_checker.state_dict()
    assert all(torch.equal(loaded[k.replace("vision_model.vision_model.", "vision_model.", 1)], v)
               for k, v in stored.items())
    half = StableDiffusionPipeline.from_pretrained(sd.path, variant="fp16", dtype=torch.float16)
    assert {half.unet.dtype, half.vae.dtype, half.text_encoder.dtype} == {torch.float16}


def test_stable_diffusion_2_1(standin):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPModel

    sd = standin(si.SD21)
    index = _model_index(sd.path)
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    pipe = StableDiffusionPipeline.from_pretrained(sd.path)
    assert pipe.safety_checker is None and type(pipe.feature_extractor).__name__ == "CLIPImageProcessor"
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.tokenizer.pad_token == "!"
    clip = CLIPModel.from_pretrained(sd.clip)
    assert pipe.text_encoder.config.num_hidden_layers == clip.config.text_config.num_hidden_layers - 1
    _text_tower_shared(pipe.text_encoder, clip)
    image = pipe("a photo of a cat", num_inference_steps=2, generator=_generator()).images[0]
    assert image.size == (96, 96)


def test_stable_diffusion_xl(standin):
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPModel

    sd = standin(si.SDXL)
    pipe = StableDiffusionXLPipeline.from_pretrained(sd.path)
    assert pipe.config.force_zeros_for_empty_prompt is True
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    unet = pipe.unet.config
    assert unet.addition_embed_type == "text_time"
    assert unet.projection_class_embeddings_input_dim == (pipe.text_encoder_2.config.projection_dim
                                                          + 6 * unet.addition_time_embed_dim)
    assert unet.cross_attention_dim == pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    _text_tower_shared(pipe.text_encoder, CLIPModel.from_pretrained(sd.paired[si.CLIP_L14]))
    _text_tower_shared(pipe.text_encoder_2, CLIPModel.from_pretrained(sd.paired[si.CLIP_BIGG14]),
                       with_projection=True)
    image = pipe("a photo of a cat", num_inference_steps=2, generator=_generator()).images[0]
    assert image.size == (128, 128)


def _ask(model, processor, question: str = "What is shown in this image?", new_tokens: int = 3):
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    inputs = processor(images=Image.new("RGB", (60, 50), "red"), text=prompt, return_tensors="pt")
    return prompt, inputs, model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)


def test_llava_1_5(standin):
    from transformers import AutoProcessor, CLIPModel, LlavaForConditionalGeneration

    llava = standin(si.LLAVA15)
    index = json.loads((llava.path / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    model = LlavaForConditionalGeneration.from_pretrained(llava.path).eval()
    assert model.dtype == torch.float16  # as the hub's config.json says
    assert model.config.vision_feature_layer == -2 and model.config.vision_feature_select_strategy == "default"
    processor = AutoProcessor.from_pretrained(llava.path)
    assert type(processor).__name__ == "LlavaProcessor"
    prompt, inputs, out = _ask(model.float(), processor)
    assert prompt == "USER: <image>\nWhat is shown in this image? ASSISTANT:"
    image_tokens = (inputs["input_ids"] == model.config.image_token_id).sum().item()
    assert image_tokens == (48 // 8) ** 2  # 6 x 6 patches, the class token dropped
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    clip = CLIPModel.from_pretrained(llava.clip)
    tower = _params(LlavaForConditionalGeneration.from_pretrained(llava.path).model.vision_tower)
    for name, tensor in _params(clip).items():
        if name.startswith("vision_model."):
            assert torch.equal(tower[name[len("vision_model."):]], tensor.half()), name


def test_llava_next_loads(standin):
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    llava = standin(si.LLAVA_NEXT)
    model = LlavaNextForConditionalGeneration.from_pretrained(llava.path, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(llava.path)
    assert type(processor.image_processor).__name__ == "LlavaNextImageProcessor"
    assert model.config.image_grid_pinpoints == processor.image_processor.image_grid_pinpoints
    prompt, inputs, out = _ask(model, processor, new_tokens=2)
    assert prompt.startswith("[INST] <image>\n") and out.shape[1] == inputs["input_ids"].shape[1] + 2


@pytest.mark.parametrize("repo_id", [si.CLIP_L14, si.CLIP_L14_336, si.CLIP_H14, si.CLIP_BIGG14])
def test_clip_folders(standin, repo_id):
    from transformers import AutoProcessor, CLIPModel

    clip = standin(repo_id)
    model = CLIPModel.from_pretrained(clip.path)
    processor = AutoProcessor.from_pretrained(clip.path)
    inputs = processor(text=["a photo of a cat"], images=Image.new("RGB", (50, 40)), return_tensors="pt",
                       padding="max_length")
    out = model(**inputs)
    assert out.logits_per_image.shape == (1, 1)
    assert inputs["input_ids"][0, :2].tolist() == [49406, 320]  # <|startoftext|> "a"


def test_open_clip_hub_folder_and_single_file(standin):
    import open_clip
    from safetensors.torch import load_file

    single = standin(si.OPEN_CLIP_B32)
    stored = load_file(str(single.path))
    from_folder, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{single.path.parent}")
    assert all(torch.equal(from_folder.state_dict()[k], v) for k, v in stored.items())
    open_clip.add_model_config(single.extras["model_config"])
    from_file, _, _ = open_clip.create_model_and_transforms(si.OPEN_CLIP_STANDIN_NAME, pretrained=str(single.path))
    assert all(torch.equal(from_file.state_dict()[k], v) for k, v in stored.items())
    image = preprocess(Image.new("RGB", (50, 40))).unsqueeze(0)
    tokens = open_clip.get_tokenizer(f"local-dir:{single.path.parent}")(["a cat"])
    assert torch.allclose(from_folder.encode_text(tokens), from_file.encode_text(tokens))
    assert from_folder.encode_image(image).shape == (1, si.OPEN_CLIP_B32_CFG["embed_dim"])


def test_unlearncanvas(standin):
    import timm
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPModel

    uc = standin(si.UNLEARNCANVAS)
    pipe = StableDiffusionPipeline.from_pretrained(uc.path, safety_checker=None)
    _text_tower_shared(pipe.text_encoder, CLIPModel.from_pretrained(uc.clip))
    classes = si.unlearncanvas_classnames()
    assert len(classes["style"]) == 51 and len(classes["object"]) == 20
    for task in ("style", "object"):  # as the benchmark's accuracy.py reads them
        model = timm.create_model(si.UC_CLASSIFIER_ARCH["name"], pretrained=False, num_classes=len(classes[task]),
                                  **si.UC_CLASSIFIER_ARCH["kwargs"])
        model.load_state_dict(torch.load(uc.extras[f"{task}_classifier"], map_location="cpu")["model_state_dict"])
        assert model(torch.zeros(1, 3, 32, 32)).shape == (1, len(classes[task]))


def test_builds_are_reused_and_named_by_repository(standin, tmp_path):
    assert standin(si.SD15).clip == standin(si.SDXL).paired[si.CLIP_L14]
    assert standin(si.SD15).path.name == "stable-diffusion-v1-5--stable-diffusion-v1-5"
    with pytest.raises(KeyError, match="no stand-in of 'org/unknown'"):
        si.build(tmp_path, "org/unknown")


# --------------------------------------------------------------------------- the project's loaders

@pytest.mark.parametrize("repo_id", [si.SD15, si.SD21, si.UNLEARNCANVAS])
def test_load_pipeline(standin, repo_id):
    from slug_pl.pipelines import load_pipeline

    pipe = load_pipeline(standin(repo_id).path)
    assert type(pipe).__name__ == "StableDiffusionPipeline" and pipe.safety_checker is None


def test_pipeline_without_safety_checker_files_generates(standin, tmp_path):
    """A Stable Diffusion 1.5 folder downloaded without ``safety_checker/`` and
    ``feature_extractor/`` (as the README's first download command fetched it) still lists them in
    ``model_index.json``; a plain ``from_pretrained`` then stops at "Can't load image processor".
    slug-pl leaves both out, so it loads and draws."""
    import shutil

    from diffusers import StableDiffusionPipeline

    from slug_pl.cli import main

    folder = tmp_path / "sd15"
    shutil.copytree(standin(si.SD15).path, folder, ignore=shutil.ignore_patterns("safety_checker", "feature_extractor"))
    assert "feature_extractor" in _model_index(folder)
    with pytest.raises(OSError, match="image processor"):
        StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    out = tmp_path / "drawn"
    assert main(["generate", "--pipeline", str(folder), "--prompt", "a photo of a cat", "--n", "1", "--steps", "1",
                 "--device", "cpu", "--out", str(out)]) == 0
    assert json.loads((out / "manifest.json").read_text())["counts"] == [1]


def test_load_pipeline_sdxl(standin):
    """An SDXL folder loads as SDXL, both text encoders and the UNet's text_time conditioning."""
    from slug_pl.pipelines import load_pipeline

    pipe = load_pipeline(standin(si.SDXL).path)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline" and hasattr(pipe, "text_encoder_2")


@pytest.mark.parametrize("repo_id, pipeline_class", [(si.SD3, "StableDiffusion3Pipeline"), (si.FLUX, "FluxPipeline")])
def test_load_pipeline_refuses_unsupported_by_name(standin, repo_id, pipeline_class):
    from slug_pl.pipelines import PipelineError, load_pipeline

    with pytest.raises(PipelineError) as err:
        load_pipeline(standin(repo_id).path)
    assert pipeline_class in str(err.value) and "StableDiffusionPipeline" in str(err.value)


@pytest.mark.parametrize("repo_id", [si.SD15, si.SD21, si.UNLEARNCANVAS])
def test_stable_diffusion_target_pairs(standin, repo_id):
    from slug_pl.families.hf_clip import HfClip
    from slug_pl.targets.stable_diffusion import StableDiffusion

    sd = standin(repo_id)
    target = StableDiffusion(pipeline=str(sd.path), steps=1, progress=False, device="cpu")
    family = HfClip(str(sd.clip))
    target.check_pair(family, family.load())
    assert target.adapter.text_layers() == target.adapter.pipe.text_encoder.config.num_hidden_layers
    assert not target.reads("text_model.encoder.layers.99.mlp.fc1.weight")
    image = target.adapter.generator()(prompt=["a photo of a cat"], num_inference_steps=1, generator=_generator()).images[0]
    assert image.size == (target.adapter.pipe.unet.config.sample_size * 8,) * 2


def test_the_stable_diffusion_target_refuses_an_sdxl_folder_naming_the_sdxl_target(standin):
    from slug_pl.pipelines import PipelineError
    from slug_pl.targets.stable_diffusion import StableDiffusion

    with pytest.raises(PipelineError, match="holds a StableDiffusionXLPipeline, not a StableDiffusionPipeline: use "
                                            "slug_pl.targets.StableDiffusionXL"):
        StableDiffusion(pipeline=str(standin(si.SDXL).path), device="cpu").load()


def test_llava_target_pairs_in_float32(standin):
    """The float16 hub checkpoint loaded as float32 on the CPU (dtype auto) holds the float32 CLIP
    rounded to float16: the pair is compared at the checkpoint's precision, not bit for bit."""
    from slug_pl.families.hf_clip import HfClip
    from slug_pl.targets.llava import Llava

    llava = standin(si.LLAVA15)
    target = Llava(model=str(llava.path), device="cpu", progress=False)
    family = HfClip(str(llava.clip))
    target.check_pair(family, family.load())


def test_llava_target_pairs_in_float16(standin):
    from slug_pl.families.hf_clip import HfClip
    from slug_pl.targets.llava import Llava

    llava = standin(si.LLAVA15)
    target = Llava(model=str(llava.path), device="cpu", dtype="float16", progress=False)
    family = HfClip(str(llava.clip))
    target.check_pair(family, family.load())
    assert target.adapter.feature_depth() == target.adapter.config().vision_config.num_hidden_layers - 1


def test_llava_target_refuses_llava_next_by_name(standin):
    from slug_pl.targets.llava import Llava

    with pytest.raises(ValueError, match="'llava_next' model, not LLaVA"):
        Llava(model=str(standin(si.LLAVA_NEXT).path), device="cpu").adapter.config()


@pytest.mark.parametrize("repo_id", [si.CLIP_L14, si.CLIP_L14_336, si.CLIP_H14, si.CLIP_BIGG14])
def test_hf_clip_family(standin, repo_id):
    from slug_pl.families.hf_clip import HfClip

    family = HfClip(str(standin(repo_id).path))
    model = family.load()
    tokens = family.tokenize(["a photo of a cat"])
    assert tokens.shape == (1, 77) and tokens[0, 0].item() == 49406
    image = family.image_transform()(Image.new("RGB", (50, 40)))
    assert family.encode_image(model, image.unsqueeze(0)).shape == family.encode_text(model, tokens).shape


def test_open_clip_family(standin):
    from slug_pl.families.open_clip import OpenClip

    single = standin(si.OPEN_CLIP_B32)
    folder = OpenClip(model_name=f"local-dir:{single.path.parent}")
    file = OpenClip(model_name=si.OPEN_CLIP_STANDIN_NAME, pretrained=str(single.path),
                    model_config=str(single.extras["model_config"]))
    a, b = folder.load(), file.load()
    tokens = folder.tokenize(["a photo of a cat"])
    assert torch.equal(tokens, file.tokenize(["a photo of a cat"]))
    assert torch.allclose(folder.encode_text(a, tokens), file.encode_text(b, tokens))
    assert folder.image_normalization() == file.image_normalization()


def test_command_line_builds_the_named_repositories(tmp_path, capsys):
    assert si.main([str(tmp_path), si.SD3, si.FLUX]) == 0
    out = capsys.readouterr().out
    assert f"{si.SD3}: {tmp_path / 'stabilityai--stable-diffusion-3-medium-diffusers'}" in out
    assert _model_index(tmp_path / "black-forest-labs--FLUX.1-dev")["_class_name"] == "FluxPipeline"
    with pytest.raises(SystemExit):
        si.main([str(tmp_path), "org/unknown"])
