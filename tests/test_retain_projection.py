"""The forget gradient projected off the inputs of protected prompts (slug_pl.retain_projection):
an edit along it leaves every state of those prompts unchanged and still changes other prompts."""

from __future__ import annotations

import pytest
import torch

from slug_pl.families import HfClip
from slug_pl.retain_projection import input_projection, orthonormal_span

PROTECTED = ["a photo of Alice Abara.", "a portrait of Bruno Bell."]
OTHER = ["a photo of Quinn Lindqvist."]


@pytest.fixture(scope="module")
def clip(tiny_hf_clip):
    family = HfClip(model_name=tiny_hf_clip)
    return family, family.load().eval()


def text_states(family, model, prompts) -> torch.Tensor:
    """Every position's last hidden state of the text tower, ``(B, T, width)``."""
    tokens = family.tokenize(prompts)
    with torch.no_grad():
        return model.text_model(input_ids=tokens).last_hidden_state


def projection_of(family, model, prompts, tolerance):
    tokens = family.tokenize(prompts)
    return input_projection(model, "text_model.", lambda: family.encode_text(model, tokens),
                            torch.ones(tokens.shape, dtype=torch.bool), len(prompts), tolerance)


def test_orthonormal_span_keeps_the_directions_above_the_tolerance():
    x = torch.tensor([[3.0, 0, 0], [0, 1.0, 0], [0, 0.01, 0]])
    assert orthonormal_span(x, 0.0).shape == (3, 2)  # rank 2: the third row lies in the second's line
    basis = orthonormal_span(x, 0.5)  # singular values 3 and ~1: only the first survives 0.5 × 3
    assert basis.shape == (3, 1) and torch.allclose(basis.abs().squeeze(), torch.tensor([1.0, 0, 0]))
    assert torch.allclose(basis.T @ basis, torch.eye(1))


@pytest.mark.parametrize("name", ["text_model.encoder.layers.0.self_attn.v_proj.weight",
                                  "text_model.encoder.layers.1.mlp.fc2.weight",
                                  "text_model.embeddings.token_embedding.weight"])
def test_an_edit_along_the_projected_gradient_leaves_the_protected_prompts_unchanged(clip, name):
    family, model = clip
    projection = projection_of(family, model, PROTECTED, tolerance=1e-6)
    assert projection.covers(name) and projection.prompts == 2
    assert not projection.covers("text_model.encoder.layers.0.self_attn.v_proj.bias")  # no input to project off
    assert not projection.covers("text_model.final_layer_norm.weight")
    param = model.get_parameter(name)
    g = torch.randn(param.shape, generator=torch.Generator().manual_seed(0))
    projected = projection.apply({name: g, "other": g})
    assert projected["other"] is g  # uncovered entries pass through
    before_protected, before_other = text_states(family, model, PROTECTED), text_states(family, model, OTHER)
    with torch.no_grad():
        original = param.detach().clone()
        param.sub_(projected[name] * (0.5 * original.norm() / projected[name].norm()))  # a large edit
        after_protected, after_other = text_states(family, model, PROTECTED), text_states(family, model, OTHER)
        param.copy_(original)
    change = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    assert change(after_protected, before_protected) < 1e-4
    assert change(after_other, before_other) > 1e-2  # the other prompt's states move
    # without the projection the same edit moves the protected prompts too
    with torch.no_grad():
        param.sub_(g * (0.5 * original.norm() / g.norm()))
        unprojected = text_states(family, model, PROTECTED)
        param.copy_(original)
    assert change(unprojected, before_protected) > 1e-2


def test_a_tolerance_drops_weak_directions(clip):
    family, model = clip
    exact = projection_of(family, model, PROTECTED, tolerance=0.0)
    loose = projection_of(family, model, PROTECTED, tolerance=0.2)
    name = "text_model.encoder.layers.0.self_attn.v_proj.weight"
    assert loose.bases[name].shape[1] < exact.bases[name].shape[1] <= model.get_parameter(name).shape[1]
    assert loose.describe()["tolerance"] == 0.2 and loose.describe()["rank"][name] == loose.bases[name].shape[1]
    with pytest.raises(ValueError, match="tolerance"):
        projection_of(family, model, PROTECTED, tolerance=1.0)
