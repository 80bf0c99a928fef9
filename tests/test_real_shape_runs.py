"""The benchmark of whole runs at the real shapes (``benchmarks/real_shape_runs.py``): the real
shapes it builds are the real repositories' (checked on the ``meta`` device, without building the
weights), and its ``--tiny`` mode runs end to end on the CPU and records every phase."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slug_pl.testing import standins as si

REPO = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------- the real shapes

#: ``unet/config.json`` of ``stable-diffusion-v1-5/stable-diffusion-v1-5`` (its architecture keys).
SD15_UNET_CONFIG = {
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
#: Parameter counts of the real models (their hub repositories' checkpoints).
VIT_B32_PARAMS = 151_277_313
CLIP_L14_PARAMS = 427_616_513
CLIP_L14_336_PARAMS = 427_944_193
SD15_UNET_PARAMS = 859_520_964
SD15_VAE_PARAMS = 83_653_863
LLAVA15_7B_PARAMS = 7_063_427_072


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_real_vit_b32_is_open_clips_vit_b32():
    import open_clip

    assert si.REAL_SIZES.open_clip_b32 == open_clip.get_model_config("ViT-B-32")
    with torch.device("meta"):
        assert count(open_clip.CLIP(**si.REAL_SIZES.open_clip_b32)) == VIT_B32_PARAMS


def test_real_clips_are_openais_vit_l14():
    from transformers import CLIPModel

    with torch.device("meta"):
        assert count(CLIPModel(si.clip_config(si.REAL_SIZES.clip_l14))) == CLIP_L14_PARAMS
        assert count(CLIPModel(si.clip_config(si.REAL_SIZES.clip_l14_336))) == CLIP_L14_336_PARAMS
    vision = si.clip_config(si.REAL_SIZES.clip_l14_336).vision_config
    assert (vision.image_size, vision.patch_size, vision.hidden_size, vision.num_hidden_layers) == (336, 14, 1024, 24)


def test_real_stable_diffusion_1_5_is_the_repositorys():
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(in_channels=4, out_channels=4,
                                    cross_attention_dim=si.REAL_SIZES.clip_l14.text_width, **si.REAL_SIZES.sd15_unet)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            **si.REAL_SIZES.sd15_vae)
    config = json.loads(json.dumps(dict(unet.config)))  # tuples as lists, as in the repository's file
    assert {k: config[k] for k in SD15_UNET_CONFIG} == SD15_UNET_CONFIG
    assert (count(unet), count(vae)) == (SD15_UNET_PARAMS, SD15_VAE_PARAMS)


def test_real_llava_1_5_is_the_7b_model():
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = {k: v for k, v in si.REAL_SIZES.llava15_text.items() if k not in ("architectures", "model_type")}
    config = LlavaConfig(vision_config=si.clip_config(si.REAL_SIZES.clip_l14_336).vision_config,
                         text_config=LlamaConfig(**text), projector_hidden_act="gelu", vision_feature_layer=-2)
    with torch.device("meta"):
        assert count(LlavaForConditionalGeneration(config)) == LLAVA15_7B_PARAMS


def test_a_llava_whose_vocabulary_outgrows_its_tokenizer_loads_and_answers(tmp_path):
    """The real shapes' LLaVA has Vicuna's 32,064-token vocabulary and a stand-in's small tokenizer:
    the same mismatch at tiny sizes builds, loads as the target loads it, and answers."""
    from dataclasses import replace

    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from slug_pl.evaluation.vqa import DEFAULT_QUESTION, ask

    sizes = replace(si.TINY_SIZES, llava15_text=dict(si.TINY_SIZES.llava15_text) | {"vocab_size": 1024})
    folder = si.llava_1_5(tmp_path, sizes).path
    assert json.loads((folder / "config.json").read_text())["text_config"]["vocab_size"] == 1024
    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(folder)
    assert model.lm_head.out_features == 1024 > len(processor.tokenizer)
    model.generation_config.eos_token_id = None  # every answer its full length: ids the tokenizer lacks included
    answers = ask(model, processor, [Image.new("RGB", (60, 50))] * 2, DEFAULT_QUESTION, max_new_tokens=8,
                  batch_size=2, progress=False)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


# --------------------------------------------------------------------------- the benchmark, --tiny


@pytest.mark.slow  # ~1.5 min on two cores: a stand-in build, the data and one fit
def test_tiny_vit_b32_run_records_every_phase(tmp_path):
    """``real_shape_runs.py --tiny --only vit_b32`` runs the recipe's config on the CPU and its
    results hold every phase, the devices and the peak memory, with plausible values."""
    done = subprocess.run([sys.executable, "benchmarks/real_shape_runs.py", "--tiny", "--only", "vit_b32",
                           "--work", str(tmp_path / "work"), "--results", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = json.loads((tmp_path / "real_shape_runs_tiny.json").read_text())["runs"]["vit_b32"]
    assert run["exit_code"] in (0, 3) and not run["stopped_by_time_limit"]
    timings = run["timings_s"]
    assert {"gradients", "ranking", "search", "final_evaluation", "total"} <= timings.keys()
    assert all(timings[k] > 0 for k in ("gradients", "ranking", "search", "final_evaluation", "total"))
    assert timings["ranking"] <= timings["search"]
    assert timings["gradients"] + timings["search"] + timings["final_evaluation"] <= timings["total"] <= run["wall_s"]
    assert {run["devices"][k] for k in ("pass", "after_pass", "evaluation")} == {"cpu"}
    assert run["devices"]["precision"] == "32-true"
    phases = run["memory"]["phases"]
    assert list(phases) == ["gradients", "search", "final_evaluation"]
    host = [phases[p]["host_peak_rss_gib"] for p in phases]
    assert 0.1 < host[0] <= host[1] <= host[2] <= run["memory"]["host_peak_rss_gib"]
    assert run["counts"]["forget"] > 0 and run["machine"]["gpu"] is None
    assert "Not the GPU numbers" in (tmp_path / "real_shape_runs_tiny.md").read_text()
