"""The reference preset computes what the authors' code (CSIPlab/SLUG) computes, checked from the
definitions alone on a tiny model where the ViT patch embedding ``visual.conv1.weight`` (which
slug_pl's default filter never ranks) is a strong candidate.

The definitions, as the authors' code states them (``src/clip/unlearn/calc_grad.py``,
``src/clip/unlearn_slug.py``, ``src/clip/training/data.py``), recomputed here in float64 with
open_clip, tarfile, PIL and webdataset's own shuffle — none of slug_pl's passes, streams, rankings
or searches:

- forget gradient: the mean over consecutive batches of 16 forget pairs (the last one shorter) of
  ∇ of the batch's mean cos(u, v);
- retain gradient: the mean over ceil(N / B) batches of ∇ of the CLIP loss, the batches being the
  first ⌊N / B⌋ full batches of a shuffled pass over the retain shards (webdataset's buffered
  shuffle, buffer 5000, first pick after 1000) and the first batch of a second, reshuffled pass,
  every image through open_clip's training transform (random resized crop);
- ranking: importance ‖g_f‖ / ‖θ‖, alignment |cos(g_r, g_f)|, every tensor whose name has none of
  bias / logit_scale / position / embedding, towers by ``"visual" in name``, the Pareto front of
  points no other point beats on both (lower alignment and higher importance);
- search: for every front layer, their loop — ratio −‖θ‖ / ‖g_f‖ / 10, then 9 more iterations of
  bisection after a hit (forget top-5 = 0) and doubling (or bisection) after a miss — exactly 10
  evaluations, the model edited θ + ratio · g_f.

The preset's free choices are its seeds: the sample shuffle of pass p draws from
``random.Random(derived_seed(seed, "samples", p))`` and the crop at stream position q from
``torch.manual_seed(derived_seed(seed, "crop", q))`` (the authors' sample shuffle is unseeded); the
shard order is theirs at their seed.
"""

from __future__ import annotations

import io
import json
import math
import random
import re
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
import yaml
from conftest import one_thread, read_pairs, separating_config
from PIL import Image
from safetensors.torch import load_file, save_file
from test_reference_gradients import RTOL, _grads, assert_equal_to_reference, clip_loss

from slug_pl.cli import main
from slug_pl.data.labelled import LabelledSet
from slug_pl.data.pairs import PairBatches, PairSet
from slug_pl.data.reference_batches import AuthorsBatches, buffered_shuffle, derived_seed
from slug_pl.departures import RunOptions, is_reference, run_departures
from slug_pl.retain_projection import RetainProjection
from slug_pl.families.base import AUTHORS_EXCLUDE
from slug_pl.families.open_clip import OPEN_CLIP_EXCLUDE, OpenClip, register_model_configs
from slug_pl.step_search import SearchSettings

REPO = Path(__file__).resolve().parent.parent
#: Scale of the patch embedding, class token and positions in the conv1 model: the tower's output
#: is unchanged (ln_pre normalizes it away), conv1's gradient grows by 1 / C, its importance by 1 / C².
C = 0.25
AUTHORS_FILTER = ("bias", "logit_scale", "position", "embedding")  # as their code spells it
FORGET_BATCH, RETAIN_BATCH, ITERATIONS = 16, 64, 10


@pytest.fixture(scope="module")
def conv1_model(tmp_path_factory, separating_model):
    """The separating model with ``visual.conv1.weight``, ``visual.class_embedding`` and
    ``visual.positional_embedding`` scaled by :data:`C`: the same function, conv1 16 times as
    important."""
    state = load_file(separating_model["checkpoint"])
    for name in ("visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding"):
        state[name] = state[name] * C
    path = tmp_path_factory.mktemp("conv1") / "conv1.safetensors"
    save_file(state, str(path))
    return {**separating_model, "checkpoint": str(path)}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, conv1_model):
    """``slug-pl fit --config <separating config> --config configs/reference.yaml``: forget
    batches of 16 (20 pairs: 16 + 4), retain batches of 64 (600 pairs: 9 full, the 24 left over
    dropped, a tenth batch from the second pass)."""
    work = tmp_path_factory.mktemp("reference_run")
    config = separating_config(work, conv1_model, data={"retain_batch_size": RETAIN_BATCH})
    with one_thread():
        code = main(["fit", "--config", str(config), "--config", str(REPO / "configs" / "reference.yaml")])
    assert code == 0
    return work / "lightning_logs" / "version_0"


