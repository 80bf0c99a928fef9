"""Reading webdataset shards: URL expansion, raw samples, image decoding.

A shard is a tar file in the webdataset layout: files sharing a basename (the sample key) form one
sample, the extension names the field. slug_pl reads these fields:

- image: the first of ``jpg``, ``jpeg``, ``png``, ``webp`` present (bytes, decoded with PIL);
- caption: ``txt`` (UTF-8);
- class label: ``cls`` (an integer as text) for labelled validation sets.

Everything here reads; nothing writes. Shards are read in the order given, samples in tar order, so
a stream is deterministic.
"""

from __future__ import annotations

import glob
import io
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import braceexpand
import webdataset as wds
from PIL import Image

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
CAPTION_KEY = "txt"
LABEL_KEY = "cls"


class ShardError(ValueError):
    """A shard is missing, unreadable, or holds a sample slug_pl cannot use."""


class BadSampleError(ShardError):
    """One sample of a readable shard cannot be used: no image, no caption, or an image that does
    not decode. ``shard``, ``key`` and ``reason`` say which and why (for skip lists)."""

    def __init__(self, message: str, shard: str = "", key: str = "", reason: str = ""):
        super().__init__(message)
        self.shard, self.key, self.reason = shard, key, reason or message

    def __reduce__(self):  # survive the trip from a data-loader worker with its fields
        return (type(self), (str(self), self.shard, self.key, self.reason))


#: What to do about a bad sample, and how to change it (appended to error messages).
BAD_SAMPLE_HINT = ("fix or remove the sample, or set data.bad_samples: skip to leave such samples out "
                   "(they are counted and listed in the run's skipped_samples.json)")


@dataclass(frozen=True)
class RawSample:
    """One undecoded sample of a shard.

    ``image`` is the encoded image bytes (None if the sample has none), ``caption`` the text (None if
    absent), ``label`` the integer class (None if absent). ``fields`` keeps every field's raw bytes so
    a sample can be written back unchanged (forget-set mining does).
    """

    shard: str
    key: str
    image: bytes | None
    caption: str | None
    label: int | None
    fields: dict[str, bytes]


def expand_urls(spec: str | Sequence[str]) -> list[str]:
    """Expand brace patterns (``data/{000..009}.tar``), globs and lists into an ordered shard list.

    Local paths are checked to exist; a missing one raises :class:`ShardError` naming it. URLs with a
    scheme (``pipe:``, ``s3://``, ``http://``) are passed through to webdataset unchecked.
    """
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not specs:
        raise ShardError("empty shard list: give at least one shard path or brace pattern")
    urls: list[str] = []
    for item in specs:
        for url in braceexpand.braceexpand(os.path.expanduser(str(item))):
            if "://" in url or url.startswith("pipe:"):
                urls.append(url)
            elif any(c in url for c in "*?["):
                matches = sorted(glob.glob(url))
                if not matches:
                    raise ShardError(f"no shard matches {url!r}: check the path or pattern")
                urls.extend(matches)
            else:
                if Path(url).exists() and not Path(url).is_file():
                    raise ShardError(f"shard {url} (from {item!r}) is not a regular file; give tar files")
                if not Path(url).is_file():
                    raise ShardError(
                        f"shard not found: {url} (from {item!r}). Check the path; brace patterns "
                        f"like 'dir/shard-{{000..009}}.tar' are expanded, relative paths are taken "
                        f"from the working directory {os.getcwd()}"
                    )
                urls.append(url)
    return urls


def _first_image(sample: dict) -> bytes | None:
    for key in IMAGE_KEYS:
        if key in sample:
            return sample[key]
    return None


def iter_raw_samples(urls: Sequence[str]) -> Iterator[RawSample]:
    """Yield every sample of ``urls`` in order, undecoded.

    Errors in reading a shard are re-raised as :class:`ShardError` naming the shard.
    """
    for url in urls:
        pipeline = wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples())
        try:
            for sample in pipeline:
                fields = {k: v for k, v in sample.items() if not k.startswith("__")}
                caption = sample.get(CAPTION_KEY)
                label = sample.get(LABEL_KEY)
                yield RawSample(
                    shard=url,
                    key=sample["__key__"],
                    image=_first_image(sample),
                    caption=caption.decode("utf-8").strip() if caption is not None else None,
                    label=int(label.decode("utf-8").strip()) if label is not None else None,
                    fields=fields,
                )
        except ShardError:
            raise
        except Exception as err:  # tarfile, IO and decoding errors of webdataset
            raise ShardError(unreadable_shard_message(url, err)) from err


def unreadable_shard_message(url: str, err: BaseException) -> str:
    """The error text for a shard that cannot be read (missing, no permission, corrupt tar)."""
    detail = " ".join(str(err).split())  # one line, also for tarfile's multi-line messages
    return (f"cannot read shard {url}: {type(err).__name__}: {detail}. The file is missing, unreadable "
            f"or not a complete tar archive (an interrupted download or copy?): re-create or "
            f"re-download it, or leave it out of the shard list")


def missing_field(sample: RawSample) -> str | None:
    """Why a pair sample cannot be used before decoding (no image / no caption), else None."""
    if sample.image is None:
        return f"no image (expected one of {', '.join(IMAGE_KEYS)})"
    if sample.caption is None:
        return f"no caption ('{CAPTION_KEY}')"
    return None


def bad_sample_error(sample: RawSample, reason: str, hint: bool = True) -> BadSampleError:
    """A :class:`BadSampleError` naming shard and key; ``hint`` appends what to do."""
    message = f"sample {sample.key!r} in {sample.shard}: {reason}"
    return BadSampleError(f"{message}; {BAD_SAMPLE_HINT}" if hint else message, sample.shard,
                          sample.key, reason)


def decode_image(sample: RawSample) -> Image.Image:
    """Decode a sample's image to RGB; raises :class:`BadSampleError` naming shard and key."""
    if sample.image is None:
        raise bad_sample_error(sample, f"no image (expected one of {', '.join(IMAGE_KEYS)})", hint=False)
    try:
        with Image.open(io.BytesIO(sample.image)) as img:
            return img.convert("RGB")
    except Exception as err:
        # no object addresses in the reason: skip lists must be the same in every run
        detail = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "the image bytes", str(err))
        raise bad_sample_error(sample, f"image does not decode ({type(err).__name__}: {detail})",
                               hint=False) from err
