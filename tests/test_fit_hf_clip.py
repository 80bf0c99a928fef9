"""``fit_hf_clip``, the demos' CLIP training: an image may be captioned in several ways (each epoch
draws one per image), as the UnlearnCanvas demo's CLIP is trained; one caption per image trains
exactly as a plain list of texts does."""

from __future__ import annotations

import pytest
import torch

from slug_pl.demo.hf_clip import clip_tokenizer, fit_hf_clip, tiny_clip_config

N_IMAGES = 8


def _fit(folder, captions, epochs=3):
    """(training record, trained weights) of a 16-wide one-block CLIP on 8 fixed random images."""
    from transformers import CLIPModel

    images = torch.randn(N_IMAGES, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    config = tiny_clip_config(hidden_size=16, layers=1, heads=1, projection_dim=8)
    record = fit_hf_clip(images, captions, config, folder, epochs=epochs, batch_size=4)
    return record, CLIPModel.from_pretrained(folder).state_dict()


def _initial_weights():
    from transformers import CLIPModel

    torch.manual_seed(0)  # fit_hf_clip's seed
    return CLIPModel(tiny_clip_config(hidden_size=16, layers=1, heads=1, projection_dim=8)).state_dict()


def _token(word: str) -> int:
    ids = clip_tokenizer(16)(word)["input_ids"]
    assert len(ids) == 3, (word, ids)  # <start> word <end>: one token
    return ids[1]


EMBEDDING = "text_model.embeddings.token_embedding.weight"


def test_one_caption_per_image_trains_as_plain_texts(tmp_path):
    texts = [f"a photo of the {w}." for w in ("apple", "bicycle", "lamp", "mug", "tree", "clock", "car", "house")]
    plain_record, plain = _fit(tmp_path / "plain", texts)
    listed_record, listed = _fit(tmp_path / "listed", [[t] for t in texts])
    assert plain_record["n_captions"] == listed_record["n_captions"] == N_IMAGES
    assert plain.keys() == listed.keys()
    assert all(torch.equal(plain[k], listed[k]) for k in plain)


def test_every_way_of_captioning_an_image_is_trained(tmp_path):
    """Each image has two captions, the second one's words nowhere else: after 3 epochs their
    token embeddings have moved (some epoch drew them), a word of no caption's has not, and
    the draws are the seed's (a second run gives the same weights)."""
    objects = ("apple", "bicycle", "lamp", "mug", "tree", "clock", "car", "house")
    variants = [[f"a photo of the {w}.", f"crimson {w}"] for w in objects]
    record, trained = _fit(tmp_path / "a", variants)
    assert record["n_captions"] == 2 * N_IMAGES and record["n_pairs"] == N_IMAGES
    start = _initial_weights()[EMBEDDING]
    moved = (trained[EMBEDDING] - start).norm(dim=1)
    assert moved[_token("crimson")] > 0 and moved[_token("photo")] > 0
    assert moved[_token("violet")] == 0  # in no caption

    first_only, only = _fit(tmp_path / "first", [v[:1] for v in variants])
    assert (only[EMBEDDING] - start).norm(dim=1)[_token("crimson")] == 0
    _, again = _fit(tmp_path / "again", variants)
    assert all(torch.equal(trained[k], again[k]) for k in trained)


def test_an_image_without_a_caption_is_refused(tmp_path):
    with pytest.raises(ValueError, match="one text or a non-empty list of texts per image"):
        _fit(tmp_path / "bad", [["a photo."]] * (N_IMAGES - 1) + [[]])
