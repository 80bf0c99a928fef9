"""Every Python example of docs/using.md and of the README runs, against stand-ins and run folders
written the way a run writes them, so the examples cannot rot.

How a block runs. Each ```python block is preceded by a marker ``<!-- test: <id> -->``; the id's
setup (:data:`SETUPS`) names a *world*: a working directory holding ``lightning_logs/version_0/``
(a run on that model's stand-in, :func:`slug_pl.testing.runs.write_run`, with the downstream
model's saved copy where the example reads one) and ``photo.jpg``. The block runs in that
directory with one substitution step: every quoted hub id (and the few costly numbers, such as
``num_inference_steps=25``) in the world's table is replaced by its stand-in. Then the id's check
asserts what the example promised (the edit applied, reverted, or carried by the loaded model).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from slug_pl.patch import SlugPatch, embedded_tower
from slug_pl.testing import standins
from slug_pl.testing.runs import random_edit, write_run

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "docs" / "using.md", REPO / "README.md"]
BLOCK = re.compile(r"<!-- test: ([\w-]+) -->\n```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
BEFORE = {"forget_top1": 0.8, "forget_top5": 1.0, "retain_top1": 0.6, "utility_top1": 0.5}
AFTER = {"forget_top1": 0.0, "forget_top5": 0.0, "retain_top1": 0.55, "utility_top1": 0.48}


@dataclass
class World:
    """Where a block runs: ``cwd`` (with ``lightning_logs/version_0`` and ``photo.jpg``), the
    literal replacements, and the run's patch (for the checks)."""

    cwd: Path
    substitutions: dict[str, str]
    patch: SlugPatch

    @property
    def run(self) -> Path:
        return self.cwd / "lightning_logs" / "version_0"


def _new_world(root: Path, family, edited: str, substitutions: dict[str, str]) -> World:
    from PIL import Image

    root.mkdir(parents=True)
    Image.new("RGB", (64, 64), (200, 120, 40)).save(root / "photo.jpg")
    model = family.load()
    write_run(root / "lightning_logs" / "version_0", family, model, [random_edit(model, edited)], BEFORE, AFTER)
    return World(root, substitutions, SlugPatch.from_run(root / "lightning_logs" / "version_0"))


def _save_downstream(world: World, family, target, folder: str) -> None:
    """The downstream model's saved copy, as a run with ``save_edited: true`` writes it, and its
    card."""
    from slug_pl.edit import apply_edit, revert_edit
    from slug_pl.model_card import write_model_card

    clip = family.load()
    for e in world.patch.edits:
        apply_edit(clip, e)
    target.transplant(clip, world.patch.edits)
    saved = target.save_pretrained(world.run / folder)
    for e in world.patch.edits:
        revert_edit(clip, e)
    write_model_card(saved, world.patch.summary, world.patch.config, base_model=target.source())


def open_clip_world(root: Path, hub: Path) -> World:
    from slug_pl.families import OpenClip
    from slug_pl.families.open_clip import register_model_configs

    checkpoint = standins.open_clip_checkpoint_file(hub)
    config = checkpoint.extras["model_config"]
    register_model_configs(config)  # the stand-in's model name, as open_clip's own names are registered
    family = OpenClip(model_name=standins.OPEN_CLIP_STANDIN_NAME, pretrained=str(checkpoint.path),
                      model_config=str(config))
    return _new_world(root, family, "visual.transformer.resblocks.0.mlp.c_fc.weight",
                      {'"ViT-B-32-quickgelu"': f'"{standins.OPEN_CLIP_STANDIN_NAME}"',
                       '"laion400m_e32"': f'"{checkpoint.path}"'})


def hf_clip_world(root: Path, hub: Path) -> World:
    from slug_pl.families import HfClip

    clip = standins.clip_vit_large_patch14(hub).path
    return _new_world(root, HfClip(model_name=str(clip)), "text_model.encoder.layers.1.mlp.fc1.weight",
                      {f'"{standins.CLIP_L14}"': f'"{clip}"'})


def stable_diffusion_world(root: Path, hub: Path) -> World:
    from slug_pl.families import HfClip
    from slug_pl.targets import StableDiffusion

    pipeline = standins.stable_diffusion_v1_5(hub)
    family = HfClip(model_name=str(pipeline.clip))
    world = _new_world(root, family, "text_model.encoder.layers.0.mlp.fc1.weight",
                       {f'"{standins.SD15}"': f'"{pipeline.path}"', "num_inference_steps=25": "num_inference_steps=2"})
    _save_downstream(world, family, StableDiffusion(str(pipeline.path), device="cpu"), "edited_stable_diffusion")
    return world


def sdxl_world(root: Path, hub: Path) -> World:
    from slug_pl.families import HfClip
    from slug_pl.targets import StableDiffusionXL

    pipeline = standins.stable_diffusion_xl_base(hub)
    family = HfClip(model_name=str(pipeline.paired[standins.CLIP_BIGG14]))
    world = _new_world(root, family, "text_model.encoder.layers.0.mlp.fc1.weight",
                       {f'"{standins.SDXL}"': f'"{pipeline.path}"', "num_inference_steps=25": "num_inference_steps=2"})
    _save_downstream(world, family, StableDiffusionXL(str(pipeline.path), text_encoder=2, device="cpu"),
                     "edited_stable_diffusion_xl")
    return world


