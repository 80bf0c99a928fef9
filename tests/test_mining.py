"""Forget-set mining: name matching, selection, output layout and safety rules."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from slug_pl.data.mining import (
    EmptyForgetSetError,
    MiningResult,
    concept_pattern,
    main,
    mine_forget_set,
)
from slug_pl.data.shards import ShardError, iter_raw_samples


def _png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buf, format="PNG")
    return buf.getvalue()


# (key, caption or None, has image); shard 0 then shard 1.
SHARD0 = [
    ("s0-000", "Elon Musk at the launch", True),             # match, name at start
    ("s0-001", "a cat on a sofa", True),
    ("s0-002", "Portrait of ELON   MUSK", True),             # case + whitespace run, at end
    ("s0-003", "Muskrat swimming in a pond", True),          # inside another word: no
    ("s0-004", "Elon Musk without an image", False),         # no image: skipped
    ("s0-005", None, True),                                  # no caption: skipped
    ("s0-006", "Tesla car; (musk) said: hello.", True),      # alias, punctuation around
]
SHARD1 = [
    ("s1-000", "Muskets from the 1700s", True),              # inside another word: no
    ("s1-001", "a dog", True),
    ("s1-002", "Elon Musk's rocket", True),                  # possessive: match
    ("s1-003", "elonmusk fan account", True),                # glued: no
    ("s1-004", "News: Musk, Elon and others", True),         # alias: match
]
EXPECTED = ["s0-000", "s0-002", "s0-006", "s1-002", "s1-004"]
NAMES = ["Elon Musk", "Musk"]


def _write_shard(path: Path, rows, start_color: int = 0) -> None:
    with wds.TarWriter(str(path)) as sink:
        for i, (key, caption, has_image) in enumerate(rows):
            sample = {"__key__": key, "json": json.dumps({"id": key, "i": i}).encode()}
            if has_image:
                sample["png"] = _png(((start_color + 37 * i) % 256, i, 200))
            if caption is not None:
                sample["txt"] = caption.encode("utf-8")
            sink.write(sample)


@pytest.fixture
def shards(tmp_path: Path) -> list[Path]:
    src = tmp_path / "src"
    src.mkdir()
    paths = [src / "shard-00000.tar", src / "shard-00001.tar"]
    _write_shard(paths[0], SHARD0, 0)
    _write_shard(paths[1], SHARD1, 100)
    return paths


def _hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _brace(shards: list[Path]) -> str:
    return str(shards[0].parent / "shard-{00000..00001}.tar")


def _read_manifest(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ------------------------------------------------------------------------------------ pattern


def test_concept_pattern_whole_words_case_and_whitespace():
    pat = concept_pattern(["Ann"])
    assert pat.search("Ann went home")
    assert pat.search("with ANN.")
    assert pat.search("Ann's dog")
    assert pat.search("(ann)")
    assert not pat.search("Anna went home")
    assert not pat.search("Annual report")
    assert not pat.search("Joanne and Hann")
    assert not pat.search("ann_2")

    pat = concept_pattern(["Elon Musk"])
    assert pat.search("elon \t\n MUSK")
    assert not pat.search("ElonMusk")
    assert not pat.search("Elon Muskrat")


def test_concept_pattern_escapes_punctuation():
    pat = concept_pattern(["Dr. No", "AT&T", "C++"])
    assert pat.search("poster of dr.  no, 1962")
    assert not pat.search("Dr, No")  # the dot is literal, not any character
    assert not pat.search("DrX No")
    assert pat.search("the AT&T building")
    assert not pat.search("ATXT")
    assert pat.search("learning c++ today")
    assert not pat.search("c++x")


def test_concept_pattern_rejects_no_names():
    with pytest.raises(ValueError, match="non-empty name"):
        concept_pattern(["", "   "])


# ------------------------------------------------------------------------------------ mining


def test_mine_selects_and_writes(shards, tmp_path):
    before = [_hash(p) for p in shards]
    out = tmp_path / "forget" / "elon"
    result = mine_forget_set(_brace(shards), NAMES, out)

    assert isinstance(result, MiningResult)
    assert [p.name for p in result.output_shards] == ["forget-000000.tar"]
    assert result.scanned == len(SHARD0) + len(SHARD1)
    assert result.matched == result.written == len(EXPECTED)
    assert result.skipped_missing_fields == 2
    assert result.truncated is False
    assert sorted(p.name for p in out.iterdir()) == ["forget-000000.tar", "manifest.jsonl", "mining.json"]
    assert not any(p.name.startswith(".") for p in out.parent.iterdir())  # temp dir gone

    # inputs untouched
    assert [_hash(p) for p in shards] == before

    # output: exact keys, field bytes identical to the source
    source = {s.key: s for s in iter_raw_samples([str(p) for p in shards])}
    written = list(iter_raw_samples([str(p) for p in result.output_shards]))
    assert [s.key for s in written] == EXPECTED
    for s in written:
        assert s.fields == source[s.key].fields
        assert set(s.fields) == {"png", "txt", "json"}

    # manifest
    manifest = _read_manifest(result.manifest_path)
    assert [m["key"] for m in manifest] == EXPECTED
    for m in manifest:
        assert set(m) == {"key", "source_shard", "caption", "output_shard"}
        expected_src = shards[0] if m["key"].startswith("s0") else shards[1]
        assert m["source_shard"] == str(expected_src)
        assert m["caption"] == source[m["key"]].caption
        assert m["output_shard"] == "forget-000000.tar"

    # report
    report = json.loads(result.report_path.read_text())
    assert report["names"] == NAMES
    assert report["pattern"] == result.pattern
    assert report["counts"] == {"scanned": 12, "matched": 5, "written": 5, "skipped_missing_fields": 2}
    assert report["max_count"] is None
    assert report["inputs"] == [str(p) for p in shards]
    assert report["outputs"] == ["forget-000000.tar"]


def test_max_count_and_shard_size(shards, tmp_path):
    out = tmp_path / "out"
    result = mine_forget_set([str(p) for p in shards], NAMES, out, max_count=4, shard_size=3, prefix="em")
    assert result.written == 4
    assert result.truncated is True
    assert [p.name for p in result.output_shards] == ["em-000000.tar", "em-000001.tar"]
    per_shard = [[s.key for s in iter_raw_samples([str(p)])] for p in result.output_shards]
    assert per_shard == [EXPECTED[:3], EXPECTED[3:4]]
    manifest = _read_manifest(result.manifest_path)
    assert [m["output_shard"] for m in manifest] == ["em-000000.tar"] * 3 + ["em-000001.tar"]
    report = json.loads(result.report_path.read_text())
    assert report["max_count"] == 4
    assert report["counts"]["written"] == 4
    # stopped right after s1-002, the 10th sample
    assert report["counts"]["scanned"] == len(SHARD0) + 3


def test_deterministic_output(shards, tmp_path):
    a = mine_forget_set(_brace(shards), NAMES, tmp_path / "a")
    b = mine_forget_set(_brace(shards), NAMES, tmp_path / "b")
    assert _hash(a.output_shards[0]) == _hash(b.output_shards[0])


def test_refuses_existing_non_empty_output(shards, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="taken.*new directory"):
        mine_forget_set(_brace(shards), NAMES, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "taken"]  # no temp dir left


def test_existing_empty_output_is_used(shards, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    result = mine_forget_set(_brace(shards), NAMES, out)
    assert result.written == len(EXPECTED)
    assert (out / "mining.json").is_file()


def test_refuses_output_holding_inputs(shards, tmp_path):
    before = [_hash(p) for p in shards]
    src = shards[0].parent
    listing = sorted(p.name for p in src.iterdir())
    for out in (src, tmp_path, shards[0]):
        with pytest.raises(ValueError, match="overlaps the input") as info:
            mine_forget_set(_brace(shards), NAMES, out)
        assert str(shards[0]) in str(info.value)
    assert [_hash(p) for p in shards] == before
    assert sorted(p.name for p in src.iterdir()) == listing
    # a new sub-directory next to the inputs is fine
    result = mine_forget_set(_brace(shards), NAMES, src / "forget")
    assert result.written == len(EXPECTED)
    assert [_hash(p) for p in shards] == before


def test_empty_result(shards, tmp_path):
    out = tmp_path / "none"
    with pytest.raises(EmptyForgetSetError) as info:
        mine_forget_set(_brace(shards), ["Grace Hopper"], out)
    msg = str(info.value)
    assert "Grace Hopper" in msg and str(shards[0]) in msg and str(shards[1]) in msg
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]

    result = mine_forget_set(_brace(shards), ["Grace Hopper"], out, allow_empty=True)
    assert result.written == 0 and result.output_shards == []
    assert result.manifest_path.read_text() == ""
    assert json.loads(result.report_path.read_text())["counts"]["scanned"] == 12


def test_missing_shard(tmp_path):
    with pytest.raises(ShardError, match="nope.tar"):
        mine_forget_set(str(tmp_path / "nope.tar"), NAMES, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_duplicate_keys_across_shards_refused(tmp_path):
    a, b = tmp_path / "a.tar", tmp_path / "b.tar"
    _write_shard(a, [("k", "Musk one", True)])
    _write_shard(b, [("k", "Musk two", True)])
    with pytest.raises(ValueError, match="'k'.*unique"):
        mine_forget_set([str(a), str(b)], NAMES, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar", "b.tar"]


# ------------------------------------------------------------------------------------ CLI


def test_cli_main(shards, tmp_path, capsys):
    out = tmp_path / "cli" / "elon"
    rc = main([
        "--shards", str(shards[0]), "--shards", str(shards[1]),
        "--name", "Elon Musk", "--alias", "Musk", "--out", str(out), "--max-count", "3",
    ])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "wrote 3 of" in captured.out and str(out) in captured.out
    assert len(captured.out.strip().splitlines()) == 1
    assert [s.key for s in iter_raw_samples([str(out / "forget-000000.tar")])] == EXPECTED[:3]
    assert json.loads((out / "mining.json").read_text())["names"] == NAMES


def test_cli_bad_input_exit_code_2(shards, tmp_path, capsys):
    missing = tmp_path / "missing-{0..1}.tar"
    rc = main(["--shards", str(missing), "--name", "Elon Musk", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2
    assert str(tmp_path / "missing-0.tar") in err
    assert "Traceback" not in err

    rc = main(["--shards", _brace(shards), "--name", "Nobody Here", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "Nobody Here" in err

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "x").write_text("x")
    rc = main(["--shards", _brace(shards), "--name", "Musk", "--out", str(existing)])
    err = capsys.readouterr().err
    assert rc == 2 and str(existing) in err
