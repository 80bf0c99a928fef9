"""SLUG and the baselines on the demo world: ``slug-pl compare --config configs/demo_compare.yaml``
for several identities of several world seeds, one table.

Each (world seed, identity) is one compare run: SLUG, FT, GA, GAFT, SalUn and SSD on identical
data, the same forget target (forget top-5 = 0 on validation) and the same selection rule, each
method in its own process with one CPU thread (measured best on shared cores). Metrics are on the
held-out test sets; wall time, peak memory, gradient evaluations and edit size as each run records
them. Reported: mean ± std per method over the runs, and every run.

    python benchmarks/comparison_demo.py --seeds 0 1 --identities 3
    # writes benchmarks/results/comparison_demo.csv, comparison_demo.md and comparison_demo.json
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from demo_runs import REPO, demo_root
from results_io import write_result

from slug_pl.compare import CompareConfig, run_compare
from slug_pl.demo.world import WorldSpec, identity_names

#: (column, header, unit): "pct" fractions shown in %, "num" as measured
BEFORE = ("forget_top1", "forget_top5", "retain_top1", "utility_top1", "mia")
COLUMNS = (("forget_top1", "forget top-1 (%)", "pct"), ("forget_top5", "forget top-5 (%)", "pct"),
           ("retain_top1", "retain top-1 (%)", "pct"), ("utility_top1", "utility top-1 (%)", "pct"),
           ("retain_drop", "retain drop (pts)", "pct"), ("utility_drop", "utility drop (pts)", "pct"),
           ("mia", "MIA (%)", "num"), ("wall_s", "wall (s)", "num"), ("peak_mem_mb", "peak mem (MB)", "num"),
           ("gradient_evals", "gradient evals", "num"), ("evaluations", "evaluations", "num"),
           ("edit_bytes", "edit (bytes)", "num"))


def mean_std(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    values = [scale * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def method_row(seed: int, concept: str, run, row: dict) -> dict:
    """One method's row of the table: its comparison-table ``row`` (metrics after the method,
    fractions), the model's metrics before it (``before_*``, from the run's summary) and what it
    cost: ``retain_drop`` / ``utility_drop`` = before − after top-1 (fractions; positive = accuracy
    lost). A failed run keeps its table row only."""
    out = {"seed": seed, "concept": concept, **row}
    if not run.ok:
        return out
    before = dict(run.summary["before"], mia=run.summary.get("mia", {}).get("before", {}).get("mean"))
    return out | {f"before_{k}": before.get(k) for k in BEFORE} | {
        "retain_drop": before["retain_top1"] - row["retain_top1"],
        "utility_drop": before["utility_top1"] - row["utility_top1"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--identities", type=int, default=3, help="identities per seed (the first ones)")
    p.add_argument("--cache", default=".slug_cache", help="demo cache root (a folder per seed below it)")
    p.add_argument("--work", default=None, help="folder for the compare runs (default: a temporary one)")
    args = p.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = "1"  # every method's process: one thread (shared cores)
    config = CompareConfig.load(REPO / "configs" / "demo_compare.yaml")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="comparison_demo-"))
    t_start = time.perf_counter()
    command = "python benchmarks/comparison_demo.py " + " ".join(sys.argv[1:] if argv is None else argv)
    rows: list[dict] = []
    for seed in args.seeds:
        root = demo_root(args.cache, seed)
        for i, concept in enumerate(identity_names(WorldSpec(seed=seed))[: args.identities]):
            extra = ["--data.init_args.root", str(root), "--data.init_args.seed", str(seed),
                     "--data.init_args.concepts", json.dumps([concept]),
                     "--model.init_args.family.init_args.pretrained", str(root / "model" / "slug-demo-vit.safetensors"),
                     "--trainer.enable_progress_bar", "false"]
            print(f"comparison_demo: seed {seed}, identity {concept!r}", flush=True)
            runs, table = run_compare(config, work / f"seed{seed}-{i}", extra=extra, command=command)
            rows += [method_row(seed, concept, run, r) for run, r in zip(runs, table)]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    n_runs = len(args.seeds) * args.identities
    md = ["# SLUG and the baselines on the demo world", "", f"Command: `{command}` (the compare config: "
          "`configs/demo_compare.yaml`; baseline settings from `benchmarks/results/baseline_sweep.md`)", "",
          f"{n_runs} runs: world seeds {args.seeds}, the first {args.identities} identities of each. Every method ran on "
          "identical data with the same forget target (forget top-5 = 0 on validation) and selection rule (the first "
          "epoch / λ / step meeting it, else the closest). Accuracies and MIA after each method on the held-out test "
          "sets; wall time, peak memory (resident, one process per method), gradient evaluations (sample "
          "forward+backward passes) and edit size (bytes a user must store) as each run recorded them; one CPU thread "
          "per process on a shared 2-core machine, so wall times compare methods, not machines.", "",
          "## Mean ± std over the runs", "",
          "| method | target met (val) | held out | " + " | ".join(c[1] for c in COLUMNS) + " |",
          "|" + "---|" * (3 + len(COLUMNS))]
    originals = list({(r["seed"], r["concept"]): r for r in rows if r.get("before_forget_top1") is not None}.values())
    if originals:  # the model before any method, once per run
        md.append("| original | – | – | " + " | ".join(
            mean_std([r[f"before_{k}"] for r in originals], 100 if unit == "pct" else 1)
            if k in BEFORE and originals[0].get(f"before_{k}") is not None else "–" for k, _, unit in COLUMNS) + " |")
    for m in methods:
        sel = [r for r in rows if r["method"] == m and r.get("wall_s") is not None]
        cells = []
        for key, _, unit in COLUMNS:
            values = [r[key] for r in sel if r.get(key) is not None]
            cells.append("–" if not values else mean_std(values, 100 if unit == "pct" else 1,
                                                          0 if key in ("gradient_evals", "evaluations", "edit_bytes",
                                                                       "peak_mem_mb") else 1))
        met = sum(bool(r["target_met"]) for r in sel)
        held = sum(bool(r["held_out_met"]) for r in sel)
        md.append(f"| {m} | {met}/{len(sel)} | {held}/{len(sel)} | " + " | ".join(cells) + " |")
    md += ["", "## Every run", "", "| seed | identity | method | target met (val) | held out | "
           + " | ".join(c[1] for c in COLUMNS) + " |", "|" + "---|" * (5 + len(COLUMNS))]
    for r in rows:
        if r.get("wall_s") is None:
            md.append(f"| {r['seed']} | {r['concept']} | {r['method']} | failed |")
            continue
        cells = [("–" if r.get(k) is None else f"{100 * r[k]:.1f}" if unit == "pct" else
                  f"{r[k]:.1f}" if isinstance(r[k], float) else f"{r[k]}") for k, _, unit in COLUMNS]
        md.append(f"| {r['seed']} | {r['concept']} | {r['method']} | {'yes' if r['target_met'] else 'no'} | "
                  f"{'yes' if r['held_out_met'] else 'no'} | " + " | ".join(cells) + " |")
    buf = io.StringIO()
    fields = ["seed", "concept", "method", "target_met", "held_out_met", *(c[0] for c in COLUMNS),
              *(f"before_{k}" for k in BEFORE)]
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_result("comparison_demo.csv", buf.getvalue())
    write_result("comparison_demo.md", "\n".join(md) + "\n")
    write_result("comparison_demo.json", {"command": command, "seconds": time.perf_counter() - t_start,
                                          "rows": [{k: v for k, v in r.items() if k != "run_dir"} for r in rows]})
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