def authors_forget(model, images, tokens, batch_size: int = FORGET_BATCH) -> dict[str, torch.Tensor]:
    """The mean over consecutive batches (the last one shorter) of ∇ (batch mean of cos(u, v))."""
    model.zero_grad(set_to_none=True)
    batches = math.ceil(len(images) / batch_size)
    for b in range(batches):
        rows = slice(b * batch_size, (b + 1) * batch_size)
        u = F.normalize(model.encode_image(images[rows]), dim=-1)
        v = F.normalize(model.encode_text(tokens[rows]), dim=-1)
        (u * v).sum(dim=-1).mean().backward()
    out = {n: g / batches for n, g in _grads(model).items()}
    model.zero_grad(set_to_none=True)
    return out


def authors_retain_samples(shards: list[str], n: int, batch_size: int = RETAIN_BATCH, seed: int = 0) -> list[dict]:
    """The retain samples in batch order: the shard list through webdataset's buffered shuffle
    (2000 / 500, their seed), then each pass through webdataset's sample shuffle (5000 / 1000);
    ⌊n / B⌋ full batches from pass 0, the epoch's last batch from pass 1."""
    order = list(wds.filters._shuffle(iter(shards), 2000, 500, rng=random.Random(seed)))

    def one_pass(p: int) -> list[dict]:
        stream = wds.DataPipeline(wds.SimpleShardList(order), wds.tarfile_to_samples(),
                                  wds.shuffle(5000, 1000, seed=derived_seed(seed, "samples", p)))
        return list(stream)

    full = n // batch_size * batch_size
    return one_pass(0)[:full] + one_pass(1)[: math.ceil(n / batch_size) * batch_size - full]


def authors_retain(model, samples: list[dict], train_transform, tokenizer, batch_size: int = RETAIN_BATCH,
                   seed: int = 0) -> dict[str, torch.Tensor]:
    """The mean over the batches of ∇ CLIP loss, the image at position q cropped under
    ``torch.manual_seed(derived_seed(seed, "crop", q))``."""
    images = []
    for q, sample in enumerate(samples):
        torch.manual_seed(derived_seed(seed, "crop", q))
        images.append(train_transform(Image.open(io.BytesIO(sample["png"])).convert("RGB")))
    images = torch.stack(images).double()
    tokens = tokenizer([s["txt"].decode("utf-8").strip() for s in samples])
    batches = len(samples) // batch_size
    model.zero_grad(set_to_none=True)
    for b in range(batches):
        rows = slice(b * batch_size, (b + 1) * batch_size)
        u = F.normalize(model.encode_image(images[rows]), dim=-1)
        v = F.normalize(model.encode_text(tokens[rows]), dim=-1)
        clip_loss(u, v, model.logit_scale.exp()).backward()
    out = {n: g / batches for n, g in _grads(model).items()}
    model.zero_grad(set_to_none=True)
    return out


def authors_ranking(params, forget, retain) -> dict[str, dict]:
    """Importance, alignment, tower and front membership of every tensor the authors rank."""
    rows = {}
    for name, theta in params.items():
        if any(word in name for word in AUTHORS_FILTER) or retain[name].dim() == 0 or forget[name].norm() == 0:
            continue
        rows[name] = {"tower": "vision" if "visual" in name else "text",
                      "importance": (forget[name].norm() / theta.norm()).item(),
                      "alignment": F.cosine_similarity(retain[name].flatten(), forget[name].flatten(), dim=0,
                                                       eps=1e-6).abs().item()}
    for name, r in rows.items():
        r["on_front"] = not any(o["tower"] == r["tower"] and o["alignment"] < r["alignment"]
                                and o["importance"] > r["importance"] for o in rows.values())
    return rows


