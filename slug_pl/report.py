"""The run's human- and machine-readable record: ``report.md`` and ``summary.json``."""

from __future__ import annotations

import json
import os
from pathlib import Path

from slug_pl.atomic import write_text


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _memory(mem: dict) -> str:
    if "peak_allocated_gib" in mem:
        return f"{mem['peak_allocated_gib']:.2f} GiB allocated on {mem['device']}"
    return f"{mem.get('peak_rss_gib', float('nan')):.2f} GiB resident (CPU)"


def _several_concepts(summary: dict, report_on: str) -> list[str]:
    """One row per concept (its layer, step and forget metrics) and the joint search's complete
    edit sets, scored on the combined model (validation)."""
    joint = summary.get("joint", {})
    lines = ["", "## Several concepts", "", f"Joint search: {joint.get('method', '')}.", "",
             f"| concept | layer | step λ | validation forget top-5 | {report_on} forget top-1 | {report_on} forget top-5 |",
             "|---|---|---|---|---|---|"]
    for c in summary["per_concept"]:
        lines.append(f"| {c['concept']} | `{c['layer']}` | {c['step']:.4g} | {_pct(c['validation'].get('forget_top5'))} | "
                     f"{_pct(c['after'].get('forget_top1'))} | {_pct(c['after'].get('forget_top5'))} |")
    alternatives = joint.get("alternatives", [])
    if alternatives:
        lines += ["", "Complete edit sets the beam kept, scored on the combined model (validation, %); of these, the one "
                      "with every target met and the best retain + utility top-1 is applied:", "",
                  "| edits (layer, λ) | targets met | retain top-1 | utility top-1 |", "|---|---|---|---|"]
        for a in alternatives:
            edits = "; ".join(f"{e['concept']}: `{e['layer']}` {e['step']:.4g}" for e in a["edits"])
            v = a["validation"]
            lines.append(f"| {edits} | {a['targets_met']}/{len(a['edits'])} | {_pct(v.get('retain_top1'))} | "
                         f"{_pct(v.get('utility_top1'))} |")
    return lines


