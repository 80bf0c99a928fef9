"""A SLUG edit as a patch people can share: load it, check it against the base, apply and revert
it in one call.

The patch of a run is its ``edit.safetensors`` (each edited tensor, new and original, and the
run's metadata; :mod:`slug_pl.edit`). :class:`SlugPatch` reads it, and shares it the way peft
shares an adapter (``PeftModel.save_pretrained`` / ``from_pretrained``): a small folder holding

- ``slug_patch.json``: the config: the base model (the family's description: family, model name,
  revision or weights), ``base_sha256`` (the SHA-256 of the base weights), the concepts, the
  method, the forget target, each edited tensor with its step(s), the slug_pl version;
- ``slug_patch.safetensors``: the edited tensors, new and original (an edit file, the same
  config as its metadata);
- ``README.md``: the model card (:mod:`slug_pl.model_card`).

::

    patch = SlugPatch.from_run("lightning_logs/version_0")  # or from_file / from_pretrained
    patch.apply(model)                                       # checks the base, then edits it
    with patch.applied(model):                               # or: edited inside the block only
        ...
    patch.save_pretrained("elon_musk_patch")

**Checking the base.** Before the model changes, :meth:`SlugPatch.apply` checks that every edited
tensor exists in the model with the patch's shape; that the model does not carry the patch already
(it says so); that it holds each tensor's original (bit for bit where the model holds the tensor
in the patch's dtype, within one rounding step where it holds it in a lower precision, as a
float16 pipeline embeds a float32 CLIP); and, for the model the patch was computed on, that the
SHA-256 of all its weights is the recorded ``base_sha256``, so a patch never lands on other
weights that merely share the edited tensor. Either every tensor is edited or none is.

**A model that embeds one tower** (Stable Diffusion's text encoder, LLaVA's vision tower) names
the CLIP's tensors its own way: ``name_map`` maps a CLIP parameter name to the model's (None: the
model lacks it, which is refused). A downstream target's ``downstream_name`` is one;
:func:`embedded_tower` finds the names in any model that holds the tower under the CLIP's names or
under a prefix. Such a model holds one tower, not the CLIP, so the whole-weights hash does not
apply there; each tensor's check does.
"""

from __future__ import annotations

import json
import os
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from slug_pl.atomic import atomic_folder, write_text
from slug_pl.edit import EditMismatchError, LayerEdit, edit_layers, load_edits, save_edits
from slug_pl.gradients import weights_fingerprint
from slug_pl.record import EDIT_FILE, SUMMARY_FILE
from slug_pl.safety import read_descriptor

PATCH_CONFIG = "slug_patch.json"
PATCH_WEIGHTS = "slug_patch.safetensors"
MODEL_CARD = "README.md"
#: ``slug_patch.json``'s own fields (the rest is the edit file's metadata).
FORMAT, FORMAT_VERSION = "slug_patch", 1
#: Largest ``summary.json`` read with a run's patch (a real one holds tens of KB).
MAX_SUMMARY_BYTES = 16 * 2**20

#: A CLIP parameter name -> the model's name of the same tensor, or None when the model lacks it.
NameMap = Callable[[str], "str | None"]


def patch_metadata(model: nn.Module, edits: Sequence[LayerEdit]) -> dict[str, object]:
    """What a run records in its edit file beyond the model, concepts and method, so that the patch
    can check its base: ``base_sha256``, the fingerprint (:func:`~slug_pl.gradients.weights_fingerprint`)
    of the weights before the edit, computed from ``model`` carrying ``edits`` (untouched), and
    ``slug_pl_version``."""
    from slug_pl import __version__

    return {"base_sha256": weights_fingerprint(model, {e.name: e.original for e in edits}),
            "slug_pl_version": __version__}


def embedded_tower(model: nn.Module) -> NameMap:
    """The name map to ``model``, which embeds one tower of the CLIP the patch was computed on.

    A CLIP name (``text_model.encoder.layers.3.mlp.fc1.weight``) is looked for as it is, then as
    named inside its tower (without its first part: ``encoder.layers.3.mlp.fc1.weight``, as
    transformers' ``CLIPTextModel`` names it); each form as the whole name of a parameter, else
    as the end of exactly one parameter's name after a dot (the tower under a prefix: LLaVA's
    ``model.vision_tower.encoder.layers.3.…``). None when nothing, or more than one parameter,
    matches. The values are checked when the patch is applied, so a tensor of the other tower
    that happens to share a name is refused there."""
    names = [n for n, _ in model.named_parameters()]
    known = set(names)

    def name_map(clip_name: str) -> str | None:
        for form in (clip_name, clip_name.split(".", 1)[-1]):
            if form in known:
                return form
            prefixed = [n for n in names if n.endswith("." + form)]
            if prefixed:
                return prefixed[0] if len(prefixed) == 1 else None
        return None

    return name_map