def forget_top5(model, images, label: int, class_embeddings) -> float:
    """Zero-shot top-5 accuracy of images of one class (design §2)."""
    with torch.no_grad():
        u = F.normalize(model.encode_image(images), dim=-1)
        return (u @ class_embeddings(model).T).topk(5, dim=-1).indices.eq(label).any(-1).float().mean().item()


def authors_iterates(model, name: str, vector: torch.Tensor, measure) -> list[tuple[float, float]]:
    """The authors' loop on one layer: (step λ = −ratio, forget top-5) of each of its 10 iterations."""
    param = model.get_parameter(name)
    theta = param.detach().clone()
    ratio = theta.norm().item() / vector.norm().item()
    out, top5, low, high = [], None, 0.0, float("inf")
    for cnt in range(ITERATIONS):
        if cnt == 0:
            ratio = -(ratio / 10)
        elif top5 == 0:
            high = ratio
            ratio = (low + high) / 2
        else:
            low = ratio
            ratio = (low + high) / 2 if high != float("inf") else ratio * 2
        param.data = theta + ratio * vector
        top5 = measure(model)
        out.append((-ratio, top5))
    param.data = theta
    return out


def authors_gradients(model_info: dict, forget_batch: int, retain_batch: int):
    """The float64 model (train mode, as their pass), its transforms and tokenizer, and the authors'
    forget and retain gradients at these batch sizes, with the retain samples."""
    register_model_configs()
    model, train_transform, preprocess = open_clip.create_model_and_transforms(
        "slug-tiny-vit", pretrained=model_info["checkpoint"])
    tokenizer = open_clip.get_tokenizer("slug-tiny-vit")
    model64 = model.double().train()  # their pass runs in train mode (no dropout here)
    with one_thread():
        images, captions = read_pairs([model_info["forget"]], preprocess)
        forget = authors_forget(model64, images.double(), tokenizer(captions), forget_batch)
        samples = authors_retain_samples(model_info["corpus_shards"], 600, retain_batch)
        retain = authors_retain(model64, samples, train_transform, tokenizer, retain_batch)
    return model64, preprocess, tokenizer, forget, retain, samples


def test_the_reference_preset_computes_what_the_authors_code_computes(reference_run, conv1_model):
    model64, preprocess, tokenizer, forget, retain, samples = authors_gradients(conv1_model, FORGET_BATCH,
                                                                                RETAIN_BATCH)
    assert len(samples) == 640 and len({s["__key__"] for s in samples[:576]}) == 576

    # the gradient files
    folder = reference_run / "gradients"
    meta = assert_equal_to_reference(folder / "forget.safetensors", forget)
    assert (meta["counts"]["samples"], meta["counts"]["batches"]) == (20, 2)
    meta = assert_equal_to_reference(folder / "retain.safetensors", retain)
    assert (meta["counts"]["samples"], meta["counts"]["batches"]) == (640, 10)

    # importance, alignment and the fronts
    params = {n: p.detach() for n, p in model64.named_parameters()}
    theirs = authors_ranking(params, forget, retain)
    ours = {r["name"]: r for r in _read_csv(reference_run / "ranking.csv")}
    assert set(ours) == set(theirs) and "visual.conv1.weight" in ours
    for name, r in theirs.items():
        assert float(ours[name]["importance"]) == pytest.approx(r["importance"], rel=1e-5), name
        # float32 files within RTOL of float64 gradients move a cosine by at most ~2 RTOL
        assert float(ours[name]["alignment"]) == pytest.approx(r["alignment"], abs=2 * RTOL), name
    fronts = {n for n, r in theirs.items() if r["on_front"]}
    assert {n for n, r in ours.items() if r["on_front"] == "True"} == fronts
    assert theirs["visual.conv1.weight"]["on_front"]  # what the fixture is for: a strong conv1

    # ten iterations of their loop on every front layer, judged on the concept's validation images
    model = model64.float().eval()
    names = json.loads(Path(conv1_model["identities_json"]).read_text())
    templates = conv1_model["templates"]["identities"]
    val = LabelledSet(conv1_model["val_identities"], names, templates).load(preprocess, "val")
    label = names.index(conv1_model["concept"])
    concept_images = val.images[val.labels == label]

    def class_embeddings(m):
        prompts = tokenizer([t.format(c) for c in names for t in templates])
        e = F.normalize(m.encode_text(prompts), dim=-1).view(len(names), len(templates), -1).mean(1)
        return F.normalize(e, dim=-1)

    searched = _read_csv(reference_run / "search.csv")
    assert {r["layer"] for r in searched} == fronts  # every front layer, of both towers
    summary = json.loads((reference_run / "summary.json").read_text())
    finals = {c["layer"]: c for c in summary["method"]["candidates"]}
    with one_thread():
        for name in sorted(fronts):
            iterates = authors_iterates(model, name, forget[name].float(),
                                        lambda m: forget_top5(m, concept_images, label, class_embeddings))
            rows = [r for r in searched if r["layer"] == name]
            assert len(rows) == ITERATIONS, name
            assert [float(r["step"]) for r in rows] == pytest.approx([s for s, _ in iterates], rel=1e-5), name
            assert [float(r["forget_top5"]) for r in rows] == pytest.approx([t for _, t in iterates]), name
            assert [r["target_met"] == "True" for r in rows] == [t == 0 for _, t in iterates], name
            assert finals[name]["final_step"] == pytest.approx(iterates[-1][0], rel=1e-5)
    assert summary["method"]["reference_preset"] is True
    report = (reference_run / "report.md").read_text()
    assert "This run used the reference preset" in report and "slug_pl's own" in report


