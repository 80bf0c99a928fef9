"""The SLUG DataModule: forget and retain pair shards for the gradient pass, labelled concept and
utility sets for validation (step search, ``validate``) and held-out test (final report, ``test``).

Evaluation sets follow docs/design.md §1: a *concept set* holds labelled images of the forgotten
concept(s) and of other concepts over one class list (forget accuracy on the former, retain
accuracy on the latter); a *utility set* is a general zero-shot benchmark.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, IterableDataset

from slug_pl.data.agreement import AgreedBatches, first_error
from slug_pl.data.labelled import LoadedSet, load_pairs
from slug_pl.data.layouts import EvalSet
from slug_pl.data.limits import (
    DEFAULT_MAX_CAPTION_CHARS,
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_MAX_MEMBER_BYTES,
    InputRules,
)
from slug_pl.data.mining import EmptyForgetSetError, concept_pattern
from slug_pl.data.pairs import (
    BAD_SAMPLE_POLICIES,
    PairBatches,
    PairSet,
    excluded_samples,
    kept_sample_counts,
    shard_sample_counts,
)
from slug_pl.data.reference_batches import AuthorsBatches
from slug_pl.data.shard_index import IndexStore
from slug_pl.data.shards import ShardError, expand_urls
from slug_pl.errors import did_you_mean

STAGES = ("validation", "test")
#: How the retain set is batched: each sample once, in shard order, the last batch partial and
#: the evaluation transform (``in_order``); or the authors' shuffled, augmented full batches
#: (``reference``, :mod:`slug_pl.data.reference_batches`).
RETAIN_BATCHES = ("in_order", "reference")


@dataclass
class EvalSuite:
    """The labelled sets of one stage (validation or test).

    Each set is one of the layouts: webdataset shards with labels (``shards:``), an
    ImageNet-style class-folder tree (``root:``), or a CelebA-style identity set (``images:`` +
    ``identities:``); see :mod:`slug_pl.data.layouts`.

    Attributes:
        concepts: images of the forgotten and of other concepts, labelled over the full concept list.
        utility: an optional general zero-shot benchmark (e.g. ImageNet-style classes).
    """

    concepts: EvalSet
    utility: EvalSet | None = None


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity where the system tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def portable_path(path: str) -> str:
    """``path`` relative to the working folder when it lies inside it (as a POSIX path), else as
    given: what a record names, the same for two checkouts of a project in different folders."""
    p = Path(path)
    if p.is_absolute():
        try:
            return p.resolve().relative_to(Path.cwd().resolve()).as_posix()
        except ValueError:
            return path
    return path


def quick_fingerprint(path: str) -> dict[str, object]:
    """Size and a SHA-256 of the first and last MiB of a local file (cheap on large shards); the
    path as :func:`portable_path` gives it."""
    p = Path(path)
    if not p.is_file():
        return {"path": portable_path(path)}
    size = p.stat().st_size
    h = hashlib.sha256()
    with open(p, "rb") as f:
        h.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
        h.update(f.read(1 << 20))
    return {"path": portable_path(path), "bytes": size, "sha256_head_tail": h.hexdigest()}


class _LabelledBatches(IterableDataset):
    """Batches of a loaded labelled set, split by rank without padding (each image scored once)."""

    def __init__(self, data: LoadedSet, name: str, batch_size: int, rank: int, world_size: int):
        self.data, self.name, self.batch_size = data, name, batch_size
        self.indices = torch.arange(rank, len(data.labels), world_size)

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def __iter__(self):
        for start in range(0, len(self.indices), self.batch_size):
            idx = self.indices[start : start + self.batch_size]
            yield {"set": self.name, "images": self.data.images[idx], "labels": self.data.labels[idx]}


class SlugDataModule(LightningDataModule):
    """Forget / retain pairs and labelled evaluation sets for one SLUG run."""

    def __init__(
        self,
        forget: str | list[str] | dict[str, str | list[str]] | None = None,
        retain: str | list[str] | None = None,
        concepts: list[str] | None = None,
        batch_size: int = 32,
        retain_batch_size: int | None = None,
        num_workers: int = 0,
        validation: EvalSuite | None = None,
        test: EvalSuite | None = None,
        eval_batch_size: int = 256,
        bad_samples: str = "stop",
        mia_nonmembers: str | list[str] | None = None,
        retain_exclude_concepts: bool | list[str] = False,
        max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
        max_caption_chars: int = DEFAULT_MAX_CAPTION_CHARS,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        allow_shard_commands: bool = False,
        retain_batches: str = "in_order",
        retain_seed: int = 0,
        index_dir: str | None = None,
        index_beside_shards: bool = False,
    ):
        """
        Args:
            forget: forget-set shards (path, list or brace pattern), e.g. from ``slug-pl mine``; with
                several concepts a mapping ``concept -> shards`` (each concept gets its own edit).
            retain: retain-set shards (e.g. one LAION shard).
            concepts: the concept name(s) to forget, as spelled in the concept set's class list.
            batch_size: global batch size of the forget pass (does not change the result).
            retain_batch_size: global batch size of the contrastive retain loss (defaults to
                ``batch_size``; it *does* define the loss).
            num_workers: data-loader worker processes per device (more than the CPU cores this
                process may use are reduced to that number, with a warning; the batches are the
                same with any number).
            validation: labelled sets for the step search and ``validate``.
            test: held-out labelled sets for the final before/after report and ``test``.
            eval_batch_size: images per batch in evaluation.
            mia_nonmembers: shards of image–caption pairs of the concept(s) the model never saw;
                with them, membership inference (forget pairs vs these) is reported before and
                after the edit (docs/design.md §2).
            bad_samples: what a forget/retain sample without image or caption, or with an image
                that does not decode, does to the pass: ``"stop"`` (raise, naming shard and key) or
                ``"skip"`` (leave it out; skipped samples are counted and listed in the gradient
                files' metadata and the run's ``skipped_samples.json``). See
                :mod:`slug_pl.data.pairs` for how skipping stays exact under DDP.
            retain_exclude_concepts: leave out of the retain set every pair whose caption names a
                forgotten concept (whole words, any case, as ``slug-pl mine`` matches): ``true``
                for the names in ``concepts``, or a list of names (add aliases, e.g.
                ``["Elon Musk", "Musk"]``). The retain set is then exactly the other pairs, on any
                number of devices (see :mod:`slug_pl.data.pairs`). Default ``false``: the retain
                shards as given.
            max_member_bytes: the largest tar member read, in bytes (default 32 MiB); a sample
                with a larger one is a bad sample (``bad_samples``).
            max_caption_chars: the longest caption used, in characters (default 10,000); a sample
                with a longer one is a bad sample.
            max_image_pixels: the most pixels (width × height) an image may announce before it
                is decoded (default 8192 × 8192, at most PIL's own bound); a sample with more is a
                bad sample, an evaluation image with more an error.
            allow_shard_commands: let shard specs that webdataset opens by running a program
                (``pipe:<command>`` with a shell, ``http://`` with curl, ``gs://`` with gsutil)
                through. Default ``false``: such a spec is refused before any work. Only for
                shard lists you wrote yourself. See docs/inputs.md.
            retain_batches: ``in_order`` (default): every retain sample once, in shard order, the
                last batch partial, the evaluation transform. ``reference``: the authors' retain
                batches, seeded by ``retain_seed``: shards and samples shuffled (buffers 2000 /
                5000), full batches only (the partial one dropped, the epoch topped up from a
                second, reshuffled pass) and open_clip's training augmentation (docs/reference.md).
            retain_seed: the seed of ``retain_batches: reference`` (the authors' ``--seed``, 0).
            index_dir: the folder where the forget and retain shards' indexes are kept (where each
                sample starts, so that each rank and worker reads only its own samples; built once
                from the tar headers, see :mod:`slug_pl.data.shard_index`). Default:
                ``$SLUG_PL_CACHE/shard_index``, else ``~/.cache/slug_pl/shard_index``. With several
                nodes give a folder they all see (else each rank builds the indexes its node lacks).
            index_beside_shards: keep each index beside its shard (``<shard>.slug-index``) where
                the shard's folder is writable (else in ``index_dir``), and use one found there.
                Default ``false``: a shard's folder is never written to.
        """
        super().__init__()
        for name, value in (("batch_size", batch_size), ("retain_batch_size", retain_batch_size),
                            ("eval_batch_size", eval_batch_size)):
            if value is not None and (isinstance(value, bool) or value < 1):
                raise ValueError(f"data.{name} must be a positive integer, got {value}")
        if isinstance(num_workers, bool) or num_workers < 0:
            raise ValueError(f"data.num_workers must be a number of worker processes >= 0, got {num_workers}")
        cores = usable_cores()
        if num_workers > cores:  # a config written for a larger machine: the stream is the same with fewer
            rank_zero_warn(f"data.num_workers {num_workers} is more than the {cores} CPU cores this process may "
                           f"use; using {cores}")
            num_workers = cores
        if retain_batches not in RETAIN_BATCHES:
            raise ValueError(f"data.retain_batches must be one of {list(RETAIN_BATCHES)}, got {retain_batches!r}")
        if bad_samples not in BAD_SAMPLE_POLICIES:
            raise ValueError(f"data.bad_samples must be one of {list(BAD_SAMPLE_POLICIES)}, got {bad_samples!r}")
        self.forget = forget
        self.retain = retain
        self.concepts = list(concepts or [])
        self.batch_size = batch_size
        self.retain_batch_size = retain_batch_size or batch_size
        self.num_workers = num_workers
        self.suites = {"validation": validation, "test": test}
        if validation is not None and test is not None and validation.concepts == test.concepts:
            rank_zero_warn("data.validation.concepts and data.test.concepts are the same images: the report's "
                           "held-out numbers are then measured where the search chose the step (slug-pl prepare "
                           "celeba writes disjoint validation and test sets)")
        self.eval_batch_size = eval_batch_size
        self.mia_nonmembers = mia_nonmembers
        self.bad_samples = bad_samples
        if not isinstance(retain_exclude_concepts, bool) and not retain_exclude_concepts:
            raise ValueError("data.retain_exclude_concepts is an empty list: give names, true or false")
        self.retain_exclude_concepts = retain_exclude_concepts
        try:
            self.input_rules = InputRules(max_member_bytes, max_caption_chars, max_image_pixels,
                                          allow_shard_commands)
        except ValueError as err:
            raise ValueError(f"data.{err}") from err
        self.retain_batches = retain_batches
        self.retain_sampling = AuthorsBatches(retain_seed) if retain_batches == "reference" else None
        if not isinstance(index_beside_shards, bool):
            raise ValueError(f"data.index_beside_shards must be true or false, got {index_beside_shards!r}")
        self.index_store = IndexStore(str(Path(index_dir).expanduser()) if index_dir else None, index_beside_shards)
        #: (shard, exclusion pattern, flags) -> numbers of the shard's samples left out (excluded_samples)
        self._exclusions: dict[tuple[str, str, int], tuple[int, ...]] = {}
        self._pair_sets: dict[str, PairSet] = {}
        self._pair_set_keys: dict[str, str] = {}  # what data.forget / data.retain were when cached
        self._loaded: dict[tuple[str, tuple[int, int]], dict[str, LoadedSet]] = {}
        #: the model family whose transform and tokenizer the data uses (given by :meth:`attach`)
        self.family = None
        #: what ``fit`` streams: the pair sets in order and the global batch it starts at
        self.pass_sets: tuple[str, ...] = ()
        self.start_batch = 0

    # -- what the method gives the data ----------------------------------------------------------
    def attach(self, family, pass_sets: Sequence[str] = (), start_batch: int = 0, target=None) -> None:
        """The method's side of the contract, given in its ``setup`` (after this module's own
        ``setup``, before any batch): the model ``family`` (image transform, tokenizer), the pair
        sets ``fit`` streams in order (checked here: they exist, read and are not empty), the
        global batch the stream starts at (> 0 when a pass resumes) and the downstream ``target``
        (a data module that builds the models it serves checks that the run loads them:
        :meth:`check_models`). Under DDP every rank calls it: the ranks share the indexing of the
        sets' shards (:meth:`share_indexing`)."""
        self.family = family
        self.pass_sets, self.start_batch = tuple(pass_sets), start_batch
        self.share_indexing(self.pass_sets)
        for name in self.pass_sets:
            self.pair_set(name)
        self.check_models(family, target)

    def check_models(self, family, target=None) -> None:
        """Hook: a data module that builds the models it serves (the demos) refuses a run that
        loads others, naming the option to set. Real data serves any model."""

    def _family(self):
        if self.family is None:
            raise RuntimeError("the data module has no model family yet: the method gives it with "
                               "SlugDataModule.attach(family, ...) before the data is used")
        return self.family

    def _rank_world(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    # -- pairs ---------------------------------------------------------------------------------
    def pair_set(self, name: str) -> PairSet:
        """The ``forget`` or ``retain`` pairs as ``data.forget`` / ``data.retain`` name them now:
        cached, and built anew when the attribute changed since (a subclass's ``setup`` may
        replace the forget shards after its parent's checks have already read them)."""
        key = json.dumps(self.forget if name == "forget" else self.retain, sort_keys=True, default=str)
        if name not in self._pair_sets or self._pair_set_keys.get(name) != key:
            self._pair_sets.pop(name, None)
            self._pair_set_keys[name] = key
            exclude = self.retain_exclusion() if name == "retain" else None
            bs = self.batch_size if name == "forget" else self.retain_batch_size
            sampling = self.retain_sampling if name == "retain" else None
            pair_set = self._read_pair_set(name, self._set_urls(name), bs, exclude, sampling)
            if pair_set.num_samples == 0:
                error = EmptyForgetSetError if name == "forget" else ShardError
                left_out = f" once pairs matching {exclude.pattern!r} are left out" if exclude is not None else ""
                raise error(
                    f"the {name} set is empty{left_out}: no samples in {', '.join(pair_set.urls)}. "
                    + ("Mine a forget set with `slug-pl mine` (check the concept names) or point "
                       "data.forget at its shards" if name == "forget" else
                       "Point data.retain at shards that hold image-caption pairs")
                )
            if sampling is not None:
                sampling.positions(pair_set.num_samples, bs)  # refuses a batch larger than the set
            self._pair_sets[name] = pair_set
        return self._pair_sets[name]

    def _set_urls(self, name: str) -> tuple[str, ...]:
        """The shards of the ``forget`` or ``retain`` set, expanded and checked to exist."""
        spec = self.forget if name == "forget" else self.retain
        if isinstance(spec, dict):  # several concepts: the pass runs over all their pairs
            spec = [u for c in self.concepts for u in expand_urls(spec[c], self.input_rules, f"data.{name}")] if all(
                c in spec for c in self.concepts) else self._missing_concepts(spec)
        if spec is None:
            raise ValueError(f"data.{name} is not set: give the {name}-set shards in the config")
        return tuple(expand_urls(spec, self.input_rules, f"data.{name}"))

    def _read_pair_set(self, name: str, urls: tuple[str, ...], batch_size: int, exclude: re.Pattern | None = None,
                       sampling: AuthorsBatches | None = None) -> PairSet:
        """The pair set of ``urls``, counted from the shards' indexes (built where missing), so its
        readers read only their own samples; streamed, and counted from the tar headers, when a
        shard cannot be indexed (compressed, or a spec with a scheme)."""
        indexes = [self.index_store.index(url) for url in urls]
        if any(index is None for index in indexes):
            sizes = tuple(shard_sample_counts(urls) if exclude is None else
                          kept_sample_counts(urls, exclude, self.input_rules))
            return PairSet(name, urls, batch_size, sum(sizes), sizes, exclude, sampling)
        excluded = tuple(self._excluded(url, exclude) for url in urls) if exclude is not None else ()
        sizes = tuple(len(index) - len(out) for index, out in zip(indexes, excluded or [()] * len(urls)))
        return PairSet(name, urls, batch_size, sum(sizes), sizes, exclude, sampling, excluded, self.index_store)

    def _excluded(self, url: str, exclude: re.Pattern) -> tuple[int, ...]:
        """The samples of indexed shard ``url`` that ``exclude`` leaves out (found once per run)."""
        key = (url, exclude.pattern, int(exclude.flags))
        if key not in self._exclusions:
            self._exclusions[key] = excluded_samples(url, self.index_store, exclude, self.input_rules)
        return self._exclusions[key]

    def share_indexing(self, names: Sequence[str]) -> None:
        """Under DDP, a collective call: each rank indexes (and, for a set that leaves samples out,
        reads the captions of) every W-th shard of the pair sets ``names``, so that each shard is
        read once; the ranks then exchange what they found (the exclusions; the indexes are in the
        index folder) and raise the same error when one rank's shard could not be read. A no-op
        on one process."""
        rank, world = self._rank_world()
        if world == 1 or not (dist.is_available() and dist.is_initialized()):
            return
        jobs: dict[tuple[str, re.Pattern | None], None] = {}  # ordered, the same on every rank
        for name in names:
            exclude = self.retain_exclusion() if name == "retain" else None
            jobs.update(((url, exclude), None) for url in self._set_urls(name))
        error = None
        try:
            for url, exclude in list(jobs)[rank::world]:
                if self.index_store.index(url) is not None and exclude is not None:
                    self._excluded(url, exclude)
        except ShardError as err:
            error = err
        gathered: list = [None] * world
        dist.all_gather_object(gathered, (self._exclusions, error))
        errors = [e for _, e in gathered if e is not None]
        if errors:
            raise first_error(errors)
        for exclusions, _ in gathered:
            self._exclusions.update(exclusions)

    def retain_exclusion(self) -> re.Pattern | None:
        """The caption pattern of retain pairs left out (``retain_exclude_concepts``), or None."""
        if self.retain_exclude_concepts is False:
            return None
        names = self.concepts if self.retain_exclude_concepts is True else list(self.retain_exclude_concepts)
        if not names:
            raise ValueError("data.retain_exclude_concepts: true needs data.concepts; or give the names to leave out")
        return concept_pattern(names)

    def _missing_concepts(self, spec: dict):
        missing = [c for c in self.concepts if c not in spec]
        raise ValueError(f"data.forget has no shards for concept(s) {missing}; its keys are {list(spec)}")

    def concept_forget_urls(self, concept: str) -> tuple[str, ...]:
        """The forget-set shards of one concept (``data.forget[concept]``, or ``data.forget`` itself
        when the run has one concept)."""
        if isinstance(self.forget, dict):
            if concept not in self.forget:
                self._missing_concepts(self.forget)
            spec = self.forget[concept]
        elif len(self.concepts) == 1:
            spec = self.forget
        else:
            raise ValueError("with several data.concepts, give data.forget as a mapping concept -> shards")
        return tuple(expand_urls(spec, self.input_rules, "data.forget"))

    def concept_batches(self, concept: str) -> PairBatches:
        """One concept's forget pairs as single-process batches (for the per-concept forget
        gradients of a multi-concept search, computed on rank 0)."""
        pair_set = self._read_pair_set("forget", self.concept_forget_urls(concept), self.batch_size)
        family = self._family()
        return PairBatches([pair_set], family.image_transform(), family.tokenize, bad_samples=self.bad_samples,
                           rules=self.input_rules)

    def retain_urls(self) -> tuple[str, ...]:
        """The retain-set shards, as given."""
        return self.pair_set("retain").urls

    def mia_pairs(self):
        """``((member images, tokens), (non-member images, tokens))`` for membership inference:
        members are the forget pairs, non-members ``data.mia_nonmembers``; None without them."""
        if not self.mia_nonmembers:
            return None
        family = self._family()
        transform, tokenize = family.image_transform(), family.tokenize
        members = load_pairs(list(self.pair_set("forget").urls), transform, tokenize, rules=self.input_rules)
        nonmembers = expand_urls(self.mia_nonmembers, self.input_rules, "data.mia_nonmembers")
        return members, load_pairs(nonmembers, transform, tokenize, rules=self.input_rules)

    def global_batch_size(self, name: str) -> int:
        return self.pair_set(name).global_batch_size

    def fingerprint(self, name: str) -> dict[str, object]:
        pair_set = self.pair_set(name)
        out = {"num_samples": pair_set.num_samples, "shards": [quick_fingerprint(u) for u in pair_set.urls]}
        if pair_set.exclude is not None:
            out["excluded_captions"] = pair_set.exclude.pattern
        if pair_set.sampling is not None:
            out["batches"] = pair_set.sampling.describe()
        return out

    def _on_gpu(self) -> bool:
        """Whether the batches go to a CUDA device: the loaders then pin them in host memory
        (faster copies that overlap the computation)."""
        trainer = self.trainer
        return trainer is not None and trainer.strategy.root_device.type == "cuda"

    def train_dataloader(self) -> DataLoader:
        sets = [self.pair_set(name) for name in self.pass_sets]  # what the method streams (attach)
        rank, world = self._rank_world()
        family = self._family()
        augmented = any(s.sampling is not None and s.sampling.augmented for s in sets)
        dataset = PairBatches(sets, family.image_transform(), family.tokenize, rank, world,
                              start_batch=self.start_batch if sets else 0, bad_samples=self.bad_samples,
                              rules=self.input_rules,
                              train_transform=family.train_image_transform() if augmented else None)
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                            persistent_workers=False, pin_memory=self._on_gpu())
        return AgreedBatches(loader) if world > 1 else loader  # one rank's bad sample stops them all

    # -- checks before any work ----------------------------------------------------------------
    def setup(self, stage: str) -> None:
        self.check(stage)  # the pair sets a fit streams are checked when the method attaches them

    def check(self, stage: str, pair_sets: Sequence[str] = (), processes: int = 1) -> None:
        """Check what a ``stage`` run ("fit", "validate", "test") needs before any work: the
        concept names are in the concept class list of every evaluation set the stage uses (with
        "did you mean"), those sets' files exist, and the ``pair_sets`` ("forget", "retain") exist,
        read and are not empty. For a run of several ``processes`` the pair sets' shards are only
        checked to exist here: they are read when the method attaches them, each shard by one
        process (:meth:`share_indexing`). Raises ValueError (or FileNotFoundError) naming the
        option."""
        if isinstance(self.forget, dict) and any(c not in self.forget for c in self.concepts):
            self._missing_concepts(self.forget)
        for name in pair_sets:
            if processes > 1:
                self._set_urls(name)
            else:
                self.pair_set(name)
        required = {"validate": "validation", "test": "test"}.get(stage)
        if required is not None and not self.has_stage(required):
            raise ValueError(f"data.{required} is not set: {stage} needs its labelled concept (and "
                             f"utility) sets")
        for eval_stage in STAGES if stage == "fit" else (required,) if required else ():
            suite = self.suites.get(eval_stage)
            if suite is None:
                continue
            classnames = suite.concepts.class_names(f"{eval_stage}.concepts", self.input_rules)
            for concept in self.concepts:
                if concept not in classnames:
                    raise ValueError(
                        f"data.concepts: {concept!r} is not in the class list of data.{eval_stage}.concepts "
                        f"({len(classnames)} names){did_you_mean(concept, classnames)}; spell each concept "
                        f"exactly as there"
                    )
            if suite.utility is not None:
                suite.utility.class_names(f"{eval_stage}.utility", self.input_rules)

    # -- labelled sets -------------------------------------------------------------------------
    def has_stage(self, stage: str) -> bool:
        return self.suites.get(stage) is not None

    def eval_suite(self, stage: str) -> EvalSuite | None:
        """The specs of ``stage``'s labelled sets (None when the config has none)."""
        return self.suites.get(stage)

    def loaded_sets(self, stage: str, part: tuple[int, int] = (0, 1)) -> dict[str, LoadedSet]:
        """The decoded sets of ``stage`` ("validation" or "test"): ``concepts`` and ``utility``;
        with ``part`` ``(r, W)`` only samples ``r::W`` of each (kept like the whole sets)."""
        if (stage, part) not in self._loaded:
            suite = self.suites.get(stage)
            if suite is None:
                raise ValueError(f"data.{stage} is not set: give its concept (and utility) sets")
            transform = self._family().image_transform()
            sets = {"concepts": suite.concepts.load(transform, f"{stage}.concepts", self.input_rules, part)}
            if suite.utility is not None:
                sets["utility"] = suite.utility.load(transform, f"{stage}.utility", self.input_rules, part)
            self._loaded[(stage, part)] = sets
        return self._loaded[(stage, part)]

    def forget_ids(self, stage: str) -> list[int]:
        classnames = self.loaded_sets(stage)["concepts"].classnames
        missing = [c for c in self.concepts if c not in classnames]
        if missing:
            raise ValueError(
                f"data.concepts {missing} not found in the {stage} concept class list "
                f"({len(classnames)} names, e.g. {classnames[:3]}); spell them exactly as there"
            )
        return [classnames.index(c) for c in self.concepts]

    def _eval_loaders(self, stage: str) -> list[DataLoader]:
        rank, world = self._rank_world()
        return [
            DataLoader(_LabelledBatches(data, name, self.eval_batch_size, rank, world), batch_size=None,
                       pin_memory=self._on_gpu())
            for name, data in self.loaded_sets(stage).items()
        ]

    def val_dataloader(self):
        if self.trainer is not None and self.trainer.state.fn == "fit":
            return []  # during fit the search callback evaluates; no validation loop
        return self._eval_loaders("validation")

    def test_dataloader(self):
        return self._eval_loaders("test")
