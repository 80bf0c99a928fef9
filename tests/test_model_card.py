"""The model card of an edited model (slug_pl.model_card): front matter a hub reads, and what a
user must know: the edit, the numbers, how forgetting was verified, the departures, how to undo it."""

from __future__ import annotations

import json

import pytest
import yaml

from slug_pl.model_card import model_card, write_model_card

EDIT_META = {
    "model": {"family": "hf_clip", "model_name": "openai/clip-vit-large-patch14", "revision": "None"},
    "concepts": ["Elon Musk", "Taylor Swift"], "method": "slug", "target": "forget_top5 <= 0",
    "base_sha256": "ab" * 32, "slug_pl_version": "0.1.0",
    "layers": {"text_model.encoder.layers.9.mlp.fc1.weight": {
        "step": 0.375, "relative_change": 0.0213, "concepts": ["Elon Musk", "Taylor Swift"], "steps": [0.25, 0.125],
        "tower": "text"}},
}
SUMMARY = {
    "concepts": ["Elon Musk", "Taylor Swift"], "evaluated_on": "test",
    "target": {"rule": "forget_top5 <= 0", "metric": "forget_top5", "value": 0.0, "met": True,
               "held_out": {"met": False, "value": 0.0667, "images": 15}},
    "before": {"forget_top1": 0.9, "forget_top5": 1.0, "retain_top1": 0.62, "utility_top1": 0.55},
    "after": {"forget_top1": 0.0, "forget_top5": 0.0667, "retain_top1": 0.6, "utility_top1": 0.54},
    "mia": {"before": {"mean": 71.0, "std": 2.0, "n": 40}, "after": {"mean": 52.5, "std": 3.0, "n": 40}},
    "method": {"name": "slug", "departures": [
        {"name": "forget averaging", "option": "model.forget_averaging", "value": "per_sample",
         "authors": "per_batch", "follows_authors": False},
        {"name": "eval mode", "option": "model.eval_mode", "value": "true", "authors": "true",
         "follows_authors": True}],
        "retain_projection": {"name": "retain projection", "option": "model.protect_retained",
                              "departure": "a departure from SLUG's plain gradient",
                              "how": "the forget gradient of every covered tensor is projected",
                              "tolerance": None, "limit": 2000,
                              "protected": [{"tower": "text", "kind": "prompts", "inputs": 12, "tolerance": 0.05,
                                             "description": "the prompts of 6 retained concepts", "covered": 73}]}},
    "generation": {"transplanted": ["encoder.layers.9.mlp.fc1.weight"], "judge": "clip",
                   "judges": {"clip": {}, "classifier": {}},
                   "target": {"rule": "forget_recognition <= 0.1 under every judge", "met": True}},
}


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_the_card_says_what_changed_what_it_did_and_how_it_was_checked():
    card = model_card(SUMMARY, EDIT_META, library="transformers")
    assert _front_matter(card) == {"base_model": "openai/clip-vit-large-patch14", "library_name": "transformers",
                                   "tags": ["slug", "machine-unlearning"]}
    assert "# openai/clip-vit-large-patch14, with Elon Musk and Taylor Swift unlearned" in card
    assert ("| `text_model.encoder.layers.9.mlp.fc1.weight` | text | 0.375 (sum of 0.25, 0.125) | 0.0213 | "
            "Elon Musk, Taylor Swift |") in card
    assert "| forget_top1 | 90.0 | 0.0 | -90.0 |" in card  # the run's before / after, in %
    assert "| MIA accuracy (forget set vs unseen pairs; 50 = no membership signal) | 71.0 ± 2.0 | 52.5 ± 3.0" in card
    assert "held-out test" in card
    assert "forgetting does NOT hold (forget_top5 = 6.7 % over 15 images)" in card
    assert "judged by `clip`, `classifier`; its target `forget_recognition <= 0.1 under every judge` was met" in card
    assert "| forget averaging | per_sample | per_batch |" in card and "eval mode" not in card
    assert ("- `model.protect_retained`, a departure from SLUG's plain gradient: the forget gradient of every "
            "covered tensor is projected, off what the retained inputs feed each tensor (12 prompts of the text "
            "tower (tolerance 0.05)).") in card
    assert "SHA-256 of the CLIP's weights before the edit | `" + "ab" * 32 + "`" in card
    assert "edited model" not in card  # the CLIP itself
    assert "revision | not pinned" in card
    assert 'SlugPatch.from_file("edit.safetensors")' in card


def test_a_card_without_a_run_record_says_nothing_was_verified_and_a_local_base_is_no_hub_id():
    meta = {**EDIT_META, "model": {"family": "open_clip", "model_name": "local-dir:/models/my_clip",
                                   "pretrained": "None"}}
    card = model_card(None, meta)
    assert "base_model" not in _front_matter(card)
    assert "came without its run record" in card
    assert "## Before / after" not in card and "## Departures" not in card
    assert "pretrained | none (random initialization)" in card


@pytest.mark.parametrize("files, library, usage", [
    ({"model_index.json": {"_class_name": "StableDiffusionPipeline"}}, "diffusers",
     'StableDiffusionPipeline.from_pretrained("edited")'),
    ({"config.json": {"architectures": ["LlavaForConditionalGeneration"]}}, "transformers",
     'LlavaForConditionalGeneration.from_pretrained("edited")'),
    ({"config.json": {"architectures": ["os.system('x')"]}}, "transformers", 'AutoModel.from_pretrained("edited")'),
    ({"open_clip_config.json": {"model_cfg": {}}}, "open_clip", 'create_model_and_transforms("local-dir:edited")'),
])
def test_write_model_card_reads_the_library_from_the_folder_and_replaces_the_bases_card(
        tmp_path, files, library, usage):
    folder = tmp_path / "edited"
    folder.mkdir()
    for name, content in files.items():
        (folder / name).write_text(json.dumps(content))
    (folder / "README.md").write_text("# the base model's card\n")
    path = write_model_card(folder, SUMMARY, EDIT_META, base_model="stable-diffusion-v1-5/stable-diffusion-v1-5")
    card = path.read_text()
    assert path == folder / "README.md" and "the base model's card" not in card
    assert _front_matter(card)["library_name"] == library
    assert _front_matter(card)["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert usage in card and "system" not in card.split("## Use")[1]
    assert ("| edited model | `stable-diffusion-v1-5/stable-diffusion-v1-5`, carrying the edit of the CLIP below |\n"
            "| CLIP the edit was computed on | `openai/clip-vit-large-patch14` (hf_clip) |") in card
