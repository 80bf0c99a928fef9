"""Forgetting that holds on fresh images: the step-margin trade-off on the demo world.

For each world seed and several identities: one SLUG run (``slug-pl fit`` on the demo config),
then the chosen layer's step λ is scaled by each margin m and the edited model is scored on the
validation images (which chose λ) and on the held-out test images. Reported per margin: how often
the forgotten identity is fully out of the top-5 / top-1 on fresh images, and what that costs in
retain and utility top-1 (points, test sets).

    python benchmarks/robust_forgetting.py --seeds 0 1 --identities 3
    # writes benchmarks/results/robust_forgetting.json and robust_forgetting.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from demo_runs import demo_root, fit_demo
from results_io import write_table_results

from slug_pl.data.labelled import LabelledSet
from slug_pl.demo.world import WorldSpec, identity_names
from slug_pl.edit import stepped
from slug_pl.evaluation.evaluator import Evaluator
from slug_pl.families.open_clip import OpenClip
from slug_pl.gradients import load_tensors


def _evaluators(family, world_root: Path, concept: str) -> dict[str, Evaluator]:
    w = world_root / "world"
    templates = json.loads((w / "templates.json").read_text())
    out = {}
    for split in ("val", "test"):
        transform = family.image_transform()
        ids = LabelledSet(str(w / split / "identities-000000.tar"), str(w / "identities.json"),
                          templates["identities"]).load(transform, f"{split}.identities")
        objs = LabelledSet(str(w / split / "objects-000000.tar"), str(w / "objects.json"),
                           templates["objects"]).load(transform, f"{split}.objects")
        out[split] = Evaluator(family, ids, [concept], objs)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--identities", type=int, default=3, help="identities per seed (the first ones)")
    p.add_argument("--margins", type=float, nargs="+", default=[1.0, 1.25, 1.5, 2.0])
    p.add_argument("--cache", default=".slug_cache", help="demo cache root (a folder per seed below it)")
    args = p.parse_args(argv)
    rows = []
    t_start = time.perf_counter()
    for seed in args.seeds:
        root = demo_root(args.cache, seed)
        for concept in identity_names(WorldSpec(seed=seed))[: args.identities]:
            with tempfile.TemporaryDirectory() as tmp:
                code, run = fit_demo(root, seed, [concept], tmp)
                summary = json.loads((run / "summary.json").read_text())
                grads, _ = load_tensors(run / "gradients" / "forget.safetensors")
            family = OpenClip("slug-demo-vit", pretrained=str(root / "model" / "slug-demo-vit.safetensors"))
            model = family.load()
            evals = _evaluators(family, root, concept)
            base = {split: e.evaluate(model) for split, e in evals.items()}
            chosen = summary["method"]["per_concept"][0]  # found_step: the step before any margin
            layer, step = chosen["layer"], chosen["found_step"]
            for margin in args.margins:
                with stepped(model, layer, grads[layer], step * margin):
                    m = {split: e.evaluate(model, edited=layer) for split, e in evals.items()}
                rows.append({
                    "seed": seed, "concept": concept, "layer": layer, "step": step, "margin": margin,
                    "target_met": summary["target"]["met"], "exit_code": code,
                    "val_forget_top1": m["val"]["forget_top1"], "val_forget_top5": m["val"]["forget_top5"],
                    "test_forget_top1": m["test"]["forget_top1"], "test_forget_top5": m["test"]["forget_top5"],
                    "test_retain_drop": base["test"]["retain_top1"] - m["test"]["retain_top1"],
                    "test_utility_drop": base["test"]["utility_top1"] - m["test"]["utility_top1"],
                })
                r = rows[-1]
                print(f"seed {seed} {concept:20s} margin {margin:4.2f}: test forget top1 {r['test_forget_top1']:.2f} "
                      f"top5 {r['test_forget_top5']:.2f}, retain -{100 * r['test_retain_drop']:.1f} pts, "
                      f"utility -{100 * r['test_utility_drop']:.1f} pts", flush=True)
    table = []
    for margin in args.margins:
        sel = [r for r in rows if r["margin"] == margin]
        table.append({
            "margin": margin, "runs": len(sel),
            "test_top5_zero": sum(r["test_forget_top5"] == 0 for r in sel) / len(sel),
            "test_top1_zero": sum(r["test_forget_top1"] == 0 for r in sel) / len(sel),
            "mean_test_forget_top5": statistics.mean(r["test_forget_top5"] for r in sel),
            "mean_retain_drop_pts": 100 * statistics.mean(r["test_retain_drop"] for r in sel),
            "max_retain_drop_pts": 100 * max(r["test_retain_drop"] for r in sel),
            "mean_utility_drop_pts": 100 * statistics.mean(r["test_utility_drop"] for r in sel),
        })
    command = "python benchmarks/robust_forgetting.py " + " ".join(sys.argv[1:] if argv is None else argv)
    md = ["# Step margin vs robust forgetting (demo world)", "", f"Command: `{command}`", "",
          f"{len(rows) // len(args.margins)} SLUG runs (seeds {args.seeds}, {args.identities} identities each); "
          "the chosen step λ (smallest meeting forget top-5 = 0 on validation) scaled by the margin; "
          "metrics on the held-out test images.", "",
          "| margin | runs | test top-5 = 0 | test top-1 = 0 | mean test forget top-5 | mean retain drop (pts) | max retain drop (pts) | mean utility drop (pts) |",
          "|---|---|---|---|---|---|---|---|"]
    for t in table:
        md.append(f"| {t['margin']:.2f} | {t['runs']} | {100 * t['test_top5_zero']:.0f} % | {100 * t['test_top1_zero']:.0f} % | "
                  f"{100 * t['mean_test_forget_top5']:.1f} % | {t['mean_retain_drop_pts']:.1f} | {t['max_retain_drop_pts']:.1f} | "
                  f"{t['mean_utility_drop_pts']:.1f} |")
    write_table_results("robust_forgetting", command, time.perf_counter() - t_start, {"summary": table, "runs": rows}, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
