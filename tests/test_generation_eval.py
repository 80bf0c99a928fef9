"""Generation evaluation (slug_pl.evaluation.generation) and generated forget sets
(slug_pl.data.generated), on a tiny random Stable Diffusion pipeline and a tiny open_clip model."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from builders_downstream import SD_IMAGE_SIZE, TinyClassifier, tiny_sd_pipeline
from slug_pl.data import generated
from slug_pl.data.pairs import shard_sample_counts
from slug_pl.data.shards import expand_urls, iter_raw_samples
from slug_pl.evaluation import generation as gen
from slug_pl.pipelines import generate_images, load_pipeline
from slug_pl.families.base import ModelFamily

STEPS = 2


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    torch.set_num_threads(1)
    return tiny_sd_pipeline(tmp_path_factory.mktemp("sd") / "pipeline")


@pytest.fixture(scope="module")
def pipe(sd_dir):
    return load_pipeline(sd_dir)


@pytest.fixture(scope="module")
def clip(tiny_checkpoint):
    from slug_pl.families.open_clip import OpenClip

    family = OpenClip(model_name="slug-tiny-vit", pretrained=tiny_checkpoint)
    return family, family.load()


def solid(rgb, size=8) -> Image.Image:
    return Image.new("RGB", (size, size), rgb)


# ---------------------------------------------------------------------------- prompt set


def test_prompt_set_order_and_checks():
    ps = gen.PromptSet(concepts=["A", "B"], forget=["B"], templates=["a photo of {}.", "{c} here"],
                       seeds=[5, 7])
    got = [(i.concept, i.prompt, i.seed) for i in ps.items()]
    assert got == [("A", "a photo of A.", 5), ("A", "a photo of A.", 7), ("A", "A here", 5), ("A", "A here", 7),
                   ("B", "a photo of B.", 5), ("B", "a photo of B.", 7), ("B", "B here", 5), ("B", "B here", 7)]
    assert ps.retain == ("A",) and ps.judge_classes == ("A", "B")
    assert [i.seed for i in ps.items(seeds=[3])] == [3, 3, 3, 3]
    with pytest.raises(ValueError, match="not among the concepts"):
        gen.PromptSet(concepts=["A"], forget=["Z"])
    with pytest.raises(ValueError, match="distinct"):
        gen.PromptSet(concepts=["A"], forget=[], seeds=[1, 1])
    with pytest.raises(ValueError, match="classnames lacks"):
        gen.PromptSet(concepts=["A", "B"], forget=["A"], classnames=["A", "C"])


# ---------------------------------------------------------------------------- generation


def test_generate_images_depend_on_seed_not_batching(pipe):
    prompts = ["a photo of Alice Abara.", "a red cube", "a photo of Alice Abara.", "a cat"]
    seeds = [0, 1, 2, 0]
    first = generate_images(pipe, prompts, seeds, steps=STEPS, guidance=3.0, batch_size=4, progress=False)
    again = generate_images(pipe, prompts, seeds, steps=STEPS, guidance=3.0, batch_size=4, progress=False)
    assert len(first) == 4 and first[0].size == (SD_IMAGE_SIZE, SD_IMAGE_SIZE)
    for a, b in zip(first, again):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    # a seed decides the image: prompts 0 and 2 differ only in seed, their images differ
    assert np.abs(np.asarray(first[0], float) - np.asarray(first[2], float)).mean() > 1.0

    batched = generate_images(pipe, prompts, seeds, steps=STEPS, guidance=3.0, batch_size=4,
                                  progress=False, output_type="pt")
    single = generate_images(pipe, prompts, seeds, steps=STEPS, guidance=3.0, batch_size=1,
                                 progress=False, output_type="pt")
    assert batched.shape == (4, 3, SD_IMAGE_SIZE, SD_IMAGE_SIZE) and batched.dtype == torch.float32
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)  # float rounding of batched matmuls
    # the PIL images are the rounded tensors
    assert np.abs(np.asarray(first[1], float) - batched[1].permute(1, 2, 0).numpy() * 255).max() <= 1.0
    # pairs of unequal length are refused
    with pytest.raises(ValueError, match="one seed per prompt"):
        generate_images(pipe, prompts, seeds[:2], progress=False)


# ---------------------------------------------------------------------------- CLIP score


class VectorFamily(ModelFamily):
    """A family with hand-set embeddings: an image's embedding is its top-left pixel's (R, G)
    values, a text's embedding is looked up in ``TEXTS``."""

    family_name = "vectors"
    TEXTS = {"east": [1.0, 0.0], "north-east": [4.0, 3.0], "west": [-1.0, 0.0]}

    def load(self):
        return torch.nn.Linear(1, 1)

    def describe(self):
        return {"family": self.family_name}

    def tokenize(self, texts):
        names = list(self.TEXTS)
        return torch.tensor([[names.index(t)] for t in texts])

    def image_transform(self):
        return lambda im: torch.tensor(np.asarray(im, dtype=np.float32)).permute(2, 0, 1)

    def encode_image(self, model, images):
        return images[:, :2, 0, 0]

    def encode_text(self, model, tokens):
        return torch.tensor(list(self.TEXTS.values()))[tokens[:, 0]]

    def logit_scale(self, model):
        return torch.tensor(1.0)

    def tower_of(self, name):
        return None


