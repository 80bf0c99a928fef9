"""What one downloaded input may cost: bytes per tar member, characters per caption, pixels per
image; and whether a shard spec may run a program.

Shards, caption files and image folders come from the internet. A data-loader worker reads the
tar members of its samples into memory (of every sample, for a shard streamed whole: a
compressed one), a caption is tokenized in time proportional to its length, and a small
compressed image can decode to gigabytes (a decompression bomb). :class:`InputRules` bounds each, before the cost is paid:

- ``max_member_bytes``: a tar member larger than this is not read (its size is in the tar
  header); a caption member (``txt``) is held to ``4 × max_caption_chars`` bytes as well, the
  most that many UTF-8 characters take;
- ``max_caption_chars``: a longer caption is not tokenized;
- ``max_image_pixels``: an image whose header announces more pixels (width × height) is not
  decoded. It may not exceed PIL's own bound, ``PIL.Image.MAX_IMAGE_PIXELS`` (above it PIL
  warns, above twice that it refuses).

A sample that breaks a limit is a *bad sample*: under ``data.bad_samples: stop`` the run stops
with an error naming the shard, the key and the limit (and the option that raises it); under
``skip`` it is left out and listed in ``skipped_samples.json`` (:mod:`slug_pl.data.pairs`).

``allow_shard_commands``: webdataset opens a ``pipe:`` spec with a shell and ``http://`` /
``gs://`` ... specs with ``curl`` / ``gsutil``; without this opt-in such a spec is refused
(:func:`slug_pl.safety.refuse_command`).
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

#: Defaults: 32 MiB per tar member (LAION's images are below 1 MB), 10,000 characters per
#: caption (CLIP reads 77 tokens), 64 Mpx per image (8192 × 8192).
DEFAULT_MAX_MEMBER_BYTES = 32 << 20
DEFAULT_MAX_CAPTION_CHARS = 10_000
DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192

#: The most bytes one character takes in UTF-8.
_UTF8_MAX = 4


class InputLimitError(ValueError):
    """An input is larger than a limit of :class:`InputRules` (the message names the option)."""


@dataclass(frozen=True)
class InputRules:
    """The limits and the shard-command opt-in of the module docstring (sizes in bytes,
    characters and pixels; every limit a positive integer)."""

    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES
    max_caption_chars: int = DEFAULT_MAX_CAPTION_CHARS
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    allow_shard_commands: bool = False

    def __post_init__(self):
        for name in ("max_member_bytes", "max_caption_chars", "max_image_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_image_pixels > Image.MAX_IMAGE_PIXELS:
            raise ValueError(f"max_image_pixels {self.max_image_pixels} is above PIL's decompression-bomb "
                             f"bound ({Image.MAX_IMAGE_PIXELS} pixels); give at most that")
        if not isinstance(self.allow_shard_commands, bool):
            raise ValueError(f"allow_shard_commands must be true or false, got {self.allow_shard_commands!r}")

    def member_problem(self, suffix: str, size: int) -> str | None:
        """Why a tar member of field ``suffix`` and ``size`` bytes is not read, or None."""
        if suffix == "txt" and size > _UTF8_MAX * self.max_caption_chars:
            return (f"its caption has {size} bytes, more than {_UTF8_MAX} x max_caption_chars "
                    f"({self.max_caption_chars}) can take")
        if size > self.max_member_bytes:
            return f"its {suffix} member has {size} bytes, more than max_member_bytes ({self.max_member_bytes})"
        return None

    def caption_problem(self, caption: str) -> str | None:
        """Why ``caption`` is not used, or None."""
        if len(caption) > self.max_caption_chars:
            return f"its caption has {len(caption)} characters, more than max_caption_chars ({self.max_caption_chars})"
        return None

    def open_rgb(self, source: bytes | str | os.PathLike) -> Image.Image:
        """The image in ``source`` (encoded bytes or a file path) decoded to RGB, after its header
        showed at most ``max_image_pixels`` pixels (:class:`InputLimitError` if not; PIL's own
        errors for what does not decode)."""
        stream = io.BytesIO(source) if isinstance(source, bytes) else Path(source)
        try:
            with warnings.catch_warnings():  # PIL warns above its bound; the check below refuses
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(stream)
        except Image.DecompressionBombError as err:  # above twice PIL's bound: refused at the header
            raise InputLimitError(f"the image is a decompression bomb ({err}); max_image_pixels is "
                                  f"{self.max_image_pixels}") from err
        with img:
            pixels = img.width * img.height
            if pixels > self.max_image_pixels:
                raise InputLimitError(f"the image has {img.width} x {img.height} = {pixels} pixels, more "
                                      f"than max_image_pixels ({self.max_image_pixels})")
            return img.convert("RGB")


#: The rules of a reader that was given none: the defaults, no shard commands.
DEFAULT_RULES = InputRules()
