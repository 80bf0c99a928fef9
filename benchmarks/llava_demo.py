"""The LLaVA demo for several identities: does the VLM stop naming the forgotten person, and what
does it cost the others and the object answers?

For each of the world's first ``--identities`` identities: one ``slug-pl fit`` on
``configs/demo_llava.yaml`` (the cached world, CLIP and LLaVA under ``<cache>/demo_llava``),
forgetting that identity. Reported per run, on the held-out test images: the VLM's name accuracy
of the forgotten identity, of the other identities (mean per identity) and of the objects, before
and after; the CLIP's own zero-shot top-1 before / after; the edited layer and step. And, on the
chosen layer's search (validation): the smallest step at which the CLIP stopped matching the
identity (its forget top-1 = 0), how often the VLM still named the person there, and how much
larger the step the VLM needed was. Finally the step margin: the found step (before the config's
``search.step_margin``) times each ``--margins`` value, the VLM measured on the test images.

    python benchmarks/llava_demo.py --identities 3
    # writes benchmarks/results/llava_demo.json and llava_demo.md
    python benchmarks/llava_demo.py --identities 3 --protect off
    # SLUG's own forget gradient (model.protect_retained null): llava_demo_unprotected.json / .md
    python benchmarks/llava_demo.py --identities 3 --varying shirt background
    # a world where shirt and background change from photo to photo (its own cache,
    # .slug_cache/demo_llava_varying): llava_demo_varying.json / .md
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from results_io import write_table_results

from slug_pl.atomic import file_slug
from slug_pl.cli import main as slug_main
from slug_pl.data.labelled import LabelledSet
from slug_pl.demo.world import ATTRIBUTES, WorldSpec, identity_names
from slug_pl.edit import stepped
from slug_pl.families.hf_clip import HfClip
from slug_pl.gradients import load_tensors
from slug_pl.evaluation.vqa import VQA_METRICS, VqaImages, group_by_concept
from slug_pl.targets.llava import Llava

REPO = Path(__file__).resolve().parent.parent
COMMAND = "python benchmarks/llava_demo.py --identities {n}"


def fit_llava_demo(config: str, root: Path, concept: str, out_dir: str,
                   overrides: list[str] = ()) -> tuple[int, Path, float]:
    """One ``slug-pl fit`` of the LLaVA demo ``config`` (plus command-line ``overrides``) on the
    cache at ``root``; returns the exit code, the run folder and the wall seconds of the run."""
    t0 = time.perf_counter()
    code = slug_main(["fit", "--config", config, *overrides,
                      "--data.init_args.root", str(root), "--data.init_args.concepts", json.dumps([concept]),
                      "--model.family.init_args.model_name", str(root / "hf_clip"),
                      "--model.target.init_args.model", str(root / "llava"),
                      "--model.target.init_args.progress", "false",
                      "--trainer.default_root_dir", out_dir, "--trainer.enable_progress_bar", "false"])
    return code, Path(out_dir) / "lightning_logs" / "version_0", time.perf_counter() - t0


def clip_vs_vlm(run: Path, layer: str) -> dict:
    """On the chosen layer's search: the smallest evaluated step at which the CLIP's forget top-1
    was 0, the VLM's forget name accuracy there, and the applied step over that step."""
    rows = [r for r in csv.DictReader((run / "search.csv").open()) if r["layer"] == layer]
    clip_done = sorted((float(r["step"]), float(r["forget_name_accuracy"])) for r in rows
                       if float(r["forget_top1"]) == 0.0)
    if not clip_done:
        return {"clip_step": None, "vlm_named_there": None}
    step, named = clip_done[0]
    return {"clip_step": step, "vlm_named_there": named}


def test_images(target: Llava, world: Path) -> VqaImages:
    """The world's held-out test identities and objects, preprocessed by the VLM's processor."""
    transform = target.adapter.image_transform()
    sets = {what: LabelledSet(str(world / "test" / f"{what}-000000.tar"), str(world / f"{what}.json"))
            .load(transform, f"test.{what}") for what in ("identities", "objects")}
    return VqaImages(*(group_by_concept(s.images, s.labels, s.classnames) for s in sets.values()))


def run_settings(run: Path) -> dict:
    """What the run's resolved config says about the search: the step margin and whether the
    judge also asked about the forget pairs."""
    import yaml

    config = yaml.safe_load((run / "config.yaml").read_text())
    target = config["model"]["init_args"]["target"]["init_args"]
    return {"step_margin": config["search"]["step_margin"],
            "search_forget_pairs": bool(target.get("search_forget_pairs"))}


