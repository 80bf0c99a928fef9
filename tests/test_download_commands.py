"""The download commands of docs/recipes.md, checked against the stand-ins of their repositories
(:mod:`slug_pl.testing.standins`, the repositories' own layouts).

For every ``hf download`` command:

- the installed ``hf`` CLI parses it (its own argument parsing, in-process, the download itself
  replaced) into one ``snapshot_download`` of the repository whose ``allow_patterns`` are exactly
  the command's ``--include`` values, without a warning (a pattern after a single ``--include``
  would become a positional file name, and positional names make ``hf download`` ignore
  ``--include``);
- huggingface_hub's own pattern filter (``filter_repo_objects``) selects, in the stand-in, every
  file the loaders open (seen by an audit hook on Python's ``open``), and none of the real
  repository's files that no loader reads;
- the loaders, run on a copy holding only the selected files, give the same model as on the
  whole stand-in (the files opened outside Python, safetensors and tokenizers, are covered by
  this: a missing one fails the load or changes what is loaded).
"""

from __future__ import annotations

import re
import shlex
import shutil
import sys
import warnings
from pathlib import Path
from unittest import mock

import pytest
import torch
from PIL import Image

from slug_pl.testing import standins as si

RECIPES = Path(__file__).resolve().parent.parent / "docs" / "recipes.md"

#: Files of the real repositories that no loader reads and no command may fetch (full-precision
#: single-file checkpoints, ``.bin`` and ``fp16`` duplicates, other frameworks' exports).
NOT_NEEDED = {
    si.SD15: ["v1-5-pruned.ckpt", "v1-5-pruned.safetensors", "v1-5-pruned-emaonly.ckpt",
              "v1-5-pruned-emaonly.safetensors", "text_encoder/pytorch_model.bin", "unet/diffusion_pytorch_model.bin",
              "unet/diffusion_pytorch_model.non_ema.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
              "vae/diffusion_pytorch_model.bin", "safety_checker/pytorch_model.bin",
              "safety_checker/model.fp16.safetensors", "text_encoder/model.fp16.safetensors"],
    si.SD21: ["v2-1_768-ema-pruned.ckpt", "v2-1_768-ema-pruned.safetensors", "v2-1_768-nonema-pruned.safetensors",
              "text_encoder/pytorch_model.bin", "unet/diffusion_pytorch_model.fp16.safetensors",
              "unet/diffusion_pytorch_model.bin"],
    si.SDXL: ["sd_xl_base_1.0.safetensors", "sd_xl_base_1.0_0.9vae.safetensors",
              "sd_xl_offset_example-lora_1.0.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
              "unet/model.onnx", "unet/model.onnx_data", "text_encoder/model.onnx", "text_encoder/flax_model.msgpack",
              "vae_1_0/diffusion_pytorch_model.safetensors", "vae_decoder/model.onnx", "vae_encoder/model.onnx",
              "unet/openvino_model.bin"],
    si.LLAVA15: [],
    si.LLAVA_NEXT: [],
    si.CLIP_L14: ["pytorch_model.bin", "tf_model.h5", "flax_model.msgpack"],
    si.CLIP_L14_336: ["pytorch_model.bin", "tf_model.h5"],
    si.CLIP_H14: ["open_clip_pytorch_model.bin", "open_clip_model.safetensors", "pytorch_model.bin"],
    si.CLIP_BIGG14: ["open_clip_pytorch_model.bin", "open_clip_model.safetensors",
                     "pytorch_model-00001-of-00002.bin"],
    si.OPEN_CLIP_B32: ["open_clip_pytorch_model.bin", "pytorch_model.bin", "model.safetensors", "config.json"],
}


# --------------------------------------------------------------------------- the commands


