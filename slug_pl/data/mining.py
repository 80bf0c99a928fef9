"""Forget-set mining: select the samples of a shard collection whose caption names a concept.

SLUG needs a *forget set*: image-text pairs that show the identity or concept to unlearn. This
module scans webdataset shards in order (deterministic), keeps every sample whose caption mentions
one of the given names or aliases (case-insensitive, whole words), and writes the selection as new
webdataset shards, every field's bytes unchanged under the original key, together with

- ``manifest.jsonl``: one line per written sample, ``{"key", "source_shard", "caption",
  "output_shard"}`` (``output_shard`` is the file name inside the output directory);
- ``mining.json``: names, regular expression, counts, inputs and outputs, and the samples left
  out for breaking a limit (``skipped_samples``, under ``bad_samples="skip"``).

Safety rules: input shards are only read, under :class:`~slug_pl.data.limits.InputRules` (a shard
whose member names leave it is refused, a sample above a size limit stops the mining or, with
``bad_samples="skip"``, is left out; a shard spec that runs a program needs the opt-in); the
output directory must be new (or empty) and must not hold any input shard; everything is written
into a temporary directory beside the output and renamed into place at the end, so an interrupted
run leaves no half-written output.

Command line::

    python -m slug_pl.data.mining --shards 'data/{00000..00009}.tar' --name "Elon Musk" \\
        --alias "Musk" --out data/forget/elon_musk --max-count 500
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from slug_pl.atomic import atomic_folder
from slug_pl.data.limits import (
    DEFAULT_MAX_CAPTION_CHARS,
    DEFAULT_MAX_MEMBER_BYTES,
    DEFAULT_RULES,
    InputRules,
)
from slug_pl.data.shard_writer import ShardWriter
from slug_pl.data.shards import ShardError, bad_sample_error, expand_urls, iter_raw_samples
from slug_pl.safety import command_of

MANIFEST_NAME = "manifest.jsonl"
REPORT_NAME = "mining.json"


class EmptyForgetSetError(ValueError):
    """No sample's caption matched: an empty forget set cannot be used for unlearning."""


@dataclass(frozen=True)
class MiningResult:
    """What :func:`mine_forget_set` wrote.

    ``matched`` counts matching samples seen before the scan stopped; as the scan stops once
    ``max_count`` samples are written, it equals ``written``. ``truncated`` is True when the scan
    stopped because ``max_count`` was reached (samples after the last written one were not read).
    """

    output_dir: Path
    output_shards: list[Path]
    manifest_path: Path
    report_path: Path
    names: list[str]
    pattern: str
    scanned: int
    matched: int
    written: int
    skipped_missing_fields: int
    max_count: int | None
    truncated: bool
    inputs: list[str] = field(default_factory=list)
    skipped_samples: list[dict] = field(default_factory=list)


def _clean_names(names: Sequence[str]) -> list[str]:
    if isinstance(names, str):
        names = [names]
    cleaned: list[str] = []
    for name in names:
        words = str(name).split()
        if not words:
            continue
        normal = " ".join(words)
        if normal.casefold() not in {n.casefold() for n in cleaned}:
            cleaned.append(normal)
    if not cleaned:
        raise ValueError(f"no usable concept name in {list(names)!r}: give at least one non-empty name")
    return cleaned


def concept_pattern(names: Sequence[str]) -> re.Pattern:
    """Regular expression matching any of ``names`` as whole words, case-insensitively.

    Names are matched literally (``"Dr. No"``, ``"AT&T"``, ``"C++"`` are escaped); words of a name
    may be separated by any run of whitespace; a match may not start or end inside another word
    (``"Ann"`` does not match ``"Anna"`` or ``"Annual"``, but does match ``"Ann's"`` and ``"(Ann)"``).
    """
    cleaned = _clean_names(names)
    # Longest first so the reported match is the most specific name.
    alternatives = sorted(
        (r"\s+".join(re.escape(word) for word in name.split()) for name in cleaned),
        key=len,
        reverse=True,
    )
    return re.compile(r"(?<!\w)(?:" + "|".join(alternatives) + r")(?!\w)", re.IGNORECASE)


def _check_output_dir(output_dir: Path, urls: Sequence[str]) -> Path:
    """Refuse an output that overlaps an input or already holds files; return it resolved."""
    resolved = output_dir.expanduser().resolve()
    clashes = []
    for url in urls:
        if command_of(url) is not None:  # not a local file
            continue
        shard = Path(url).expanduser().resolve()
        if shard == resolved or resolved in shard.parents or shard in resolved.parents:
            clashes.append(url)
    if clashes:
        raise ValueError(
            f"output directory {output_dir} overlaps the input shard(s) {', '.join(clashes)}: "
            f"inputs are never modified, choose an output directory that holds no input shard "
            f"(for example a new sub-directory such as {output_dir / 'forget'})"
        )
    if resolved.exists():
        if not resolved.is_dir():
            raise FileExistsError(
                f"output path {output_dir} exists and is not a directory; choose a new directory"
            )
        if any(resolved.iterdir()):
            raise FileExistsError(
                f"output directory {output_dir} already exists and is not empty; mining never "
                f"overwrites, choose a new directory (or remove this one yourself)"
            )
    return resolved