def applied_direction(run: Path, layer: str, step: float):
    """The direction the run stepped along, ``(θ − θ')/λ`` from its ``edit.safetensors``: SLUG's
    forget gradient, or its projection when the target protected the retain images."""
    tensors, _ = load_tensors(run / "edit.safetensors")
    return (tensors[f"original/{layer}"].double() - tensors[layer].double()).div(step).float()


def margin_sweep(root: Path, run: Path, concept: str, margins: list[float]) -> list[dict]:
    """The VLM on the test images with the chosen layer's found step times each margin, along the
    direction the run applied."""
    summary = json.loads((run / "summary.json").read_text())
    chosen = summary["method"]["per_concept"][0]
    layer, found = chosen["layer"], chosen["found_step"]
    direction = applied_direction(run, layer, chosen["step"])
    family = HfClip(model_name=str(root / "hf_clip"))
    clip = family.load()
    target = Llava(str(root / "llava"), max_new_tokens=8, batch_size=128, progress=False, cpu_threads=1)
    target.load()
    images = test_images(target, root / "world")
    out = []
    for margin in margins:
        with stepped(clip, layer, direction, found * margin):
            target.adapter.mirror(clip, [layer])
            with target.adapter.threads():
                m = target.judge.measure(images, [concept])
        out.append({"margin": margin, **{k: m[k] for k in VQA_METRICS}})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--identities", type=int, default=3, help="the world's first identities, one run each")
    p.add_argument("--root", default=None, help="the LLaVA demo's cache (world, CLIP, LLaVA; default "
                   ".slug_cache/demo_llava, or .slug_cache/demo_llava_varying with --varying)")
    p.add_argument("--protect", choices=["on", "off"], default="on",
                   help="off: SLUG's own forget gradient (the config's model.protect_retained set null)")
    p.add_argument("--varying", nargs="+", default=None, metavar="ATTRIBUTE",
                   help="a world where these attributes are drawn afresh for every image (data varying)")
    p.add_argument("--config", default=str(REPO / "configs" / "demo_llava.yaml"))
    p.add_argument("--keep", default=None, help="keep each run's folder below this folder (default: deleted)")
    p.add_argument("--margins", type=float, nargs="+", default=[1.0, 1.1, 1.2, 1.3])
    args = p.parse_args(argv)
    overrides, stem, command = [], "llava_demo", COMMAND.format(n=args.identities)
    if args.protect == "off":
        overrides += ["--model.protect_retained", "null"]
        stem, command = stem + "_unprotected", command + " --protect off"
    if args.varying:
        overrides += ["--data.init_args.varying", json.dumps(args.varying)]
        stem, command = stem + "_varying", command + " --varying " + " ".join(args.varying)
    root = Path(args.root or f".slug_cache/{'demo_llava_varying' if args.varying else 'demo_llava'}").resolve()
    rows = []
    t_start = time.perf_counter()
    for concept in identity_names(WorldSpec())[: args.identities]:
        with tempfile.TemporaryDirectory() as tmp:
            out = str(Path(args.keep) / file_slug(concept)) if args.keep else tmp
            code, run, seconds = fit_llava_demo(args.config, root, concept, out, overrides)
            summary = json.loads((run / "summary.json").read_text())
            edit = summary["method"]["edits"][0]
            vqa = summary["vqa"]
            rows.append({
                "concept": concept, "exit_code": code, "target_met": summary["target"]["met"],
                "layer": edit["layer"], "step": edit["step"], "relative_step": edit["relative_step"],
                "vqa_before": vqa["before"], "vqa_after": vqa["after"], "images": vqa["images"],
                "clip_before": summary["before"], "clip_after": summary["after"],
                "examples": vqa["examples"][:2], "seconds": seconds, "timings_s": summary["timings_s"],
                "target_rule": summary["target"]["rule"], **run_settings(run),
                "protected": retain_projection_row(summary["method"].get("retain_projection")),
                **clip_vs_vlm(run, edit["layer"]),
                "found_step": summary["method"]["per_concept"][0]["found_step"],
                "margins": margin_sweep(root, run, concept, args.margins),
                "per_concept": {c: {"before": v["before"], "after": v["after"]}
                                for c, v in vqa["per_concept"].items() if v["kind"] == "retain"},
            })
    built = {name: json.loads((root / name / "slug_demo.json").read_text()) for name in ("hf_clip", "llava")}
    attributes = {a["name"]: a for a in json.loads((root / "world" / "attributes.json").read_text())}
    varying = json.loads((root / "world" / "world.json").read_text())["spec"].get("varying", [])
    for r in rows:
        r["who_pays"] = who_pays(r, attributes)
    payload = {"rows": rows, "built": {k: {m: v.get(m) for m in ("identities_top1", "objects_top1",
                                                                    "identities_name_accuracy", "objects_name_accuracy",
                                                                    "train_seconds") if m in v}
                                       for k, v in built.items()}}
    payload["varying"] = varying
    write_table_results(stem, command, time.perf_counter() - t_start, payload,
                        markdown(rows, payload["built"], command, varying))
    return 0