def _holds(param: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether ``param`` holds ``value``: bit for bit in the same dtype; in another dtype within
    its rounding (:func:`~slug_pl.targets.saved_copy.same_weights`: a lower-precision model holds
    the float32 value rounded, perhaps twice)."""
    if param.dtype == value.dtype:
        return param.shape == value.shape and torch.equal(param.detach().cpu(), value)
    from slug_pl.targets.saved_copy import same_weights

    return same_weights(value, param)


@dataclass(eq=False)
class SlugPatch:
    """The edits of one run and its config (the edit file's metadata).

    Attributes:
        edits: one :class:`~slug_pl.edit.LayerEdit` per edited tensor (CLIP parameter names).
        config: the base model (``model``), ``base_sha256``, ``concepts``, ``method``, ``target``,
            ``layers`` (per tensor: step, relative change, concepts), ``slug_pl_version``.
        source: where the patch was read from (named in every refusal).
        summary: the run's ``summary.json`` when the patch was read with its run (for the card).
    """

    edits: list[LayerEdit]
    config: dict
    source: str = "the patch"
    summary: dict | None = None
    #: per model the patch is applied to: its tensors as they were before (for an exact revert)
    _displaced: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary, repr=False,
                                                  compare=False)

    # -- reading and writing -------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | os.PathLike) -> SlugPatch:
        """The patch in an edit file (a run's ``edit.safetensors``), every entry checked
        (:func:`~slug_pl.edit.load_edits`)."""
        edits, meta = load_edits(path)
        return cls(edits, meta, str(path))

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike) -> SlugPatch:
        """The patch of a run folder (``lightning_logs/version_N``): its ``edit.safetensors``, with
        its ``summary.json`` when there is one."""
        run_dir = Path(run_dir)
        if not (run_dir / EDIT_FILE).is_file():
            raise FileNotFoundError(f"{run_dir} holds no {EDIT_FILE}: give the folder of a finished fit run "
                                    f"(lightning_logs/version_N)")
        patch = cls.from_file(run_dir / EDIT_FILE)
        if (run_dir / SUMMARY_FILE).is_file():
            patch.summary = read_descriptor(run_dir / SUMMARY_FILE, "run summary", MAX_SUMMARY_BYTES)
        return patch

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> SlugPatch:
        """The patch a :meth:`save_pretrained` folder holds. Refused (naming the file and the
        entry) when ``slug_patch.json`` is not a slug patch config or disagrees with the metadata
        of ``slug_patch.safetensors``."""
        folder = Path(folder)
        if not (folder / PATCH_CONFIG).is_file():
            raise FileNotFoundError(f"{folder} holds no {PATCH_CONFIG}: give a folder SlugPatch.save_pretrained "
                                    f"wrote (or read a run's edit file with SlugPatch.from_file)")
        config = read_descriptor(folder / PATCH_CONFIG, "patch config")
        if config.pop("format", None) != FORMAT or config.pop("format_version", None) != FORMAT_VERSION:
            raise EditMismatchError(f"{folder / PATCH_CONFIG} is not a {FORMAT} config of version {FORMAT_VERSION} "
                                    f"(its 'format' / 'format_version' entries)")
        edits, meta = load_edits(folder / PATCH_WEIGHTS)
        for key in sorted(set(config) | set(meta)):
            if config.get(key) != meta.get(key):
                raise EditMismatchError(f"{folder}: {PATCH_CONFIG} and {PATCH_WEIGHTS} disagree on entry {key!r}; "
                                        f"the folder was altered after it was written")
        return cls(edits, config, str(folder))

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write the patch into the new folder ``folder`` (``slug_patch.json``,
        ``slug_patch.safetensors``, ``README.md``); complete or absent, never over an existing
        folder."""
        from slug_pl.model_card import model_card

        config = {**self.config, "layers": edit_layers(self.edits)}
        with atomic_folder(folder) as tmp:
            save_edits(tmp / PATCH_WEIGHTS, self.edits, config)
            write_text(tmp / PATCH_CONFIG, json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, **config},
                                                      indent=2, sort_keys=True) + "\n")
            write_text(tmp / MODEL_CARD, model_card(self.summary, config, library="slug_pl"))
        return Path(folder)

    # -- what it is ----------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """The edited tensors (CLIP parameter names)."""
        return [e.name for e in self.edits]

    @property
    def base_sha256(self) -> str | None:
        """The SHA-256 of the base weights, when the run recorded it."""
        return self.config.get("base_sha256")

    # -- applying ------------------------------------------------------------------------------
    def _targets(self, model: nn.Module, name_map: NameMap | None) -> list[tuple[LayerEdit, str, nn.Parameter]]:
        """Each edit with the model's name and parameter for it, checked to exist with its shape."""
        params = dict(model.named_parameters())
        out = []
        for e in self.edits:
            name = e.name if name_map is None else name_map(e.name)
            if name is None or name not in params:
                found = "the name map finds no parameter for it" if name is None else f"it has no parameter {name!r}"
                raise EditMismatchError(f"{self.source}: entry {e.name!r} does not fit the model ({found}): the patch "
                                        f"belongs to another model")
            if params[name].shape != e.edited.shape:
                raise EditMismatchError(f"{self.source}: entry {e.name!r} has shape {tuple(e.edited.shape)}, the "
                                        f"model's {name!r} {tuple(params[name].shape)}: the patch belongs to another "
                                        f"model")
            out.append((e, name, params[name]))
        return out

    def is_applied(self, model: nn.Module, name_map: NameMap | None = None) -> bool:
        """Whether ``model`` holds every edited tensor's edited value."""
        return all(_holds(p, e.edited) for e, _, p in self._targets(model, name_map))

    def check_base(self, model: nn.Module, name_map: NameMap | None = None) -> None:
        """Raise :class:`~slug_pl.edit.EditMismatchError` unless ``model`` is the base the patch
        was computed for (see the module docstring); touches nothing."""
        targets = self._targets(model, name_map)
        if any(not _holds(p, e.original) for e, _, p in targets) and all(_holds(p, e.edited) for e, _, p in targets):
            raise EditMismatchError(f"{self.source}: the model carries this patch already (revert it first)")
        for e, name, p in targets:
            if not _holds(p, e.original):
                raise EditMismatchError(
                    f"{self.source}: entry {e.name!r}: the model's {name!r} ({p.dtype}) is not the original this "
                    f"patch edits: it was computed for other weights ({_describe_base(self.config)})")
        if name_map is None and self.base_sha256:
            actual = weights_fingerprint(model)
            if actual != self.base_sha256:
                dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
                raise EditMismatchError(
                    f"{self.source}: the model's weights (SHA-256 {actual[:12]}…, {', '.join(dtypes)}) are not the "
                    f"base this patch was computed for (SHA-256 {self.base_sha256[:12]}…, "
                    f"{_describe_base(self.config)}, float32 as slug_pl loads it); every edited tensor matches, so "
                    f"the model differs elsewhere. Load the base model in float32, or apply to a model that embeds "
                    f"one tower with name_map")

    @torch.no_grad()
    def apply(self, model: nn.Module, name_map: NameMap | None = None) -> nn.Module:
        """Edit ``model`` in place after :meth:`check_base` (every tensor or none); returns it.
        ``name_map``: for a model that embeds one tower of the CLIP (module docstring)."""
        self.check_base(model, name_map)
        displaced = {}
        for e, name, p in self._targets(model, name_map):
            displaced[name] = p.detach().clone()
            p.copy_(e.edited.to(p.device, p.dtype))
        self._displaced[model] = displaced
        return model

    @torch.no_grad()
    def revert(self, model: nn.Module, name_map: NameMap | None = None) -> nn.Module:
        """Restore the tensors the patch edited: exactly as they were when this patch applied
        them, else its originals (in the model's dtype). Refused unless the model carries the
        patch."""
        targets = self._targets(model, name_map)
        for e, name, p in targets:
            if not _holds(p, e.edited):
                raise EditMismatchError(f"{self.source}: entry {e.name!r}: the model's {name!r} does not hold this "
                                        f"patch's edit (was it applied?); nothing was reverted")
        displaced = self._displaced.pop(model, {})
        for e, name, p in targets:
            p.copy_(displaced.get(name, e.original).to(p.device, p.dtype))
        return model

    @contextmanager
    def applied(self, model: nn.Module, name_map: NameMap | None = None) -> Iterator[nn.Module]:
        """``model`` edited inside the block, restored on leaving it (also on an error)."""
        self.apply(model, name_map)
        try:
            yield model
        finally:
            self.revert(model, name_map)


def _describe_base(config: Mapping[str, object]) -> str:
    model = config.get("model")
    if not isinstance(model, Mapping):
        return "base model not recorded"
    weights = model.get("pretrained", model.get("revision"))
    return f"{model.get('family')} model {model.get('model_name')}" + (f", {weights}" if weights else "")
