"""``slug-pl compare``: SLUG and the baselines on identical data, the same evaluation and the same
selection rule, in one command and one table.

    slug-pl compare --config configs/demo_compare.yaml
    slug-pl compare --config configs/demo_compare.yaml --out runs/seed1 --methods slug ssd \\
        -- --data.init_args.seed 1      # after "--": arguments given to every method's run

A compare config (YAML; paths relative to the file)::

    shared: demo.yaml              # the config every method runs on: data, model family, trainer
    forget_target: {metric: forget_top5, value: 0.0}   # the one forget target, set for every method
    methods:                       # name: the config that makes the shared one that method
      slug: null                   #   (null: the shared config as it is)
      ga: baselines/demo_ga.yaml   #   (e.g. model.class_path and init_args, trainer.max_epochs)
    out: comparisons/demo          # the output folder (relative to the working directory)

Each method runs as ``slug-pl fit --config <shared> --config <method config> <target> <extra>`` in
its own process (so its wall time and peak memory are its own), one after another, into
``<out>/lightning_logs/version_N``, with its progress on the console. The forget target is given
to every run the same way (``--forget_target.metric`` / ``--forget_target.value``: one section for
every method). Then every run's ``summary.json`` (the same schema for every method) is read into:

- ``comparison.csv``: one row per method: held-out test accuracies after the method (``forget_top1``,
  ``forget_top5``, ``retain_top1``, ``utility_top1``, fractions), ``mia`` (membership-inference
  accuracy after, %), ``wall_s``, ``peak_mem_mb``, ``gradient_evals`` (sample forward+backward
  passes), ``evaluations`` (validation evaluations), ``edit_bytes`` (what a user must store to keep
  the result), whether the target was met on validation and held out, and the run folder
  (relative to ``<out>``);
- ``comparison.md``: the same table in %, with the original model's row and the command;
- ``comparison.png`` and TensorBoard (``<out>/lightning_logs/comparison``): forget vs retain
  top-1 per method, marker area proportional to wall time.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from slug_pl.step_search import ForgetTarget
from slug_pl.atomic import atomic_output, refuse_existing, write_text

FILES = ("comparison.csv", "comparison.md", "comparison.png")
METRICS = ("forget_top1", "forget_top5", "retain_top1", "utility_top1")
COLUMNS = ("method", *METRICS, "mia", "wall_s", "peak_mem_mb", "gradient_evals", "evaluations", "edit_bytes",
           "target_met", "held_out_met", "run_dir")


@dataclass
class CompareConfig:
    """A parsed compare config (see the module docstring); paths resolved."""

    shared: Path
    methods: dict[str, Path | None]
    forget_target: ForgetTarget = ForgetTarget()  # noqa: RUF009 (frozen)
    out: Path = Path("comparisons")
    source: Path | None = None

    @classmethod
    def load(cls, path: str | Path) -> "CompareConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"compare config {path} not found")
        raw = yaml.safe_load(path.read_text()) or {}
        unknown = set(raw) - {"shared", "methods", "forget_target", "out"}
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {sorted(unknown)}; a compare config has shared, methods, "
                             f"forget_target ({{metric, value}}), out")
        target = raw.get("forget_target") or {}
        if not isinstance(target, dict) or set(target) - {"metric", "value"}:
            raise ValueError(f"{path}: forget_target is {{metric: <name>, value: <number>}}, got {target!r}")
        if not raw.get("shared") or not raw.get("methods"):
            raise ValueError(f"{path}: give 'shared' (the config every method runs on) and 'methods' "
                             f"(name: config, or null for the shared config itself)")
        here = path.parent

        def resolve(p: str) -> Path:
            q = here / p
            if not q.is_file():
                raise FileNotFoundError(f"{path}: config {p!r} not found (looked for {q})")
            return q

        return cls(shared=resolve(raw["shared"]),
                   methods={name: None if cfg is None else resolve(cfg) for name, cfg in raw["methods"].items()},
                   forget_target=ForgetTarget(target.get("metric", "forget_top5"), float(target.get("value", 0.0))),
                   out=Path(raw.get("out", "comparisons")),
                   source=path)


@dataclass
class MethodRun:
    """One method's run: its command, exit code, run folder and summary (None if it failed)."""

    name: str
    command: list[str]
    exit_code: int | None = None
    run_dir: Path | None = None
    summary: dict | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.summary is not None


def fit_command(config: CompareConfig, method: str, out: Path, extra: list[str]) -> list[str]:
    """The ``slug-pl fit`` command line of one method."""
    configs = [config.shared] + ([config.methods[method]] if config.methods[method] is not None else [])
    args = [a for c in configs for a in ("--config", str(c))]
    target = ["--forget_target.metric", config.forget_target.metric,
              "--forget_target.value", repr(float(config.forget_target.value))]
    return [sys.executable, "-m", "slug_pl.cli", "fit", *args, *target,
            "--trainer.default_root_dir", str(out), *extra]