def who_pays(row: dict, attributes: dict[str, dict], threshold: float = 0.2) -> dict:
    """The other identities whose name accuracy fell by at least ``threshold`` in this run, each
    with the attributes it shares with the forgotten identity (the demo world draws every
    identity from a few attributes: skin, hair, eyes, glasses, and unless they vary per image,
    shirt and background; ``attributes`` holds each identity's fixed ones), and for each of
    the forgotten identity's attributes how many of those that fell and of those that kept their
    accuracy share it (``"telling"``: the one shared most by the fallen relative to the rest)."""
    mine = attributes[row["concept"]]
    keys = [k for k in mine if k != "name"]
    fell = {c: v["before"] - v["after"] for c, v in row["per_concept"].items() if v["before"] - v["after"] >= threshold}
    kept = [c for c in row["per_concept"] if c not in fell]
    by_attribute = [{"attribute": f"{k} {mine[k]}",
                     "fell": sum(attributes[c][k] == mine[k] for c in fell), "of_fell": len(fell),
                     "kept": sum(attributes[c][k] == mine[k] for c in kept), "of_kept": len(kept)} for k in keys]

    def lift(a: dict) -> float:
        return a["fell"] / max(a["of_fell"], 1) - a["kept"] / max(a["of_kept"], 1)

    return {"fell": [{"identity": c, "drop": d,
                      "shared": [f"{k} {mine[k]}" for k in keys if attributes[c][k] == mine[k]]}
                     for c, d in sorted(fell.items(), key=lambda kv: -kv[1])],
            "by_attribute": by_attribute,
            "telling": max(by_attribute, key=lift) if fell else None}


def pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _change(before: dict, after: dict, key: str) -> str:
    return f"{pct(before[key])} → {pct(after[key])}"


def _mean_drop(pairs: list[tuple[dict, dict]], key: str) -> float:
    """Mean over runs of before − after of ``key``, in points."""
    return statistics.mean(100 * (b[key] - a[key]) for b, a in pairs)


def world_sentence(varying: list[str]) -> str:
    if not varying:
        return ("The world: every person always wears the same shirt in front of the same background (a person is "
                "skin, hair colour and style, eyes, glasses, shirt and background).")
    return (f"The world: {' and '.join(varying)} are drawn afresh for every photo (people change clothes and "
            "places), so a person is the rest: " + ", ".join(k.replace("_", " ") for k in ATTRIBUTES if k not in varying)
            + ".")


def retain_projection_row(record: dict | None) -> dict | None:
    """A run's retain projection (``method.retain_projection``), as its rows keep it: the
    tolerance, the retain images and the tensors the VLM reads that could be edited; None when off."""
    if record is None:
        return None
    return {"images": record["protected"][0]["inputs"], "tolerance": record["protected"][0]["tolerance"],
            "tensors": record["editable"]}


def settings_sentence(row: dict) -> str:
    """The search and the update direction of a run, in words."""
    judged = "its validation images" + (" and its forget pairs" if row["search_forget_pairs"] else "")
    p = row["protected"]
    direction = ("SLUG's forget gradient projected off the main directions (above "
                 f"{p['tolerance']:g} × the largest singular value) of what {p['images']} retain images feed each "
                 f"linear layer of the tower (the retain projection, `model.protect_retained`; {p['tensors']} "
                 f"tensors the VLM reads could be edited)" if p else
                 "SLUG's own forget gradient")
    return (f"The search runs on the VLM: forget target `{row['target_rule']}` on {judged}; it keeps the most "
            f"`retain_name_accuracy + object_accuracy` on the other identities' and objects' validation images and "
            f"applies the found step × `step_margin` {row['step_margin']:g}. Update direction: {direction}.")