def test_the_reference_gradients_are_the_same_on_two_processes(tmp_path, conv1_model):
    """The preset on two processes (ddp_spawn over gloo) with odd batches: forget batches of 7 (20
    pairs: 7, 7, 6; one padding row on rank 1 in each), retain batches of 63 (600 pairs: 9 full
    batches, the 33 left over dropped, a tenth from the second pass; a padding row on rank 1 in
    each). The files equal the authors' definitions at those sizes: a batch's mean divides by
    its pairs on both ranks, and the stream is the one-process stream."""
    config = separating_config(tmp_path, conv1_model, trainer={"devices": 2, "strategy": "ddp_spawn"},
                               data={"retain_batch_size": 63})
    main(["fit", "--config", str(config), "--config", str(REPO / "configs" / "reference.yaml"),
          "--data.init_args.batch_size", "7", "--search.max_evals", "1"])  # one evaluation: the files are what counts
    _, _, _, forget, retain, _ = authors_gradients(conv1_model, 7, 63)
    folder = tmp_path / "lightning_logs" / "version_0" / "gradients"
    meta = assert_equal_to_reference(folder / "forget.safetensors", forget)
    assert meta["world_size"] == 2 and (meta["counts"]["samples"], meta["counts"]["batches"]) == (20, 3)
    meta = assert_equal_to_reference(folder / "retain.safetensors", retain)
    assert (meta["counts"]["samples"], meta["counts"]["batches"]) == (630, 10)


def _read_csv(path: Path) -> list[dict]:
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# -- the authors' retain stream, on its own ---------------------------------------------------------

@pytest.mark.parametrize("n,bufsize,initial", [(120, 50, 20), (30, 5000, 1000), (7, 4, 4), (0, 10, 3)])
def test_the_buffered_shuffle_is_webdatasets(n, bufsize, initial):
    """Item for item the order of webdataset's ``shuffle`` with the same generator."""
    ours = list(buffered_shuffle(range(n), bufsize, initial, random.Random(3)))
    theirs = list(wds.filters._shuffle(iter(range(n)), bufsize, initial, rng=random.Random(3)))
    assert ours == theirs and sorted(ours) == list(range(n))


def _retain_set(small_world, batch_size: int, sampling: AuthorsBatches | None) -> PairSet:
    shards = [str(p) for p in small_world["corpus_shards"]]
    assert len(shards) == 3
    return PairSet("retain", tuple(shards), batch_size, 120, (50, 50, 20), sampling=sampling)


