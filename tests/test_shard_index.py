"""Shard indexes: each reader reads only the samples it decodes, the batches stay those of the
streamed set bit for bit, and an index file is data: checked, never trusted over its shard."""

from __future__ import annotations

import dataclasses
import io
import os
import tarfile
import zlib

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from slug_pl.data.datamodule import SlugDataModule
from slug_pl.data.indexed_reader import IndexedReader
from slug_pl.data.pairs import PairBatches, shard_sample_counts
from slug_pl.data.reference_batches import AuthorsBatches
from slug_pl.data.shard_index import (
    BESIDE_SUFFIX,
    IndexStore,
    ShardIndex,
    build_index,
    encode_index,
    shard_stamp,
)
from slug_pl.data.shards import BadSampleError, ShardError, iter_raw_samples


def _png(i: int) -> bytes:
    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(6, 5, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _sample(i: int, caption: str | None = None) -> dict:
    return {"__key__": f"k{i:04d}", "png": _png(i), "txt": (caption or f"a photo number {i}").encode()}


def _shard(path, samples) -> str:
    with wds.TarWriter(str(path)) as sink:
        for s in samples:
            sink.write(s)
    return str(path)


def _to_tensor(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)


def _tokens(captions) -> torch.Tensor:
    return torch.tensor([[len(c), sum(map(ord, c)) % 10007] for c in captions])


@pytest.fixture
def store(tmp_path) -> IndexStore:
    return IndexStore(str(tmp_path / "index"))


@pytest.fixture
def odd_shard(tmp_path) -> str:
    """A shard with a folder member first, a metadata member, a key longer than a ustar name holds
    (a pax header), and samples of one, two and three members."""
    path = tmp_path / "odd.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        def add(name, data=b"", kind=tarfile.REGTYPE):
            info = tarfile.TarInfo(name)
            info.type, info.size = kind, len(data)
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
        add("folder", kind=tarfile.DIRTYPE)
        add("a.png", _png(1)), add("a.txt", b"first")
        add("__meta__/info.json", b"{}")
        long = "x" * 150
        add(f"{long}.png", _png(2)), add(f"{long}.txt", b"second"), add(f"{long}.json", b"{}")
        add("c.txt", b"a caption alone")
    return str(path)


def test_index_numbers_the_samples_the_stream_reads(odd_shard, store):
    index = store.index(odd_shard)
    streamed = list(iter_raw_samples([odd_shard]))
    assert list(index.keys) == [s.key for s in streamed] == ["a", "x" * 150, "c"]
    assert shard_sample_counts([odd_shard]) == [len(index)] == [3]
    with IndexedReader(store) as reader:
        assert [reader.sample(odd_shard, i) for i in range(3)] == streamed
        caption_only = reader.sample(odd_shard, 1, frozenset({"txt"}))
    assert caption_only.caption == "second" and caption_only.image is None


def test_index_is_built_once_and_found_again(tmp_path, store, monkeypatch):
    shard = _shard(tmp_path / "s.tar", [_sample(i) for i in range(5)])
    built = store.index(shard)
    assert store.cache_path(shard, shard_stamp(shard)).is_file()
    import slug_pl.data.shard_index as shard_index

    monkeypatch.setattr(shard_index, "build_index", lambda url: pytest.fail("built again"))
    assert store.index(shard) == built


def test_changed_shard_is_indexed_anew(tmp_path, store):
    shard = tmp_path / "s.tar"
    _shard(shard, [_sample(i) for i in range(5)])
    assert len(store.index(str(shard))) == 5
    _shard(shard, [_sample(i) for i in range(7)])  # another size
    assert len(store.index(str(shard))) == 7
    before = shard_stamp(str(shard))
    _shard(shard, [_sample(i, "other words") for i in range(7)])  # the same size, a later time
    os.utime(shard, ns=(before[1] + 10**9, before[1] + 10**9))
    assert store.index(str(shard)).mtime_ns == before[1] + 10**9


def _plant(store: IndexStore, shard: str, data: bytes) -> None:
    path = store.cache_path(shard, shard_stamp(shard))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@pytest.mark.parametrize("kind", ["garbage", "zip_bomb", "deep_json", "other_shard", "split_sample", "beyond_end"])
def test_a_malformed_index_file_is_rebuilt_from_the_shard(tmp_path, store, kind):
    shard = _shard(tmp_path / "s.tar", [_sample(i) for i in range(4)])
    true = build_index(shard)
    with tarfile.open(shard) as tar:
        second_member = tar.getmembers()[1].offset  # k0000's caption: inside sample 0
    size, mtime = shard_stamp(shard)
    fake = {
        "garbage": os.urandom(300),
        "zip_bomb": zlib.compress(b"\0" * (3 * size + (1 << 21)), 9),
        "deep_json": zlib.compress(b"[" * 200_000),
        "other_shard": encode_index(dataclasses.replace(true, size=size + 512)),
        "split_sample": encode_index(dataclasses.replace(
            true, keys=(true.keys[0], *true.keys), starts=(0, second_member, *true.starts[1:]))),
        "beyond_end": encode_index(dataclasses.replace(true, end=size)),
    }[kind]
    _plant(store, shard, fake)
    assert store.load(shard) is None
    assert store.index(shard) == true
    assert store.load(shard) == true  # and stored in its place


@pytest.mark.parametrize("kind", ["omits_a_sample", "omits_the_first", "omits_the_last", "renames", "points_into_data"])
def test_an_index_that_misplaces_samples_is_caught_by_the_reads(tmp_path, store, kind):
    """An index well formed and stamped for the shard, but wrong: reading the samples it names
    finds out (the shard is the truth), with an error naming the shard."""
    shard = _shard(tmp_path / "s.tar", [_sample(i) for i in range(4)])
    true = build_index(shard)
    keys, starts = list(true.keys), list(true.starts)
    end = true.end
    if kind == "omits_a_sample":
        del keys[2], starts[2]
    elif kind == "omits_the_first":
        del keys[0], starts[0]
    elif kind == "omits_the_last":
        end = starts.pop()
        keys.pop()
    elif kind == "renames":
        keys[1] = "k9999"
    else:
        starts[2] += 512
    _plant(store, shard, encode_index(ShardIndex(shard, true.size, true.mtime_ns, tuple(keys), tuple(starts), end)))
    assert store.load(shard) is not None  # it passes the checks of the file itself ...
    with IndexedReader(store) as reader, pytest.raises(ShardError, match=r"s\.tar.*index"):
        for i in range(len(keys)):  # ... but not the reads
            reader.sample(shard, i)


def test_index_beside_the_shard_only_when_allowed(tmp_path):
    shard = _shard(tmp_path / "s.tar", [_sample(i) for i in range(3)])
    beside = tmp_path / ("s.tar" + BESIDE_SUFFIX)
    cache = IndexStore(str(tmp_path / "cache"))
    beside.write_bytes(encode_index(dataclasses.replace(build_index(shard), keys=("k0000", "k0001", "zzz"))))
    with IndexedReader(cache) as reader:  # a file beside the shard is not even looked at without the option
        assert [reader.sample(shard, i).key for i in range(3)] == ["k0000", "k0001", "k0002"]
    beside.unlink()
    allowed = IndexStore(str(tmp_path / "cache2"), beside_shards=True)
    assert len(allowed.index(shard)) == 3 and beside.is_file()
    assert not (tmp_path / "cache2").exists()
    assert IndexStore(str(tmp_path / "cache3"), beside_shards=True).load(shard) == allowed.index(shard)


def test_compressed_shard_is_streamed(tmp_path):
    plain = _shard(tmp_path / "p.tar", [_sample(i) for i in range(5)])
    packed = tmp_path / "p.tar.gz"
    with open(plain, "rb") as src, __import__("gzip").open(packed, "wb") as dst:
        dst.write(src.read())
    dm = SlugDataModule(forget=[str(packed)], index_dir=str(tmp_path / "index"))
    streamed = dm.pair_set("forget")
    assert streamed.index is None and streamed.num_samples == 5
    indexed = SlugDataModule(forget=[plain], index_dir=str(tmp_path / "index")).pair_set("forget")
    assert indexed.index is not None and indexed.num_samples == 5
    one = list(PairBatches([streamed], _to_tensor, _tokens))
    two = list(PairBatches([dataclasses.replace(indexed, urls=(str(packed),), index=None)], _to_tensor, _tokens))
    assert all(torch.equal(a["images"], b["images"]) for a, b in zip(one, two))


# -- the batches: the same as the streamed set's, on any number of ranks and workers ----------

CONCEPT = "Ada Lovelace"


@pytest.fixture(scope="module")
def mixed_sets(tmp_path_factory):
    """Forget and retain shards with bad samples and captions naming the concept, uneven shards."""
    folder = tmp_path_factory.mktemp("mixed")
    bad = [{"__key__": "bad-nocap", "png": _png(900)},
           {"__key__": "bad-decode", "jpg": b"\xff\xd8 no jpeg", "txt": b"broken"}]
    retain, i = [], 0
    for s, n in enumerate((9, 4, 13)):
        samples = []
        for _ in range(n):
            samples.append(_sample(i, f"{CONCEPT} at work {i}" if i % 7 == 3 else None))
            i += 1
        if s == 2:
            samples[5:5] = bad
        retain.append(_shard(folder / f"r-{s}.tar", samples))
    forget = [_shard(folder / "f-0.tar", [_sample(500 + j, f"{CONCEPT} {j}") for j in range(7)] + bad[1:])]
    return forget, retain


def _augment(image) -> torch.Tensor:
    """A random 'augmentation': the images' seeded draws must match too."""
    return _to_tensor(image) + torch.rand(1)


def _batches(sets, rank, world, workers=0, start=0):
    ds = PairBatches(sets, _to_tensor, _tokens, rank, world, start_batch=start, bad_samples="skip",
                     train_transform=_augment)
    return list(DataLoader(ds, batch_size=None, num_workers=workers)) if workers else list(ds)


@pytest.mark.parametrize("sampling", [None, AuthorsBatches(seed=3)], ids=["in_order", "reference"])
def test_indexed_batches_are_the_streamed_batches(tmp_path, mixed_sets, sampling):
    forget, retain = mixed_sets
    dm = SlugDataModule(forget=forget, retain=retain, concepts=[CONCEPT], retain_exclude_concepts=True, batch_size=3,
                        retain_batch_size=5, bad_samples="skip", index_dir=str(tmp_path / "index"),
                        retain_batches="reference" if sampling else "in_order", retain_seed=3)
    indexed = [dm.pair_set("forget"), dm.pair_set("retain")]
    assert all(s.index is not None for s in indexed) and indexed[1].excluded
    streamed = [dataclasses.replace(s, index=None, excluded=()) for s in indexed]
    for world, workers, start in ((1, 0, 0), (2, 0, 0), (3, 2, 0), (2, 2, 3)):
        for rank in range(world):
            got, want = _batches(indexed, rank, world, workers, start), _batches(streamed, rank, world, 0, start)
            assert len(got) == len(want) == sum(s.num_batches for s in indexed) - start
            for a, b in zip(got, want):
                assert (a["set"], a["batch_index"], a["last"], a["skipped"]) == \
                       (b["set"], b["batch_index"], b["last"], b["skipped"])
                for key in ("images", "tokens", "valid"):
                    assert torch.equal(a[key], b[key]), (world, rank, workers, a["set"], a["batch_index"], key)


def _counting_pread(monkeypatch) -> list[int]:
    counts = [0]
    real = os.pread

    def pread(fd, n, offset):
        data = real(fd, n, offset)
        counts[0] += len(data)
        return data

    monkeypatch.setattr(os, "pread", pread)
    return counts


def test_each_rank_reads_only_the_samples_it_decodes(tmp_path, mixed_sets, monkeypatch):
    forget, retain = mixed_sets
    dm = SlugDataModule(forget=forget, retain=retain, batch_size=3, retain_batch_size=5, bad_samples="skip",
                        index_dir=str(tmp_path / "index"))
    sets = [dm.pair_set("forget"), dm.pair_set("retain")]  # indexes built here, before counting
    shard_bytes = sum(os.path.getsize(u) for u in (*forget, *retain))
    counts = _counting_pread(monkeypatch)
    read = {}
    for world in (1, 2, 3):
        per_rank = []
        for rank in range(world):
            counts[0] = 0
            _batches(sets, rank, world)
            per_rank.append(counts[0])
        read[world] = per_rank
    assert sum(read[1]) <= shard_bytes  # headers and member bytes, no padding, no end blocks
    largest = max(build_index(u).window(i)[1] - build_index(u).window(i)[0]
                  for u in (*forget, *retain) for i in range(len(build_index(u))))
    for world in (2, 3):
        assert sum(read[world]) == sum(read[1])  # every byte read once, whatever the number of ranks
        for rank, got in enumerate(read[world]):  # each rank its share: its positions of each batch
            share = sum(len(range(rank, min(s.global_batch_size, s.num_positions - k * s.global_batch_size), world))
                        for s in sets for k in range(s.num_batches)) / sum(s.num_positions for s in sets)
            assert abs(got - share * sum(read[1])) <= 2 * largest, (world, rank, got, share)


def test_bad_sample_under_stop_carries_its_position(tmp_path, mixed_sets):
    forget, retain = mixed_sets
    dm = SlugDataModule(forget=forget, retain=retain, batch_size=3, index_dir=str(tmp_path / "index"))
    pair_set = dm.pair_set("forget")  # 7 good samples, then bad-decode at position 7
    owner = 7 % 3 % 2  # position 1 of batch 2, of two ranks: rank 1
    with pytest.raises(BadSampleError, match=r"bad-decode.*f-0\.tar.*does not decode") as caught:
        _ = [b for b in PairBatches([pair_set], _to_tensor, _tokens, owner, 2)]
    assert caught.value.index == 7
    assert len(list(PairBatches([pair_set], _to_tensor, _tokens, 1 - owner, 2))) == 3  # the other rank reads past it
