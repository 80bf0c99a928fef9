"""The departures of slug_pl's defaults from the authors' code, measured on the demo world.

On the demo (world seed 0, its first identity): the default run (``configs/demo.yaml``) and the
reference run (``configs/demo_reference.yaml``, every departure switched off), then each departure
alone:

1. ranking filter: the default run with the authors' filter only (it ranks ``visual.conv1.weight``);
   conv1's importance, alignment and front, in the reference run too;
2. forget averaging: the forget gradient per pair (default) against per batch of 16 (reference);
3. retain batches: the retain gradient of each part of the authors' batching alone (shuffle; full
   batches with the top-up; augmentation), of all three, and of all three at retain seeds 1-4, against
   the default's: how far the alignments move and whether the Pareto fronts change; and how
   noisy the retain gradient is (the norm of the mean batch gradient against the mean norm of
   one batch's gradient);
4. candidates: the front layers the default's top 3 leaves out;
5. iterations: the reference run's search again on its own gradients with the tolerance rule;
6. pass mode: the forget gradient in train mode against eval mode.

    python benchmarks/reference_departures.py [--cache .slug_cache]
    # writes benchmarks/results/reference_departures.json and reference_departures.md
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from demo_runs import REPO, demo_root, fit_demo
from results_io import write_table_results

from slug_pl.data.pairs import PairBatches, PairSet, shard_sample_counts
from slug_pl.data.reference_batches import AuthorsBatches
from slug_pl.demo.world import WorldSpec, identity_names
from slug_pl.families.base import AUTHORS_EXCLUDE
from slug_pl.families.open_clip import OpenClip
from slug_pl.gradients import contrastive_loss, forget_gradient, load_tensors
from slug_pl.ranking import layer_scores

REFERENCE = str(REPO / "configs" / "reference.yaml")
CONV1, PROJ = "visual.conv1.weight", "visual.proj"
#: The runs: the defaults, the preset, each departure alone on top of the defaults (search-only
#: ones on the default run's gradients), and the preset with the tolerance rule on its gradients.
RUNS = (
    ("default", ()),
    ("reference", ("--config", REFERENCE)),
    ("default + authors' filter", ("--model.family.init_args.exclude", json.dumps(list(AUTHORS_EXCLUDE)))),
    ("default + per-batch forget averaging", ("--model.forget_averaging", "per_batch", "--data.init_args.batch_size", "16")),
    ("default + authors' retain batches", ("--data.init_args.retain_batches", "reference")),
    ("default + every front layer", ("--search.top_k", "null", "--model.gradients_from", "{default}/gradients")),
    ("default + ten iterations", ("--search.iterations", "fixed", "--model.gradients_from", "{default}/gradients")),
    ("default + train-mode pass", ("--model.eval_mode", "false")),
    ("reference, tolerance rule", ("--config", REFERENCE, "--search.iterations", "until_tolerance",
                                   "--model.gradients_from", "{reference}/gradients")),
)


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _run_summary(run: Path) -> dict:
    """The choice of a run, its candidates and their evaluations."""
    summary = json.loads((run / "summary.json").read_text())
    per = summary["method"]["per_concept"][0]
    searched = _rows(run / "search.csv")
    fraction = {float(r["step"]): float(r["step_fraction"]) for r in searched}
    return {
        "chosen": {"layer": per["layer"], "tower": per["tower"], "step": per["step"],
                   "relative_step": per["relative_step"], "validation": per["validation"]},
        "test_after": {k: summary["after"][k] for k in ("forget_top1", "forget_top5", "retain_top1", "utility_top1")},
        "held_out_met": summary["target"]["held_out"]["met"],
        "evaluations": summary["cost"]["evaluations"],
        "candidates": [{"layer": c["layer"], "tower": c["tower"], "evaluations": c["evaluations"],
                        "smallest_step": c["smallest_step"],
                        "relative_step": fraction.get(c["smallest_step"]) if c["smallest_step"] else None,
                        "validation": c["validation"], "final_step": c["final_step"],
                        "final_target_met": c["final_target_met"], "final_validation": c["final_validation"]}
                       for c in summary["method"]["candidates"]],
        "fronts": {r["name"]: r["tower"] for r in _rows(run / "ranking.csv") if r["on_front"] == "True"},
    }


def _left_out_by_top3(run: Path) -> list[str]:
    """Front layers beyond the three most important of their tower (what top_k 3 does not search)."""
    front = [r for r in _rows(run / "ranking.csv") if r["on_front"] == "True"]
    out = []
    for tower in ("vision", "text"):
        ranked = sorted((r for r in front if r["tower"] == tower), key=lambda r: -float(r["importance"]))
        out += [r["name"] for r in ranked[3:]]
    return out


def _scores(family, model, forget: dict, retain: dict) -> dict:
    """name -> (importance, alignment, front) under the family's filter."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    return {s.name: (s.importance, s.alignment, s.front) for s in layer_scores(family, params, forget, retain)}


