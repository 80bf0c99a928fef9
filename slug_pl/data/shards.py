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
            raise ShardError(f"cannot read shard {url}: {type(err).__name__}: {err}") from err


def decode_image(sample: RawSample) -> Image.Image:
    """Decode a sample's image to RGB; raises :class:`ShardError` naming shard and key."""
    if sample.image is None:
        raise ShardError(
            f"sample {sample.key!r} in {sample.shard} has no image (expected one of "
            f"{', '.join(IMAGE_KEYS)})"
        )
    try:
        with Image.open(io.BytesIO(sample.image)) as img:
            return img.convert("RGB")
    except Exception as err:
        raise ShardError(
            f"image of sample {sample.key!r} in {sample.shard} does not decode: {err}"
        ) from err