def mine_forget_set(
    shards: str | Sequence[str],
    names: Sequence[str],
    output_dir: str | Path,
    max_count: int | None = None,
    shard_size: int = 10000,
    prefix: str = "forget",
    allow_empty: bool = False,
    rules: InputRules = DEFAULT_RULES,
    bad_samples: str = "stop",
) -> MiningResult:
    """Select samples whose caption names the concept and write them as new shards.

    ``shards`` is a path, brace pattern, glob or a list of these (see
    :func:`slug_pl.data.shards.expand_urls`). Samples lacking an image or a caption are skipped
    and counted. The scan stops once ``max_count`` samples are written. Output shards hold at most
    ``shard_size`` samples each and are named ``<prefix>-000000.tar``, ``<prefix>-000001.tar``, ….
    Shards are read under ``rules``; a sample above one of its limits stops the mining
    (``bad_samples="stop"``: :class:`~slug_pl.data.shards.BadSampleError` naming shard and key) or
    is left out and listed (``"skip"``).

    Raises :class:`ShardError` (a ValueError) for a missing or unreadable shard, ValueError for
    bad arguments or an output that overlaps an input or a key written twice,
    :class:`FileExistsError` for a non-empty existing output, and :class:`EmptyForgetSetError`
    when nothing matched (unless ``allow_empty``).
    """
    cleaned = _clean_names(names)
    pattern = concept_pattern(cleaned)
    if max_count is not None and (isinstance(max_count, bool) or int(max_count) < 1):
        raise ValueError(f"max_count must be a positive integer or None, got {max_count!r}")
    if int(shard_size) < 1:
        raise ValueError(f"shard_size must be a positive integer, got {shard_size!r}")
    if not prefix or "/" in prefix or os.sep in prefix:
        raise ValueError(f"prefix must be a plain file-name prefix, got {prefix!r}")
    if bad_samples not in ("stop", "skip"):
        raise ValueError(f"bad_samples must be 'stop' or 'skip', got {bad_samples!r}")
    shard_size = int(shard_size)
    max_count = None if max_count is None else int(max_count)

    urls = expand_urls(shards, rules, "--shards")
    output_dir = Path(output_dir)
    final_dir = _check_output_dir(output_dir, urls)

    scanned = matched = skipped = 0
    truncated = False
    seen_keys: dict[str, str] = {}
    left_out: list[dict] = []
    with atomic_folder(final_dir, empty_ok=True) as tmp_dir:
        with open(tmp_dir / MANIFEST_NAME, "w", encoding="utf-8") as manifest, \
                ShardWriter(tmp_dir, prefix, shard_size) as writer:
            for sample in iter_raw_samples(urls, rules):
                scanned += 1
                if sample.problem is not None:
                    if bad_samples == "stop":
                        raise bad_sample_error(sample, f"{sample.problem}; leave such samples out with "
                                                       f"--bad-samples skip, or raise the limit", hint=False)
                    left_out.append({"shard": sample.shard, "key": sample.key, "reason": sample.problem})
                    continue
                if sample.image is None or sample.caption is None:
                    skipped += 1
                    continue
                if not pattern.search(sample.caption):
                    continue
                if sample.key in seen_keys:
                    raise ValueError(
                        f"sample key {sample.key!r} occurs in {seen_keys[sample.key]} and again in "
                        f"{sample.shard}; forget-set samples keep their original keys, so keys must "
                        f"be unique across the input shards"
                    )
                seen_keys[sample.key] = sample.shard
                output_shard = writer.write({"__key__": sample.key, **sample.fields})
                matched += 1
                manifest.write(
                    json.dumps(
                        {
                            "key": sample.key,
                            "source_shard": sample.shard,
                            "caption": sample.caption,
                            "output_shard": output_shard,
                        },
                        ensure_ascii=False,
                    )
                    + "\n"
                )
                if max_count is not None and matched >= max_count:
                    truncated = True  # stop reading: later samples are not scanned
                    break
        shard_names = writer.names

        if matched == 0 and not allow_empty:
            raise EmptyForgetSetError(
                f"no caption matched {', '.join(repr(n) for n in cleaned)} (pattern "
                f"{pattern.pattern!r}) in {scanned} samples of {len(urls)} shard(s): "
                f"{_shard_summary(urls)}; an empty forget set cannot be used. Check the names and "
                f"aliases, or the shards"
            )

        written = matched
        report = {
            "names": cleaned,
            "pattern": pattern.pattern,
            "counts": {
                "scanned": scanned,
                "matched": matched,
                "written": written,
                "skipped_missing_fields": skipped,
            },
            "max_count": max_count,
            "truncated": truncated,
            "skipped_samples": left_out,
            "shard_size": shard_size,
            "inputs": list(urls),
            "outputs": list(shard_names),
            "manifest": MANIFEST_NAME,
        }
        with open(tmp_dir / REPORT_NAME, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=2, ensure_ascii=False)
            fh.write("\n")

    return MiningResult(
        output_dir=output_dir,
        output_shards=[output_dir / name for name in shard_names],
        manifest_path=output_dir / MANIFEST_NAME,
        report_path=output_dir / REPORT_NAME,
        names=cleaned,
        pattern=pattern.pattern,
        scanned=scanned,
        matched=matched,
        written=written,
        skipped_missing_fields=skipped,
        max_count=max_count,
        truncated=truncated,
        inputs=list(urls),
        skipped_samples=left_out,
    )


