"""Cached evaluation (other tower's features, hidden states entering the edited block) gives the
same logits as a full re-evaluation, for edits in either tower at every depth."""

from __future__ import annotations

import pytest
import torch

from slug_pl.data.labelled import LoadedSet
from slug_pl.edit import stepped
from slug_pl.evaluation.evaluator import Evaluator
from slug_pl.families.open_clip import OpenClip

LAYERS = [
    "visual.transformer.resblocks.0.attn.in_proj_weight",  # first block
    "visual.transformer.resblocks.1.mlp.c_proj.weight",    # last block
    "visual.ln_pre.weight",                                 # before the blocks
    "visual.proj",                                          # head
    "transformer.resblocks.0.mlp.c_fc.weight",
    "transformer.resblocks.1.attn.out_proj.weight",
    "ln_final.weight",
    "text_projection",
]


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    family = OpenClip("slug-tiny-vit")
    model = family.load()
    classes = [f"person {i}" for i in range(6)]
    concepts = LoadedSet("concepts", torch.randn(23, 3, 32, 32), torch.arange(23) % 6, classes,
                         ["a photo of {}.", "{} smiling."])
    utility = LoadedSet("utility", torch.randn(9, 3, 32, 32), torch.arange(9) % 3, ["cat", "dog", "car"],
                        ["a photo of a {}."])
    return family, model, concepts, utility


@pytest.mark.parametrize("layer", LAYERS)
def test_cached_logits_match_full_evaluation(setup, layer):
    family, model, concepts, utility = setup
    cached = Evaluator(family, concepts, ["person 0"], utility, batch_size=8)
    cached.evaluate(model)  # fills the caches from the unedited model
    grad = torch.randn_like(dict(model.named_parameters())[layer])
    for step in (0.05, 0.3):  # two steps: the second re-uses the hidden-state cache
        with stepped(model, layer, grad, step):
            for name in ("concepts", "utility"):
                fast = cached.logits(model, name, edited=layer)
                full = Evaluator(family, concepts, ["person 0"], utility, batch_size=8).logits(model, name)
                rel = (fast - full).norm() / full.norm()
                assert rel <= 1e-5, (layer, step, name, float(rel))
                # the edit really changed the logits (the cache is not just the unedited model)
                base = cached.logits(model, name, edited=None)
                assert (full - base).abs().max() > 1e-4
    tower = family.tower_of(layer)
    block = family.tower_stages(model, tower).first_block(layer)
    if 0 < block:
        assert any(k[1] == tower and k[2] == block for k in cached._hidden), "hidden states were not cached"


def test_evaluate_without_a_hint_scores_the_model_as_it_is_now(setup):
    """``evaluate(model)`` (no ``edited`` hint) after the model changed in place scores the changed
    model, as a fresh evaluator does: a before/after measurement with one evaluator must never
    report the 'after' from the features cached 'before'."""
    family, model, concepts, utility = setup
    evaluator = Evaluator(family, concepts, ["person 0"], utility, batch_size=8)
    layer = "visual.transformer.resblocks.1.mlp.c_proj.weight"
    evaluator.evaluate(model)
    torch.manual_seed(1)
    grad = torch.randn_like(dict(model.named_parameters())[layer])
    with stepped(model, layer, grad, 0.5):
        reused = {name: evaluator.logits(model, name) for name in ("concepts", "utility")}
        after = evaluator.evaluate(model)
        fresh_evaluator = Evaluator(family, concepts, ["person 0"], utility, batch_size=8)
        assert after == fresh_evaluator.evaluate(model)
        for name in ("concepts", "utility"):
            now = evaluator.logits(model, name)
            assert torch.allclose(now, fresh_evaluator.logits(model, name), atol=1e-6)
            assert (now - reused[name]).abs().max() > 1e-4  # the stale features really differed
