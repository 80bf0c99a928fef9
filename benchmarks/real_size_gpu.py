"""Time and peak GPU memory of slug_pl's own evaluation code at the real model sizes.

Parts, each a random-init model built in memory with the real architecture and shapes:

- ``sd15``: Stable Diffusion 1.5 (UNet ~860 M, VAE ~84 M, CLIP ViT-L/14 text encoder ~123 M),
  float16, 512 px; :func:`slug_pl.evaluation.generation.generate_images` with 50 DDIM steps,
  guidance 7.5, batch 8, 16 prompts (after a 3-step warm-up batch);
- ``sd21``: Stable Diffusion 2.1 (UNet ~866 M, same VAE, OpenCLIP ViT-H/14 text tower ~340 M,
  v-prediction), float16, 768 px, same settings;
- ``llava7b``: LLaVA-1.5-7B (CLIP ViT-L/14-336 vision tower, Llama-2-7B, ~7.06 B in all),
  bfloat16; :func:`slug_pl.evaluation.vqa.ask` (576 image tokens per image, exactly 16 new tokens
  per answer: the end token is switched off) over 64 random images at batch 32 and 8, each after
  a warm-up batch.

The weights are random: speed and memory are those of the real shapes, the images and answers are
meaningless. Per part: parameter counts, dtype, batch, seconds per image (SD) or answers per
second (LLaVA), seconds measured, and ``torch.cuda.max_memory_allocated()`` during the measured
calls (``peak_gib``, weights included) and over the whole part, building included
(``part_peak_gib``: models are built in float32 on the GPU, then cast). A part that fails is recorded with its error and the others still run; the
JSON (with the command line, GPU name and library versions) and a markdown table are rewritten
after every part, in ``benchmarks/results/real_size_gpu.{json,md}``.

    python benchmarks/real_size_gpu.py                    # on a CUDA GPU (~2-3 min on an H200)
    python benchmarks/real_size_gpu.py --parts sd15 llava7b
    python benchmarks/real_size_gpu.py --tiny             # CPU dry run, tiny shapes, same code
    python benchmarks/real_size_gpu.py --meta             # real shapes on the meta device: parameter counts only
"""

from __future__ import annotations

import argparse
import gc
import platform
import sys
import tempfile
import time
import traceback
import warnings

import numpy as np
import torch
from PIL import Image
from results_io import write_result

CA, CAU = "CrossAttnDownBlock2D", "CrossAttnUpBlock2D"
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                 set_alpha_to_one=False, steps_offset=1)
SD_RUN = dict(kind="sd", dtype="float16", steps=50, warm_steps=3, guidance=7.5, batch=8)
SD15 = SD_RUN | dict(
    unet=dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, attention_head_dim=8,
              cross_attention_dim=768, down_block_types=(CA, CA, CA, "DownBlock2D"),
              up_block_types=("UpBlock2D", CAU, CAU, CAU)),
    vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, sample_size=512,
             down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
    text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768, hidden_act="quick_gelu"),
    prediction_type="epsilon")
SD21 = SD15 | dict(
    unet=SD15["unet"] | dict(sample_size=96, attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
                             use_linear_projection=True, upcast_attention=True),
    vae=SD15["vae"] | dict(sample_size=768),
    text=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
              projection_dim=512, hidden_act="gelu"),
    prediction_type="v_prediction")
LLAVA7B = dict(
    kind="llava", dtype="bfloat16", images=64, batches=(32, 8), max_new_tokens=16,
    vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                image_size=336, patch_size=14, projection_dim=768),
    text=dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
              num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5))
REAL = {"sd15": SD15, "sd21": SD21, "llava7b": LLAVA7B}

# --tiny: the same parts and code, only the numbers below differ (float32, CPU, seconds in all).
TINY_SD = dict(dtype="float32", steps=2, warm_steps=1,
               unet=dict(sample_size=16, block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=4,
                         norm_num_groups=8, cross_attention_dim=32, down_block_types=(CA, "DownBlock2D"),
                         up_block_types=("UpBlock2D", CAU)),
               vae=dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=32,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
               text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         projection_dim=32))
