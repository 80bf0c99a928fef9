"""The demo world generator: names, attributes, layout, counts, labels, determinism, caching."""

from __future__ import annotations

import collections
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from slug_pl.data.shards import decode_image, expand_urls, iter_raw_samples
from slug_pl.demo.world import (
    ATTRIBUTES,
    SHIRT_COLOURS,
    WorldSpec,
    build_world,
    identity_attributes,
    identity_names,
    object_names,
    spec_record,
)

SMALL = WorldSpec(seed=3, identity_corpus=2, identity_val=1, identity_test=1, object_corpus=3,
                  object_val=2, object_test=1, shard_size=25)


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("world") / "w", SMALL)


def _samples(pattern: str):
    return list(iter_raw_samples(expand_urls(pattern)))


def test_identity_names_distinct_and_realistic():
    for seed in (0, 1, 2):
        spec = WorldSpec(seed=seed)
        names = identity_names(spec)
        assert len(names) == spec.n_identities >= 20
        assert len(set(names)) == len(names)
        firsts = [n.split()[0] for n in names]
        lasts = [n.split()[1] for n in names]
        assert len(set(firsts)) == len(names) and len(set(lasts)) == len(names)
        for name in names:
            parts = name.split(" ")
            assert len(parts) == 2 and all(p.isalpha() and p[0].isupper() for p in parts)
        assert names == identity_names(WorldSpec(seed=seed))  # deterministic
    assert identity_names(WorldSpec(seed=0)) != identity_names(WorldSpec(seed=1))
    assert len(identity_names(WorldSpec(n_identities=30))) == 30


def test_object_names():
    names = object_names(WorldSpec())
    assert len(names) == WorldSpec().n_objects == len(set(names))
    assert "apple" in names and "bicycle" in names
    assert not set(names) & {w for n in identity_names(WorldSpec()) for w in n.lower().split()}


@pytest.mark.parametrize("seed", [0, 1, 2, 7])
def test_attributes_shared_but_combinations_unique(seed):
    spec = WorldSpec(seed=seed)
    attrs = identity_attributes(spec)
    assert len(attrs) == spec.n_identities
    assert all(set(a) == set(ATTRIBUTES) for a in attrs)
    combos = [tuple(a[k] for k in ATTRIBUTES) for a in attrs]
    assert len(set(combos)) == len(combos)  # no two identities share all attributes
    for i in range(len(combos)):
        for j in range(i + 1, len(combos)):
            differ = sum(x != y for x, y in zip(combos[i], combos[j]))
            assert differ >= spec.min_attribute_distance
    for key, values in ATTRIBUTES.items():
        counts = collections.Counter(a[key] for a in attrs)
        assert set(counts) == set(values), key  # every value is used ...
        assert min(counts.values()) >= 2, (key, counts)  # ... by at least two people
    assert attrs == identity_attributes(WorldSpec(seed=seed))


def test_spec_validation():
    with pytest.raises(ValueError):
        WorldSpec(n_identities=5)
    with pytest.raises(ValueError):
        WorldSpec(n_objects=0)
    with pytest.raises(ValueError):
        WorldSpec(shard_size=0)
    with pytest.raises(ValueError, match="unknown attribute.*'hat'"):
        WorldSpec(varying=("shirt", "hat"))
    with pytest.raises(ValueError, match="at least two fixed"):
        WorldSpec(varying=tuple(ATTRIBUTES)[:-1])
    with pytest.raises(ValueError, match=r"min_attribute_distance must be in \[1, 5\]"):
        WorldSpec(varying=("shirt", "background"), min_attribute_distance=6)


def test_spec_record_keeps_worlds_without_varying_attributes_as_they_were():
    assert "varying" not in spec_record(WorldSpec())  # records and cache keys made before it existed
    spec = WorldSpec(seed=2, varying=["shirt", "background"])  # a list, as YAML gives it
    record = json.loads(json.dumps(spec_record(spec)))
    assert record["varying"] == ["shirt", "background"]
    assert WorldSpec(**record) == spec and spec.fixed == ("skin", "hair_colour", "hair_style",
                                                          "eye_colour", "glasses")


@pytest.mark.parametrize("seed", [0, 1])
def test_people_are_told_apart_by_their_fixed_attributes_when_others_vary(seed):
    spec = WorldSpec(seed=seed, varying=("shirt", "background"))
    attrs = identity_attributes(spec)
    assert all(tuple(a) == spec.fixed for a in attrs)
    for i in range(len(attrs)):
        for j in range(i + 1, len(attrs)):
            assert sum(attrs[i][k] != attrs[j][k] for k in spec.fixed) >= spec.min_attribute_distance
    for key in spec.fixed:
        assert min(collections.Counter(a[key] for a in attrs).values()) >= 2, key


