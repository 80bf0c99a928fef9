"""Labelled image sets for zero-shot evaluation (validation and held-out test).

A labelled set is webdataset shards whose samples carry an image and a ``cls`` integer label, a
class-name list (label i ↔ ``classnames[i]``) and prompt templates. Validation sets are small, so
they are decoded and preprocessed once into memory and re-used by every evaluation of the search.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from slug_pl.data.limits import DEFAULT_RULES, InputRules
from slug_pl.data.shards import ShardError, decode_image, expand_urls, iter_raw_samples
from slug_pl.data.subsets import stratified_sample

DEFAULT_TEMPLATES = ("a photo of {}.",)


def read_name_list(value: str | Sequence[str], what: str) -> list[str]:
    """A list given inline, or a path to a ``.json`` list or a text file (one entry per line)."""
    if not isinstance(value, str):
        return [str(v) for v in value]
    path = Path(value).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"{what} file not found: {path}. Give a JSON list file, a text file with one entry "
            f"per line, or an inline YAML list"
        )
    if path.suffix == ".json":
        try:
            items = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{what} file {path} is not valid JSON: {err}") from err
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise ValueError(f"{what} file {path} must hold a JSON list of strings")
        return items
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


@dataclass
class LabelledSet:
    """Where a labelled evaluation set lives (a YAML-friendly spec).

    The shards are webdataset tars; each sample holds an image (``jpg``/``jpeg``/``png``/``webp``)
    and ``cls``, its label as decimal text (``b"207"``): the index of its class in ``classnames``
    (0-based). Other fields (``txt``, ``json``) are ignored.

    Attributes:
        shards: shard path(s) or brace pattern with ``cls`` labels.
        classnames: class names in label order: inline list or a ``.json``/``.txt`` file.
        templates: prompt templates with ``{}`` for the class name: inline or a file.
        max_samples: keep at most this many samples: a fixed-seed *stratified* subset (every
            class keeps its share of the set, ±1 sample; see
            :func:`slug_pl.data.subsets.stratified_subset`), kept in shard order. It depends only
            on ``subset_seed`` and the sample keys. The labels are read first (one extra read of
            the shards, nothing decoded).
        subset_seed: seed of the ``max_samples`` subset.
    """

    shards: str | list[str]
    classnames: str | list[str]
    templates: str | list[str] = field(default_factory=lambda: list(DEFAULT_TEMPLATES))
    max_samples: int | None = None
    subset_seed: int = 0

    def class_names(self, name: str, rules: InputRules = DEFAULT_RULES) -> list[str]:
        """The class list in label order, read without decoding an image (checks the shards exist)."""
        expand_urls(self.shards, rules, f"{name}: shards")
        return read_name_list(self.classnames, f"{name} class-name")

    def load(self, transform: Callable, name: str, rules: InputRules = DEFAULT_RULES,
             part: tuple[int, int] = (0, 1)) -> LoadedSet:
        """Decode and preprocess the shards under ``rules`` (see :func:`load_labelled_set`)."""
        return load_labelled_set(self, transform, name, rules, part)


@dataclass
class LoadedSet:
    """A labelled set decoded into memory: ``images (N, 3, H, W)``, ``labels (N,)`` long.

    ``part`` ``(r, W)``: the set holds only samples ``r, r + W, ...`` of the whole (one rank's
    part of a shared evaluation, :mod:`slug_pl.evaluation.group`); ``(0, 1)``: the whole set.
    """

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    classnames: list[str]
    templates: list[str]
    part: tuple[int, int] = (0, 1)

    def subset(self, mask: torch.Tensor, name: str) -> LoadedSet:
        return LoadedSet(name, self.images[mask], self.labels[mask], self.classnames, self.templates)

    def take_part(self, part: tuple[int, int]) -> LoadedSet:
        """Samples ``r::W`` of this whole set, as the set's part ``(r, W)`` (copies: the whole
        set can then be freed)."""
        if self.part != (0, 1):
            raise ValueError(f"set {self.name!r} is already part {self.part} of its samples")
        rank, world = part
        return LoadedSet(self.name, self.images[rank::world].clone(), self.labels[rank::world].clone(),
                         self.classnames, self.templates, part)


def load_labelled_set(spec: LabelledSet, transform: Callable, name: str,
                      rules: InputRules = DEFAULT_RULES, part: tuple[int, int] = (0, 1)) -> LoadedSet:
    """Decode and preprocess every sample of ``spec`` under ``rules``, or with ``part`` ``(r, W)``
    only the samples ``r::W`` of the set (every label is still checked against the class list)."""
    rank, world = part
    classnames = read_name_list(spec.classnames, f"{name} class-name")
    templates = read_name_list(spec.templates, f"{name} template")
    urls = expand_urls(spec.shards, rules, f"{name}: shards")
    keep = _stratified_indices(urls, len(classnames), spec.max_samples, spec.subset_seed, rules) \
        if spec.max_samples is not None else None
    images, labels = [], []
    position = -1  # the sample's number in the set
    for index, sample in enumerate(iter_raw_samples(urls, rules)):
        if keep is not None and index not in keep:
            continue
        position += 1
        if sample.label is None:
            raise ShardError(
                f"sample {sample.key!r} in {sample.shard} has no class label ('cls'), needed by "
                f"the labelled set {name!r}"
            )
        if not 0 <= sample.label < len(classnames):
            raise ShardError(
                f"sample {sample.key!r} in {sample.shard} has label {sample.label}, outside the "
                f"{len(classnames)} class names of set {name!r}"
            )
        if position % world != rank:
            continue
        images.append(transform(decode_image(sample, rules)))
        labels.append(sample.label)
    if position < 0:
        raise ShardError(f"labelled set {name!r} has no samples ({spec.shards})")
    if not images:  # a set smaller than the ranks sharing it: this rank's part is empty
        return LoadedSet(name, torch.empty(0), torch.empty(0, dtype=torch.long), classnames, templates, part)
    return LoadedSet(name, torch.stack(images), torch.tensor(labels), classnames, templates, part)


def _stratified_indices(urls: Sequence[str], num_classes: int, count: int, seed: int,
                        rules: InputRules) -> set[int]:
    """Stream positions of a stratified subset of ``count`` samples (labels read, nothing decoded;
    samples without a valid label are kept so that loading reports them)."""
    keys: list[list[str]] = [[] for _ in range(num_classes)]
    positions: list[list[int]] = [[] for _ in range(num_classes)]
    unlabelled = set()
    for index, sample in enumerate(iter_raw_samples(urls, rules)):
        if sample.label is None or not 0 <= sample.label < num_classes:
            unlabelled.add(index)
            continue
        keys[sample.label].append(sample.key)
        positions[sample.label].append(index)
    picks = stratified_sample(keys, count, seed)
    return unlabelled | {positions[c][i] for c, chosen in enumerate(picks) for i in chosen}


def load_pairs(shards: str | Sequence[str], transform: Callable, tokenize: Callable,
               label: int | None = None, max_samples: int | None = None,
               rules: InputRules = DEFAULT_RULES) -> tuple[torch.Tensor, torch.Tensor]:
    """Image–caption pairs decoded into memory under ``rules``: images ``(N, 3, H, W)``, tokens
    ``(N, L)``.

    ``label`` keeps only samples with that ``cls`` label (e.g. one concept's held-out images);
    samples without a caption, or above a limit, are an error naming shard and key.
    """
    images, captions = [], []
    for sample in iter_raw_samples(expand_urls(shards, rules), rules):
        if max_samples is not None and len(images) >= max_samples:
            break
        if label is not None and sample.label != label:
            continue
        image = decode_image(sample, rules)  # names a broken limit first
        if sample.caption is None:
            raise ShardError(f"sample {sample.key!r} in {sample.shard} has no caption ('txt')")
        images.append(transform(image))
        captions.append(sample.caption)
    if not images:
        raise ShardError(f"no image–caption pairs in {shards}" + (f" with label {label}" if label is not None else ""))
    return torch.stack(images), tokenize(captions)
