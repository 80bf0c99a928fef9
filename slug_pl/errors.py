"""How ``slug-pl`` reports a failure: an anticipated error as one line that names the problem.

*Anticipated* errors are those a user's input or machine causes: a bad config value or key, a
missing or unreadable file, a run that would overwrite another, data that does not fit the model
(:data:`ANTICIPATED`; slug_pl's own error types — ``ShardError``, ``GradientFileError``,
``EditMismatchError``, ``ResumeError``, ``TargetMismatchError``, … — are ``ValueError`` s). The
command prints them as its last line, ``slug-pl <command>: error: <message>``, and exits with
status 2; the traceback only with ``--debug`` (or ``SLUG_PL_DEBUG=1``). Any other exception is a
bug and keeps its traceback.

Config errors come out of jsonargparse as nested text (``Parser key "data": Does not validate
against any of the Union subtypes … Given value: Namespace(…)``), and an error raised inside a
class's ``__init__`` while the config is instantiated arrives wrapped in such an error (the
original is its ``__cause__``). :func:`original_error` finds the original;
:func:`explain_parse_error` turns a parse error into ``<key>: <problem>`` with "did you mean"
where a close name exists.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import re
import traceback
from collections.abc import Iterable
from pathlib import Path

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException

#: Exit status of a command stopped by an anticipated error (as argparse uses for bad usage).
EXIT_ERROR = 2

#: Exception types reported as one line (see the module docstring).
ANTICIPATED: tuple[type[BaseException], ...] = (
    ValueError,  # bad values; every slug_pl error type (ShardError, GradientFileError, ...)
    OSError,  # FileNotFoundError, FileExistsError, PermissionError, a full disk
    FloatingPointError,  # NaN/inf weights or gradients
    MisconfigurationException,  # Lightning: e.g. accelerator gpu on a machine without one
    torch.OutOfMemoryError,
)


class ConfigError(ValueError):
    """A command line or config file that does not parse: unknown key, wrong type, no such class."""


def one_line(text: str) -> str:
    """``text`` with every run of whitespace (newlines included) as one space."""
    return " ".join(str(text).split())


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` for the choice closest to ``word`` (case-insensitive), or ``""``."""
    choices = [c for c in dict.fromkeys(choices) if c != word]
    by_fold = {c.casefold(): c for c in choices}
    close = difflib.get_close_matches(word.casefold(), list(by_fold), n=1, cutoff=0.6)
    return f" (did you mean {by_fold[close[0]]!r}?)" if close else ""


def _raised_by_jsonargparse(err: BaseException) -> bool:
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and "jsonargparse" in Path(frames[-1].filename).parts


def original_error(err: BaseException) -> BaseException | None:
    """The first exception in ``err``'s ``__cause__`` chain that jsonargparse did not raise (the
    error of a class's ``__init__``, say), or None when every link is jsonargparse's own."""
    seen: BaseException | None = err
    while seen is not None:
        if not _raised_by_jsonargparse(seen):
            return seen
        seen = seen.__cause__
    return None


# -- parse errors ------------------------------------------------------------------------------

_PARSER_KEY = re.compile(r'^Parser key "([^"]+)":\s*(.*)$')
_CLASS_PATH = re.compile(r"^Problem with given class_path '([^']+)':")
_UNION = "Does not validate against any of the Union subtypes"
_SUBTYPES = re.compile(r"^\s*Subtypes: \[(.*)\]\s*$", re.MULTILINE)
_CLASS_REPR = re.compile(r"<class '([\w.]+)'>")
_NOT_ACCEPTED = re.compile(r"^Option '([^']+)' is not accepted")
_SUBCOMMAND_KEY = re.compile(r"^Subcommand '([^']+)' does not accept option '([^']+)'")
_GROUP_KEY = re.compile(r"^Group '([^']+)' does not accept option '([^']+)'")
_NO_ATTRIBUTE = re.compile(r"^module '([\w.]+)' has no attribute '(\w+)'")
_UNRECOGNIZED = re.compile(r"^unrecognized arguments: (.*)$")
_EXPECTED = re.compile(r"^Expected a (.+?)\. Got value: (.*)$")
_REQUIRED = "the following arguments are required"


