"""The built-in offline demo as a DataModule: build the procedural world and train its tiny CLIP
(both cached), mine the forget set from the world's caption corpus, and serve forget / retain pairs
and the validation and held-out test sets like any other :class:`SlugDataModule`.

Everything lives under ``root`` (default ``.slug_cache/demo``, relative to the working
directory). What is trained is said by ``build``: ``open_clip`` (an open_clip model at
``<root>/model/<model_name>.safetensors``, :func:`slug_pl.demo.train.ensure_demo`), ``hf_clip``
(a Hugging Face ``CLIPModel`` folder at ``<root>/hf_clip``, :func:`slug_pl.demo.hf_clip.ensure_hf_clip`)
or ``llava`` (that CLIP and a LLaVA on its vision tower at ``<root>/llava``,
:func:`slug_pl.demo.llava.ensure_llava`). The run's family (and target) must load what this module
trains; when the method attaches them a mismatch is reported with the path to put there.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lightning.pytorch.utilities import rank_zero_info

from slug_pl.atomic import file_slug
from slug_pl.data.datamodule import EvalSuite, SlugDataModule
from slug_pl.data.labelled import LabelledSet, load_pairs
from slug_pl.data.mining import mine_forget_set
from slug_pl.demo.train import ensure_demo
from slug_pl.demo.world import WorldSpec, identity_names
from slug_pl.errors import did_you_mean


class DemoWorld(SlugDataModule):
    """The demo world: ≥20 face-like identities and object scenes, a tiny CLIP trained on them.

    Takes the options of :class:`SlugDataModule` that make sense for it (``concepts``,
    ``retain``, ``retain_exclude_concepts``, ``batch_size``, ``retain_batch_size``,
    ``retain_batches``, ``retain_seed``, ``num_workers``, ``eval_batch_size``, ``bad_samples``,
    ``mia_nonmembers``), with the same
    meaning. Not ``forget`` (mined from the world's caption corpus; ``forget_max`` caps it) nor
    ``validation`` / ``test`` (the world's held-out identity and object sets).
    """

    def __init__(
        self,
        root: str = ".slug_cache/demo",
        seed: int = 0,
        concepts: list[str] | None = None,
        forget_max: int | None = None,
        retain: str | list[str] | None = None,
        retain_exclude_concepts: bool | list[str] = False,
        retain_batches: str = "in_order",
        retain_seed: int = 0,
        batch_size: int = 64,
        retain_batch_size: int = 128,
        num_workers: int = 0,
        eval_batch_size: int = 512,
        bad_samples: str = "stop",
        mia_nonmembers: str | list[str] | None = None,
        train: dict | None = None,
        varying: list[str] | None = None,
        build: str = "open_clip",
    ):
        """
        Args:
            root: cache folder for the world, the model and mined forget sets.
            seed: world seed (identities' attributes, renders, captions).
            concepts: identities to forget (default: the first identity of the world).
            forget_max: cap on mined forget pairs (None: all pairs naming the identity).
            retain: retain-set shards (default: the first shard of the world's caption corpus,
                as one LAION shard in real use).
            retain_exclude_concepts / retain_batches / retain_seed / batch_size / retain_batch_size /
                num_workers / eval_batch_size / bad_samples: as in :class:`SlugDataModule`.
            mia_nonmembers: non-member pairs for membership inference (default: the held-out
                validation and test pairs of the forgotten identities, never seen in training).
            train: overrides of the demo CLIP's training settings (see ``slug_pl.demo.train``).
            varying: attributes drawn afresh for every image rather than fixed per person, e.g.
                ``[shirt, background]`` (see :class:`~slug_pl.demo.world.WorldSpec`); a world of
                its own, so give it its own ``root``.
            build: the models trained on the world: ``open_clip`` (the CLIP demo), ``hf_clip`` (a
                Hugging Face CLIP) or ``llava`` (that CLIP and a LLaVA on its vision tower).
        """
        if build not in BUILDS:
            raise ValueError(f"data.build must be one of {list(BUILDS)}, got {build!r}")
        self.build = build
        self.spec = WorldSpec(seed=seed, varying=tuple(varying or ()))
        names = identity_names(self.spec)
        concepts = list(concepts) if concepts else [names[0]]
        for concept in concepts:
            if concept not in names:
                raise ValueError(
                    f"data.concepts: {concept!r} is not an identity of the demo world (seed {seed})"
                    f"{did_you_mean(concept, names)}; its identities are {', '.join(names)}"
                )
        super().__init__(retain=retain, concepts=concepts, batch_size=batch_size,
                         retain_batch_size=retain_batch_size, num_workers=num_workers,
                         eval_batch_size=eval_batch_size, bad_samples=bad_samples,
                         mia_nonmembers=mia_nonmembers, retain_exclude_concepts=retain_exclude_concepts,
                         retain_batches=retain_batches, retain_seed=retain_seed)
        self.root = Path(root).expanduser()
        self.forget_max = forget_max
        self.train_kwargs = dict(train or {})
        self.paths: dict | None = None
        self._corpus_retain = retain is None

    def _ensure(self) -> dict:
        """The world and the models of ``build``, built or read from the cache."""
        if self.build == "llava":
            from slug_pl.demo.llava import ensure_llava

            built = ensure_llava(self.root, self.spec, self.train_kwargs)
            return {**built["world"], "hf_clip": built["hf_clip"], "llava": built["path"], "metrics": built["metrics"]}
        if self.build == "hf_clip":
            from slug_pl.demo.hf_clip import ensure_hf_clip

            built = ensure_hf_clip(self.root, self.spec, self.train_kwargs)
            return {**built["world"], "hf_clip": built["path"], "metrics": built["metrics"]}
        return ensure_demo(self.root, self.spec, self.train_kwargs)

    def prepare_data(self) -> None:
        self.paths = self._ensure()
        for concept in self.concepts:
            out = self._forget_dir(concept)
            if not (out / "mining.json").is_file():
                result = mine_forget_set(self.paths["corpus_shards"], [concept], out, max_count=self.forget_max)
                rank_zero_info(f"demo: mined {result.written} forget pairs for {concept!r} into {out}")

    def _forget_dir(self, concept: str) -> Path:
        """Mined pairs of one concept, keyed by the world's fingerprint (a rebuilt world is mined
        anew, never served stale pairs)."""
        cap = f"-max{self.forget_max}" if self.forget_max else ""
        return self.root / "forget" / self.paths["fingerprint"][:12] / f"{file_slug(concept)}{cap}"

    def setup(self, stage: str) -> None:
        if self.paths is None:  # prepare_data ran in another process (DDP): read the cache
            self.paths = self._ensure()
        p = self.paths
        self.forget = {c: [str(s) for s in sorted(self._forget_dir(c).glob("*.tar"))] for c in self.concepts}
        if self._corpus_retain:
            self.retain = p["corpus_shards"][0]  # one corpus shard, as one LAION shard in real use
        identities = {"classnames": p["identities_json"], "templates": _templates(p, "identities")}
        objects = {"classnames": p["objects_json"], "templates": _templates(p, "objects")}
        self.suites = {
            "validation": EvalSuite(LabelledSet(p["val_identities"], **identities),
                                    LabelledSet(p["val_objects"], **objects)),
            "test": EvalSuite(LabelledSet(p["test_identities"], **identities),
                              LabelledSet(p["test_objects"], **objects)),
        }
        super().setup(stage)  # the checks before any work

    def check(self, stage: str, pair_sets=(), processes: int = 1) -> None:
        if self.paths is not None:  # the world's sets exist once it is built (prepare_data / setup)
            super().check(stage, pair_sets, processes)

    def mia_pairs(self):
        """Membership inference sets: members = the mined forget pairs (seen in training),
        non-members = ``mia_nonmembers`` or else the held-out validation and test pairs of the
        same identities (never seen)."""
        if self.mia_nonmembers:
            return super().mia_pairs()
        family = self._family()
        transform, tokenize = family.image_transform(), family.tokenize
        names = json.loads(Path(self.paths["identities_json"]).read_text())
        members = load_pairs([u for c in self.concepts for u in self.forget[c]], transform, tokenize)
        held_out = [load_pairs([self.paths["val_identities"], self.paths["test_identities"]], transform, tokenize,
                               label=names.index(c)) for c in self.concepts]
        nonmembers = (torch.cat([h[0] for h in held_out]), torch.cat([h[1] for h in held_out]))
        return members, nonmembers


    def check_models(self, family, target=None) -> None:
        """The run's family loads the CLIP this world trained (and a LLaVA target the LLaVA), or
        ValueError naming the option and the path to put there."""
        if self.paths is None:
            return
        if "llava" in self.paths:
            refuse_other_model("the demo builds its LLaVA", self.paths["llava"], target_source(target),
                               "model.init_args.target.init_args.model")
        if "hf_clip" in self.paths:
            refuse_other_model("the demo trains its CLIP", self.paths["hf_clip"], family.describe().get("model_name"),
                               "model.init_args.family.init_args.model_name")
        else:
            refuse_other_model("the demo trains its CLIP", self.paths["checkpoint"], family.describe().get("pretrained"),
                               "model.init_args.family.init_args.pretrained",
                               f" (and model_name to {self.paths['model_name']})")


#: What a demo world can build (``DemoWorld(build=...)``).
BUILDS = ("open_clip", "hf_clip", "llava")


def target_source(target) -> str | None:
    """The folder a downstream target loads (``describe_source()``), or None without a target."""
    return None if target is None else target.source()


def refuse_other_model(what: str, wanted: str | Path, loaded: str | None, option: str, hint: str = "") -> None:
    """ValueError when the run loads ``loaded`` where a demo built ``wanted``: ``"<what> at
    <wanted>, but the run loads <loaded>; set <option> to <wanted><hint>"``."""
    wanted = Path(wanted).resolve()
    if loaded is None or loaded == "None" or Path(loaded).expanduser().resolve() != wanted:
        raise ValueError(f"{what} at {wanted}, but the run loads {loaded!r}; set {option} to {wanted}{hint}")


def _templates(paths: dict, kind: str) -> list[str]:
    return json.loads(Path(paths["templates_json"]).read_text())[kind]
