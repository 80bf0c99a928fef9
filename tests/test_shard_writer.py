"""Writing shards: one writer for streams and for lists, names and brace patterns that the reader
expands back, byte-identical output for equal samples."""

from __future__ import annotations

import tarfile

import pytest

from slug_pl.data.shard_writer import SLUG_OWNER, ShardWriter, brace_pattern, shard_name, write_shards
from slug_pl.data.shards import expand_urls


def _sample(i: int) -> dict:
    return {"__key__": f"s{i:03d}", "txt": f"caption {i}".encode(), "cls": str(i % 3).encode()}


def _members(path) -> list[tuple[str, int, str, int]]:
    with tarfile.open(path) as tar:
        return [(m.name, int(m.mtime), m.uname, m.mode) for m in tar.getmembers()]


def test_a_stream_rolls_over_every_shard_size_samples(tmp_path):
    with ShardWriter(tmp_path, "forget", 2) as writer:
        into = [writer.write(_sample(i)) for i in range(5)]
    assert into == ["forget-000000.tar"] * 2 + ["forget-000001.tar"] * 2 + ["forget-000002.tar"]
    assert writer.names == [shard_name("forget", i) for i in range(3)] and writer.counts == [2, 2, 1]
    assert _members(tmp_path / "forget-000000.tar")[:3] == [("s000.cls", 0, "bigdata", 0o444),
                                                            ("s000.txt", 0, "bigdata", 0o444),
                                                            ("s001.cls", 0, "bigdata", 0o444)]
    with ShardWriter(tmp_path / "none", "forget", 2) as empty:
        pass
    assert empty.names == [] and not (tmp_path / "none").exists()  # no samples, no shard


def test_a_list_is_written_as_the_stream_writes_it(tmp_path):
    (tmp_path / "a").mkdir()
    with ShardWriter(tmp_path / "a", "val", 2) as writer:
        for i in range(5):
            writer.write(_sample(i))
    (tmp_path / "b").mkdir()
    paths = write_shards(tmp_path / "b", "val", list(range(5)), 2, _sample)
    assert [p.name for p in paths] == writer.names
    for p in paths:
        assert p.read_bytes() == (tmp_path / "a" / p.name).read_bytes()  # same bytes out


def test_options_of_a_list(tmp_path):
    (tmp_path / "f").mkdir()
    assert write_shards(tmp_path / "f", "x", [], 3) == []
    assert [p.name for p in write_shards(tmp_path / "f", "x", [], 3, at_least_one=True)] == ["x-000000.tar"]
    [path] = write_shards(tmp_path / "g", "y", [_sample(0)], 3, owner=SLUG_OWNER, atomic=True)  # makes g/
    assert _members(path)[0] == ("s000.cls", 0, "slug", 0o644)
    with pytest.raises(FileExistsError):  # atomic: never over an existing shard
        write_shards(tmp_path / "g", "y", [_sample(1)], 3, atomic=True)
    with pytest.raises(ValueError, match="shard_size"):
        write_shards(tmp_path / "g", "z", [_sample(1)], 0)


def test_brace_pattern_expands_back_to_the_shards(tmp_path):
    (tmp_path / "s").mkdir()
    paths = write_shards(tmp_path / "s", "val", list(range(7)), 2, _sample)
    pattern = brace_pattern(paths)
    assert pattern == str(tmp_path / "s" / "val-{000000..000003}.tar")
    assert expand_urls(pattern) == [str(p) for p in paths]
    assert brace_pattern(paths[:1]) == str(paths[0])
