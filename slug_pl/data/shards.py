"""Reading webdataset shards: URL expansion, raw samples, image decoding.

A shard is a tar file in the webdataset layout: files sharing a basename (the sample key) form one
sample, the extension names the field. slug_pl reads these fields:

- image: the first of ``jpg``, ``jpeg``, ``png``, ``webp`` present (bytes, decoded with PIL);
- caption: ``txt`` (UTF-8);
- class label: ``cls`` (an integer as text) for labelled validation sets.

Everything here reads; nothing writes. Shards are read in the order given, samples in tar order, so
a stream is deterministic.

A shard is a downloaded file, read under :class:`~slug_pl.data.limits.InputRules`: a member
name that leaves the shard (absolute, ``..``) makes the whole shard refused; a member, caption or
image above a limit makes its sample a bad sample (:attr:`RawSample.problem`; the member is not
read); a spec that would run a program (``pipe:``, ``http://`` ...) is refused without the opt-in.
"""

from __future__ import annotations

import contextlib
import glob
import io
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import braceexpand
from PIL import Image
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

from slug_pl.data.limits import DEFAULT_RULES, InputLimitError, InputRules
from slug_pl.safety import command_of, member_name_problem, refuse_command

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
CAPTION_KEY = "txt"
LABEL_KEY = "cls"


class ShardError(ValueError):
    """A shard is missing, unreadable, or holds a sample slug_pl cannot use."""


class BadSampleError(ShardError):
    """One sample of a readable shard cannot be used: no image, no caption, or an image that does
    not decode. ``shard``, ``key`` and ``reason`` say which and why (for skip lists); ``index``
    is the sample's position in its set's stream where the stream knows it, else None."""

    def __init__(self, message: str, shard: str = "", key: str = "", reason: str = "", index: int | None = None):
        super().__init__(message)
        self.shard, self.key, self.reason, self.index = shard, key, reason or message, index

    def __reduce__(self):  # survive the trip from a data-loader worker (or another rank) with its fields
        return (type(self), (str(self), self.shard, self.key, self.reason, self.index))


#: What to do about a bad sample, and how to change it (appended to error messages).
BAD_SAMPLE_HINT = ("fix or remove the sample, or set data.bad_samples: skip to leave such samples out "
                   "(they are counted and listed in the run's skipped_samples.json)")


@dataclass(frozen=True)
class RawSample:
    """One undecoded sample of a shard.

    ``image`` is the encoded image bytes (None if the sample has none), ``caption`` the text (None if
    absent), ``label`` the integer class (None if absent). ``fields`` keeps every field's raw bytes so
    a sample can be written back unchanged (forget-set mining does). ``problem``: why the sample
    cannot be used whatever it holds (a member or caption above a limit, which was then not
    read), or None.
    """

    shard: str
    key: str
    image: bytes | None
    caption: str | None
    label: int | None
    fields: dict[str, bytes]
    problem: str | None = None


def expand_urls(spec: str | Sequence[str], rules: InputRules = DEFAULT_RULES,
                source: str = "shard list") -> list[str]:
    """Expand brace patterns (``data/{000..009}.tar``), globs and lists into an ordered shard list.

    Local paths are checked to exist; a missing one raises :class:`ShardError` naming it. A spec
    that webdataset would open by running a program (``pipe:``, ``http://``, ``gs://`` ...) is
    refused (:class:`~slug_pl.safety.UnsafePathError` naming ``source`` and the opt-in option)
    unless ``rules.allow_shard_commands``; then it is passed through unchecked.
    """
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not specs:
        raise ShardError("empty shard list: give at least one shard path or brace pattern")
    urls: list[str] = []
    for item in specs:
        for url in braceexpand.braceexpand(os.path.expanduser(str(item))):
            if command_of(url) is not None:
                if not rules.allow_shard_commands:
                    refuse_command(url, source)
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


_META = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members, skipped as it skips them