def test_clip_score_hand_computation():
    family = VectorFamily()
    images = [solid((3, 4, 0)), solid((3, 4, 0)), solid((0, 5, 0))]
    prompts = ["north-east", "west", "east"]
    # cos((3,4),(4,3)) = 24/25; cos((3,4),(-1,0)) = -3/5 -> clipped to 0; cos((0,5),(1,0)) = 0
    scores = gen.clip_scores(family, family.load(), images, prompts)
    torch.testing.assert_close(scores, torch.tensor([96.0, 0.0, 0.0]))


def test_clip_score_matches_open_clip_directly(clip):
    import open_clip

    family, model = clip
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)) for _ in range(3)]
    prompts = ["a photo of Alice Abara.", "a red cube", "a dog"]
    transform = family.image_transform()
    with torch.no_grad():
        img = model.encode_image(torch.stack([transform(im) for im in images]))
        txt = model.encode_text(open_clip.tokenize(prompts, context_length=model.context_length))
    cos = [float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b)) for a, b in zip(img.numpy(), txt.numpy())]
    expected = [100 * max(c, 0.0) for c in cos]
    assert gen.clip_scores(family, model, images, prompts).tolist() == pytest.approx(expected, abs=1e-4)


# ---------------------------------------------------------------------------- recognition


class FixedJudge:
    """Predicts a fixed class name per image, in order (one-hot logits)."""

    name = "fixed"

    def __init__(self, predictions):
        self.predictions = predictions

    def logits(self, images, classnames):
        assert len(images) == len(self.predictions)
        return torch.nn.functional.one_hot(
            torch.tensor([list(classnames).index(p) for p in self.predictions]), len(classnames)).float()


def test_recognition_fractions_by_hand():
    labels = ["A"] * 4 + ["B"] * 2 + ["C"] * 3 + ["D"]
    predicted = ["A", "B", "A", "C", "B", "B", "A", "C", "D", "A"]
    images = [solid((0, 0, 0))] * len(labels)
    classnames = ["A", "B", "C", "D", "E"]  # E: a class without images
    out = gen.recognition(FixedJudge(predicted), images, labels, classnames, forget=["A"])
    # A: 2/4 recognized; B: 2/2; C: 1/3; D: 0/1
    assert out["forget_recognition"] == pytest.approx(0.5)
    assert out["retain_recognition"] == pytest.approx((1 + 1 / 3 + 0) / 3)
    assert out["per_concept"] == pytest.approx({"A": 0.5, "B": 1.0, "C": 1 / 3, "D": 0.0})
    two = gen.recognition(FixedJudge(predicted), images, labels, classnames, forget=["A", "B"])
    assert two["forget_recognition"] == pytest.approx(4 / 6)  # over all 6 images of A and B
    assert two["retain_recognition"] == pytest.approx((1 / 3 + 0) / 2)
    with pytest.raises(ValueError, match="not among the judge's classes"):
        gen.recognition(FixedJudge(predicted), images, labels, ["A", "B"], forget=["A"])


def test_clip_zero_shot_judge_is_cosine_to_template_means(clip):
    import open_clip

    family, model = clip
    templates = ("a photo of {}.", "{} in a picture.")
    judge = gen.ClipZeroShotJudge(family, model, templates)
    images = [solid((200, 30, 30), 40), solid((30, 200, 30), 40)]
    names = ["Alice Abara", "Bruno Bell", "Chen Cho"]
    with torch.no_grad():
        classes = []
        for name in names:
            emb = model.encode_text(open_clip.tokenize([t.format(name) for t in templates],
                                                       context_length=model.context_length))
            mean = (emb / emb.norm(dim=-1, keepdim=True)).mean(0)
            classes.append(mean / mean.norm())
        img = model.encode_image(torch.stack([family.image_transform()(im) for im in images]))
        expected = (img / img.norm(dim=-1, keepdim=True)) @ torch.stack(classes).T
    torch.testing.assert_close(judge.logits(images, names), expected, atol=1e-5, rtol=0)
    assert judge.name == "clip-zeroshot:slug-tiny-vit"