def download_commands(markdown: str) -> list[list[str]]:
    """Every ``hf download`` command in the ``bash`` code blocks of ``markdown``, as argv lists
    (continuation lines joined, comments dropped)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv[:2] == ["hf", "download"]:
                commands.append(argv)
    return commands


def parse_with_hf_cli(argv: list[str]) -> dict:
    """What the installed ``hf`` CLI would download for ``argv``: the keyword arguments of its one
    ``snapshot_download`` call (the download replaced). Fails on a warning or another call."""
    from huggingface_hub.cli import download
    from huggingface_hub.cli.hf import app

    calls = []
    with mock.patch.object(download, "snapshot_download", side_effect=lambda **kw: calls.append(kw) or "."), \
            mock.patch.object(download, "hf_hub_download", side_effect=lambda **kw: pytest.fail(
                f"{shlex.join(argv)} downloads the single file {kw['filename']!r}")), \
            warnings.catch_warnings():
        warnings.simplefilter("error")
        app(argv[1:], standalone_mode=False)
    assert len(calls) == 1
    return calls[0]


COMMANDS = download_commands(RECIPES.read_text(encoding="utf-8"))


def test_every_documented_repository_is_checked():
    repos = [argv[2] for argv in COMMANDS]
    assert sorted(repos) == sorted(NOT_NEEDED), "a command without a stand-in check, or a check without a command"


def test_a_pattern_after_one_include_would_be_lost():
    """The mistake the commands avoid, as the installed CLI reads it: the second pattern becomes a
    positional file name and the first is dropped (with a warning only)."""
    from huggingface_hub.cli import download
    from huggingface_hub.cli.hf import app

    with mock.patch.object(download, "snapshot_download") as snapshot, \
            mock.patch.object(download, "hf_hub_download") as single, pytest.warns(UserWarning, match="Ignoring"):
        app(["download", si.SD15, "--include", "model_index.json", "scheduler/*", "unet/*"], standalone_mode=False)
    assert snapshot.call_args.kwargs["allow_patterns"] == ["scheduler/*", "unet/*"]
    single.assert_not_called()


@pytest.mark.parametrize("argv", COMMANDS, ids=[argv[2] for argv in COMMANDS])
def test_command_parses_to_its_includes(argv):
    call = parse_with_hf_cli(argv)
    includes = [argv[i + 1] for i, arg in enumerate(argv) if arg == "--include"]
    assert call["repo_id"] == argv[2] and call["allow_patterns"] == includes
    assert call["ignore_patterns"] is None and call["local_dir"]


# --------------------------------------------------------------------------- the loaders

_OPENED: list[str] | None = None


def _audit(event: str, args) -> None:
    if _OPENED is not None and event == "open" and isinstance(args[0], (str, bytes, Path)):
        _OPENED.append(str(args[0]))


sys.addaudithook(_audit)


def opened_files(load, folder: Path):
    """Run ``load(folder)``; return its result and the files under ``folder`` Python opened."""
    global _OPENED
    _OPENED = []
    try:
        result = load(folder)
    finally:
        opened, _OPENED = _OPENED, None
    root = folder.resolve()
    inside = {Path(p).resolve() for p in opened}
    return result, {p.relative_to(root).as_posix() for p in inside if p.is_relative_to(root) and p.is_file()}


def _tensors(**modules) -> dict:
    return {f"{part}.{name}": t.detach().clone() for part, m in modules.items() for name, t in m.state_dict().items()}


def _load_sd(folder: Path, xl: bool = False) -> dict:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from slug_pl.pipelines import load_pipeline

    pipe = (StableDiffusionXLPipeline if xl else StableDiffusionPipeline).from_pretrained(folder)
    parts = {name: getattr(pipe, name) for name in ("text_encoder", "text_encoder_2", "unet", "vae", "safety_checker")
             if getattr(pipe, name, None) is not None}
    record = _tensors(**parts)
    for name in ("tokenizer", "tokenizer_2"):
        if getattr(pipe, name, None) is not None:
            record[name] = getattr(pipe, name)(["a photo of a cat"], padding="max_length").input_ids
    if not xl:
        record["slug_pl"] = _tensors(text_encoder=load_pipeline(folder).text_encoder)
    return record


def _load_llava(folder: Path, next_: bool = False) -> dict:
    from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    model = (LlavaNextForConditionalGeneration if next_ else LlavaForConditionalGeneration).from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Who is this?"}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    inputs = processor(images=Image.new("RGB", (60, 50), "red"), text=prompt, return_tensors="pt")
    record = {**_tensors(model=model), "prompt": prompt, **inputs, "generation": model.generation_config.to_dict()}
    if not next_:
        from slug_pl.targets.llava import Llava

        target = Llava(model=str(folder), device="cpu", progress=False)
        target.load()
        record["slug_pl"] = _tensors(vlm=target.adapter.vlm)
    return record


def _load_clip(folder: Path) -> dict:
    from slug_pl.families.hf_clip import HfClip

    family = HfClip(str(folder))
    return {**_tensors(clip=family.load()), "tokens": family.tokenize(["a photo of a cat"]),
            "pixels": family.image_transform()(Image.new("RGB", (50, 40), "blue"))}


def _load_open_clip(folder: Path) -> dict:
    from slug_pl.families.open_clip import OpenClip

    family = OpenClip(model_name=f"local-dir:{folder}")
    return {**_tensors(clip=family.load()), "pixels": family.image_transform()(Image.new("RGB", (50, 40), "blue"))}


LOADERS = {
    si.SD15: _load_sd, si.SD21: _load_sd, si.SDXL: lambda f: _load_sd(f, xl=True),
    si.LLAVA15: _load_llava, si.LLAVA_NEXT: lambda f: _load_llava(f, next_=True),
    si.CLIP_L14: _load_clip, si.CLIP_L14_336: _load_clip, si.CLIP_H14: _load_clip, si.CLIP_BIGG14: _load_clip,
    si.OPEN_CLIP_B32: _load_open_clip,
}


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return a == b


@pytest.mark.parametrize("argv", COMMANDS, ids=[argv[2] for argv in COMMANDS])
def test_command_selects_what_the_loaders_open(standin, tmp_path, argv):
    from huggingface_hub.utils import filter_repo_objects

    repo_id = argv[2]
    patterns = parse_with_hf_cli(argv)["allow_patterns"]
    built = standin(repo_id)
    folder = built.path.parent if repo_id == si.OPEN_CLIP_B32 else built.path
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    selected = set(filter_repo_objects(files, allow_patterns=patterns))
    assert not list(filter_repo_objects(NOT_NEEDED[repo_id], allow_patterns=patterns))

    full, opened = opened_files(LOADERS[repo_id], folder)
    assert opened, "the spy saw no file opened"
    assert opened <= selected, f"opened but not downloaded: {sorted(opened - selected)}"

    copy = tmp_path / folder.name
    for name in selected:
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(folder / name, copy / name)
    assert _same(full, LOADERS[repo_id](copy))
