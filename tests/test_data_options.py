"""Data options: the checks a data module runs before any work, retain pairs that name a forgotten
concept left out (exactly, on any number of ranks), the stratified ``max_samples`` subset, and
the demo data module taking the same options as SlugDataModule."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
import webdataset as wds
import yaml
from lightning.pytorch import Trainer
from PIL import Image

from slug_pl.cli import TRAINER_DEFAULTS, main
from slug_pl.data.datamodule import EvalSuite, SlugDataModule
from slug_pl.data.labelled import LabelledSet, load_labelled_set
from slug_pl.data.mining import concept_pattern, mine_forget_set
from slug_pl.data.pairs import PairBatches
from slug_pl.data.shards import ShardError, iter_raw_samples
from slug_pl.demo.datamodule import DemoWorld
from slug_pl.families.open_clip import OpenClip
from slug_pl.gradients import load_tensors
from slug_pl.methods.slug import SlugModule

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def concept(small_world):
    return json.loads(Path(small_world["identities_json"]).read_text())[0]


@pytest.fixture(scope="module")
def forget_shard(tmp_path_factory, small_world, concept):
    out = tmp_path_factory.mktemp("mined") / "forget"
    return str(mine_forget_set(small_world["corpus"], [concept], out).output_shards[0])


# -- checks before any work ------------------------------------------------------------------------


def _suite(world) -> EvalSuite:
    return EvalSuite(LabelledSet(world["val_identities"], world["identities_json"]),
                     LabelledSet(world["val_objects"], world["objects_json"]))


def test_check_names_the_unknown_concept_with_the_close_one(small_world, concept):
    typo = concept.lower()
    dm = SlugDataModule(concepts=[typo], validation=_suite(small_world))
    with pytest.raises(ValueError) as err:
        dm.check("fit")
    assert str(err.value) == (f"data.concepts: {typo!r} is not in the class list of data.validation.concepts "
                              f"(20 names) (did you mean {concept!r}?); spell each concept exactly as there")
    SlugDataModule(concepts=[concept], validation=_suite(small_world)).check("fit")  # the right name passes


def test_check_names_missing_sets_and_files(small_world, concept, tmp_path, forget_shard):
    with pytest.raises(ValueError, match=r"^data\.test is not set: test needs"):
        SlugDataModule(concepts=[concept], validation=_suite(small_world)).check("test")
    broken = EvalSuite(LabelledSet(small_world["val_identities"], small_world["identities_json"]),
                       LabelledSet(str(tmp_path / "gone-{000..001}.tar"), small_world["objects_json"]))
    with pytest.raises(ShardError, match=r"shard not found: .*gone-000\.tar"):
        SlugDataModule(concepts=[concept], validation=broken).check("validate")
    with pytest.raises(ValueError, match=r"data\.forget has no shards for concept\(s\) \['Someone Else'\]"):
        SlugDataModule(forget={concept: forget_shard}, concepts=[concept, "Someone Else"]).check("fit")
    empty = tmp_path / "empty.tar"
    wds.TarWriter(str(empty)).close()
    with pytest.raises(ShardError, match=r"the retain set is empty"):
        SlugDataModule(forget=forget_shard, retain=str(empty), concepts=[concept]).check("fit", ["forget", "retain"])


# -- retain pairs naming a forgotten concept -----------------------------------------------------------


def _without(shards: list[str], pattern, folder: Path) -> list[str]:
    """Copies of ``shards`` without the samples whose caption matches ``pattern`` (the reference)."""
    out = []
    for i, shard in enumerate(shards):
        path = folder / f"kept-{i}.tar"
        with wds.TarWriter(str(path)) as sink:
            for s in iter_raw_samples([shard]):
                if not pattern.search(s.caption):
                    sink.write({"__key__": s.key, **s.fields})
        out.append(str(path))
    return out


def _pass(root: Path, checkpoint: str, forget, retain, **data) -> SlugModule:
    module = SlugModule(OpenClip("slug-tiny-vit", pretrained=checkpoint))
    trainer = Trainer(**TRAINER_DEFAULTS, default_root_dir=str(root), logger=False, enable_progress_bar=False,
                      enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(module, datamodule=SlugDataModule(forget=forget, retain=retain, batch_size=4, retain_batch_size=8,
                                                  **data))
    return module


def test_retain_exclusion_equals_a_retain_set_without_those_pairs(tmp_path, small_world, tiny_checkpoint,
                                                                   forget_shard, concept):
    torch.set_num_threads(1)
    corpus = small_world["corpus_shards"]
    pattern = concept_pattern([concept])
    named = sum(1 for s in iter_raw_samples(corpus) if pattern.search(s.caption))
    assert named == 4  # the world's corpus names each identity in 4 captions
    reference = _without(corpus, pattern, tmp_path)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    excluded = _pass(tmp_path / "a", tiny_checkpoint, forget_shard, corpus, concepts=[concept],
                     retain_exclude_concepts=True)
    ref = _pass(tmp_path / "b", tiny_checkpoint, forget_shard, reference)
    assert excluded.pass_stats["retain"]["samples"] == small_world["counts"]["corpus"] - named
    assert excluded.pass_stats["retain"] == ref.pass_stats["retain"]
    for name, g in ref.gradients["retain"].items():
        torch.testing.assert_close(excluded.gradients["retain"][name], g, rtol=0, atol=0)
    _, meta = load_tensors(tmp_path / "a" / "gradients" / "retain.safetensors")
    assert meta["data"]["excluded_captions"] == pattern.pattern  # part of the data identity
    assert meta["data"]["num_samples"] == small_world["counts"]["corpus"] - named


def test_retain_exclusion_is_the_same_on_every_rank(small_world, concept):
    """Ranks split the kept samples as they split any set: the union over ranks of each global
    batch is the same for 1, 2 and 3 ranks, and holds no pair naming the concept."""
    family = OpenClip("slug-tiny-vit")
    dm = SlugDataModule(retain=small_world["corpus"], concepts=[concept], retain_batch_size=16,
                        retain_exclude_concepts=[concept, "nobody at all"])
    pair_set = dm.pair_set("retain")
    assert pair_set.num_samples == 116 and sum(pair_set.shard_sizes) == 116
    pattern_tokens = set(map(tuple, family.tokenize([concept]).tolist()))
    batches = {}
    for world in (1, 2, 3):
        rows: dict[int, list] = {}
        counts = set()
        for rank in range(world):
            stream = list(PairBatches([pair_set], family.image_transform(), family.tokenize, rank, world))
            counts.add(len(stream))
            for b in stream:
                rows.setdefault(b["batch_index"], []).extend(map(tuple, b["tokens"][b["valid"]].tolist()))
        assert counts == {8}  # ceil(116 / 16) batches on every rank
        batches[world] = {k: sorted(v) for k, v in rows.items()}
        assert sum(len(v) for v in rows.values()) == 116
    assert batches[1] == batches[2] == batches[3]
    assert not pattern_tokens & {r for rows in batches[1].values() for r in rows}


def test_retain_exclusion_options(small_world, concept):
    with pytest.raises(ValueError, match=r"retain_exclude_concepts is an empty list"):
        SlugDataModule(retain_exclude_concepts=[])
    with pytest.raises(ValueError, match=r"true needs data\.concepts"):
        SlugDataModule(retain=small_world["corpus"], retain_exclude_concepts=True).pair_set("retain")
    assert SlugDataModule(retain=small_world["corpus"]).pair_set("retain").num_samples == 120  # default: as given


# -- max_samples: a stratified subset ----------------------------------------------------------------


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (value, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def _labelled_shard(path: Path, labels: list[int]) -> str:
    with wds.TarWriter(str(path)) as sink:
        for i, label in enumerate(labels):
            sink.write({"__key__": f"s{i:03d}", "png": _png(i), "cls": str(label).encode()})
    return str(path)


def _red(img):
    return torch.tensor([float(img.getpixel((1, 1))[0])])


def test_max_samples_is_a_stratified_subset_in_shard_order(tmp_path):
    # classes of 6, 3 and 1 samples, interleaved: the first 5 in shard order would be 0,1,0,1,0
    labels = [0, 1, 0, 1, 0, 2, 0, 1, 0, 0]
    shard = _labelled_shard(tmp_path / "set.tar", labels)
    spec = LabelledSet(shard, ["a", "b", "c"], max_samples=5)
    data = load_labelled_set(spec, _red, "utility")
    # half of each class: 3, 1.5, 0.5 -> 3 + 1 + 0, the fifth to class 1 or 2 (equal remainders)
    counts = tuple(data.labels.tolist().count(c) for c in range(3))
    assert counts in ((3, 2, 0), (3, 1, 1))
    positions = data.images[:, 0].int().tolist()  # sample i has red value i
    assert positions == sorted(positions) and all(labels[p] == lab for p, lab in zip(positions, data.labels.tolist()))
    assert load_labelled_set(spec, _red, "utility").images.equal(data.images)  # fixed seed
    assert len(load_labelled_set(LabelledSet(shard, ["a", "b", "c"], max_samples=50), _red, "u").labels) == 10


def test_max_samples_subset_depends_on_the_seed(tmp_path):
    shard = _labelled_shard(tmp_path / "big.tar", [i % 4 for i in range(40)])
    picks = {}
    for seed in (0, 1):
        data = load_labelled_set(LabelledSet(shard, list("abcd"), max_samples=8, subset_seed=seed), _red, "u")
        assert [data.labels.tolist().count(c) for c in range(4)] == [2, 2, 2, 2]
        picks[seed] = data.images[:, 0].int().tolist()
    assert picks[0] != picks[1]


# -- the demo takes SlugDataModule's options ------------------------------------------------------------


def test_demo_world_accepts_the_data_options(tmp_path, capsys):
    dm = DemoWorld(root=str(tmp_path), retain="my/retain.tar", retain_exclude_concepts=True, bad_samples="skip",
                   mia_nonmembers="my/unseen.tar", num_workers=2)
    assert (dm.retain, dm.retain_exclude_concepts, dm.bad_samples, dm.mia_nonmembers, dm.num_workers) == \
        ("my/retain.tar", True, "skip", "my/unseen.tar", 2)
    with pytest.raises(ValueError, match=r"data\.bad_samples must be one of"):
        DemoWorld(root=str(tmp_path), bad_samples="ignore")
    dm.check("fit", ["forget", "retain"])  # nothing to check before the world is built
    # the README's options parse for the demo config
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(REPO / "configs" / "demo.yaml"), "--data.init_args.bad_samples", "skip",
              "--data.init_args.retain_exclude_concepts", "true", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)["data"]["init_args"]
    assert printed["bad_samples"] == "skip" and printed["retain_exclude_concepts"] is True


def test_pair_set_follows_a_replaced_forget_set(small_world):
    """A subclass's setup may replace ``forget`` after its parent's checks have read the pairs (the
    SD demo swaps the mined photos for the pipeline's generated images): the pass must stream the
    replacement, not the pairs cached before it."""
    from slug_pl.data.shards import expand_urls

    shards = list(expand_urls(small_world["corpus"]))
    dm = SlugDataModule(forget=small_world["corpus"])
    first = dm.pair_set("forget")
    assert first.num_samples == 120 and dm.pair_set("forget") is first  # cached while unchanged
    dm.forget = shards[:1]
    replaced = dm.pair_set("forget")
    assert replaced.urls == tuple(shards[:1]) and replaced.num_samples == 50
    assert dm.fingerprint("forget")["num_samples"] == 50
