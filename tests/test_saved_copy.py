"""The saved copy of an edited downstream model (slug_pl.targets.saved_copy): only the files that
hold an edited tensor are rewritten, every stored variant of it is edited, stale pickles are left
out, and a folder without safetensors is refused before anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from slug_pl.targets.saved_copy import NoSafetensorsError, TensorChange, copy_with_tensors

NAME = "encoder.layers.0.mlp.fc1.weight"


@pytest.fixture
def model_folder(tmp_path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A folder as a hub snapshot may hold it: float32 weights in the newer key layout, a float16
    variant in the older one (tower prefix), a pickle of the same weights, a config."""
    g = torch.Generator().manual_seed(0)
    weights = {f"vision_model.{NAME}": torch.randn(6, 4, generator=g),
               "vision_model.encoder.layers.0.mlp.fc2.weight": torch.randn(4, 6, generator=g),
               "language_model.lm_head.weight": torch.randn(5, 4, generator=g)}
    folder = tmp_path / "model"
    folder.mkdir()
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    save_file({f"vision_tower.{k}": v.half() for k, v in weights.items()}, str(folder / "model.fp16.safetensors"))
    torch.save(weights, folder / "pytorch_model.bin")
    (folder / "config.json").write_text('{"model_type": "toy"}')
    return folder, weights


def test_only_the_edited_tensor_changes_in_every_stored_variant(model_folder, tmp_path):
    folder, weights = model_folder
    new = torch.full((6, 4), 0.123456789)
    loaded_in_bf16 = weights[f"vision_model.{NAME}"].to(torch.bfloat16)  # the model ran in bfloat16
    rewritten = copy_with_tensors(folder, tmp_path / "out", {NAME: TensorChange(loaded_in_bf16, new)})
    out = tmp_path / "out"
    assert rewritten == ["model.fp16.safetensors", "model.safetensors"]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.fp16.safetensors", "model.safetensors"]
    assert (out / "config.json").read_bytes() == (folder / "config.json").read_bytes()
    full, half = load_file(out / "model.safetensors"), load_file(out / "model.fp16.safetensors")
    assert torch.equal(full[f"vision_model.{NAME}"], new)  # float32: the new value itself
    assert torch.equal(half[f"vision_tower.vision_model.{NAME}"], new.half())  # in the file's dtype
    for key, value in weights.items():
        if not key.endswith(NAME):
            assert torch.equal(full[key], value) and torch.equal(half[f"vision_tower.{key}"], value.half())
    with pytest.raises(FileExistsError):
        copy_with_tensors(folder, out, {NAME: TensorChange(loaded_in_bf16, new)})


def test_a_tensor_is_found_by_its_value_too(model_folder, tmp_path):
    """A same-named tensor whose value is not what the model loaded is another model's: refused,
    before anything is written."""
    folder, weights = model_folder
    other = weights[f"vision_model.{NAME}"] + 1
    with pytest.raises(NoSafetensorsError, match=NAME):
        copy_with_tensors(folder, tmp_path / "out", {NAME: TensorChange(other, other)})
    assert not (tmp_path / "out").exists()


def test_a_folder_without_safetensors_is_refused(tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    weight = torch.randn(6, 4)
    torch.save({f"vision_model.{NAME}": weight}, folder / "pytorch_model.bin")
    with pytest.raises(NoSafetensorsError, match="another format"):
        copy_with_tensors(folder, tmp_path / "out", {NAME: TensorChange(weight, weight * 2)})
    assert not (tmp_path / "out").exists()
