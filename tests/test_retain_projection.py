"""The forget gradient projected off the inputs of protected prompts (slug_pl.retain_projection):
an edit along it leaves every state of those prompts unchanged and still changes other prompts."""

from __future__ import annotations

import pytest
import torch

from slug_pl.families import HfClip
from slug_pl.retain_projection import gram_span, input_projection, orthonormal_span

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


@pytest.mark.parametrize("tolerance", [0.0, 0.3])
def test_the_gram_matrix_spans_what_the_inputs_span(tolerance):
    """Inputs too many to keep (every patch of thousands of images) are kept as their Gram matrix:
    the same protected span as the inputs' own SVD, rank-deficient inputs included."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 5, generator=g) @ torch.randn(5, 12, generator=g) * torch.linspace(0.1, 3, 12)  # rank 5
    direct, gram = orthonormal_span(x, tolerance), gram_span(x.double().T @ x.double(), tolerance)
    assert gram.shape == direct.shape and gram.shape[1] == (5 if tolerance == 0 else gram.shape[1])
    assert torch.allclose(gram @ gram.T, direct @ direct.T, atol=1e-5)  # the same projector


def test_inputs_encoded_in_several_calls_give_the_same_projection(clip):
    family, model = clip
    tokens = family.tokenize(PROTECTED + OTHER)
    every = torch.ones(tokens.shape, dtype=torch.bool)
    at_once = input_projection(model, "text_model.", lambda: family.encode_text(model, tokens), every, 3, 0.1)

    def in_two_calls():
        family.encode_text(model, tokens[:2])
        family.encode_text(model, tokens[2:])

    in_parts = input_projection(model, "text_model.", in_two_calls, None, 3, 0.1)
    assert at_once.bases.keys() == in_parts.bases.keys() and at_once.rows.keys() == in_parts.rows.keys()
    for name, basis in at_once.bases.items():
        assert torch.allclose(basis @ basis.T, in_parts.bases[name] @ in_parts.bases[name].T, atol=1e-5), name
    assert all(torch.equal(at_once.rows[n], in_parts.rows[n]) for n in at_once.rows)
