"""Shared fixtures: a small demo world and tiny random-init open_clip and Hugging Face CLIP models,
built locally."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# One torch thread for the whole suite: the machines that run it are shared, and measured under
# load one thread was ~10x faster than two (OpenMP threads spin against other jobs).
torch.set_num_threads(1)

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402


@pytest.fixture(scope="session")
def small_world(tmp_path_factory):
    """A demo world with few images per class (20 identities, 10 objects), built in seconds; its
    120 corpus pairs lie in 3 uneven shards (50, 50, 20)."""
    from slug_pl.demo.world import WorldSpec, build_world

    spec = WorldSpec(identity_corpus=4, identity_val=3, identity_test=3,
                     object_corpus=4, object_val=3, object_test=3, shard_size=50)
    return build_world(tmp_path_factory.mktemp("world") / "world", spec)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A random-init ``slug-tiny-vit`` saved as safetensors (the real open_clip loader reads it)."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    from slug_pl.families.open_clip import register_model_configs

    register_model_configs()
    torch.manual_seed(0)
    model = open_clip.create_model("slug-tiny-vit")
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_file(model.state_dict(), str(path))
    return str(path)


@pytest.fixture(scope="session")
def tiny_hf_clip(tmp_path_factory):
    """A random-init tiny ``transformers.CLIPModel`` with the shape of ``slug-tiny-vit`` (both towers
    64 wide, 2 blocks of 2 heads, projection 32, patch 8, 32 px images, 16 text positions), saved
    with its tokenizer and image processor as one ``save_pretrained`` folder; returns its path."""
    import torch
    from transformers import CLIPModel

    from slug_pl.demo.hf_clip import save_clip_folder, tiny_clip_config

    torch.manual_seed(0)
    model = CLIPModel(tiny_clip_config(hidden_size=64, layers=2, heads=2, projection_dim=32))
    return str(save_clip_folder(model, tmp_path_factory.mktemp("hf_clip") / "tiny"))


def write_config(tmp_path: Path, world: dict, checkpoint: str, forget: str, **overrides) -> Path:
    """A fit/validate config over ``world`` with a tiny model; ``overrides`` replace top-level
    sections' keys, e.g. ``trainer={"devices": 2}``."""
    concept = json.loads(Path(world["identities_json"]).read_text())[0]
    config = {
        "model": {"class_path": "slug_pl.methods.SlugModule", "init_args": {
            "family": {"class_path": "slug_pl.families.OpenClip",
                       "init_args": {"model_name": "slug-tiny-vit", "pretrained": checkpoint}}}},
        "data": {"class_path": "slug_pl.data.datamodule.SlugDataModule", "init_args": {
            "forget": forget,
            "retain": world["corpus"],
            "concepts": [concept],
            "batch_size": 5,
            "retain_batch_size": 16,
            "validation": {
                "concepts": {"shards": world["val_identities"], "classnames": world["identities_json"],
                             "templates": ["a photo of {}.", "{} in a picture."]},
                "utility": {"shards": world["val_objects"], "classnames": world["objects_json"],
                            "templates": ["a photo of a {}."]}},
            "test": {
                "concepts": {"shards": world["test_identities"], "classnames": world["identities_json"]},
                "utility": {"shards": world["test_objects"], "classnames": world["objects_json"]}},
        }},
        "search": {"top_k": 2, "max_evals": 5},
        "trainer": {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False},
    }
    for section, values in overrides.items():
        target = config[section]["init_args"] if section in ("data", "model") else config[section]
        target.update(values)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path