def llava_world(root: Path, hub: Path) -> World:
    from slug_pl.families import HfClip
    from slug_pl.targets import Llava

    vlm = standins.llava_1_5(hub)
    family = HfClip(model_name=str(vlm.clip))
    world = _new_world(root, family, "vision_model.encoder.layers.0.mlp.fc1.weight",
                       {f'"{standins.LLAVA15}"': f'"{vlm.path}"', "max_new_tokens=20": "max_new_tokens=2"})
    _save_downstream(world, family, Llava(str(vlm.path), device="cpu", progress=False), "edited_llava")
    return world


WORLDS: dict[str, Callable[[Path, Path], World]] = {
    "open_clip": open_clip_world, "hf_clip": hf_clip_world, "stable_diffusion": stable_diffusion_world,
    "sdxl": sdxl_world, "llava": llava_world}


# -- what each example promises --------------------------------------------------------------------

Check = Callable[[dict, World], None]


def _carries(key: str, part: Callable | None = None) -> Check:
    """The model ``ns[key]`` (or ``part`` of it, a model that embeds one tower) carries the run's edit."""
    def check(ns: dict, world: World) -> None:
        model = ns[key] if part is None else part(ns[key])
        assert world.patch.is_applied(model, name_map=embedded_tower(model) if part else None)
    return check


def _reverted(key: str) -> Check:
    """The model ``ns[key]`` is the base model again (every edited tensor and the weights' SHA-256)."""
    return lambda ns, world: world.patch.check_base(ns[key])


def _probabilities(ns: dict, world: World) -> None:
    probs = ns["probs"]
    assert probs.shape == (1, 2) and torch.allclose(probs.sum(), torch.tensor(1.0))


def _generated(ns: dict, world: World) -> None:
    assert min(ns["image"].size) > 0


def _answered(ns: dict, world: World) -> None:
    assert isinstance(ns["answer"], str)


def _shared(ns: dict, world: World) -> None:
    assert (world.cwd / "elon_musk_patch" / "slug_patch.json").is_file()


def _all(*checks: Check) -> Check:
    def check(ns: dict, world: World) -> None:
        for one in checks:
            one(ns, world)
    return check


def text_encoder(pipe):
    return pipe.text_encoder


def text_encoder_2(pipe):
    return pipe.text_encoder_2


def whole(model):
    return model


#: block id -> (world, check[, marks])
SETUPS = {
    "open_clip-patch": ("open_clip", _all(_probabilities, _reverted("model"))),
    "open_clip-saved": ("open_clip", _all(_carries("model"), _carries("same"))),
    "hf_clip-patch": ("hf_clip", _all(_probabilities, _reverted("model"))),
    "hf_clip-saved": ("hf_clip", _carries("model")),
    "hf_clip-share": ("hf_clip", _all(_shared, _carries("model"))),
    "stable_diffusion-patch": ("stable_diffusion", _all(_generated, _carries("pipe", text_encoder))),
    "stable_diffusion-saved": ("stable_diffusion", _carries("pipe", text_encoder)),
    "sdxl-patch": ("sdxl", _all(_generated, _carries("pipe", text_encoder_2))),
    "sdxl-saved": ("sdxl", _carries("pipe", text_encoder_2)),
    "llava-patch": ("llava", _all(_answered, _carries("vlm", whole))),
    "llava-saved": ("llava", _carries("vlm", whole)),
    "readme-open_clip": ("open_clip", _all(_reverted("model"), _carries("edited"))),
    "readme-hf_clip": ("hf_clip", _all(_carries("model"), _carries("edited"))),
    "readme-stable_diffusion": ("stable_diffusion", _all(_carries("pipe", text_encoder), _carries("edited", text_encoder))),
    "readme-llava": ("llava", _all(_carries("vlm", whole), _carries("edited", whole))),
}


def _blocks() -> list[tuple[str, str, str]]:
    """(page, id, code) of every marked block."""
    return [(page.relative_to(REPO).as_posix(), block_id, code)
            for page in PAGES for block_id, code in BLOCK.findall(page.read_text())]


def _params():
    for page, block_id, code in _blocks():
        marks = SETUPS.get(block_id, (None, None))[2:]
        yield pytest.param(block_id, code, id=f"{page}:{block_id}", marks=list(marks))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_python_block_is_marked_with_a_known_setup(page):
    text = page.read_text()
    marked = BLOCK.findall(text)
    assert len(marked) == text.count("```python"), f"{page.name}: a python block without a '<!-- test: id -->' marker"
    unknown = [block_id for block_id, _ in marked if block_id not in SETUPS]
    assert not unknown, f"{page.name}: no setup for {unknown} in tests/test_using_docs.py"


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    hub = tmp_path_factory.mktemp("hub")
    built: dict[str, World] = {}

    def world(name: str) -> World:
        if name not in built:
            built[name] = WORLDS[name](tmp_path_factory.mktemp(name) / "work", hub)
        return built[name]

    return world


@pytest.mark.parametrize("block_id, code", list(_params()))
def test_the_example_runs_and_does_what_it_says(block_id, code, worlds, monkeypatch):
    name, check = SETUPS[block_id][:2]
    world = worlds(name)
    for literal, replacement in world.substitutions.items():
        code = code.replace(literal, replacement)
    monkeypatch.chdir(world.cwd)
    namespace: dict = {}
    exec(compile(code, block_id, "exec"), namespace)
    check(namespace, world)