def test_classifier_judge_checkpoint_round_trip(tmp_path):
    module = TinyClassifier(num_classes=3)
    with torch.no_grad():
        module.linear.weight.copy_(torch.eye(3))
        module.linear.bias.zero_()
    folder = gen.save_classifier(tmp_path / "judge", module, "builders_downstream.TinyClassifier",
                                 {"num_classes": 3}, ["red", "green", "blue"], image_size=(8, 8))
    judge = gen.ClassifierJudge.load(folder)
    images = [solid((250, 10, 10), 20), solid((10, 250, 10), 20), solid((10, 10, 250), 20)]
    assert judge.logits(images, ["red", "green", "blue"]).argmax(1).tolist() == [0, 1, 2]
    # restricted to two classes, in the requested order: the blue image goes to the larger of
    # its red and green logits (equal here, argmax takes the first)
    assert judge.logits(images, ["green", "red"]).argmax(1).tolist() == [1, 0, 0]
    out = gen.recognition(judge, images, ["red", "green", "red"], ["red", "green", "blue"], forget=["green"])
    assert out == {"forget_recognition": 1.0, "retain_recognition": 0.5,
                   "per_concept": {"red": 0.5, "green": 1.0}}
    assert json.loads((folder / gen.CLASSIFIER_JSON).read_text())["classnames"] == ["red", "green", "blue"]
    with pytest.raises(ValueError, match="no class"):
        judge.logits(images, ["purple"])
    with pytest.raises(FileNotFoundError, match="classifier.json"):
        gen.ClassifierJudge.load(tmp_path)


# ---------------------------------------------------------------------------- grid


def test_image_grid_layout_and_writers(tmp_path):
    before = [[solid((255, 0, 0), 4)] * 2, [solid((0, 255, 0), 4)] * 2]
    after = [[solid((0, 0, 255), 4)] * 2, [solid((0, 255, 0), 4)] * 2]
    grid = gen.image_grid(before, after, ["forget: A", "retain: B"], forget_rows=1, cell=20)
    pixels = np.asarray(grid)
    # every image cell appears as a 20x20 block of its colour, before cells left of after cells
    red = np.argwhere((pixels == [255, 0, 0]).all(-1))
    blue = np.argwhere((pixels == [0, 0, 255]).all(-1))
    assert len(red) == len(blue) == 2 * 20 * 20
    assert red[:, 1].max() < blue[:, 1].min()
    assert (pixels == [0, 255, 0]).all(-1).sum() == 4 * 20 * 20
    assert red[:, 0].max() < np.argwhere((pixels == [0, 255, 0]).all(-1))[:, 0].min()  # forget row on top
    # labels are drawn (forget label in red-ish text left of the images)
    left = pixels[:, : red[:, 1].min()]
    assert ((left[..., 0] > 120) & (left[..., 1] < 90)).any()


# ---------------------------------------------------------------------------- evaluation