def _nearest_shirt(img: np.ndarray) -> str:
    """The shirt colour nearest (in RGB direction) to the pixel below the chin, at the centre of
    the shirt whatever the render's jitter of position and scale."""
    pixel = img[30, 16].astype(float) / 255.0
    cosine = {k: pixel @ np.asarray(c) / np.linalg.norm(pixel) / np.linalg.norm(c)
              for k, c in SHIRT_COLOURS.items()}
    return max(cosine, key=cosine.get)


def test_varying_attributes_are_drawn_for_every_image(tmp_path):
    spec = WorldSpec(**{**SMALL.__dict__, "identity_corpus": 6, "varying": ("shirt", "background")})
    world = build_world(tmp_path / "w", spec)
    names, attrs = identity_names(spec), identity_attributes(spec)
    shirts = collections.defaultdict(set)
    backgrounds = collections.Counter()
    for s in _samples(world["corpus"]):
        meta = json.loads(s.fields["json"])
        if meta["kind"] != "identity":
            continue
        fixed = {k: meta["attributes"][k] for k in spec.fixed}
        assert fixed == attrs[names.index(meta["name"])]  # the person ...
        shirt = meta["attributes"]["shirt"]  # ... in this photo's clothes and place
        shirts[meta["name"]].add(shirt)
        backgrounds[meta["attributes"]["background"]] += 1
        assert _nearest_shirt(np.asarray(decode_image(s))) == shirt  # drawn as recorded
        if " shirt." in s.caption:
            assert s.caption.endswith(f"in a {shirt} shirt.")
    assert set(backgrounds) == set(ATTRIBUTES["background"])
    assert sum(len(v) > 1 for v in shirts.values()) >= len(names) // 2  # people change shirts
    # the attributes table lists what makes a person, and the record says what varies
    table = json.loads((Path(world["root"]) / "attributes.json").read_text())
    assert all(set(a) == {"name", *spec.fixed} for a in table)
    assert json.loads(Path(world["world_json"]).read_text())["spec"]["varying"] == ["shirt", "background"]
    # the same spec rebuilt is the same world, byte for byte
    assert build_world(tmp_path / "again", spec)["fingerprint"] == world["fingerprint"]


def test_the_shirt_check_reads_fixed_worlds_too(small_world):
    names, attrs = identity_names(SMALL), identity_attributes(SMALL)
    samples = [s for s in _samples(small_world["corpus"]) if json.loads(s.fields["json"])["kind"] == "identity"]
    for s in samples:
        name = json.loads(s.fields["json"])["name"]
        assert _nearest_shirt(np.asarray(decode_image(s))) == attrs[names.index(name)]["shirt"]


def test_layout_and_counts(small_world):
    spec = SMALL
    root = Path(small_world["root"])
    counts = small_world["counts"]
    n_id, n_obj = spec.n_identities, spec.n_objects
    assert counts["corpus"] == n_id * spec.identity_corpus + n_obj * spec.object_corpus
    corpus = _samples(small_world["corpus"])
    assert len(corpus) == counts["corpus"] == 70
    assert len(expand_urls(small_world["corpus"])) == 3  # 70 samples, 25 per shard
    assert small_world["corpus_shards"] == expand_urls(small_world["corpus"])
    assert Path(small_world["corpus_shards"][0]).name == "corpus-000000.tar"
    expected = {
        "val_identities": n_id * spec.identity_val,
        "test_identities": n_id * spec.identity_test,
        "val_objects": n_obj * spec.object_val,
        "test_objects": n_obj * spec.object_test,
    }
    for key, n in expected.items():
        assert len(_samples(small_world[key])) == n == counts[key], key
    assert (root / "val" / "identities-000000.tar").is_file()
    assert (root / "test" / "objects-000000.tar").is_file()
    for key in ("identities_json", "objects_json", "templates_json", "world_json"):
        assert Path(small_world[key]).is_file()
    templates = json.loads(Path(small_world["templates_json"]).read_text())
    assert all("{}" in t for t in templates["identities"] + templates["objects"])
    record = json.loads(Path(small_world["world_json"]).read_text())
    assert record["spec"]["seed"] == spec.seed and record["fingerprint"] == small_world["fingerprint"]
    # no temporary folders left next to the world
    assert sorted(p.name for p in root.parent.iterdir()) == [root.name]