def _versions(out: Path) -> set[Path]:
    logs = out / "lightning_logs"
    return {p for p in logs.glob("version_*") if p.is_dir()} if logs.is_dir() else set()


def run_method(run: MethodRun, out: Path, position: str) -> MethodRun:
    """Run one method's fit in its own process (its progress on this console) and read its summary."""
    print(f"compare {position} {run.name}: slug-pl {' '.join(run.command[3:])}", flush=True)
    before = _versions(out)
    t0 = time.perf_counter()
    run.exit_code = subprocess.run(run.command).returncode
    run.seconds = time.perf_counter() - t0
    new = sorted(_versions(out) - before, key=lambda p: int(p.name.split("_")[-1]))
    run.run_dir = new[-1] if new else None
    summary = run.run_dir / "summary.json" if run.run_dir else None
    if summary is not None and summary.is_file() and run.exit_code in (0, 3):
        run.summary = json.loads(summary.read_text())
        c, a = run.summary["cost"], run.summary["after"]
        print(f"compare {position} {run.name}: done in {run.seconds:.0f} s: target "
              f"{'met' if run.summary['target']['met'] else 'NOT met'}, forget top-1 {100 * a['forget_top1']:.1f} %, "
              f"retain top-1 {100 * a['retain_top1']:.1f} %, {c['gradient_evals']} gradient evals, "
              f"{c['wall_s']:.1f} s", flush=True)
    else:
        print(f"compare {position} {run.name}: FAILED (exit code {run.exit_code}); see the output above", flush=True)
    return run


def row(run: MethodRun, out: Path) -> dict:
    """One ``comparison.csv`` row (after the method, held-out test sets; None where it failed);
    ``run_dir`` relative to ``out``, the folder of the table."""
    run_dir = os.path.relpath(run.run_dir, out) if run.run_dir else ""
    if not run.ok:
        return {"method": run.name, "run_dir": run_dir}
    s = run.summary
    held = s["target"].get("held_out")
    mia = s.get("mia", {}).get("after", {}).get("mean")
    return {"method": run.name, **{k: s["after"].get(k) for k in METRICS}, "mia": mia,
            **{k: s["cost"].get(k) for k in ("wall_s", "peak_mem_mb", "gradient_evals", "evaluations", "edit_bytes")},
            "target_met": s["target"]["met"], "held_out_met": None if held is None else held["met"],
            "run_dir": run_dir}


def original_row(runs: list[MethodRun]) -> dict | None:
    """The model before any method (every run measures it on the same data: they must agree)."""
    done = [r for r in runs if r.ok]
    if not done:
        return None
    first = done[0].summary
    for r in done[1:]:
        if any(abs(r.summary["before"][k] - first["before"][k]) > 1e-9 for k in first["before"]):
            raise ValueError(f"the runs measured different original models ({done[0].name}: {first['before']}, "
                             f"{r.name}: {r.summary['before']}): the methods did not run on identical data and model")
    mia = first.get("mia", {}).get("before", {}).get("mean")
    return {"method": "original", **{k: first["before"].get(k) for k in METRICS}, "mia": mia}


def _fmt(value, kind: str) -> str:
    if value is None:
        return "–"
    if kind == "pct":
        return f"{100 * value:.1f}"
    if kind == "float":
        return f"{value:.1f}"
    if kind == "bool":
        return "yes" if value else "no"
    return f"{value:,}" if isinstance(value, int) else str(value)


