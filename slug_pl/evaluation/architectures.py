"""The classifier architectures a checkpoint file may ask for (an allow-list, with typed
arguments), and its weights (safetensors only).

A classifier checkpoint (a judge's ``classifier.json``, an UnlearnCanvas classifier's JSON) is a
downloaded file, so its description of the network is data: a library, an architecture name and
keyword arguments. Nothing is imported by a name the file supplies; the name is looked up in one
of these tables and the arguments are checked against the types the table gives:

- ``"slug_pl"``: the project's own classifier classes (:data:`PROJECT_CLASSIFIERS`) and classes
  registered by Python code with :func:`register_classifier` (code the user runs, not a file the
  user downloads). Each argument must be a parameter of the class annotated ``int``, ``float``,
  ``bool`` or ``str``, and the value must have that type. ``"python"`` is read as ``"slug_pl"``
  (the name earlier versions wrote; it too only looks the class up).
- ``"timm"``: ``timm.create_model(name, pretrained=False, num_classes=...)`` for a name timm
  knows (``vit_large_patch16_224``, optionally with a pretrained tag, ``.augreg_in21k``; no
  ``hf-hub:`` or ``local-dir:`` prefix), arguments from :data:`TIMM_ARGUMENTS`.
- ``"torchvision"``: ``torchvision.models.get_model(name, weights=None, num_classes=...)`` for a
  name of ``torchvision.models.list_models()``, arguments from :data:`TORCHVISION_ARGUMENTS`.

Nothing is downloaded (no pretrained weights, no remote configs); the weights come from a
safetensors file afterwards (:func:`load_weights`). A torch pickle (``.pth``, ``.pt``) is
converted once, on a trusted machine, by ``slug-pl convert-checkpoint``
(:mod:`slug_pl.convert`).
"""

from __future__ import annotations

import importlib
import inspect
import re
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

#: The project's classifier classes: the name a checkpoint gives -> (module, class) in slug_pl.
PROJECT_CLASSIFIERS: dict[str, tuple[str, str]] = {
    "slug_pl.demo.sd.WorldClassifier": ("slug_pl.demo.sd", "WorldClassifier"),
    "slug_pl.demo.canvas.CanvasCNN": ("slug_pl.demo.canvas", "CanvasCNN"),
}

#: Keyword arguments a checkpoint may give ``timm.create_model``: name -> type, or the allowed
#: values. (Not ``pretrained``, ``checkpoint_path``, ``pretrained_cfg*`` or ``cache_dir``: those
#: download or unpickle.)
TIMM_ARGUMENTS: dict[str, type | tuple] = {
    "img_size": int, "patch_size": int, "in_chans": int, "drop_rate": float, "drop_path_rate": float,
    "global_pool": ("", "avg", "max", "avgmax", "catavgmax", "token", "map"),
}
#: Keyword arguments a checkpoint may give ``torchvision.models.get_model``.
TORCHVISION_ARGUMENTS: dict[str, type | tuple] = {"dropout": float}

LIBRARIES = ("slug_pl", "timm", "torchvision")
_ALIASES = {"python": "slug_pl"}
_PLAIN_TYPES = (int, float, bool, str)

_registered: dict[str, type[nn.Module]] = {}