def test_corpus_samples(small_world):
    names = json.loads(Path(small_world["identities_json"]).read_text())
    objects = json.loads(Path(small_world["objects_json"]).read_text())
    assert names == identity_names(SMALL) and objects == object_names(SMALL)
    corpus = _samples(small_world["corpus"])
    kinds = collections.Counter()
    per_name = collections.Counter()
    keys = set()
    for s in corpus:
        assert set(s.fields) == {"png", "txt", "json"}
        assert s.label is None
        meta = json.loads(s.fields["json"])
        kinds[meta["kind"]] += 1
        per_name[meta["name"]] += 1
        if meta["kind"] == "identity":
            assert meta["name"] in names and meta["name"] in s.caption  # full name in caption
            assert meta["attributes"] == identity_attributes(SMALL)[names.index(meta["name"])]
        else:
            assert meta["kind"] == "object" and meta["name"] in objects and meta["name"] in s.caption
            assert not any(n in s.caption for n in names)
        img = decode_image(s)
        assert img.size == (SMALL.image_size, SMALL.image_size)
        keys.add(s.key)
    assert len(keys) == len(corpus)
    assert kinds == {"identity": 40, "object": 30}
    assert all(per_name[n] == SMALL.identity_corpus for n in names)
    assert all(per_name[o] == SMALL.object_corpus for o in objects)
    # shuffled: identities and objects are interleaved, not in blocks
    first_kinds = [json.loads(s.fields["json"])["kind"] for s in corpus[:20]]
    assert 0 < first_kinds.count("object") < 20


def test_labels_match_names(small_world):
    for what, names_key in (("identities", "identities_json"), ("objects", "objects_json")):
        names = json.loads(Path(small_world[names_key]).read_text())
        for split in ("val", "test"):
            samples = _samples(small_world[f"{split}_{what}"])
            per_spec = getattr(SMALL, f"{'identity' if what == 'identities' else 'object'}_{split}")
            assert collections.Counter(s.label for s in samples) == {
                i: per_spec for i in range(len(names))}
            for s in samples:
                assert 0 <= s.label < len(names)
                assert json.loads(s.fields["json"])["name"] == names[s.label]
                assert names[s.label] in s.caption


def test_images_vary_and_held_out_differ(small_world):
    corpus = _samples(small_world["corpus"])
    val = _samples(small_world["val_identities"])
    test = _samples(small_world["test_identities"])
    pngs = [s.image for s in corpus + val + test]
    assert len(set(pngs)) == len(pngs)  # every render is different
    # two renders of the same identity differ by more than noise (jitter, lighting, expression)
    name = json.loads(val[0].fields["json"])["name"]
    same = [s for s in corpus if json.loads(s.fields["json"])["name"] == name]
    a, b = (np.asarray(Image.open(io.BytesIO(s.image)), dtype=float) for s in same[:2])
    assert np.abs(a - b).mean() > 5.0


def test_deterministic_bytes(tmp_path, small_world):
    other = build_world(tmp_path / "again", SMALL)
    assert other["fingerprint"] == small_world["fingerprint"]
    root_a, root_b = Path(small_world["root"]), Path(other["root"])
    files_a = sorted(p.relative_to(root_a) for p in root_a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(root_b) for p in root_b.rglob("*") if p.is_file())
    assert files_a == files_b
    for rel in files_a:
        assert (root_a / rel).read_bytes() == (root_b / rel).read_bytes(), rel
    different = build_world(tmp_path / "seed4", WorldSpec(**{**SMALL.__dict__, "seed": 4}))
    assert different["fingerprint"] != small_world["fingerprint"]


def test_cache_reuses_and_rebuilds_on_new_spec(tmp_path):
    spec = WorldSpec(seed=5, identity_corpus=1, identity_val=1, identity_test=1, object_corpus=1,
                     object_val=1, object_test=1)
    first = build_world(tmp_path / "w", spec)
    assert first["built"]
    shard = Path(first["corpus_shards"][0])
    stamp = os.stat(shard).st_mtime_ns
    second = build_world(tmp_path / "w", spec)
    assert not second["built"]
    assert os.stat(shard).st_mtime_ns == stamp
    assert second["fingerprint"] == first["fingerprint"]
    changed = WorldSpec(**{**spec.__dict__, "object_test": 2})
    third = build_world(tmp_path / "w", changed)
    assert third["built"] and third["counts"]["test_objects"] == 2 * changed.n_objects
    assert len(_samples(third["test_objects"])) == 2 * changed.n_objects
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]