def member_key(shard: str, member: tarfile.TarInfo) -> tuple[str, str] | None:
    """``(sample key, field)`` of a regular tar member of ``shard`` (webdataset's convention: the
    key is the path up to the first dot of the file name), or None for a member that is no
    sample field (a folder, a link, metadata, a name without an extension). Raises
    :class:`ShardError` naming the shard and the member when its name leaves the shard."""
    if (problem := member_name_problem(member.name)) is not None:
        raise ShardError(f"shard {shard}: member {member.name!r} {problem}; a shard's members must stay "
                         f"inside it, so slug_pl refuses this shard (re-create it, or leave it out)")
    if not member.isreg() or _META.match(member.name):
        return None
    key, suffix = base_plus_ext(member.name)
    return None if key is None else (key, suffix.lower())


@dataclass
class _Gathering:
    """The members of one sample read so far; ``unread`` holds the fields present but not asked for."""

    key: str
    fields: dict[str, bytes] = field(default_factory=dict)
    unread: set[str] = field(default_factory=set)
    problem: str | None = None

    def sample(self, shard: str, rules: InputRules) -> RawSample:
        caption = self.fields.get(CAPTION_KEY)
        label = self.fields.get(LABEL_KEY)
        text = caption.decode("utf-8").strip() if caption is not None else None
        problem = self.problem or (rules.caption_problem(text) if text is not None else None)
        return RawSample(shard=shard, key=self.key, image=_first_image(self.fields),
                         caption=None if problem else text,
                         label=int(label.decode("utf-8").strip()) if label is not None else None,
                         fields=self.fields, problem=problem)


def _open_shard(url: str) -> BinaryIO:
    """A local shard as a file; a spec with a scheme (only once allowed) by webdataset's openers
    (a shell for ``pipe:``, curl for ``http://`` ...)."""
    return open(url, "rb") if command_of(url) is None else gopen(url)


def samples_of_tar(url: str, tar: tarfile.TarFile, rules: InputRules,
                   fields: frozenset[str] | None = None) -> Iterator[RawSample]:
    """The samples of the open tar ``tar`` of shard ``url``, in member order: consecutive members
    with one key form a sample. Members above a limit are passed over unread (the sample gets a
    ``problem``); with ``fields``, only those fields' bytes are read (the others count as present
    for the checks but are absent from the sample). Raises :class:`ShardError` for a member name
    that leaves the shard or a field held twice by one sample."""
    gathering: _Gathering | None = None
    for member in tar:
        found = member_key(url, member)
        tar.members = []  # keep no headers
        if found is None:
            continue
        key, suffix = found
        if gathering is None or key != gathering.key:
            if gathering is not None:
                yield gathering.sample(url, rules)
            gathering = _Gathering(key)
        if suffix in gathering.fields or suffix in gathering.unread:
            raise ShardError(f"shard {url}: sample {key!r} holds the field {suffix!r} twice")
        too_big = rules.member_problem(suffix, member.size)
        if too_big is not None:
            gathering.problem = gathering.problem or too_big
            continue
        if fields is not None and suffix not in fields:
            gathering.unread.add(suffix)
            continue
        gathering.fields[suffix] = tar.extractfile(member).read()
    if gathering is not None:
        yield gathering.sample(url, rules)


def _shard_samples(url: str, stream: BinaryIO, rules: InputRules) -> Iterator[RawSample]:
    """The samples of one open shard, read as a stream, in tar order."""
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        yield from samples_of_tar(url, tar, rules)


class _Window(io.RawIOBase):
    """Bytes ``[start, stop)`` of an open file as a seekable file of their own, read with
    ``os.pread`` (no file position shared with other readers of the descriptor)."""

    def __init__(self, fd: int, start: int, stop: int):
        super().__init__()
        self._fd, self._start, self._length, self._pos = fd, start, stop - start, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._length}[whence]
        self._pos = max(base + offset, 0)
        return self._pos

    def readinto(self, buffer) -> int:
        wanted = max(min(len(buffer), self._length - self._pos), 0)
        view, got = memoryview(buffer).cast("B"), 0
        while got < wanted:
            chunk = os.pread(self._fd, wanted - got, self._start + self._pos + got)
            if not chunk:
                break
            view[got : got + len(chunk)] = chunk
            got += len(chunk)
        self._pos += got
        return got


