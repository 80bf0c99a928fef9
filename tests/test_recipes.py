"""Every recipe of docs/recipes.md, run as written on stand-ins: its commands prepare the data, its
shipped config (``configs/<recipe>.yaml``) runs ``fit``, and the result is used.

Each test works in a new folder laid out as the recipe lays out the user's: the models where its
``hf download`` commands put them (the hub stand-ins, :mod:`slug_pl.testing.standins`), the
published data files where it says to put them (small stand-ins, ``tests/recipe_inputs.py``).
The recipe's own commands (checked to be the documented ones) then prepare the data, and the
shipped config runs unchanged: its paths are the recipe's. What differs from a run on the real
models, all of it here:

- :data:`CPU_OVERRIDES`, added to ``fit`` and ``test``: the configs ask for a GPU in bf16;
- :data:`STANDIN_SIZES`: the sizes of ``prepare celeba`` scaled to the stand-in CelebA;
- :data:`STANDIN_CANVAS`: ``prepare unlearncanvas`` names the stand-in's classifier architecture
  (timm's small ``test_vit``, not the benchmark's ViT-L/16) and its two styles (of the 50).

On a CUDA machine each test also runs as its ``gpu`` variant (``pytest -m gpu``): the shipped
config with nothing added, on the GPU in bf16 as a user runs it.

Random weights forget nothing in particular: ``fit`` may end with status 3 (target not met); the
run must still write its edit, its report and the edited downstream model, which are then used.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch

from slug_pl.cli import main
from slug_pl.testing import standins as si
import recipe_inputs as inputs
from conftest import ON_CPU_AND_GPU

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "docs" / "recipes.md"

#: The only options a test adds to a shipped config: the CPU in float32 instead of a GPU in bf16
#: (the ``gpu`` variants add nothing).
CPU_OVERRIDES = ["--trainer.accelerator", "cpu", "--trainer.precision", "32-true"]
#: ``prepare celeba``'s sizes for the stand-in CelebA (``recipe_inputs.CELEBA_OTHERS`` others with
#: ``recipe_inputs.CELEBA_IMAGES`` images each), in place of the documented 100 others, 10 + 10 images.
STANDIN_SIZES = {"--others": "4", "--val": "2", "--test": "2"}
#: ``prepare unlearncanvas``'s options for the stand-in release and canvas.
STANDIN_CANVAS = ["--arch", si.UC_CLASSIFIER_ARCH["name"], "--styles", *inputs.CANVAS_STYLES]

#: The recipes' commands, as docs/recipes.md gives them (one line each here).
PREPARE_CELEBA = ('slug-pl prepare celeba --images celeba/img_align_celeba --identities celeba/identity_CelebA.txt '
                  '--names celeba/identity_names.txt --include "Elon Musk" --others 100 --val 10 --test 10 '
                  '--out data/celeba')
PREPARE_IMAGENET = ("slug-pl prepare imagenet --root imagenet/ILSVRC/Data/CLS-LOC/val "
                    "--solution-csv imagenet/LOC_val_solution.csv --out data/imagenet")
MINE = "slug-pl mine --shards 'data/laion/{00000..00009}.tar' --name \"Elon Musk\" --out data/forget/elon_musk"
PREPARE_CANVAS = ("slug-pl prepare unlearncanvas --classifiers models/unlearncanvas/cls_model "
                  "--root data/UnlearnCanvas --out data/unlearncanvas")
DOCUMENTED = [PREPARE_CELEBA, PREPARE_IMAGENET, MINE, PREPARE_CANVAS]
for _name in ("clip_vit_b32_laion", "sd15", "sd21", "sdxl", "llava15", "unlearncanvas"):
    DOCUMENTED.append(f"slug-pl fit --config configs/{_name}.yaml")


def documented_commands() -> list[list[str]]:
    """Every ``slug-pl`` command of docs/recipes.md's bash blocks, as argv lists."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", RECIPES.read_text(encoding="utf-8"), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv[:1] == ["slug-pl"]:
                commands.append(argv)
    return commands


def test_the_tested_commands_are_the_documented_ones():
    documented = documented_commands()
    for command in DOCUMENTED:
        assert shlex.split(command) in documented, f"docs/recipes.md does not show: {command}"


def run(command: str, *extra: str) -> int:
    """``command`` (a documented one) with ``extra`` options, in the working folder."""
    argv = shlex.split(command)
    assert argv[0] == "slug-pl"
    return main([*argv[1:], *extra])


def standin_sizes(command: str) -> list[str]:
    argv = shlex.split(command)
    for i, word in enumerate(argv[:-1]):
        if word in STANDIN_SIZES:
            argv[i + 1] = STANDIN_SIZES[word]
    return argv


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A new working folder, the current directory, with the recipe's configs in ``configs/`` as
    a user's checkout has them."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(REPO / "configs")
    return tmp_path


def identity_data(work: Path) -> None:
    """The data of the identity recipes: LAION shards, CelebA and ImageNet as published, prepared
    and mined by the recipe's commands."""
    inputs.laion(work)
    inputs.celeba(work)
    inputs.imagenet(work)
    assert main(standin_sizes(PREPARE_CELEBA)[1:]) == 0
    assert run(PREPARE_IMAGENET) == 0
    assert run(MINE) == 0


def overrides(device: str) -> list[str]:
    return CPU_OVERRIDES if device == "cpu" else []