def markdown(rows: list[dict], original: dict | None, header: list[str]) -> list[str]:
    """``comparison.md``: the table in %, the original model first."""
    cols = [("method", "method", "str"), ("target met (val)", "target_met", "bool"),
            ("held out", "held_out_met", "bool"), ("forget top-1", "forget_top1", "pct"),
            ("forget top-5", "forget_top5", "pct"), ("retain top-1", "retain_top1", "pct"),
            ("utility top-1", "utility_top1", "pct"), ("MIA (%)", "mia", "float"), ("wall (s)", "wall_s", "float"),
            ("peak mem (MB)", "peak_mem_mb", "float"), ("gradient evals", "gradient_evals", "int"),
            ("evaluations", "evaluations", "int"), ("edit (bytes)", "edit_bytes", "int")]
    lines = [*header, "| " + " | ".join(c[0] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in ([original] if original else []) + rows:
        lines.append("| " + " | ".join(_fmt(r.get(key), kind) for _, key, kind in cols) + " |")
    return lines + [""]


def figure(rows: list[dict], original: dict | None):
    """Forget vs retain top-1 (held-out, %), one marker per method, area proportional to wall time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=110)
    done = [r for r in rows if r.get("wall_s") is not None]
    longest = max((r["wall_s"] for r in done), default=1.0) or 1.0
    for r in done:
        ax.scatter(100 * r["forget_top1"], 100 * r["retain_top1"], s=40 + 1200 * r["wall_s"] / longest, alpha=0.6)
        ax.annotate(f"{r['method']} ({r['wall_s']:.0f} s)", (100 * r["forget_top1"], 100 * r["retain_top1"]),
                    textcoords="offset points", xytext=(6, 6), fontsize=9)
    if original is not None:
        ax.scatter(100 * original["forget_top1"], 100 * original["retain_top1"], marker="x", color="black")
        ax.annotate("original", (100 * original["forget_top1"], 100 * original["retain_top1"]),
                    textcoords="offset points", xytext=(-50, -12), fontsize=9)
    ax.set_xlabel("forget top-1 after (%, held-out; lower is better)")
    ax.set_ylabel("retain top-1 after (%, held-out; higher is better)")
    ax.set_title("Methods compared (marker area ∝ wall time)")
    ax.set_xlim(-5, 105)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def write_outputs(out: Path, runs: list[MethodRun], header: list[str]) -> list[dict]:
    """``comparison.csv``, ``comparison.md``, ``comparison.png`` and the TensorBoard figure; returns the rows."""
    rows = [row(r, out) for r in runs]
    original = original_row(runs)
    with atomic_output(out / "comparison.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    md = markdown(rows, original, header)
    write_text(out / "comparison.md", "\n".join(md))
    fig = figure(rows, original)
    with atomic_output(out / "comparison.png") as tmp:
        fig.savefig(tmp, format="png")
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(out / "lightning_logs" / "comparison"))
    writer.add_figure("comparison/forget_vs_retain", fig)  # closes the figure
    writer.add_text("comparison/table", "\n".join(md))
    writer.close()
    return rows


def run_compare(config: CompareConfig, out: Path | None = None, methods: list[str] | None = None,
                extra: list[str] | None = None, command: str | None = None) -> tuple[list[MethodRun], list[dict]]:
    """Run every (or the named) method, one after another, and write the comparison into ``out``."""
    out = Path(out or config.out)
    names = list(methods or config.methods)
    unknown = [m for m in names if m not in config.methods]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; the compare config lists {list(config.methods)}")
    for name in FILES:  # before any work: never overwrite a comparison
        refuse_existing(out / name)
    out.mkdir(parents=True, exist_ok=True)
    runs = [MethodRun(m, fit_command(config, m, out, list(extra or []))) for m in names]
    for i, run in enumerate(runs, 1):
        run_method(run, out, f"[{i}/{len(runs)}]")
    done = [r for r in runs if r.ok]
    concepts = ", ".join(done[0].summary["concepts"]) if done else "?"
    model = done[0].summary["model"].get("model_name", "?") if done else "?"
    where = done[0].summary["evaluated_on"] if done else "test"
    header = [f"# Methods compared: forgetting {concepts}", "",
              f"Command: `{command or 'slug-pl compare'}`", "",
              f"Model `{model}`; every method on the same data (`{config.shared.name}`), the same evaluation and "
              f"the same forget target `{config.forget_target}` on validation (the first "
              f"epoch / λ / step meeting it, else the closest). Accuracies (%) and MIA after each method on the "
              f"{'held-out test' if where == 'test' else 'validation'} sets; `original` is the model before. "
              "Gradient evals: sample forward+backward passes; evaluations: validation evaluations; edit: bytes a "
              "user must store to keep the result.", ""]
    rows = write_outputs(out, runs, header)
    print(f"compare: wrote {out / 'comparison.md'}, comparison.csv, comparison.png", flush=True)
    return runs, rows


def main(argv: list[str] | None = None) -> int:
    """``slug-pl compare``; exit 0 when every method ran, 1 when one failed."""
    words = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in words:
        i = words.index("--")
        words, extra = words[:i], words[i + 1:]
    p = argparse.ArgumentParser(prog="slug-pl compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the compare config (YAML)")
    p.add_argument("--out", default=None, help="output folder (default: the config's 'out')")
    p.add_argument("--methods", nargs="+", default=None, help="run only these methods of the config")
    args = p.parse_args(words)
    config = CompareConfig.load(args.config)
    command = "slug-pl compare " + " ".join(words + (["--", *extra] if extra else []))
    runs, _ = run_compare(config, Path(args.out) if args.out else None, args.methods, extra, command)
    return 0 if all(r.ok for r in runs) else 1