def markdown(rows: list[dict], built: dict, command: str, varying: list[str]) -> list[str]:
    llava, clip = built["llava"], built["hf_clip"]
    lines = ["# LLaVA demo: forgetting a name in a vision-language model (demo world)", "",
             f"Command: `{command}` (one `slug-pl fit --config configs/demo_llava.yaml` per identity with the "
             "options the command names, on the cached world, CLIP and LLaVA; 2 shared CPU cores).", "",
             world_sentence(varying), "",
             f"Before any edit the LLaVA names the held-out test identities {pct(llava.get('identities_name_accuracy'))} % "
             f"and objects {pct(llava.get('objects_name_accuracy'))} % of the time; its CLIP (6 blocks, width 128) "
             f"scores {pct(clip.get('identities_top1'))} % / {pct(clip.get('objects_top1'))} % zero-shot top-1. "
             + settings_sentence(rows[0]), "",
             "Held-out test images, before → after (%): the VLM's name accuracy, and the CLIP's zero-shot top-1:", "",
             "| forgotten | edited layer | ‖λg‖/‖θ‖ | VLM forgotten | VLM others (mean) | VLM objects | "
             "CLIP forget | CLIP retain | CLIP utility | run (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b, a, cb, ca = r["vqa_before"], r["vqa_after"], r["clip_before"], r["clip_after"]
        lines.append(
            f"| {r['concept']} | `{r['layer'].removeprefix('vision_model.encoder.')}` | {r['relative_step']:.2f} | "
            f"{_change(b, a, 'forget_name_accuracy')} | {_change(b, a, 'retain_name_accuracy')} | "
            f"{_change(b, a, 'object_accuracy')} | {_change(cb, ca, 'forget_top1')} | {_change(cb, ca, 'retain_top1')} | "
            f"{_change(cb, ca, 'utility_top1')} | {r['seconds']:.0f} |")
    pairs = [(r["vqa_before"], r["vqa_after"]) for r in rows]
    retain_drops = [100 * (b["retain_name_accuracy"] - a["retain_name_accuracy"]) for b, a in pairs]
    object_drops = [100 * (b["object_accuracy"] - a["object_accuracy"]) for b, a in pairs]
    forgotten = statistics.mean(100 * a["forget_name_accuracy"] for _, a in pairs)
    lines += ["", f"Mean over {len(rows)} runs: the forgotten identity is named {forgotten:.1f} % of the time after the "
              f"edit; the other identities lose {statistics.mean(retain_drops):.1f} points (max {max(retain_drops):.1f}), "
              f"the objects {statistics.mean(object_drops):.1f} points (max {max(object_drops):.1f}).", "",
              "Where the CLIP stops matching the identity (its forget top-1 = 0 on validation, in the chosen layer's "
              "search), how often the VLM still named the person, and how much larger the applied step is:", "",
              "| forgotten | CLIP forget top-1 = 0 at λ | VLM named it there (%) | applied λ / that λ |",
              "|---|---|---|---|"]
    for r in rows:
        clip_step = "–" if r["clip_step"] is None else f"{r['clip_step']:.4g}"
        ratio = "–" if r["clip_step"] is None else f"{r['step'] / r['clip_step']:.2f}×"
        lines.append(f"| {r['concept']} | {clip_step} | {pct(r['vlm_named_there'])} | {ratio} |")
    lines += ["", f"The step margin: the found step × margin (the config applies {rows[0]['step_margin']:g}), along the "
              "direction the run applied, the VLM on the test images, "
              "mean over the runs:", "",
              "| margin | forgotten identity named (%) | runs naming it at all | others drop (pts) | objects drop (pts) |",
              "|---|---|---|---|---|"]
    for i, margin in enumerate(rows[0]["margins"]):
        swept = [(r["vqa_before"], r["margins"][i]) for r in rows]
        named = statistics.mean(100 * m["forget_name_accuracy"] for _, m in swept)
        lines.append(f"| {margin['margin']:.2f} | {named:.1f} | {sum(m['forget_name_accuracy'] > 0 for _, m in swept)}"
                     f"/{len(swept)} | {_mean_drop(swept, 'retain_name_accuracy'):.1f} | "
                     f"{_mean_drop(swept, 'object_accuracy'):.1f} |")
    lines += ["", "Who pays for the edit: the other identities whose name accuracy fell by 20 points or more, "
              "with the fixed attributes they share with the forgotten identity:", "",
              "| forgotten | identities that fell (drop in points: shared attributes) | the attribute shared most by "
              "those that fell: among them / among the others that kept their accuracy |",
              "|---|---|---|"]
    for r in rows:
        w = r["who_pays"]
        fell = "; ".join(f"{f['identity']} (−{100 * f['drop']:.0f}: {', '.join(f['shared']) or 'none'})"
                         for f in w["fell"]) or "none"
        t = w["telling"]
        telling = "–" if t is None else f"{t['attribute']}: {t['fell']} of {t['of_fell']} / {t['kept']} of {t['of_kept']}"
        lines.append(f"| {r['concept']} | {fell} | {telling} |")
    lines += ["", "Example answers (before → after, the forgotten identity):", ""]
    for r in rows:
        for e in r["examples"]:
            lines.append(f"- {r['concept']}: “{e['before']}” → “{e['after']}”")
    return lines


if __name__ == "__main__":
    sys.exit(main())
