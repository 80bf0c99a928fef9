"""The model card of an edited model: what changed, what the edit did, how forgetting was
checked, and how to undo it.

Every saved edited model (a CLIP's ``edited_model/``, a downstream model's ``edited_<target>/``,
a shared patch folder) carries a ``README.md`` in the Hugging Face model card format: YAML front
matter (``base_model`` when it is a hub id, ``library_name``, the tags ``slug`` and
``machine-unlearning``) and markdown:

- **What changed**: each edited tensor, its step and relative change, the concepts it removes;
- **Before / after**: the run's table (``summary.json``; the report's own table);
- **How forgetting was verified**: on which images (validation, held-out test), whether the
  target held, and which judge measured it (the CLIP's zero-shot classification, and a downstream
  model's own judges when the run had one);
- **Departures**: where the run departed from the authors' SLUG, and whether the change was kept
  off what must stay (the retain projection, ``model.protect_retained``), as the summary records
  them;
- **Provenance** (base model, revision, the SHA-256 of the base weights, slug_pl version),
  **Use** (loading it with its own library) and **Reverting**.

:func:`model_card` composes the text from a run's summary and its edit file's metadata;
:func:`write_model_card` writes it into a saved model's folder, reading from the folder which
library loads it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

from slug_pl.atomic import write_text
from slug_pl.markdown import table
from slug_pl.record import before_after_section, verdict_line
from slug_pl.safety import read_descriptor

CARD_FILE = "README.md"
TAGS = ("slug", "machine-unlearning")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def model_card(summary: Mapping | None, edit_meta: Mapping, *, base_model: str | None = None,
               library: str | None = None, usage: str | None = None) -> str:
    """The card (markdown with YAML front matter) of a model carrying the edit described by
    ``edit_meta`` (an edit file's metadata), measured as ``summary`` records (None: the patch came
    without its run record). ``base_model``: the model that was edited (default: the CLIP of
    ``edit_meta``; a downstream target's model for its saved copy); ``library``: the library that
    loads it; ``usage``: Python that loads it."""
    model = edit_meta.get("model") if isinstance(edit_meta.get("model"), Mapping) else {}
    base = base_model or str(model.get("model_name", "the base model"))
    concepts = [str(c) for c in edit_meta.get("concepts", [])]
    method = str(edit_meta.get("method", "slug"))
    lines = _front_matter(base, library)
    lines += [f"# {base}, with {_and(concepts) or 'a concept'} unlearned", "",
              f"`{base}` with {_count(edit_meta)} edited by {_method_name(method)} so that it no longer "
              f"recognizes {_and(concepts) or 'the forgotten concept'}. Every other tensor is the base model's, "
              f"bit for bit.", ""]
    lines += _what_changed(edit_meta, method)
    if summary is not None:
        lines += before_after_section(summary, summary["before"], summary["after"])
    lines += _verification(summary)
    lines += _departures(summary)
    lines += _provenance(edit_meta, model, method, base)
    if usage:
        lines += ["## Use", "", "```python", usage.rstrip(), "```", ""]
    lines += _reverting()
    return "\n".join(lines)


def write_model_card(folder: str | os.PathLike, summary: Mapping | None, edit_meta: Mapping,
                     base_model: str | None = None) -> Path:
    """Write :func:`model_card` as ``folder/README.md``, replacing the card a copied model folder
    brought from its base (it describes the base, not the edit). The library and the loading
    code are read from the folder: a diffusers pipeline (``model_index.json``), a transformers
    model (``config.json``), an open_clip model (``open_clip_config.json``)."""
    folder = Path(folder)
    library, usage = _loader(folder)
    card = model_card(summary, edit_meta, base_model=base_model, library=library, usage=usage)
    return write_text(folder / CARD_FILE, card, overwrite=True)


def _loader(folder: Path) -> tuple[str | None, str | None]:
    """The library that loads the saved model in ``folder`` and the Python that does it."""
    name = folder.name
    if (folder / "model_index.json").is_file():
        cls = _class_name(read_descriptor(folder / "model_index.json", "pipeline index").get("_class_name"),
                          "DiffusionPipeline")
        return "diffusers", f'from diffusers import {cls}\n\npipe = {cls}.from_pretrained("{name}")'
    if (folder / "open_clip_config.json").is_file():
        return "open_clip", (f'import open_clip\n\nmodel, _, preprocess = open_clip.create_model_and_transforms('
                             f'"local-dir:{name}")\ntokenizer = open_clip.get_tokenizer("local-dir:{name}")')
    if (folder / "config.json").is_file():
        architectures = read_descriptor(folder / "config.json", "model config").get("architectures") or []
        cls = _class_name(architectures[0] if isinstance(architectures, list) and architectures else None,
                          "AutoModel")
        return "transformers", f'from transformers import {cls}\n\nmodel = {cls}.from_pretrained("{name}")'
    return None, None


def _class_name(value: object, default: str) -> str:
    """A class name read from a config, if it is one (a config is data: anything else is ignored)."""
    return value if isinstance(value, str) and _IDENTIFIER.fullmatch(value) else default


def _front_matter(base: str, library: str | None) -> list[str]:
    lines = ["---"]
    if _is_hub_id(base):
        lines.append(f"base_model: {json.dumps(base)}")
    if library:
        lines.append(f"library_name: {json.dumps(library)}")
    return lines + ["tags:", *(f"- {tag}" for tag in TAGS), "---", ""]


def _is_hub_id(name: str) -> bool:
    """A hub repository id (``owner/name``), not a local path."""
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) is not None


def _and(items: list[str]) -> str:
    return ", ".join(items[:-1]) + " and " + items[-1] if len(items) > 1 else "".join(items)


def _count(edit_meta: Mapping) -> str:
    n = len(edit_meta.get("layers", {}))
    return "one tensor" if n == 1 else f"{n} tensors"


def _method_name(method: str) -> str:
    return "SLUG (Single Layer Unlearning Gradient)" if method == "slug" else f"the unlearning method `{method}`"


def _number(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else "–"


def _what_changed(edit_meta: Mapping, method: str) -> list[str]:
    rows = []
    for name, info in edit_meta.get("layers", {}).items():
        info = info if isinstance(info, Mapping) else {}
        steps = info.get("steps")
        step = _number(info.get("step")) + (f" (sum of {', '.join(_number(s) for s in steps)})"
                                            if isinstance(steps, list) and len(steps) > 1 else "")
        rows.append([f"`{name}`", info.get("tower", "–"), step, _number(info.get("relative_change")),
                     ", ".join(str(c) for c in info.get("concepts", [])) or "–"])
    lines = ["## What changed", "", *table(["tensor", "tower", "step λ", "relative change ‖Δ‖/‖θ‖", "concepts"], rows),
             ""]
    if method == "slug":
        lines += ["Each edit is θ ← θ − λ·g, g the gradient of the forget set's mean image–text similarity.", ""]
    return lines


def _downstream_blocks(summary: Mapping) -> list[tuple[str, Mapping]]:
    """The run's downstream-model blocks (``generation``, ``vqa``, ...): those recording what was
    transplanted."""
    return [(key, block) for key, block in summary.items() if isinstance(block, Mapping) and "transplanted" in block]


def _judges(block: Mapping) -> str:
    if isinstance(block.get("judges"), Mapping) and block["judges"]:
        return ", ".join(f"`{name}`" for name in block["judges"])
    for key in ("judge", "classifier"):
        if block.get(key):
            return f"`{block[key]}`"
    return "its own measurement"


def _verification(summary: Mapping | None) -> list[str]:
    lines = ["## How forgetting was verified", ""]
    if summary is None:
        return lines + ["This patch came without its run record (`summary.json`): nothing here says how well it "
                        "forgets. Measure it with `slug-pl test --model.edit` before relying on it.", ""]
    where = "held-out test images" if summary.get("evaluated_on") == "test" else "validation images only"
    verdict = verdict_line(summary)
    lines += [f"- {verdict[0].upper()}{verdict[1:]}.",
              f"- The before/after table is measured on {where}, by zero-shot classification with the CLIP: an "
              f"image counts as recognized when its class is among the most similar class prompts."]
    for key, block in _downstream_blocks(summary):
        rule = block.get("target") or block.get("verdict")
        verdict = (f"; its target `{rule['rule']}` was {'met' if rule.get('met') else 'NOT met'}"
                   if isinstance(rule, Mapping) and "rule" in rule else "")
        lines.append(f"- The downstream model (`{key}` in `summary.json`) was judged by {_judges(block)}{verdict}.")
    return lines + [""]


def _departures(summary: Mapping | None) -> list[str]:
    if summary is None:
        return []
    method = summary.get("method", {})
    rows = [[d.get("name"), d.get("value"), d.get("authors")] for d in method.get("departures", [])
            if isinstance(d, Mapping) and not d.get("follows_authors", True)]
    projection = method.get("retain_projection")
    if not rows and not isinstance(projection, Mapping):
        return []
    lines = ["## Departures from the authors' SLUG", ""]
    if rows:
        lines += [*table(["what", "this run", "the authors' code"], rows), ""]
    if isinstance(projection, Mapping):
        inputs = "; ".join(f"{p.get('inputs')} {p.get('kind')} of the {p.get('tower')} tower "
                           f"(tolerance {_plain(p.get('tolerance'))})" for p in projection.get("protected", []))
        lines += [f"- `model.protect_retained`, {projection.get('departure')}: {projection.get('how')}, off what "
                  f"the retained inputs feed each tensor ({inputs}).", ""]
    return lines


def _plain(value: object) -> str | None:
    """A scalar or a list of scalars as text; None for anything else (tables, records)."""
    if isinstance(value, (str, int, float)):
        return str(value)
    if isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
        return ", ".join(str(v) for v in value)
    return None


def _provenance(edit_meta: Mapping, model: Mapping, method: str, base: str) -> list[str]:
    """Where the edit comes from: the CLIP it was computed on (``model``), its weights' hash, and
    the model it was copied into when that is another one (``base``)."""
    clip = str(model.get("model_name", "–"))
    rows = [] if base == clip else [["edited model", f"`{base}`, carrying the edit of the CLIP below"]]
    rows.append(["CLIP the edit was computed on", f"`{clip}` ({model.get('family', '–')})"])
    unset = {"revision": "not pinned (the SHA-256 below identifies the weights)",
             "pretrained": "none (random initialization)"}
    for key, meaning in unset.items():
        if key in model:
            rows.append([key, meaning if model[key] in (None, "None") else f"`{model[key]}`"])
    rows += [["SHA-256 of the CLIP's weights before the edit", f"`{edit_meta.get('base_sha256', 'not recorded')}`"],
             ["method", method],
             ["concepts", ", ".join(str(c) for c in edit_meta.get("concepts", [])) or "–"],
             ["forget target", f"`{edit_meta.get('target', '–')}`"],
             ["slug_pl", str(edit_meta.get("slug_pl_version", "–"))]]
    return ["## Provenance", "", *table(["", ""], rows), ""]


def _reverting() -> list[str]:
    return ["## Reverting", "",
            "Only the tensors above differ from the base model: load the base model to undo the edit, or revert it "
            "in place with the run's `edit.safetensors`, which holds each tensor's original:", "",
            "```python", "from slug_pl.patch import SlugPatch, embedded_tower", "",
            'patch = SlugPatch.from_file("edit.safetensors")',
            "patch.revert(model)  # a model that embeds one CLIP tower: name_map=embedded_tower(model)", "```", ""]