def _fronts(scores: dict) -> set[str]:
    return {n for n, (_, _, front) in scores.items() if front == 1}


def retain_pass(family, model, pair_set: PairSet) -> tuple[dict, list[float]]:
    """The retain gradient (mean over batches of ∇ CLIP loss, eval mode) of a stream, and the norm
    of each batch's gradient over every parameter."""
    batches = PairBatches([pair_set], family.image_transform(), family.tokenize,
                          train_transform=family.train_image_transform())
    sums = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    norms = []
    model.eval()
    for batch in batches:
        model.zero_grad(set_to_none=True)
        u, v = family.encode_image(model, batch["images"]), family.encode_text(model, batch["tokens"])
        contrastive_loss(u, v, family.logit_scale(model), batch["valid"]).backward()
        grads = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}
        norms.append(torch.cat([g.flatten() for g in grads.values()]).norm().item())
        for n, g in grads.items():
            sums[n] += g
    model.zero_grad(set_to_none=True)
    return {n: (g / len(norms)).detach() for n, g in sums.items()}, norms


def _moved(base: dict, other: dict) -> dict:
    """How far the alignments moved and whether the fronts changed (default filter)."""
    shared = set(base) & set(other)
    moves = {n: abs(other[n][1] - base[n][1]) for n in shared}
    worst = max(moves, key=moves.get)
    return {"max_alignment_change": moves[worst], "layer": worst,
            "median_alignment_change": sorted(moves.values())[len(moves) // 2],
            "fronts_equal": _fronts(base) == _fronts(other),
            "front": sorted(_fronts(other))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default=".slug_cache", help="demo cache root (the world of seed 0 below it)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    root = demo_root(args.cache, 0)
    concept = identity_names(WorldSpec(seed=0))[0]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        runs = {}
        for name, overrides in RUNS:
            # "{default}" / "{reference}": that run's folder (the search again on its gradients)
            overrides = tuple(o.replace("{default}", str(runs.get("default"))).replace("{reference}", str(runs.get("reference")))
                              for o in overrides)
            code, run = fit_demo(root, 0, [concept], tmp / f"run{len(runs)}", *overrides)
            assert code == 0, f"the {name} run failed ({code})"
            runs[name] = run
        summaries = {name: _run_summary(run) for name, run in runs.items()}
        left_out = {name: _left_out_by_top3(runs[name]) for name in ("default", "reference")}

        # gradient-level measurements, in process
        family = OpenClip("slug-demo-vit", pretrained=str(root / "model" / "slug-demo-vit.safetensors"))
        authors_family = OpenClip("slug-demo-vit", pretrained=family.pretrained, exclude=AUTHORS_EXCLUDE)
        model = family.load()
        grads = {name: {s: load_tensors(runs[name] / "gradients" / f"{s}.safetensors") for s in ("forget", "retain")}
                 for name in ("default", "reference")}
        per_sample, per_batch = grads["default"]["forget"][0], grads["reference"]["forget"][0]
        rankable = [n for n, q in model.named_parameters() if family.is_rankable(n, q) and per_sample[n].norm() > 0]
        forget_moves = {n: ((per_batch[n] - per_sample[n]).norm() / per_sample[n].norm()).item() for n in rankable}
        importance_moves = {n: abs(per_batch[n].norm() / per_sample[n].norm() - 1).item() for n in rankable}
        forget_meta = grads["default"]["forget"][1]
        forget_urls = [s["path"] for s in forget_meta["data"]["shards"]]
        forget_set = PairSet("forget", tuple(forget_urls), 16, forget_meta["counts"]["samples"])
        eval_mode = forget_gradient(family, model, PairBatches([forget_set], family.image_transform(),
                                                               family.tokenize), averaging="per_batch")[0]
        model.train()
        train_mode = forget_gradient(family, model, PairBatches([forget_set], family.image_transform(),
                                                                family.tokenize), averaging="per_batch")[0]
        model.eval()
        mode_moves = max(((train_mode[n] - eval_mode[n]).norm() / eval_mode[n].norm()).item() for n in rankable)

        retain_meta = grads["default"]["retain"][1]
        urls = tuple(s["path"] for s in retain_meta["data"]["shards"])
        base_set = PairSet("retain", urls, 128, retain_meta["data"]["num_samples"], tuple(shard_sample_counts(urls)))
        authors = AuthorsBatches(seed=0)
        variants = {
            "in order (default)": None,
            "shuffle only": replace(authors, full_batches=False, augmented=False),
            "full batches + top-up only": replace(authors, shuffle=False, augmented=False),
            "augmentation only": replace(authors, shuffle=False, full_batches=False),
            "all three (reference, seed 0)": authors,
            **{f"all three, seed {s}": AuthorsBatches(seed=s) for s in (1, 2, 3, 4)},
        }
        retain, noise = {}, {}
        for name, sampling in variants.items():
            print(f"retain pass: {name}", file=sys.stderr)
            retain[name], norms = retain_pass(family, model, replace(base_set, sampling=sampling))
            mean_norm = torch.cat([g.flatten() for g in retain[name].values()]).norm().item()
            noise[name] = {"mean_batch_gradient_norm": mean_norm, "batch_gradient_norms_mean": sum(norms) / len(norms),
                           "batches": len(norms)}
        check = max(((retain["in order (default)"][n] - grads["default"]["retain"][0][n]).norm()
                     / grads["default"]["retain"][0][n].norm()).item() for n in rankable)
        scores = {name: _scores(family, model, per_sample, g) for name, g in retain.items()}
        retain_effect = {name: _moved(scores["in order (default)"], s) | noise[name] for name, s in scores.items()}
        conv1 = {}
        for name, g in retain.items():
            s = _scores(authors_family, model, per_batch, g)
            conv1[name] = {"importance": s[CONV1][0], "alignment": s[CONV1][1], "conv1_on_front": s[CONV1][2] == 1,
                           "proj_on_front": s[PROJ][2] == 1}

    ref, tol = summaries["reference"], summaries["reference, tolerance rule"]
    found = {c["layer"]: c["smallest_step"] for c in ref["candidates"] if c["smallest_step"]}
    tol_found = {c["layer"]: c["smallest_step"] for c in tol["candidates"] if c["smallest_step"]}
    step_ratio = {n: tol_found[n] / found[n] - 1 for n in found if n in tol_found}
    payload = {
        "concept": concept,
        "runs": summaries,
        "forget_averaging": {"max_gradient_change": max(forget_moves.values()),
                             "layer": max(forget_moves, key=forget_moves.get),
                             "max_importance_change": max(importance_moves.values()),
                             "batches": grads["reference"]["forget"][1]["counts"]["batches"],
                             "pairs": grads["reference"]["forget"][1]["counts"]["samples"]},
        "retain_batches": retain_effect,
        "retain_in_order_check": check,
        "conv1": conv1,
        "candidates_left_out_by_top3": left_out,
        "iterations": {"found_step_change": step_ratio,
                       "final_iterate_missed": [c["layer"] for c in ref["candidates"] if not c["final_target_met"]],
                       "choice_fixed": ref["chosen"], "choice_tolerance": tol["chosen"]},
        "pass_mode_max_gradient_change": mode_moves,
    }
    write_table_results("reference_departures", "python benchmarks/reference_departures.py",
                        time.perf_counter() - t0, payload, _markdown(payload))
    return 0


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _markdown(p: dict) -> list[str]:
    runs = p["runs"]
    lines = ["# The demo with the defaults and with the reference preset", "",
             f"World seed 0, forgetting {p['concept']!r}. `python benchmarks/reference_departures.py`.", "",
             "| run | chosen layer | step λ | relative step | val forget top-5 | val retain top-1 | val utility top-1 "
             "| test forget top-5 | test retain top-1 | test utility top-1 | evaluations |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        c, v, t = r["chosen"], r["chosen"]["validation"], r["test_after"]
        lines.append(f"| {name} | `{c['layer']}` | {c['step']:.4g} | {c['relative_step']:.3f} | {_pct(v['forget_top5'])} "
                     f"| {_pct(v['retain_top1'])} | {_pct(v['utility_top1'])} | {_pct(t['forget_top5'])} "
                     f"| {_pct(t['retain_top1'])} | {_pct(t['utility_top1'])} | {r['evaluations']} |")
    lines += ["", "Candidates (validation, %; the smallest step meeting the target, and the last iterate):", ""]
    for name in ("default", "reference", "reference, tolerance rule"):
        r = runs[name]
        lines += [f"**{name}**", "", "| layer | evaluations | smallest step | relative | forget top-5 | retain top-1 "
                  "| utility top-1 | last iterate λ | last meets target |", "|---|---|---|---|---|---|---|---|---|"]
        for c in r["candidates"]:
            v = c["validation"] or {}
            lines.append(f"| `{c['layer']}` | {c['evaluations']} | "
                         + (f"{c['smallest_step']:.4g} | {c['relative_step']:.3f}" if c["smallest_step"] else "not reached | –")
                         + f" | {_pct(v.get('forget_top5'))} | {_pct(v.get('retain_top1'))} | {_pct(v.get('utility_top1'))}"
                         f" | {c['final_step']:.4g} | {'yes' if c['final_target_met'] else 'no'} |")
        lines.append("")
    f = p["forget_averaging"]
    lines += ["## Each departure alone", "",
              f"- Forget averaging ({f['pairs']} pairs in {f['batches']} batches of 16): the per-batch gradient differs "
              f"from the per-pair one by up to {100 * f['max_gradient_change']:.1f} % (`{f['layer']}`), importances by up "
              f"to {100 * f['max_importance_change']:.2f} %.",
              f"- Pass mode: train against eval mode moves the forget gradient by at most {p['pass_mode_max_gradient_change']:.1e} "
              f"(the demo model has no dropout).", "",
              "Retain batches, each part alone and all three (default filter; against the default's in-order batches, "
              f"whose gradient this benchmark recomputes to {p['retain_in_order_check']:.1e}):", "",
              "| retain batches | max alignment change | (layer) | median change | fronts unchanged | ‖mean batch gradient‖ "
              "| mean ‖batch gradient‖ |", "|---|---|---|---|---|---|---|"]
    for name, r in p["retain_batches"].items():
        lines.append(f"| {name} | {r['max_alignment_change']:.3f} | `{r['layer']}` | {r['median_alignment_change']:.3f} | "
                     f"{'yes' if r['fronts_equal'] else 'no'} | {r['mean_batch_gradient_norm']:.3f} | "
                     f"{r['batch_gradient_norms_mean']:.3f} |")
    lines += ["", "`visual.conv1.weight` under the authors' filter, with their per-batch forget gradient:", "",
              "| retain batches | importance | alignment | conv1 on the vision front | visual.proj on the front |",
              "|---|---|---|---|---|"]
    for name, c in p["conv1"].items():
        lines.append(f"| {name} | {c['importance']:.4f} | {c['alignment']:.4f} | {'yes' if c['conv1_on_front'] else 'no'} "
                     f"| {'yes' if c['proj_on_front'] else 'no'} |")
    it = p["iterations"]
    changes = ", ".join(f"`{n}` {100 * d:+.2f} %" for n, d in it["found_step_change"].items())
    lines += ["", f"- Iterations: on the reference gradients, the tolerance rule's found steps against ten iterations: "
                  f"{changes}. The 10th iterate misses the target for {len(it['final_iterate_missed'])} of "
                  f"{len(runs['reference']['candidates'])} candidates ({', '.join(f'`{n}`' for n in it['final_iterate_missed'])}). "
                  f"Chosen: `{it['choice_fixed']['layer']}` with ten iterations, `{it['choice_tolerance']['layer']}` with the "
                  f"tolerance rule.",
              f"- Candidates: front layers the top 3 leaves out: default run {p['candidates_left_out_by_top3']['default'] or 'none'}, "
              f"reference run {p['candidates_left_out_by_top3']['reference'] or 'none'}."]
    return lines


if __name__ == "__main__":
    sys.exit(main())