TINY = {
    "sd15": SD15 | TINY_SD | dict(text=TINY_SD["text"] | dict(hidden_act="quick_gelu")),
    "sd21": SD21 | TINY_SD | dict(unet=TINY_SD["unet"] | dict(attention_head_dim=(2, 4), use_linear_projection=True,
                                                              upcast_attention=True),
                                  text=TINY_SD["text"] | dict(hidden_act="gelu")),
    "llava7b": LLAVA7B | dict(
        dtype="float32",
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                    patch_size=8, projection_dim=32),
        text=dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=4096, rms_norm_eps=1e-5)),
}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(device: str, fn):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def human(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def build_sd(spec: dict, device: str):
    """A ``StableDiffusionPipeline`` of ``spec``'s shapes, random weights, on ``device``; and its info."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from slug_pl.demo.hf_clip import write_clip_tokenizer

    with tempfile.TemporaryDirectory() as folder:
        tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder, 77))
    dtype = getattr(torch, spec["dtype"])
    torch.manual_seed(0)
    with torch.device(device):
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **spec["text"]))
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, scaling_factor=0.18215, **spec["vae"])
        unet = UNet2DConditionModel(in_channels=4, out_channels=4, **spec["unet"])
    text_encoder, vae, unet = (m.to(dtype).eval() for m in (text_encoder, vae, unet))
    scheduler = DDIMScheduler(prediction_type=spec["prediction_type"], **SCHEDULER)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    size = unet.config.sample_size * pipe.vae_scale_factor
    params = {"unet": count(unet), "vae": count(vae), "text_encoder": count(text_encoder)}
    shape = (f"{size} px, {spec['steps']} steps; UNet {human(params['unet'])}, VAE {human(params['vae'])}, "
             f"text {human(params['text_encoder'])}")
    attention = sorted({type(p).__name__ for p in unet.attn_processors.values()})
    return pipe, {"params": params, "image_px": size, "shape": shape, "attention": attention}


def run_sd(spec: dict, device: str, prompts: int) -> dict:
    from slug_pl.pipelines import generate_images

    (pipe, info), build_s = timed(device, lambda: build_sd(spec, device))
    n, batch = prompts, spec["batch"]
    texts = [f"a photo of person number {i} in a park, highly detailed" for i in range(n)]
    seeds = list(range(n))
    run = lambda k, steps: generate_images(pipe, texts[:k], seeds[:k], steps=steps,  # noqa: E731
                                           guidance=spec["guidance"], batch_size=batch, progress=False)
    _, warm_s = timed(device, lambda: run(batch, spec["warm_steps"]))
    reset_peak(device)
    images, seconds = timed(device, lambda: run(n, spec["steps"]))
    if len(images) != n or images[0].size != (info["image_px"],) * 2:
        raise RuntimeError(f"expected {n} images of {info['image_px']} px, got {len(images)} of {images[0].size}")
    return info | {"dtype": spec["dtype"], "batch": batch, "images": n, "steps": spec["steps"],
                   "guidance": spec["guidance"], "build_s": round(build_s, 2), "warmup_s": round(warm_s, 2),
                   "seconds": round(seconds, 2), "s_per_image": round(seconds / n, 3), "peak_gib": peak_gib(device)}


def build_llava(spec: dict, device: str):
    """A ``LlavaForConditionalGeneration`` of ``spec``'s shapes, random weights, on ``device``, its
    processor (saved and read back with ``AutoProcessor``, as the LLaVA target loads one); and info."""
    from transformers import (AutoProcessor, CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    from slug_pl.demo.llava import CHAT_TEMPLATE, bpe_tokenizer
    from slug_pl.evaluation.vqa import DEFAULT_QUESTION

    tokenizer = bpe_tokenizer(["USER: ASSISTANT: " + DEFAULT_QUESTION, "This is Alice Abara, a teapot."], 400)
    side, patch = spec["vision"]["image_size"], spec["vision"]["patch_size"]
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}),
        tokenizer=tokenizer, patch_size=patch, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
    with tempfile.TemporaryDirectory() as folder:
        processor.save_pretrained(folder)
        processor = AutoProcessor.from_pretrained(folder)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=CLIPVisionConfig(**spec["vision"]),
                         text_config=LlamaConfig(**spec["text"], **ids),
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"), projector_hidden_act="gelu",
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         image_seq_length=(side // patch) ** 2)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration(config)
    model = model.to(getattr(torch, spec["dtype"])).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = None  # random weights: never stop early, every answer is max_new_tokens
    params = {"vision_tower": count(model.model.vision_tower), "projector": count(model.model.multi_modal_projector),
              "language_model": count(model.model.language_model) + count(model.lm_head), "total": count(model)}
    shape = (f"{(side // patch) ** 2} image tokens, {spec['max_new_tokens']} new tokens; vision "
             f"{human(params['vision_tower'])}, LM {human(params['language_model'])}")
    info = {"params": params, "shape": shape, "attention": model.config._attn_implementation,
            "image_processor": type(processor.image_processor).__name__}
    return model, processor, info


def run_llava(spec: dict, device: str, prompts: int) -> dict:
    from slug_pl.evaluation.vqa import DEFAULT_QUESTION, ask

    (model, processor, info), build_s = timed(device, lambda: build_llava(spec, device))
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)) for _ in range(spec["images"])]
    calls = []  # (prompt tokens, new tokens) of every generate call: checks that answers are full length
    generate = model.generate

    def counted(*args, **kwargs):
        out = generate(*args, **kwargs)
        calls.append((kwargs["input_ids"].shape[1], out.shape[1] - kwargs["input_ids"].shape[1]))
        return out

    model.generate = counted
    runs = []
    for batch in spec["batches"]:
        ask_all = lambda ims: ask(model, processor, ims, DEFAULT_QUESTION,  # noqa: E731
                                  max_new_tokens=spec["max_new_tokens"], batch_size=batch, progress=False)
        _, warm_s = timed(device, lambda: ask_all(images[:batch]))
        calls.clear()
        reset_peak(device)
        answers, seconds = timed(device, lambda: ask_all(images))
        if len(answers) != len(images) or any(new != spec["max_new_tokens"] for _, new in calls):
            raise RuntimeError(f"expected {len(images)} answers of {spec['max_new_tokens']} tokens, got "
                               f"{len(answers)} answers, (prompt, new) tokens per call {calls}")
        runs.append({"batch": batch, "images": len(images), "warmup_s": round(warm_s, 2), "seconds": round(seconds, 2),
                     "answers_per_s": round(len(images) / seconds, 2), "prompt_tokens": calls[0][0],
                     "new_tokens": calls[0][1], "peak_gib": peak_gib(device)})
    return info | {"dtype": spec["dtype"], "build_s": round(build_s, 2), "runs": runs}


def markdown(result: dict) -> str:
    lines = [f"{'Tiny dry run' if result['tiny'] else 'Real-size evaluation'} on {result['device_name']} "
             f"(random weights; torch {result['torch']}, "
             f"diffusers {result['diffusers']}, transformers {result['transformers']})", "",
             "| part | shape | dtype | batch | s/image or answers/s | peak GiB |", "|---|---|---|---|---|---|"]
    for name, r in result["parts"].items():
        if not r.get("ok"):
            error = r.get("error", "").strip().splitlines()[-1][:120].replace("|", "/")
            lines.append(f"| {name} | failed: {error} | | | | |")
        elif "runs" in r:
            lines += [f"| {name} | {r['shape']} | {r['dtype']} | {x['batch']} | {x['answers_per_s']} answers/s | "
                      f"{x['peak_gib']} |" for x in r["runs"]]
        else:
            lines.append(f"| {name} | {r['shape']} | {r['dtype']} | {r['batch']} | {r['s_per_image']} s/image | "
                         f"{r['peak_gib']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", choices=list(REAL), default=list(REAL))
    p.add_argument("--device", default=None, help="default: cuda (real shapes), cpu (--tiny)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes, float32: a dry run of the same code on a CPU")
    p.add_argument("--meta", action="store_true", help="build the real shapes on the meta device and print "
                                                       "their parameter counts (no run, no files)")
    p.add_argument("--prompts", type=int, default=16, help="SD prompts measured (batch 8)")
    p.add_argument("--out", default=None, help="JSON file name in benchmarks/results (default: real_size_gpu.json, "
                                               "with --tiny real_size_gpu_tiny.json)")
    args = p.parse_args(argv)
    specs = TINY if args.tiny else REAL
    if args.meta:
        for name in args.parts:
            build = build_sd if specs[name]["kind"] == "sd" else build_llava
            print(f"{name:8s} {build(specs[name], 'meta')[-1]['params']}")
        return 0
    device = args.device or ("cpu" if args.tiny else "cuda")
    if device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device here: run on a GPU machine, or use --tiny for a CPU dry run")
    out = args.out or ("real_size_gpu_tiny.json" if args.tiny else "real_size_gpu.json")
    if args.tiny and out == "real_size_gpu.json":
        p.error("--tiny never writes the real result file real_size_gpu.json")
    warnings.filterwarnings("ignore", message="invalid value encountered in cast")  # NaN pixels of random weights
    import diffusers
    import transformers

    cuda = device == "cuda"
    result = {"command": "python benchmarks/real_size_gpu.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "time": time.strftime("%Y-%m-%d %H:%M:%S"), "tiny": args.tiny, "device": device,
              "device_name": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
              "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
              "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
              "python": platform.python_version(), "parts": {}}
    t_start = time.perf_counter()
    for name in args.parts:
        spec = specs[name]
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        reset_peak(device)
        t0 = time.perf_counter()
        print(f"--- {name}", flush=True)
        try:
            record = (run_sd if spec["kind"] == "sd" else run_llava)(spec, device, args.prompts) | {"ok": True}
        except Exception:  # noqa: BLE001 - one part's failure is recorded, the others still run
            record = {"ok": False, "error": traceback.format_exc()}
            print(record["error"], file=sys.stderr, flush=True)
        record |= {"part_peak_gib": peak_gib(device), "part_wall_s": round(time.perf_counter() - t0, 2)}
        gc.collect()  # the part's models went out of scope with its function: release them
        if device == "cuda":
            torch.cuda.empty_cache()
        result["parts"][name] = record
        result["wall_s"] = round(time.perf_counter() - t_start, 2)
        print({k: v for k, v in record.items() if k != "error"}, flush=True)
        write_result(out, result)
        write_result(out.removesuffix(".json") + ".md", markdown(result))
    print(markdown(result))
    return 0 if all(r["ok"] for r in result["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