def write_report(run_dir: Path, summary: dict, *, before_val: dict, chosen, results, scores,
                 report_on: str, before_full: dict, after_full: dict, pass_stats: dict,
                 gradient_files: dict, figures: list[tuple[str, str]] = (),
                 skipped: dict[str, list[dict]] | None = None) -> None:
    """Write ``summary.json`` and ``report.md`` into ``run_dir``."""
    write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")

    names = sorted(set(before_full) | set(after_full), key=lambda k: (k.split("_")[0] != "forget", k))
    lines = [
        f"# SLUG report: unlearning {', '.join(summary['concepts'])}",
        "",
        f"Model: `{summary['model']}`. Forget target on validation: `{summary['search']['target']}` — "
        + ("**met**." if summary["search"]["target_met"] else "**NOT met** (the closest step found is reported)."),
        "",
        f"Chosen edit: `{chosen.layer}` ({chosen.tower} tower), step λ = {chosen.step:.6g} "
        f"(‖λ·g_f‖ / ‖θ‖ = {chosen.step_fraction:.4f}).",
        "",
        f"## Before / after ({report_on} sets, accuracy in %)",
        "",
        "| metric | before | after | change |",
        "|---|---|---|---|",
    ]
    for k in names:
        b, a = before_full.get(k), after_full.get(k)
        delta = f"{100 * (a - b):+.1f}" if a is not None and b is not None else "–"
        lines.append(f"| {k} | {_pct(b)} | {_pct(a)} | {delta} |")
    if "mia" in summary:
        mb, ma = summary["mia"]["before"], summary["mia"]["after"]
        lines.append(f"| MIA accuracy (forget set vs unseen pairs; 50 = no membership signal) | "
                     f"{mb['mean']:.1f} ± {mb['std']:.1f} | {ma['mean']:.1f} ± {ma['std']:.1f} | "
                     f"{ma['mean'] - mb['mean']:+.1f} |")
    lines += [
        "",
        "Forget metrics side by side (accuracy in %): validation images decide the step; held-out "
        "test images show whether forgetting holds on fresh images of the concept.",
        "",
        "| | forget top-1 | forget top-5 |",
        "|---|---|---|",
        f"| validation, after | {_pct(chosen.metrics.get('forget_top1'))} | {_pct(chosen.metrics.get('forget_top5'))} |",
    ]
    if report_on == "test":
        lines.append(f"| held-out test, after | {_pct(after_full.get('forget_top1'))} | "
                     f"{_pct(after_full.get('forget_top5'))} |")
    if "per_concept" in summary:
        lines += _several_concepts(summary, report_on)
    for caption, file in figures:
        lines += ["", f"![{caption}]({file})", "", f"*{caption}* (`{file}`)."]
    lines += [
        "",
        "## Candidates",
        "",
        "The Pareto front of each tower (high importance, low alignment), capped at top-k by importance; "
        "each searched by doubling then bisection of λ. The chosen edit is the one meeting the target "
        "with the best retain + utility top-1 on validation.",
        "",
        "| layer | tower | evaluations | smallest step meeting target | forget top-5 | retain top-1 | utility top-1 | guard |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        b = r.best
        if b is None:
            lines.append(f"| `{r.layer}` | {r.tower} | {len(r.evaluations)} | not reached | – | – | – | – |")
        else:
            lines.append(
                f"| `{r.layer}` | {r.tower} | {len(r.evaluations)} | {b.step:.4g} | "
                f"{_pct(b.metrics.get('forget_top5'))} | {_pct(b.metrics.get('retain_top1'))} | "
                f"{_pct(b.metrics.get('utility_top1'))} | {'ok' if b.guard_ok else 'rejected'} |")
    n_front = sum(s.on_front for s in scores)
    lines += [
        "",
        "Validation before editing: " + ", ".join(f"{k} {_pct(v)}" for k, v in before_val.items()) + ".",
        "",
        "## Gradient pass",
        "",
        "| set | samples | skipped | batches | mean loss | file |",
        "|---|---|---|---|---|---|",
    ]
    for name, stats in pass_stats.items():
        path = gradient_files.get(name)
        rel = os.path.relpath(path, run_dir) if path else "–"
        lines.append(f"| {name} | {stats.get('samples', '–')} | {stats.get('skipped', 0)} | {stats.get('batches', '–')} | "
                     f"{stats.get('loss', float('nan')):.4f} | `{rel}` |")
    listed = [s for items in (skipped or {}).values() for s in items]
    if listed:
        lines += ["", f"### Skipped samples ({len(listed)}; all in `skipped_samples.json`)", "",
                  "| set | shard | key | reason |", "|---|---|---|---|"]
        lines += [f"| {s.get('set', '')} | `{s.get('shard', '')}` | `{s.get('key', '')}` | {s.get('reason', '')} |"
                  for s in listed[:20]]
    t = summary["timings_s"]
    lines += [
        "",
        f"Ranked layers: {len(scores)} ({n_front} on the fronts); see `ranking.csv`, "
        "`pareto_vision.png`, `pareto_text.png`, every evaluation in `search.csv`.",
        "",
        f"Timings: gradients {t['gradients']:.1f} s, search {t['search']:.1f} s, total {t['total']:.1f} s; "
        f"{summary['evaluations']} evaluations."
        + (f" Peak memory: {_memory(summary['memory'])}." if summary.get("memory") else ""),
        "",
        "Files: `edit.safetensors` is the patch (edited and original tensor; apply or revert with "
        "`slug_pl.edit`), `edited_model.safetensors` the full edited model (if saved), `config.yaml` "
        "the resolved config that reproduces this run.",
        "",
    ]
    write_text(run_dir / "report.md", "\n".join(lines))