def read_window(url: str, fd: int, start: int, stop: int, rules: InputRules = DEFAULT_RULES,
                fields: frozenset[str] | None = None) -> list[RawSample]:
    """The samples whose members lie in bytes ``[start, stop)`` of the plain tar shard ``url``, open
    as descriptor ``fd`` (``start`` a member header's offset), read as :func:`samples_of_tar` reads
    them: only headers and the members' own bytes are read. Raises :class:`ShardError` naming the
    shard unless the members fill the bytes exactly (a member running past ``stop``, or bytes at
    the end that are no member)."""
    try:
        with _Window(fd, start, stop) as window, tarfile.open(fileobj=window, mode="r:") as tar:
            samples = list(samples_of_tar(url, tar, rules, fields))
            if tar.offset != stop - start:
                raise tarfile.ReadError(f"no tar member at byte {start + tar.offset}")
    except ShardError:
        raise
    except (OSError, tarfile.TarError) as err:
        raise ShardError(f"shard {url}: bytes {start}-{stop} are not the members its index names "
                         f"({type(err).__name__}: {err}); the shard changed after it was indexed, or "
                         f"its index file is wrong: delete the index and run again") from err
    return samples


def iter_raw_samples(urls: Sequence[str], rules: InputRules = DEFAULT_RULES) -> Iterator[RawSample]:
    """Yield every sample of ``urls`` in order, undecoded, read under ``rules``.

    Errors in reading a shard are re-raised as :class:`ShardError` naming the shard.
    """
    for url in urls:
        if not rules.allow_shard_commands:
            refuse_command(url, "shard list")  # a spec that would run a program
        try:
            with contextlib.closing(_open_shard(url)) as stream:
                yield from _shard_samples(url, stream, rules)
        except ShardError:
            raise
        except Exception as err:  # tarfile, IO and decoding errors
            raise ShardError(unreadable_shard_message(url, err)) from err


def unreadable_shard_message(url: str, err: BaseException) -> str:
    """The error text for a shard that cannot be read (missing, no permission, corrupt tar)."""
    detail = " ".join(str(err).split())  # one line, also for tarfile's multi-line messages
    return (f"cannot read shard {url}: {type(err).__name__}: {detail}. The file is missing, unreadable "
            f"or not a complete tar archive (an interrupted download or copy?): re-create or "
            f"re-download it, or leave it out of the shard list")


def unusable(sample: RawSample) -> str | None:
    """Why a pair sample cannot be used before decoding (a limit broken, no image, no caption),
    else None."""
    if sample.problem is not None:
        return sample.problem
    if sample.image is None:
        return f"no image (expected one of {', '.join(IMAGE_KEYS)})"
    if sample.caption is None:
        return f"no caption ('{CAPTION_KEY}')"
    return None


def bad_sample_error(sample: RawSample, reason: str, index: int | None = None, hint: bool = True) -> BadSampleError:
    """A :class:`BadSampleError` naming shard and key (``index``: the sample's stream position);
    ``hint`` appends what to do."""
    message = f"sample {sample.key!r} in {sample.shard}: {reason}"
    return BadSampleError(f"{message}; {BAD_SAMPLE_HINT}" if hint else message, sample.shard,
                          sample.key, reason, index)


def decode_image(sample: RawSample, rules: InputRules = DEFAULT_RULES) -> Image.Image:
    """Decode a sample's image to RGB under ``rules`` (pixels); raises :class:`BadSampleError`
    naming shard and key."""
    if sample.problem is not None:
        raise bad_sample_error(sample, sample.problem, hint=False)
    if sample.image is None:
        raise bad_sample_error(sample, f"no image (expected one of {', '.join(IMAGE_KEYS)})", hint=False)
    try:
        return rules.open_rgb(sample.image)
    except InputLimitError as err:
        raise bad_sample_error(sample, str(err), hint=False) from err
    except Exception as err:
        # no object addresses in the reason: skip lists must be the same in every run
        detail = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "the image bytes", str(err))
        raise bad_sample_error(sample, f"image does not decode ({type(err).__name__}: {detail})",
                               hint=False) from err