def _shard_summary(urls: Sequence[str], limit: int = 3) -> str:
    if len(urls) <= limit:
        return ", ".join(urls)
    return f"{', '.join(urls[:limit])}, … ({len(urls) - limit} more, last {urls[-1]})"


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the mining options to ``parser`` (for mounting as a sub-command, e.g. ``slug-pl mine``)."""
    parser.add_argument(
        "--shards", action="append", required=True, metavar="PATTERN",
        help="input shards: a path, brace pattern ('data/{00000..00009}.tar') or glob; repeatable",
    )
    parser.add_argument(
        "--name", action="append", required=True,
        help="name of the concept to forget, e.g. 'Elon Musk'",
    )
    parser.add_argument(
        "--alias", action="append", default=[],
        help="another name matched in captions; repeatable",
    )
    parser.add_argument("--out", required=True, help="new output directory for the forget set")
    parser.add_argument("--max-count", type=int, default=None, help="stop after this many samples")
    parser.add_argument("--shard-size", type=int, default=10000, help="samples per output shard")
    parser.add_argument("--prefix", default="forget", help="output shard file-name prefix")
    parser.add_argument(
        "--allow-empty", action="store_true",
        help="write an empty forget set instead of failing when nothing matches",
    )
    parser.add_argument("--max-member-bytes", type=int, default=DEFAULT_MAX_MEMBER_BYTES,
                        help="the largest tar member read, in bytes (default: %(default)s)")
    parser.add_argument("--max-caption-chars", type=int, default=DEFAULT_MAX_CAPTION_CHARS,
                        help="the longest caption read, in characters (default: %(default)s)")
    parser.add_argument("--bad-samples", choices=("stop", "skip"), default="stop",
                        help="a sample above a limit stops mining (stop, the default) or is left out "
                             "and listed in mining.json (skip)")
    parser.add_argument("--allow-shard-commands", action="store_true",
                        help="let --shards specs run programs (pipe:<command> with a shell, http:// "
                             "with curl, ...); only for specs you wrote yourself")
    return parser


def run(args: argparse.Namespace) -> int:
    """Run mining for parsed ``args``; print a one-line summary. Returns 0, or 2 on bad input."""
    try:
        rules = InputRules(max_member_bytes=args.max_member_bytes, max_caption_chars=args.max_caption_chars,
                           allow_shard_commands=args.allow_shard_commands)
        result = mine_forget_set(
            args.shards,
            list(args.name) + list(args.alias),
            args.out,
            max_count=args.max_count,
            shard_size=args.shard_size,
            prefix=args.prefix,
            allow_empty=args.allow_empty,
            rules=rules,
            bad_samples=args.bad_samples,
        )
    except (ShardError, ValueError, FileExistsError) as err:
        print(f"slug-pl mine: error: {err}", file=sys.stderr)
        return 2
    stop = f", stopped at --max-count {result.max_count}" if result.truncated else ""
    if result.skipped_samples:
        stop += f", {len(result.skipped_samples)} left out above a limit (listed in {REPORT_NAME})"
    print(
        f"wrote {result.written} of {result.scanned} scanned samples to {result.output_dir} "
        f"({len(result.output_shards)} shard(s), {result.skipped_missing_fields} skipped for a "
        f"missing image or caption{stop})"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m slug_pl.data.mining",
        description="Mine a forget set: samples whose caption names a concept, as new shards.",
    )
    add_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse printed usage/help already
        return exc.code if isinstance(exc.code, int) else 2
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
