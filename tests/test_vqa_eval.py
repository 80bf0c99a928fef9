"""VQA evaluation (slug_pl.evaluation.vqa) on a tiny random LLaVA, and its scoring rules on
hand-made answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from builders_downstream import tiny_llava
from slug_pl.evaluation import vqa

QUESTION = "Who is this person?"


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    torch.set_num_threads(1)
    folder = tiny_llava(tmp_path_factory.mktemp("llava") / "model")
    processor = AutoProcessor.from_pretrained(folder)
    model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    return model, processor


def noise_images(n, seed=0, size=(40, 48)):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for _ in range(n)]


def greedy_by_hand(model, processor, image, question, max_new_tokens):
    """Greedy decoding without ``generate``: full forward passes, argmax of the last logits,
    stop at the end-of-sequence token; the new tokens decoded."""
    inputs = processor(images=[image], text=[vqa.chat_prompt(processor, question)], return_tensors="pt")
    ids = inputs["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=ids, pixel_values=inputs["pixel_values"],
                           attention_mask=torch.ones_like(ids)).logits
            token = int(logits[0, -1].argmax())
            if token == processor.tokenizer.eos_token_id:
                break
            new.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return processor.tokenizer.decode(new, skip_special_tokens=True).strip()


def test_chat_prompt_uses_the_processors_template(llava):
    _, processor = llava
    assert vqa.chat_prompt(processor, QUESTION) == f"USER: <image>\n{QUESTION}\nASSISTANT:"


def test_ask_is_greedy_new_tokens_and_independent_of_batching(llava):
    model, processor = llava
    images = noise_images(5)
    batched = vqa.ask(model, processor, images, QUESTION, max_new_tokens=6, batch_size=4, progress=False)
    single = vqa.ask(model, processor, images, QUESTION, max_new_tokens=6, batch_size=1, progress=False)
    assert len(batched) == 5 and batched == single
    assert len(set(batched)) > 1  # the answers depend on the image
    assert batched[0] == greedy_by_hand(model, processor, images[0], QUESTION, 6)
    assert batched[3] == greedy_by_hand(model, processor, images[3], QUESTION, 6)


@pytest.mark.parametrize("answer, name, aliases, expected", [
    ("This is Alice Abara.", "Alice Abara", (), True),
    ("it is ALICE   abara!", "Alice Abara", (), True),        # case and whitespace runs
    ("Alice Abara's portrait", "Alice Abara", (), True),       # possessive: ' is not a word character
    ("(alice abara)", "Alice Abara", (), True),
    ("Alice", "Alice Abara", (), False),                        # a part of the name is not the name
    ("Alice", "Alice Abara", ("Alice",), True),                 # ... unless it is an alias
    ("Alicent Abara", "Alice Abara", ("Alice",), False),        # no match inside a word
    ("Alice", "Al", (), False),                                 # "Al" does not match "Alice"
    ("Al Bo is here", "Al", (), True),
    ("AliceAbara", "Alice Abara", (), False),
    ("Alice_Abara", "Alice", (), False),                        # underscore is a word character
    ("Abara, Alice", "Alice Abara", (), False),                 # the words in order
    ("a teapot.", "teapot", (), True),
    ("teapots", "teapot", (), False),
])
def test_name_matches_rule(answer, name, aliases, expected):
    assert vqa.name_matches(answer, name, aliases) is expected


def test_name_accuracy_with_aliases():
    answers = ["Alice", "alice abara", "Bob", "I see Alice."]
    assert vqa.name_accuracy(answers, "Alice Abara") == 0.25
    assert vqa.name_accuracy(answers, "Alice Abara", {"Alice Abara": ["Alice"]}) == 0.75
    assert vqa.name_accuracy(answers, ["Alice Abara", "Bruno", "Bob", "Alice"]) == 0.5
    with pytest.raises(ValueError, match="expected names"):
        vqa.name_accuracy(answers, ["Alice"])


def test_score_vqa_by_hand():
    identity = {"Alice Abara": ["Alice Abara", "no idea", "It's Alice."],       # forget
                "Bruno Bell": ["Bruno Bell", "bruno bell"],                      # retain
                "Chen Cho": ["Chen", "nobody", "someone", "Chen Cho"]}           # retain
    objects = {"teapot": ["a teapot", "a kettle"], "lamp": ["lamp"]}
    out = vqa.score_vqa(QUESTION, identity, ["Alice Abara"], objects, aliases={"Alice Abara": ["Alice"]},
                        examples_per_concept=1)
    assert out["question"] == QUESTION
    assert out["forget_name_accuracy"] == pytest.approx(2 / 3)       # "Alice Abara", "Alice"
    assert out["retain_name_accuracy"] == pytest.approx((1 + 1 / 4) / 2)
    assert out["object_accuracy"] == pytest.approx(2 / 3)            # micro over 3 object images
    assert out["per_concept"]["Chen Cho"] == {"kind": "retain", "images": 4, "accuracy": 0.25}
    assert out["per_concept"]["teapot"]["kind"] == "object"
    assert out["examples"] == [("Alice Abara", "Alice Abara"), ("Bruno Bell", "Bruno Bell"),
                               ("Chen Cho", "Chen"), ("teapot", "a teapot"), ("lamp", "lamp")]
    two = vqa.score_vqa(QUESTION, identity, ["Alice Abara", "Chen Cho"])
    assert two["forget_name_accuracy"] == pytest.approx((1 + 1) / 7)  # no alias: only full names
    assert two["retain_name_accuracy"] == 1.0 and two["object_accuracy"] is None


def test_evaluate_vqa_on_tiny_llava(llava):
    model, processor = llava
    images = noise_images(5, seed=1)
    sets = vqa.VqaSets(identities={"Alice Abara": images[:2], "Bruno Bell": images[2:3]},
                       forget=["Alice Abara"], objects={"teapot": images[3:]})
    kwargs = dict(question=QUESTION, object_question="What is this?", max_new_tokens=4, batch_size=2,
                  examples_per_concept=2, progress=False)
    out = vqa.evaluate_vqa(model, processor, sets, **kwargs)
    assert set(out) == {"question", "forget_name_accuracy", "retain_name_accuracy", "object_accuracy",
                        "per_concept", "examples"}
    people = vqa.ask(model, processor, images[:3], QUESTION, max_new_tokens=4, progress=False)
    things = vqa.ask(model, processor, images[3:], "What is this?", max_new_tokens=4, progress=False)
    assert out["examples"] == [("Alice Abara", people[0]), ("Alice Abara", people[1]),
                               ("Bruno Bell", people[2]), ("teapot", things[0]), ("teapot", things[1])]
    assert out == vqa.score_vqa(QUESTION, {"Alice Abara": people[:2], "Bruno Bell": people[2:]},
                                ["Alice Abara"], {"teapot": things}, examples_per_concept=2)
    assert out["per_concept"]["Bruno Bell"]["images"] == 1
    assert all(0.0 <= out[k] <= 1.0 for k in ("forget_name_accuracy", "retain_name_accuracy", "object_accuracy"))
    assert vqa.evaluate_vqa(model, processor, sets, **kwargs) == out   # deterministic
    with pytest.raises(ValueError, match="no images in identities"):
        vqa.VqaSets(identities={"A": images}, forget=["B"])