def _import(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def accepted_keys(class_path: str) -> list[str]:
    """The config keys a class (or dataclass) accepts: its ``__init__`` parameters / fields."""
    try:
        cls = _import(class_path)
    except (ImportError, AttributeError, ValueError):
        return []
    if dataclasses.is_dataclass(cls):
        return [f.name for f in dataclasses.fields(cls)]
    try:
        params = inspect.signature(cls.__init__).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _short_type(text: str) -> str:
    return _CLASS_REPR.sub(lambda m: m.group(1).rsplit(".", 1)[-1], text)


def _option_strings(parser) -> list[str]:
    return [s for action in getattr(parser, "_actions", []) for s in action.option_strings if s.startswith("--")]


def _dests(parser) -> list[str]:
    return [action.dest for action in getattr(parser, "_actions", []) if action.dest]


def explain_parse_error(message: str, cause: BaseException | None = None, parser=None) -> str:
    """One line for a jsonargparse parse error: ``<key path>: <problem>[ (did you mean …?)]``.

    ``message`` is the parser's error text, ``cause`` the exception it came from (its ``__cause__``
    chain holds the nested keys and classes down to the problem), ``parser`` the parser that
    failed (for the option names of an unknown option).
    """
    keys: list[str] = []
    classes: list[str] = []  # class paths along the chain, outermost first
    union: list[str] = []  # the innermost union's member classes
    leaf = message.strip()
    link = cause
    while link is not None:
        text = str(link).strip()
        if text:
            first = text.splitlines()[0].strip()
            key = _PARSER_KEY.match(first)
            if key:
                if not keys or keys[-1] != key.group(1):
                    keys.append(key.group(1))
                first = key.group(2).strip()
            if (cls := _CLASS_PATH.match(first)) is not None:
                classes.append(cls.group(1))
            if first.startswith(_UNION) or (first == "" and _UNION in text):
                subtypes = _SUBTYPES.search(text)
                if subtypes:
                    union = [c for c in _CLASS_REPR.findall(subtypes.group(1)) if c != "NoneType"]
            if first:
                leaf = first
        link = link.__cause__
    if cause is None:
        leaf = leaf.splitlines()[0] if leaf else leaf
        if (key := _PARSER_KEY.match(leaf)) is not None:
            keys, leaf = [key.group(1)], key.group(2)
    where = ".".join(keys)
    problem = _explain_leaf(leaf, classes, union, parser)
    if (m := _IMPORT_PATH.match(problem)) is not None and where.rsplit(".", 1)[-1] in MAPPING_OPTIONS:
        problem = f"expected {MAPPING_OPTIONS[where.rsplit('.', 1)[-1]]}, got {m.group(1)!r}"
    return f"{where}: {problem}" if where else problem


#: Options whose value is a small mapping (a dataclass), and what to write there: a value of
#: another shape (an old config's ``true``, a bare tolerance) otherwise reads as a bad import path.
MAPPING_OPTIONS = {"protect_retained": "{tolerance, limit} (e.g. {tolerance: 0.05}; each may be left out) or null (off)"}
_IMPORT_PATH = re.compile(r"^(?:Expected a dot import path string|Unexpected import path format|"
                          r"Not a valid subclass of \w+, got): (.*)$")


_FORGET_TARGET = "the forget target is set once for every method, in the top-level section forget_target"
_RETAIN_PROJECTION = ("the retain projection moved to model.protect_retained, an option of the method (null: off; "
                      "the target says what it protects)")

#: Keys that moved: where they are now and why (an old config names them; say where they went).
MOVED_KEYS = {"target_metric": ("forget_target.metric", _FORGET_TARGET),
              "target_value": ("forget_target.value", _FORGET_TARGET),
              "protect_retained": ("model.init_args.protect_retained", _RETAIN_PROJECTION),
              "protect_tolerance": ("model.init_args.protect_retained.tolerance", _RETAIN_PROJECTION),
              "protect_images": ("model.init_args.protect_retained.limit", _RETAIN_PROJECTION)}


def _moved(key: str) -> str:
    """``: <why> (write <new key> there, ...)`` when ``key`` (or its last part) is a key that
    moved, else ""."""
    name = key.rsplit(".", 1)[-1]
    if name not in MOVED_KEYS:
        return ""
    where, why = MOVED_KEYS[name]
    return f": {why} (write {where} there, or --{where})"


def _explain_leaf(leaf: str, classes: list[str], union: list[str], parser) -> str:
    if (m := _NOT_ACCEPTED.match(leaf)) is not None:
        owners = union if len(union) > 1 else classes[-1:]
        keys = [k for c in owners for k in accepted_keys(c)]
        owner = f" of {owners[0].rsplit('.', 1)[-1]}" if len(owners) == 1 else ""
        return f"unknown key {m.group(1)!r}{owner}{_moved(m.group(1)) or did_you_mean(m.group(1), keys)}"
    for pattern in (_SUBCOMMAND_KEY, _GROUP_KEY):
        if (m := pattern.match(leaf)) is not None:
            sub = getattr(parser, "_subcommands_action", None)
            subparser = sub._name_parser_map.get(m.group(1)) if sub is not None and pattern is _SUBCOMMAND_KEY else parser
            return f"unknown key {m.group(2)!r}{_moved(m.group(2)) or did_you_mean(m.group(2), _dests(subparser))}"
    if (m := _NO_ATTRIBUTE.match(leaf)) is not None:
        try:
            names = [n for n, v in vars(importlib.import_module(m.group(1))).items() if inspect.isclass(v)]
        except ImportError:
            names = []
        return f"no class {m.group(2)!r} in module {m.group(1)}{did_you_mean(m.group(2), names)}"
    if (m := _UNRECOGNIZED.match(leaf)) is not None:
        options = [w for w in m.group(1).split() if w.startswith("--")]
        known = _option_strings(parser)
        hints = "".join(did_you_mean(o.split("=", 1)[0], known) for o in options)
        return f"unrecognized arguments: {m.group(1)}{hints}"
    leaf = _short_type(leaf)
    if (m := _EXPECTED.match(leaf)) is not None:
        return f"expected {m.group(1)}, got {m.group(2)!r}"
    if leaf.startswith(_REQUIRED):
        return f"{leaf}; give them in a --config file or as options"
    return one_line(leaf.replace(". Got value: ", ", got: "))


def error_message(err: BaseException) -> str:
    """The one-line message of an anticipated error (slug_pl's messages name the file or option
    and the fix; the exception type adds nothing for a user)."""
    return one_line(str(err)) or type(err).__name__
