"""Shared fixtures: a small demo world and a tiny random-init open_clip model, built locally."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def small_world(tmp_path_factory):
    """A demo world with few images per class (20 identities, 10 objects), built in seconds."""
    from slug_pl.demo.world import WorldSpec, build_world

    spec = WorldSpec(identity_corpus=4, identity_val=3, identity_test=3,
                     object_corpus=4, object_val=3, object_test=3)
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