def fit(recipe: str, device: str) -> Path:
    """``slug-pl fit --config configs/<recipe>.yaml`` on ``device``; the run folder."""
    code = run(f"slug-pl fit --config configs/{recipe}.yaml", *overrides(device))
    assert code in (0, 3), f"fit ended with status {code}"
    runs = sorted(Path("lightning_logs").glob("version_*"))
    run_dir = runs[-1]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (run_dir / "edit.safetensors").is_file() and (run_dir / "report.md").is_file()
    assert summary["target"]["met"] == (code == 0)
    return run_dir


# --------------------------------------------------------------------------- open_clip


@ON_CPU_AND_GPU
def test_open_clip_vit_b32_laion(standin, work, device):
    """open_clip ViT-B/32 on LAION identities: fit, then the edited model measured by ``test`` and
    loaded with open_clip."""
    import open_clip
    from safetensors.torch import load_file

    inputs.download(standin, work, si.OPEN_CLIP_B32)
    identity_data(work)
    run_dir = fit("clip_vit_b32_laion", device)
    assert run(f"slug-pl test --config configs/clip_vit_b32_laion.yaml --model.edit {run_dir}/edit.safetensors",
               *overrides(device), "--json", "test.json") == 0
    assert json.loads(Path("test.json").read_text())["edit"]
    # the saved edited model loads with open_clip alone and differs from the base in the edited tensor only
    edited = open_clip.create_model(f"local-dir:{run_dir / 'edited_model'}").state_dict()
    base = open_clip.create_model("local-dir:models/clip-vit-b32-laion2b").state_dict()
    edit_names = [k for k in load_file(str(run_dir / "edit.safetensors")) if not k.startswith("original/")]
    assert [k for k, v in base.items() if not torch.equal(edited[k], v)] == edit_names


# --------------------------------------------------------------------------- Stable Diffusion


def use_edited_pipeline(run_dir: Path, pipeline: str) -> None:
    """The run's ``edited_stable_diffusion/`` loads with diffusers and draws; ``slug-pl transplant``
    makes the same pipeline from the edit."""
    from diffusers import StableDiffusionPipeline

    edited = run_dir / "edited_stable_diffusion"
    pipe = StableDiffusionPipeline.from_pretrained(edited)
    image = pipe("a photo of Elon Musk", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size[0] > 0
    assert run(f"slug-pl transplant --pipeline {pipeline} --edit {run_dir}/edit.safetensors --out transplanted") == 0
    again = StableDiffusionPipeline.from_pretrained("transplanted", safety_checker=None).text_encoder.state_dict()
    assert all(torch.equal(again[k], v) for k, v in pipe.text_encoder.state_dict().items())


@ON_CPU_AND_GPU
@pytest.mark.parametrize("recipe, pipeline, clip", [("sd15", si.SD15, si.CLIP_L14), ("sd21", si.SD21, si.CLIP_H14)],
                         ids=["sd15", "sd21"])
def test_stable_diffusion(standin, work, recipe, pipeline, clip, device):
    inputs.download(standin, work, pipeline)
    inputs.download(standin, work, clip)
    identity_data(work)
    run_dir = fit(recipe, device)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert {"before", "after"} <= summary["generation"].keys()
    use_edited_pipeline(run_dir, inputs.MODEL_FOLDERS[pipeline])


@ON_CPU_AND_GPU
def test_stable_diffusion_xl(standin, work, device):
    from diffusers import StableDiffusionXLPipeline

    inputs.download(standin, work, si.SDXL)
    inputs.download(standin, work, si.CLIP_L14)
    identity_data(work)
    run_dir = fit("sdxl", device)
    edited = run_dir / "edited_stable_diffusion_xl"
    pipe = StableDiffusionXLPipeline.from_pretrained(edited)
    assert pipe("a photo of Elon Musk", num_inference_steps=2).images[0].size[0] > 0


# --------------------------------------------------------------------------- LLaVA


@ON_CPU_AND_GPU
def test_llava_1_5(standin, work, device):
    """LLaVA-1.5: fit, then the edited VLM (``edited_llava/``) loads with transformers and answers."""
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    inputs.download(standin, work, si.LLAVA15)
    inputs.download(standin, work, si.CLIP_L14_336)
    identity_data(work)
    run_dir = fit("llava15", device)
    assert {"before", "after"} <= json.loads((run_dir / "summary.json").read_text())["vqa"].keys()
    model = LlavaForConditionalGeneration.from_pretrained(run_dir / "edited_llava", dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(run_dir / "edited_llava")
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Who is this?"}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    inputs_ = processor(images=Image.new("RGB", (60, 50)), text=prompt, return_tensors="pt")
    assert model.generate(**inputs_, max_new_tokens=2, do_sample=False).shape[1] == inputs_["input_ids"].shape[1] + 2


# --------------------------------------------------------------------------- UnlearnCanvas


@ON_CPU_AND_GPU
def test_unlearncanvas(standin, work, device):
    """UnlearnCanvas: the release's classifiers prepared, fit, the benchmark's table written and
    the edited pipeline drawing."""
    from diffusers import StableDiffusionPipeline

    inputs.download(standin, work, si.UNLEARNCANVAS)
    inputs.download(standin, work, si.CLIP_L14)
    inputs.unlearncanvas(work)
    assert run(PREPARE_CANVAS, *STANDIN_CANVAS) == 0
    run_dir = fit("unlearncanvas", device)
    block = json.loads((run_dir / "summary.json").read_text())["unlearncanvas"]
    assert {"UA", "IRA", "CRA"} <= block["after"].keys()
    assert (run_dir / "unlearncanvas.csv").is_file()
    edited = run_dir / "edited_unlearncanvas"
    pipe = StableDiffusionPipeline.from_pretrained(edited, safety_checker=None)
    assert pipe("A Dogs image in Van Gogh style.", num_inference_steps=2).images[0].size[0] > 0