def register_classifier(name: str, cls: type[nn.Module]) -> None:
    """Let checkpoints name ``cls`` as ``name`` (library ``"slug_pl"``). For Python code the user
    runs (a test, an extension); a checkpoint file can only name what is registered."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_classifier({name!r}, ...) needs an nn.Module class, got {cls!r}")
    if _registered.get(name, cls) is not cls or name in PROJECT_CLASSIFIERS:
        raise ValueError(f"a classifier class is already registered as {name!r}")
    _registered[name] = cls


@dataclass(frozen=True)
class ArchSpec:
    """A checkpoint's network description: ``library`` (one of :data:`LIBRARIES`), ``name`` and
    keyword ``arguments``; ``source`` names the file it came from (for error messages)."""

    library: str
    name: str
    arguments: Mapping[str, Any] = field(default_factory=dict)
    source: str = "classifier checkpoint"

    @classmethod
    def from_record(cls, record: Any, source: str) -> ArchSpec:
        """The spec of an ``arch`` record ``{"library", "name", "kwargs"}`` read from ``source``."""
        if not isinstance(record, Mapping):
            raise ValueError(f"{source}: arch must be an object {{\"library\", \"name\", \"kwargs\"}}, "
                             f"got {record!r}")
        unknown = sorted(set(record) - {"library", "name", "kwargs"})
        if unknown:
            raise ValueError(f"{source}: arch has unknown keys {unknown}; it takes library, name, kwargs")
        library = _ALIASES.get(record.get("library"), record.get("library"))
        return cls(library, record.get("name"), record.get("kwargs", {}), source)


def build_classifier(spec: ArchSpec, num_classes: int | None = None) -> nn.Module:
    """A randomly initialized network of ``spec`` (with ``num_classes`` outputs when given; else
    the arguments say it). ValueError naming the file and the entry when ``spec`` asks for
    anything outside the allow-list."""
    if spec.library not in LIBRARIES:
        raise ValueError(f"{spec.source}: arch library {spec.library!r} is not one of {list(LIBRARIES)}; "
                         f"a checkpoint names an architecture, never code to import")
    if not isinstance(spec.name, str):
        raise ValueError(f"{spec.source}: arch name must be a string, got {spec.name!r}")
    if not isinstance(spec.arguments, Mapping):
        raise ValueError(f"{spec.source}: arch kwargs must be an object, got {spec.arguments!r}")
    if num_classes is not None and "num_classes" in spec.arguments:
        raise ValueError(f"{spec.source}: arch kwargs set num_classes, which the class list decides")
    extra = {} if num_classes is None else {"num_classes": int(num_classes)}
    builder, allowed = _LIBRARY_BUILDERS[spec.library](spec)
    arguments = _checked_arguments(spec, allowed)
    try:
        return builder(**arguments, **extra)
    except TypeError as err:  # an allowed argument this architecture does not take
        raise ValueError(f"{spec.source}: {spec.library} architecture {spec.name!r} does not accept "
                         f"the arguments {sorted(arguments)}: {err}") from err


def _checked_arguments(spec: ArchSpec, allowed: Mapping[str, type | tuple]) -> dict[str, Any]:
    out = {}
    for key, value in spec.arguments.items():
        if key not in allowed:
            raise ValueError(f"{spec.source}: arch kwargs {key!r} is not an argument a checkpoint may "
                             f"give {spec.library} {spec.name!r}; allowed: {sorted(allowed)}")
        kind = allowed[key]
        if isinstance(kind, tuple):
            ok = isinstance(value, str) and value in kind
        elif kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, kind)
        if not ok:
            expected = f"one of {list(kind)}" if isinstance(kind, tuple) else kind.__name__
            raise ValueError(f"{spec.source}: arch kwargs {key!r} must be {expected}, got {value!r}")
        out[key] = value
    return out


def _project_class(spec: ArchSpec) -> tuple[Callable[..., nn.Module], dict[str, type]]:
    if spec.name in _registered:
        cls = _registered[spec.name]
    elif spec.name in PROJECT_CLASSIFIERS:
        module, attr = PROJECT_CLASSIFIERS[spec.name]  # slug_pl's own code, named here
        cls = getattr(importlib.import_module(module), attr)
    else:
        known = sorted({*PROJECT_CLASSIFIERS, *_registered})
        raise ValueError(f"{spec.source}: {spec.name!r} is not a slug_pl classifier class (known: {known}); "
                         f"a checkpoint names an allowed architecture, never code to import. Use timm or "
                         f"torchvision architectures by name, or register your class with "
                         f"slug_pl.evaluation.architectures.register_classifier in your own code")
    return cls, _plain_parameters(cls)


def _plain_parameters(cls: type) -> dict[str, type]:
    """``cls.__init__``'s parameters annotated with a plain type (int, float, bool, str)."""
    hints = typing.get_type_hints(cls.__init__)
    names = inspect.signature(cls.__init__).parameters
    return {n: hints[n] for n in names if hints.get(n) in _PLAIN_TYPES}


def _timm(spec: ArchSpec) -> tuple[Callable[..., nn.Module], Mapping[str, type | tuple]]:
    import timm

    if not re.fullmatch(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)?", spec.name) or not timm.is_model(spec.name):
        raise ValueError(f"{spec.source}: arch name {spec.name!r} is not a timm architecture "
                         f"(timm.list_models(); a name, optionally with a .tag, no hub prefix)")
    return (lambda **kw: timm.create_model(spec.name, pretrained=False, **kw)), TIMM_ARGUMENTS


def _torchvision(spec: ArchSpec) -> tuple[Callable[..., nn.Module], Mapping[str, type | tuple]]:
    import torchvision

    if spec.name not in torchvision.models.list_models():
        raise ValueError(f"{spec.source}: arch name {spec.name!r} is not a torchvision architecture "
                         f"(torchvision.models.list_models())")
    return (lambda **kw: torchvision.models.get_model(spec.name, weights=None, **kw)), TORCHVISION_ARGUMENTS


def load_weights(module: nn.Module, path: str | Path, source: str) -> None:
    """Load ``module``'s weights from the safetensors file ``path`` (named by ``source``).
    ValueError naming both when ``path`` is not safetensors (with the converter command) or its
    tensors do not fit the module."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{source}: weights {path.name} are not a .safetensors file; slug_pl never unpickles "
                         f"a downloaded checkpoint. Convert it once on a trusted machine: slug-pl "
                         f"convert-checkpoint {path} (writes {path.with_suffix('.safetensors').name}), "
                         f"then name that file instead")
    try:
        module.load_state_dict(load_file(str(path)))
    except SafetensorError as err:
        raise ValueError(f"{source}: weights {path} are not a readable safetensors file: {err}") from err
    except RuntimeError as err:
        raise ValueError(f"{source}: weights {path} do not fit the architecture it describes: "
                         f"{' '.join(str(err).split())}") from err


_LIBRARY_BUILDERS = {"slug_pl": _project_class, "timm": _timm, "torchvision": _torchvision}
