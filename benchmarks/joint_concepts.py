"""Several concepts at once: how the joint search strategy changes the cost of forgetting two
identities together, on the demo world.

For each world seed and each pair of identities (consecutive identities of the world), one
``slug-pl fit`` on the demo config per strategy; reported from each run's ``summary.json`` (metrics
on the held-out test images): whether every validation target was met, the largest held-out
forget top-1 / top-5 of the pair, the retain (other identities) and utility (objects) top-1 drop
in points, the edited layers, and the search time.

    python benchmarks/joint_concepts.py --pairs 3
    # writes benchmarks/results/joint_concepts.json and joint_concepts.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

from demo_runs import demo_root, fit_demo
from results_io import write_table_results

from slug_pl.demo.world import WorldSpec, identity_names

# name -> (description, search overrides)
STRATEGIES = {
    "greedy-edited": ("one concept after another, each gradient on the edited model, Pareto front top-3 "
                      "(the first implementation)",
                      ["--search.beam_width", "1", "--search.concept_gradients", "edited"]),
    "greedy": ("one concept after another, gradients on the original model, Pareto front top-3",
               ["--search.beam_width", "1"]),
    "beam": ("beam of 3 partial edit sets, Pareto front top-3 (the defaults)", []),
    "beam-wide": ("beam of 3, candidates from the first 3 Pareto fronts, top-6 per tower",
                  ["--search.fronts", "3", "--search.top_k", "6"]),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--pairs", type=int, default=3, help="pairs per seed: identities (0, 1), (1, 2), ...")
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    p.add_argument("--cache", default=".slug_cache", help="demo cache root (a folder per seed below it)")
    args = p.parse_args(argv)
    rows = []
    t_start = time.perf_counter()
    for seed in args.seeds:
        root = demo_root(args.cache, seed)
        names = identity_names(WorldSpec(seed=seed))
        for i in range(args.pairs):
            pair = names[i : i + 2]
            for strategy in args.strategies:
                with tempfile.TemporaryDirectory() as tmp:
                    code, run = fit_demo(root, seed, pair, tmp, *STRATEGIES[strategy][1])
                    s = json.loads((run / "summary.json").read_text())
                before, after = s["before"], s["after"]
                rows.append({
                    "seed": seed, "pair": pair, "strategy": strategy, "exit_code": code,
                    "targets_met": s["target"]["met"],
                    "layers": [c["layer"] for c in s["method"]["per_concept"]],
                    "steps": [c["step"] for c in s["method"]["per_concept"]],
                    "test_forget_top1_max": max(m["forget_top1"] for m in s["per_concept"].values()),
                    "test_forget_top5_max": max(m["forget_top5"] for m in s["per_concept"].values()),
                    "retain_drop_pts": 100 * (before["retain_top1"] - after["retain_top1"]),
                    "utility_drop_pts": 100 * (before["utility_top1"] - after["utility_top1"]),
                    "search_s": s["timings_s"]["search"],
                })
                r = rows[-1]
                print(f"seed {seed} {' + '.join(pair):34s} {strategy:13s}: targets {r['targets_met']}, held-out "
                      f"forget top-1 {r['test_forget_top1_max']:.2f} top-5 {r['test_forget_top5_max']:.2f}, retain "
                      f"{-r['retain_drop_pts']:+.1f} pts, utility {-r['utility_drop_pts']:+.1f} pts, "
                      f"search {r['search_s']:.0f} s, {r['layers']}", flush=True)
    table = []
    for strategy in args.strategies:
        sel = [r for r in rows if r["strategy"] == strategy]
        table.append({
            "strategy": strategy, "runs": len(sel),
            "targets_met": sum(r["targets_met"] for r in sel),
            "test_top1_zero": sum(r["test_forget_top1_max"] == 0 for r in sel),
            "within_5_pts": sum(r["retain_drop_pts"] <= 5 and r["utility_drop_pts"] <= 5 for r in sel),
            "mean_retain_drop_pts": statistics.mean(r["retain_drop_pts"] for r in sel),
            "max_retain_drop_pts": max(r["retain_drop_pts"] for r in sel),
            "mean_utility_drop_pts": statistics.mean(r["utility_drop_pts"] for r in sel),
            "mean_search_s": statistics.mean(r["search_s"] for r in sel),
        })
    command = "python benchmarks/joint_concepts.py " + " ".join(sys.argv[1:] if argv is None else argv)
    md = ["# Two identities at once: joint search strategies (demo world)", "", f"Command: `{command}`", "",
          "Each row: SLUG runs on pairs of consecutive identities of the demo world (seeds "
          f"{args.seeds}, {args.pairs} pairs each); metrics on the held-out test images. Retain = the other "
          "identities' top-1, utility = object classes' top-1; drops in points.", ""]
    md += [f"- `{k}`: {v[0]}" for k, v in STRATEGIES.items() if k in args.strategies]
    md += ["", "| strategy | runs | all targets met | held-out top-1 = 0 | retain and utility within 5 pts | "
               "mean / max retain drop (pts) | mean utility drop (pts) | mean search (s) |",
           "|---|---|---|---|---|---|---|---|"]
    for t in table:
        md.append(f"| {t['strategy']} | {t['runs']} | {t['targets_met']} | {t['test_top1_zero']} | {t['within_5_pts']} | "
                  f"{t['mean_retain_drop_pts']:.1f} / {t['max_retain_drop_pts']:.1f} | {t['mean_utility_drop_pts']:.1f} | "
                  f"{t['mean_search_s']:.0f} |")
    md += ["", "Per run:", "", "| seed | pair | strategy | held-out forget top-1 / top-5 (max of pair) | retain drop | "
                               "utility drop | layers |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['seed']} | {' + '.join(r['pair'])} | {r['strategy']} | {r['test_forget_top1_max']:.2f} / "
                  f"{r['test_forget_top5_max']:.2f} | {r['retain_drop_pts']:.1f} | {r['utility_drop_pts']:.1f} | "
                  f"{', '.join(r['layers'])} |")
    described = {k: v[0] for k, v in STRATEGIES.items() if k in args.strategies}
    write_table_results("joint_concepts", command, time.perf_counter() - t_start,
                        {"strategies": described, "summary": table, "runs": rows}, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