def test_score_generation_result(pipe, clip):
    """Recognition and CLIP score of drawn prompt sets, recomputed by hand from the judge's logits
    and the CLIP scores."""
    family, model = clip
    ps = gen.PromptSet(concepts=["Alice Abara", "Bruno Bell", "Chen Cho"], forget=["Bruno Bell"],
                       templates=["a photo of {}."], seeds=[0, 1])
    judge = gen.ClipZeroShotJudge(family, model)
    items = ps.items()
    images = generate_images(pipe, [i.prompt for i in items], [i.seed for i in items], steps=STEPS, guidance=3.0,
                             batch_size=3, progress=False)
    assert len(images) == 6
    result = gen.score_generation(images, ps, judge, family, model)
    assert set(result) >= {"forget_recognition", "retain_recognition", "clip_score", "per_concept"}
    predicted = judge.logits(images, ps.judge_classes).argmax(1).tolist()
    hits = [p == k // 2 for k, p in enumerate(predicted)]  # image k shows concept k // 2
    assert result["forget_recognition"] == pytest.approx(np.mean(hits[2:4]))
    assert result["retain_recognition"] == pytest.approx((np.mean(hits[0:2]) + np.mean(hits[4:6])) / 2)
    scores = gen.clip_scores(family, model, images, [i.prompt for i in items])
    assert result["clip_score"] == pytest.approx(scores.mean().item(), abs=1e-5)
    assert result["per_concept"]["Chen Cho"] == pytest.approx(
        {"forget": False, "images": 2, "recognition": np.mean(hits[4:6]),
         "clip_score": scores[4:6].mean().item()}, abs=1e-5)

def test_generate_forget_set_shards(pipe, sd_dir, tmp_path):
    prompt = "a photo of Alice Abara."
    out = generated.generate_forget_set(sd_dir, prompt, n=3, out=tmp_path / "forget", seed0=4,
                                        batch_size=1, steps=STEPS, guidance=3.0, device="cpu",
                                        shard_size=2, progress=False)
    manifest = json.loads((out / generated.MANIFEST_NAME).read_text())
    assert manifest["shards"] == ["generated-000000.tar", "generated-000001.tar"]
    assert manifest["counts"] == [2, 1] and manifest["seeds"] == [4, 6] and manifest["n"] == 3
    urls = expand_urls(str(out / "generated-{000000..000001}.tar"))
    assert shard_sample_counts(urls) == [2, 1]
    samples = list(iter_raw_samples(urls))
    assert [s.key for s in samples] == ["seed00000004", "seed00000005", "seed00000006"]
    assert all(s.caption == prompt for s in samples)
    meta = [json.loads(s.fields["json"]) for s in samples]
    assert [m["seed"] for m in meta] == [4, 5, 6]
    assert meta[0]["steps"] == STEPS and meta[0]["guidance"] == 3.0
    assert meta[0]["pipeline"] == str(sd_dir.resolve()) and meta[0]["dtype"] == "float32"
    for sample, seed in zip(samples, [4, 5, 6]):
        direct = pipe(prompt, num_inference_steps=STEPS, guidance_scale=3.0,
                      generator=torch.Generator().manual_seed(seed)).images[0]
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(sample.image))), np.asarray(direct))
    with pytest.raises(FileExistsError, match="already exists"):
        generated.generate_forget_set(sd_dir, prompt, 1, out, steps=STEPS, device="cpu", progress=False)


def test_generate_command_line(sd_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["--prompt", "a cat", "--n", "2", "--steps", "2", "--device", "cpu"]
    assert generated.main(["--pipeline", str(sd_dir), "--out", str(out), *args]) == 0
    assert sum(shard_sample_counts(expand_urls(str(out / "*.tar")))) == 2
    capsys.readouterr()

    (tmp_path / "empty").mkdir()
    cases = {"pipeline folder not found": [str(tmp_path / "missing"), str(tmp_path / "o1")],
             "not a diffusers pipeline folder": [str(tmp_path / "empty"), str(tmp_path / "o2")],
             "already exists": [str(sd_dir), str(out)]}
    for message, (pipeline, target) in cases.items():
        assert generated.main(["--pipeline", pipeline, "--out", target, *args]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and err.startswith("slug-pl generate: error:")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_tiny_pipeline_around_a_saved_clip_text_tower(tmp_path):
    """The SD builder with a CLIP folder as text encoder (what a transplant edits): the pipeline's
    text encoder holds that CLIP's text-tower weights and its tokenizer's context length."""
    from transformers import CLIPModel

    from slug_pl.demo.hf_clip import save_clip_folder, tiny_clip_config

    torch.manual_seed(0)
    clip_model = CLIPModel(tiny_clip_config(hidden_size=48, layers=2, heads=2, projection_dim=16))
    clip_dir = save_clip_folder(clip_model, tmp_path / "clip")
    pipe = load_pipeline(tiny_sd_pipeline(tmp_path / "sd", text_encoder_dir=clip_dir))
    tower = clip_model.text_model.state_dict()
    loaded = pipe.text_encoder.state_dict()  # transformers 5: CLIPTextModel is the tower itself
    assert set(loaded) == set(tower) and all(torch.equal(loaded[k], tower[k]) for k in tower)
    assert pipe.tokenizer.model_max_length == 16 and pipe.unet.config.cross_attention_dim == 48
    (image,) = generate_images(pipe, ["a photo of Alice Abara."], [0], steps=STEPS, progress=False)
    assert image.size == (SD_IMAGE_SIZE, SD_IMAGE_SIZE)
