"""The run record: what every method leaves in ``lightning_logs/version_N/``, method-agnostic.

A method (SLUG or a baseline) hands this module its measurements and its own report sections;
this module writes them the same way for every method:

- ``summary.json``: the machine-readable record (schema below), identical in shape for every
  method except the ``method`` block;
- ``report.md``: a first paragraph that says whether the forget target was met on validation
  and whether forgetting holds on held-out images (and, if not, what to change), the before/after
  table (with membership inference), the method's own sections, the cost, the files;
- ``edit.safetensors``: the changed tensors only, old and new (:mod:`slug_pl.edit`);
- figures as PNG (written atomically) and in TensorBoard; hparams with before/after metrics.

``summary.json`` (accuracies are fractions in [0, 1]; MIA in %)::

    {"schema": 2,
     "method": {"name": "slug", ...method-specific: edits, search settings, selected epoch...},
     "concepts": [...], "model": {...the family's describe()...},
     "target": {"rule": "forget_top5 <= 0", "metric": "forget_top5", "value": 0.0,
                "met": true,                       # on validation (decides the step / epoch)
                "held_out": {"met": false, "value": 0.333, "images": 15} | null},
     "validation": {...metrics of the result on validation...},
     "evaluated_on": "test" | "validation",
     "before": {...}, "after": {...},              # on ``evaluated_on``
     "per_concept": {"<concept>": {...after...}},
     "mia": {"before": {"mean", "std", "n"}, "after": {...}} (when available),
     "cost": {"wall_s", "gradient_evals", "evaluations", "peak_mem_mb", "edit_bytes"},
     "timings_s": {...}, "memory": {...},
     "devices": {"pass": "cuda:0", "after_pass": "cuda:0", "evaluation": "cuda:0",
                 "downstream": "cuda:0", "precision": "bf16-mixed"}}
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from slug_pl.atomic import atomic_output, refuse_existing, write_text
from slug_pl.edit import LayerEdit, save_edits
from slug_pl.gradients import save_tensors
from slug_pl.markdown import pct, table

if TYPE_CHECKING:  # annotations only: the record is written from what the search and the evaluation
    # found, and the step search reports its metrics through this module (no import cycle)
    from slug_pl.evaluation.final import BeforeAfter
    from slug_pl.step_search import ForgetTarget

SCHEMA_VERSION = 2
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.md"
EDIT_FILE = "edit.safetensors"
SKIPPED_FILE = "skipped_samples.json"
SEARCH_FILE = "search.csv"
SELECTION_FILE = "selection.csv"
#: The edited CLIP in its own library's format (:meth:`RunRecord.edited_model`).
EDITED_MODEL = "edited_model"
#: The gradients of a SLUG pass, one file per set, with the skipped samples beside them
#: (:mod:`slug_pl.skip_list`).
GRADIENT_FILES = ("gradients/forget.safetensors", "gradients/retain.safetensors", "gradients/skipped_*.jsonl")

#: Every file and folder a run may write into its folder (glob patterns; ``_<concept>`` suffixes of
#: a several-concept run and a downstream target's ``edited_<name>/`` and figures included). Before
#: any work a run refuses a folder holding one of them (:func:`check_free`): nothing is ever
#: written over an earlier run's record.
RUN_ARTIFACTS = (SUMMARY_FILE, REPORT_FILE, EDIT_FILE, "similarity.png", SKIPPED_FILE, "ranking*.csv",
                 "pareto_*.png", SEARCH_FILE, SELECTION_FILE, "edited_*", "*_grid.png", "unlearncanvas.csv",
                 *GRADIENT_FILES)


#: The headline metrics of a result (fractions), in the order the record and the logs show them;
#: add a key here to report it in ``summary.json``'s metric blocks.
CORE = ("forget_top1", "forget_top5", "retain_top1", "utility_top1")


def core_metrics(metrics: dict[str, float], keys: Sequence[str] = CORE) -> dict[str, float]:
    """The headline metrics of a result (those of ``keys`` it has), in a fixed order."""
    return {k: metrics[k] for k in keys if k in metrics}


def format_metrics(metrics: dict[str, float]) -> str:
    """``metrics`` as one log line: ``name=0.123, ...`` (three decimals, in the dict's order)."""
    return ", ".join(f"{k}={v:.3f}" for k, v in metrics.items())


def check_free(run_dir: str | Path, reusing_gradients: bool = False) -> None:
    """Raise :class:`FileExistsError` naming the first artifact of :data:`RUN_ARTIFACTS` already in
    ``run_dir`` (a run reusing an earlier run's gradients keeps its own ``gradients/`` out of it)."""
    run_dir = Path(run_dir)
    for pattern in RUN_ARTIFACTS:
        if reusing_gradients and pattern in GRADIENT_FILES:
            continue
        for path in sorted(run_dir.glob(pattern)):
            refuse_existing(path)


def read_verdict(run_dir: str | Path) -> bool | None:
    """Whether the finished run in ``run_dir`` met its forget target on validation (its
    ``summary.json``); None when it wrote no summary."""
    path = Path(run_dir) / SUMMARY_FILE
    if not path.is_file():
        return None
    return bool(json.loads(path.read_text(encoding="utf-8"))["target"]["met"])


def held_out_verdict(target: ForgetTarget, result: BeforeAfter, downstream: dict | None = None,
                     downstream_images: int | None = None) -> dict | None:
    """Whether the forget target also holds on held-out test images (None without test sets, or
    when neither the ``downstream`` model's metrics (``after`` on held-out inputs,
    ``downstream_images`` of the forgotten concepts) nor the CLIP's hold the target metric). A
    downstream model that reports the target metric judged the search, so its measurement decides."""
    if result.evaluated_on != "test":
        return None
    if downstream and target.metric in downstream:
        after, images = downstream, downstream_images if downstream_images is not None else result.forget_images
    elif target.metric in result.after:
        after, images = result.after, result.forget_images
    else:
        return None
    return {"met": bool(target.met(after)), "value": after[target.metric], "images": images}


def build_summary(*, method: dict, concepts: Sequence[str], model: dict, target: ForgetTarget, validation: dict,
                  validation_met: bool, result: BeforeAfter, cost: dict, timings: dict | None = None,
                  memory: dict | None = None, extra: dict | None = None, held_out: dict | None = None,
                  devices: dict | None = None) -> dict:
    """The ``summary.json`` of a run (see the module docstring); ``method`` must hold ``name``.
    ``held_out``: the target's verdict on held-out images when a downstream model measured it
    (see :func:`held_out_verdict`); by default from the CLIP's metrics. ``devices``: where each
    phase ran (``pass``, ``after_pass``: the search or selection, ``evaluation``, ``downstream``)
    and the trainer's ``precision``."""
    if "name" not in method:
        raise ValueError("the method block of a run record needs a 'name'")
    summary = {
        "schema": SCHEMA_VERSION,
        "method": method,
        "concepts": list(concepts),
        "model": model,
        "target": {"rule": str(target), "metric": target.metric, "value": target.value, "met": bool(validation_met),
                   "held_out": held_out if held_out is not None else held_out_verdict(target, result)},
        "validation": core_metrics(validation),
        "evaluated_on": result.evaluated_on,
        "before": core_metrics(result.before),
        "after": core_metrics(result.after),
        "per_concept": {c: core_metrics(m) for c, m in result.per_concept_after.items()},
        "cost": cost,
        "timings_s": timings or {},
        "memory": memory,
        "devices": devices or {},
    }
    if result.mia is not None:
        summary["mia"] = result.mia
    return summary | (extra or {})


def verdict_line(summary: dict) -> str:
    """One console line: the target on validation and, when measured, on held-out images."""
    t = summary["target"]
    line = f"target {t['rule']} {'met' if t['met'] else 'NOT met'} on validation"
    held = t.get("held_out")
    if held is not None:
        line += (f"; on held-out test images forgetting {'holds' if held['met'] else 'does NOT hold'} "
                 f"({t['metric']} = {pct(held['value'])} % over {held['images']} images)")
    return line


def _first_paragraph(summary: dict, remedy: str | None) -> list[str]:
    t = summary["target"]
    lines = [f"Model: `{summary['model'].get('model_name', summary['model'])}`. "
             f"Method: **{summary['method']['name']}**.", ""]
    lines.append(f"- Validation: the forget target `{t['rule']}` is " +
                 ("**met**." if t["met"] else "**NOT met** (the closest result is reported)."))
    held = t.get("held_out")
    if held is None:
        lines.append("- Held-out images: the config has no test sets, so the before/after figures below are on "
                     "validation images and say nothing about fresh images of the concept.")
    elif held["met"]:
        lines.append(f"- Held-out test images: forgetting **holds** ({t['metric']} = {pct(held['value'])} % over "
                     f"{held['images']} images of the concept).")
    else:
        n_hit = round(held["value"] * held["images"])
        lines.append(f"- Held-out test images: forgetting does **NOT hold**: {t['metric']} = {pct(held['value'])} % "
                     f"({n_hit} of {held['images']} fresh images of the concept)." + (f" {remedy}" if remedy else ""))
    return lines + [""]


def before_after_section(summary: dict, before: dict, after: dict) -> list[str]:
    """The report's before / after table (with membership inference when measured), as markdown lines."""
    names = sorted(set(before) | set(after), key=lambda k: (k.split("_")[0] != "forget", k))
    rows = []
    for k in names:
        b, a = before.get(k), after.get(k)
        rows.append([k, pct(b), pct(a), f"{100 * (a - b):+.1f}" if a is not None and b is not None else "–"])
    if "mia" in summary:
        mb, ma = summary["mia"]["before"], summary["mia"]["after"]
        rows.append(["MIA accuracy (forget set vs unseen pairs; 50 = no membership signal)",
                     f"{mb['mean']:.1f} ± {mb['std']:.1f}", f"{ma['mean']:.1f} ± {ma['std']:.1f}",
                     f"{ma['mean'] - mb['mean']:+.1f}"])
    where = "held-out test" if summary["evaluated_on"] == "test" else "validation"
    return [f"## Before / after ({where} sets, accuracy in %)", "",
            *table(["metric", "before", "after", "change"], rows), ""]


def _cost(summary: dict) -> list[str]:
    c = summary["cost"]
    mem = c.get("peak_mem_mb")
    return ["## Cost", "", *table(
        ["wall time (s)", "sample gradient evaluations", "model evaluations", "peak memory (MB)", "edit size (bytes)"],
        [[f"{c.get('wall_s', 0):.1f}", c.get("gradient_evals", "–"), c.get("evaluations", "–"),
          f"{mem:.0f}" if mem is not None else "–", c.get("edit_bytes", "–")]]), ""]


@dataclass
class RunRecord:
    """Writes one run's record into ``run_dir`` (every file atomically, never overwriting).

    ``logger``: the run's Lightning logger (or None); with a TensorBoard logger every figure, the
    hparams and the before/after metrics also go to TensorBoard.
    """

    run_dir: Path
    logger: object | None = None
    figures: list[tuple[str, str]] = field(default_factory=list)  # (caption, file) for report.md

    @property
    def tb(self):
        """The TensorBoard ``SummaryWriter`` of the logger, or None."""
        exp = getattr(self.logger, "experiment", None)
        return exp if exp is not None and hasattr(exp, "add_figure") else None

    def figure(self, fig, file: str, caption: str | None = None, tag: str | None = None,
               overwrite: bool = False) -> Path:
        """Save a matplotlib figure or a PIL image as PNG (and to TensorBoard under ``tag``); listed in the report
        when it has a caption. ``overwrite`` only for this run's own earlier version of the file."""
        path = self.run_dir / file
        if hasattr(fig, "savefig"):  # a matplotlib figure
            import matplotlib.pyplot as plt

            with atomic_output(path, overwrite=overwrite) as tmp:
                fig.savefig(tmp, format="png")
            if self.tb is not None and tag:
                self.tb.add_figure(tag, fig)
            plt.close(fig)
        else:  # a PIL image (e.g. a grid of generated images)
            import numpy as np

            with atomic_output(path, overwrite=overwrite) as tmp:
                fig.save(tmp, format="PNG")
            if self.tb is not None and tag:
                self.tb.add_image(tag, np.asarray(fig.convert("RGB")), dataformats="HWC")
        if caption:
            self.figures.append((caption, file))
        return path

    def csv(self, file: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> Path:
        path = self.run_dir / file
        with atomic_output(path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)
        return path

    def edit_patch(self, edits: Sequence[LayerEdit], metadata: dict) -> int:
        """Write ``edit.safetensors`` (changed tensors, old and new); returns the bytes a user must
        keep to reproduce the result (the new tensors)."""
        save_edits(self.run_dir / EDIT_FILE, list(edits), metadata)
        return sum(e.nbytes for e in edits)

    def gradients(self, name: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, object]) -> Path:
        """``gradients/<name>.safetensors``: a pass's averaged gradients with their metadata."""
        return save_tensors(self.run_dir / "gradients" / f"{name}.safetensors", tensors, metadata)

    def skip_list(self, name: str, records: Sequence[Mapping]) -> dict[str, object]:
        """``gradients/skipped_<name>.jsonl``: the samples pass ``name`` skipped, one per line;
        returns the gradient file's metadata entry for them (:func:`slug_pl.skip_list.write_skip_list`)."""
        from slug_pl.skip_list import write_skip_list

        return write_skip_list(self.run_dir / "gradients", name, records)

    def skipped(self, record: dict) -> Path:
        """``skipped_samples.json``: the bad-sample policy, counts and every skipped sample."""
        return write_text(self.run_dir / SKIPPED_FILE, json.dumps(record, indent=2) + "\n")

    def ranking(self, scores, suffix: str = "", chosen: str | None = None, overwrite: bool = False) -> None:
        """``ranking<suffix>.csv`` and ``pareto_<tower><suffix>.png`` (the chosen layer starred, and
        in TensorBoard, once it is known); ``overwrite`` for the run's own first version, written as
        soon as the ranking existed."""
        from slug_pl.ranking import pareto_figure, write_ranking_csv

        write_ranking_csv(scores, self.run_dir / f"ranking{suffix}.csv", overwrite=overwrite)
        for tower in ("vision", "text"):
            if any(s.tower == tower for s in scores):
                self.figure(pareto_figure(scores, tower, chosen), f"pareto_{tower}{suffix}.png",
                            tag=f"pareto/{tower}{suffix}" if chosen else None, overwrite=overwrite)

    def edited_model(self, family, model, edits: Sequence[LayerEdit], summary: dict, metadata: dict) -> Path:
        """``edited_model/``: the edited CLIP in its own library's format
        (:meth:`~slug_pl.families.base.ModelFamily.save_edited`) with its model card."""
        from slug_pl.model_card import write_model_card

        folder = family.save_edited(model, list(edits), self.run_dir / EDITED_MODEL)
        write_model_card(folder, summary, metadata)
        return folder

    def downstream_model(self, target, summary: dict, metadata: dict) -> Path:
        """``edited_<target>/``: the downstream model with the edit (a copy of its folder in which
        only the edited tensor changes, :meth:`~slug_pl.targets.base.DownstreamAdapter.save_pretrained`)
        with its model card."""
        from slug_pl.model_card import write_model_card

        folder = target.save_pretrained(self.run_dir / f"edited_{target.name}")
        write_model_card(folder, summary, metadata, base_model=target.source())
        return folder

    def write(self, summary: dict, sections: Sequence[str] = (), remedy: str | None = None,
              result: BeforeAfter | None = None) -> None:
        """``summary.json`` and ``report.md`` (first paragraph, before/after, the method's
        ``sections`` (markdown lines), figures, cost, files), and TensorBoard hparams."""
        write_text(self.run_dir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
        before = result.before if result is not None else summary["before"]
        after = result.after if result is not None else summary["after"]
        concepts = ", ".join(summary["concepts"])
        lines = [f"# Unlearning report: {concepts}", "", *_first_paragraph(summary, remedy),
                 *before_after_section(summary, before, after), *sections]
        for caption, file in self.figures:
            lines += ["", f"![{caption}]({file})", "", f"*{caption}* (`{file}`)."]
        lines += ["", *_cost(summary),
                  "Files: `summary.json` (this record for programs), `edit.safetensors` (the changed tensors, "
                  "old and new: apply or revert with `slug_pl.edit`), `config.yaml` (the resolved config that "
                  "reproduces this run), TensorBoard events (`tensorboard --logdir lightning_logs`).", ""]
        write_text(self.run_dir / REPORT_FILE, "\n".join(lines))
        self._hparams(summary)

    def _hparams(self, summary: dict) -> None:
        if self.tb is None:
            return
        params = {"method": summary["method"]["name"], "concepts": ", ".join(summary["concepts"]),
                  "target": summary["target"]["rule"]}
        metrics = ({f"before/{k}": v for k, v in summary["before"].items()}
                   | {f"after/{k}": v for k, v in summary["after"].items()}
                   | {"target_met": float(summary["target"]["met"])})
        self.logger.log_hyperparams(params, metrics)