def _batches(pair_set: PairSet, world: int, family) -> list[dict]:
    """Every rank's batches, merged back into global batches (rank r holds positions r, r + W, …)."""
    per_rank = [list(PairBatches([pair_set], family.image_transform(), family.tokenize, rank, world,
                                 train_transform=family.train_image_transform())) for rank in range(world)]
    merged = []
    for parts in zip(*per_rank):
        rows = sum(int(p["valid"].sum()) for p in parts)
        images = torch.stack([parts[j % world]["images"][j // world] for j in range(rows)])
        tokens = torch.stack([parts[j % world]["tokens"][j // world] for j in range(rows)])
        merged.append({"images": images, "tokens": tokens})
    return merged


def test_the_authors_retain_batches_are_the_same_on_any_device_count(small_world):
    """120 pairs in 3 shards (50, 50, 20), batches of 32: three full batches of distinct pairs from
    a shuffled pass (the 24 left over dropped), a fourth from a second pass shuffled anew; augmented
    images; the same global batches, image for image, on one process and on three."""
    family = OpenClip("slug-tiny-vit")
    pair_set = _retain_set(small_world, 32, AuthorsBatches(seed=5))
    one = _batches(pair_set, 1, family)
    assert len(one) == pair_set.num_batches == 4 and all(len(b["images"]) == 32 for b in one)
    three = _batches(pair_set, 3, family)
    for a, b in zip(one, three):
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["tokens"], b["tokens"])
    captions = [c for b in one for c in b["tokens"].tolist()]
    first_pass = [tuple(c) for c in captions[:96]]
    plain = list(PairBatches([_retain_set(small_world, 32, None)], family.image_transform(), family.tokenize))
    assert [len(b["images"]) for b in plain] == [32, 32, 32, 24]  # the default: in order, the last partial
    in_order = [tuple(c) for b in plain for c in b["tokens"].tolist()]
    assert first_pass != in_order[:96]  # shuffled
    # augmented: the crops differ from the evaluation transform; the same seed gives the same crops
    again = _batches(pair_set, 1, family)
    assert all(torch.equal(a["images"], b["images"]) for a, b in zip(one, again))
    other = _batches(_retain_set(small_world, 32, AuthorsBatches(seed=6)), 1, family)
    assert not torch.equal(one[0]["images"], other[0]["images"])


def test_the_authors_shard_order_is_theirs_at_the_same_seed():
    """The shard list goes through the buffered shuffle (2000 / 500) with ``random.Random(seed)``,
    as their ``detshuffle2`` at epoch 0."""
    urls = [f"shard-{i:03d}.tar" for i in range(12)]
    for seed in (0, 1, 7):
        theirs = list(wds.filters._shuffle(iter(urls), 2000, 500, rng=random.Random(seed)))
        assert AuthorsBatches(seed=seed).shard_order(urls) == theirs
    assert AuthorsBatches(shuffle=False).shard_order(urls) == urls


def test_a_retain_batch_larger_than_the_set_is_refused():
    with pytest.raises(ValueError, match=re.escape("fewer than data.retain_batch_size 64")):
        AuthorsBatches().positions(50, 64)
    assert AuthorsBatches(full_batches=False).positions(50, 64) == 50


# -- the preset as configs, its report, other families --------------------------------------------

def _resolved(capsys, *configs: str) -> dict:
    """The config the CLI resolves from ``configs`` (in order; later ones override)."""
    args = [a for c in configs for a in ("--config", str(REPO / "configs" / c))]
    with pytest.raises(SystemExit) as stop:
        main(["fit", *args, "--print_config"])
    assert stop.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_demo_reference_is_the_demo_with_the_reference_preset_on_top(capsys):
    """configs/demo_reference.yaml resolves to exactly configs/demo.yaml + configs/reference.yaml,
    and the overlay applies to another family (Hugging Face CLIP) unchanged."""
    reference = _resolved(capsys, "demo_reference.yaml")
    assert reference == _resolved(capsys, "demo.yaml", "reference.yaml")
    family = reference["model"]["init_args"]["family"]["init_args"]
    assert family["exclude"] == list(AUTHORS_EXCLUDE) and family["include"] == []
    hf = _resolved(capsys, "demo_hf.yaml", "reference.yaml")
    assert hf["model"]["init_args"]["family"]["class_path"].endswith("HfClip")
    assert hf["model"]["init_args"]["family"]["init_args"]["exclude"] == list(AUTHORS_EXCLUDE)
    assert (hf["data"]["init_args"]["retain_batches"], hf["search"]["iterations"]) == ("reference", "fixed")


def test_the_departures_of_the_defaults_and_of_the_preset():
    """The defaults depart in everything but guard and margin and the retain projection (off by
    default); the preset in nothing; model.protect_retained is a departure, named with its values."""
    defaults = run_departures(RunOptions(OPEN_CLIP_EXCLUDE, (), "per_sample", 64, "in_order", True, SearchSettings()))
    assert [d["name"] for d in defaults if d["follows_authors"]] == ["utility guard and step margin",
                                                                      "retain projection"]
    assert defaults[-1]["option"] == "model.protect_retained" and defaults[-1]["value"] == "off (null)"
    preset = run_departures(RunOptions(AUTHORS_EXCLUDE, (), "per_batch", 16, "reference", False,
                                       SearchSettings(top_k=None, iterations="fixed", max_evals=10)))
    assert is_reference(preset) and not is_reference(defaults)
    nine = SearchSettings(top_k=None, iterations="fixed", max_evals=9)
    assert not is_reference(run_departures(RunOptions(AUTHORS_EXCLUDE, (), "per_batch", 16, "reference", False, nine)))
    protected = run_departures(RunOptions(AUTHORS_EXCLUDE, (), "per_batch", 16, "reference", False,
                                          SearchSettings(top_k=None, iterations="fixed", max_evals=10),
                                          RetainProjection(0.05, 30)))
    assert [d["name"] for d in protected if not d["follows_authors"]] == ["retain projection"]
    assert protected[-1]["value"] == "the forget gradient projected off the retained inputs (tolerance 0.05, limit 30)"
    assert not is_reference(protected)


def test_hugging_face_clip_has_the_authors_training_transform(tiny_hf_clip):
    """open_clip's training transform at the processor's crop size and statistics: a random crop
    (two seeds, two images) of the evaluation transform's shape."""
    from slug_pl.families.hf_clip import HfClip

    family = HfClip(tiny_hf_clip)
    image = Image.fromarray((torch.rand(40, 40, 3) * 255).byte().numpy())
    crops = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        crops.append(family.train_image_transform()(image))
    assert crops[0].shape == family.image_transform()(image).shape == (3, 32, 32)
    assert not torch.equal(crops[0], crops[1])


@pytest.fixture(scope="module")
def fresh_demo_reference(tmp_path_factory, fresh_demo):
    """``slug-pl fit --config configs/demo_reference.yaml`` in a new process from a folder that holds
    only the session's fresh demo build (``fresh_demo``: the world and the demo CLIP, built from an
    empty folder there; the reference preset uses the same ones, and building them again would only
    repeat minutes of training)."""
    import os
    import shutil
    import subprocess
    import sys

    work = tmp_path_factory.mktemp("fresh_demo_reference")
    shutil.copytree(fresh_demo["dir"] / ".slug_cache", work / ".slug_cache")
    env = os.environ | {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "slug_pl.cli", "fit", "--config",
                           str(REPO / "configs" / "demo_reference.yaml"), "--trainer.enable_progress_bar", "false"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=3600)
    return {"dir": work, "code": done.returncode, "console": done.stdout + done.stderr}


@pytest.mark.slow  # a whole run on the fresh demo build
def test_fresh_demo_reference_ranks_conv1_and_searches_every_front_layer_ten_times(fresh_demo_reference):
    assert fresh_demo_reference["code"] == 0, fresh_demo_reference["console"][-3000:]
    run = fresh_demo_reference["dir"] / "lightning_logs" / "version_0"
    ranking = _read_csv(run / "ranking.csv")
    assert "visual.conv1.weight" in {r["name"] for r in ranking}
    fronts = {r["name"] for r in ranking if r["on_front"] == "True"}
    searched = _read_csv(run / "search.csv")
    assert {r["layer"] for r in searched} == fronts
    assert all(sum(r["layer"] == name for r in searched) == ITERATIONS for name in fronts)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"]["reference_preset"] is True and summary["target"]["met"] is True
    report = (run / "report.md").read_text()
    assert "This run used the reference preset" in report and "iterate 10 λ" in report
