"""Unlearning identities from the demo's Stable Diffusion pipeline, judged on generated images.

For each of the world's first identities and each step-search mode: one
``slug-pl fit --config configs/demo_sd.yaml`` run (the pipeline is built once and cached under
``--cache``), forgetting that identity. ``search_on: generation`` searches each candidate's step
on generations (the demo's setting); ``search_on: clip`` searches on the CLIP's zero-shot metrics
(as SLUG does for CLIP itself) and then picks among the candidates by generations. Reported from
each run's ``summary.json`` ``"generation"`` block (held-out seeds): how often each judge (the
unedited CLIP zero-shot, and the classifier trained on the world's portraits) recognizes the
forgotten identity and the other identities in their prompts' generations, before and after, the
other identities' CLIP score, the chosen layer and the run's wall time.

    python benchmarks/sd_demo.py --identities 3
    # writes benchmarks/results/sd_demo.json, sd_demo.md and sd_demo_grid.png (a run's grid, top rows)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image
from results_io import RESULTS, write_table_results

from slug_pl.atomic import atomic_output
from slug_pl.cli import main as slug_main
from slug_pl.demo.world import WorldSpec, identity_names

REPO = Path(__file__).resolve().parent.parent
#: Rows of the first run's grid kept for the README figure (the forget row, then retain rows).
GRID_ROWS = 6
MODES = ("generation", "clip")


def fit_demo(configs: list[str], root: Path, concept: str, clip: str, pipeline: str, classifier: str,
             protect: str | None, out_dir: Path, *options: str) -> tuple[int, Path, float]:
    """One ``slug-pl fit`` of the demo ``configs`` (in ``configs/``, in order) forgetting
    ``concept`` with the demo cache at ``root``: its CLIP, pipeline and classifier judge are the
    folders ``clip``, ``pipeline`` and ``classifier`` there; ``protect`` is the retain projection,
    ``model.protect_retained`` (``off``, ``all`` or a number of retained prompts, its ``limit``;
    None: the configs' setting), ``options`` any further command-line options. Returns the exit
    code, the run folder and the wall seconds."""
    projection = [] if protect is None else {"off": ["--model.protect_retained", "null"], "all": []}.get(
        protect, ["--model.protect_retained.limit", protect])
    t0 = time.perf_counter()
    code = slug_main(["fit", *[a for c in configs for a in ("--config", str(REPO / "configs" / c))],
                      "--data.init_args.root", str(root), "--data.init_args.concepts", json.dumps([concept]),
                      "--model.family.init_args.model_name", str(root / clip),
                      "--model.target.init_args.pipeline", str(root / pipeline),
                      "--model.target.init_args.judges", json.dumps(["clip", str(root / classifier)]),
                      *projection,
                      "--model.target.init_args.save_edited", "false", "--model.target.init_args.progress", "false",
                      "--trainer.default_root_dir", str(out_dir), "--trainer.enable_progress_bar", "false", *options])
    return code, out_dir / "lightning_logs" / "version_0", time.perf_counter() - t0


def fit_sd_demo(root: Path, concept: str, search_on: str, out_dir: Path, protect: str = "off") -> tuple[int, Path, float]:
    """One demo run forgetting ``concept`` with the demo cache at ``root`` (``protect``: the retain
    projection, ``model.protect_retained``: ``off``, ``all`` or a number of retained prompts, its
    ``limit``); returns the exit code, the run folder and the wall seconds."""
    return fit_demo(["demo_sd.yaml"], root, concept, "hf_clip", "sd_pipeline", "sd_classifier", protect, out_dir,
                    "--model.target.init_args.search_on", search_on)


def crop_rows(grid: Path, rows: int, cell: int = 96, pad: int = 4, font_size: int = 14) -> Image.Image:
    """The header and the first ``rows`` rows of a :func:`slug_pl.evaluation.generation.image_grid`."""
    image = Image.open(grid)
    header = font_size + 3 * pad
    return image.crop((0, 0, image.width, min(image.height, header + rows * (cell + pad) + pad)))


def arguments(description: str) -> argparse.ArgumentParser:
    """The options a demo benchmark shares: ``--identities`` and ``--cache``."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--identities", type=int, default=3, help="identities (the world's first ones), one run each")
    p.add_argument("--cache", default=".slug_cache/demo", help="the demo cache (world, CLIPs, pipeline)")
    return p


def main(argv=None) -> int:
    p = arguments(__doc__)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, help="step-search modes to run")
    p.add_argument("--protect", default="all",
                   help="the retain projection, model.protect_retained: all (the demo's setting: projected off "
                        "every retained prompt; sd_demo.md), off (SLUG's forget gradient as it is; "
                        "sd_demo_unprotected.md) or N (its limit: the first N retained prompts only, concept by "
                        "concept, 4 per identity; sd_demo_protect_N_prompts.md: the others show what an unprotected "
                        "identity loses; sd_demo_protect_10.md, 10 identities, is --protect 40)")
    args = p.parse_args(argv)
    if args.protect not in ("off", "all") and not args.protect.isdigit():
        p.error(f"--protect is off, all or a number, got {args.protect!r}")
    stem = {"all": "sd_demo", "off": "sd_demo_unprotected"}.get(args.protect,
                                                                 f"sd_demo_protect_{args.protect}_prompts")
    root = Path(args.cache)  # as given (relative paths keep the record free of machine paths)
    rows, t_start, grid = [], time.perf_counter(), None
    for mode in args.modes:
        for concept in identity_names(WorldSpec())[: args.identities]:
            with tempfile.TemporaryDirectory() as tmp:
                code, run, seconds = fit_sd_demo(root, concept, mode, Path(tmp), args.protect)
                summary = json.loads((run / "summary.json").read_text())
                if grid is None:
                    grid = crop_rows(run / "generation_grid.png", GRID_ROWS)
                changes = name_state_changes(root / "sd_pipeline", "text_encoder", root / "world",
                                             run / "edit.safetensors")
            g = summary["generation"]
            edit = summary["method"]["edits"][0]
            rows.append({"mode": mode, "concept": concept, "exit_code": code, "run_seconds": seconds,
                         "layer": edit["layer"], "step": edit["step"], "relative_step": edit["relative_step"],
                         "search": summary["method"]["search"],
                         "clip_side": {"test_before": summary["before"], "test_after": summary["after"]},
                         "generation": g, "retain_projection": summary["method"].get("retain_projection"),
                         "who_pays": who_pays(concept, g, changes)})
            print(f"{mode} {concept}: exit {code}, {seconds:.0f}s, layer {edit['layer']}", flush=True)
    build = json.loads((root / "sd_pipeline" / "slug_demo_sd.json").read_text())
    build.pop("cache_key", None)
    command = ("python benchmarks/sd_demo.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    if grid is not None:
        with atomic_output(RESULTS / f"{stem}_grid.png", overwrite=True) as tmp_png:
            grid.save(tmp_png, format="PNG")
    write_table_results(stem, command, time.perf_counter() - t_start, {"build": build, "runs": rows},
                        markdown(command, build, rows, stem))
    return 0


def name_state_changes(pipeline: Path, encoder_folder: str, world: Path, edit_file: Path,
                       hidden_state: int | None = None) -> dict[str, float] | None:
    """Per identity, how much the run's edit moves what the UNet reads at the identity's name: the
    states of the pipeline's text encoder in ``encoder_folder`` (its tokenizer in the matching
    ``tokenizer*`` folder) at the name's token positions, ‖h_after − h_before‖ / ‖h_before‖,
    averaged over the positions and the world's identity templates. The states: the last hidden
    state (``hidden_state`` None, Stable Diffusion) or ``hidden_states[hidden_state]`` (SDXL: −2).
    None when the edit moves no state (SDXL's ``text_projection``, read only through the pooled
    output)."""
    import torch
    import transformers
    from safetensors.torch import load_file

    architecture = json.loads((pipeline / encoder_folder / "config.json").read_text())["architectures"][0]
    encoder = getattr(transformers, architecture).from_pretrained(pipeline / encoder_folder).eval()
    tokenizer = transformers.CLIPTokenizer.from_pretrained(pipeline / encoder_folder.replace("text_encoder", "tokenizer"))
    names = json.loads((world / "identities.json").read_text())
    templates = json.loads((world / "templates.json").read_text())["identities"]
    edit = load_file(str(edit_file))
    (layer,) = [k for k in edit if not k.startswith("original/")]
    params = dict(encoder.named_parameters())
    tensor = params[layer] if layer in params else params[layer.removeprefix("text_model.")]

    def states() -> torch.Tensor:
        ids = tokenizer([t.format(n) for n in names for t in templates], padding="max_length",
                        max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            out = encoder(ids, output_hidden_states=hidden_state is not None)
            return out.last_hidden_state if hidden_state is None else out.hidden_states[hidden_state]

    before = states()
    with torch.no_grad():
        tensor.copy_(edit[layer])
    after = states()
    if torch.equal(before, after):
        return None
    out = {}
    for i, name in enumerate(names):
        rel = []
        for j, template in enumerate(templates):
            start = 1 + len(tokenizer.tokenize(template.split("{}")[0]))  # after the start token and the prefix
            positions = slice(start, start + len(tokenizer.tokenize(name)))
            b, a = before[i * len(templates) + j, positions], after[i * len(templates) + j, positions]
            rel.append(((a - b).norm(dim=-1) / b.norm(dim=-1)).mean().item())
        out[name] = statistics.mean(rel)
    return out


def who_pays(concept: str, g: dict, changes: dict[str, float] | None, threshold: float = 0.2) -> dict:
    """The other identities whose recognition (the judges' mean) fell by at least ``threshold``,
    each with how far the edit moved the text states at its name relative to the forgotten
    identity's (:func:`name_state_changes`; None: the edit moves no state, no ratio), and that
    ratio's mean over those that fell and those that kept their recognition."""
    judges = list(g["judges"].values())

    def recognition(name: str, when: str) -> float:
        return statistics.mean(j["per_concept"][name][when] for j in judges)

    others = [c for c in (changes or g["per_concept"]) if c != concept]
    drop = {c: recognition(c, "before") - recognition(c, "after") for c in others}
    ratio = {c: None if changes is None else changes[c] / changes[concept] for c in others}
    fell = [c for c in others if drop[c] >= threshold]
    kept = [c for c in others if drop[c] < threshold]
    return {"fell": [{"identity": c, "drop": drop[c], "state_change_ratio": ratio[c]}
                     for c in sorted(fell, key=lambda c: -drop[c])],
            "mean_ratio_fell": statistics.mean(ratio[c] for c in fell) if fell and changes else None,
            "mean_ratio_kept": statistics.mean(ratio[c] for c in kept) if kept and changes else None}


def _ratio(ratio: float | None) -> str:
    return "–" if ratio is None else f"{ratio:.2f}"


def _pts(before: float, after: float) -> str:
    return f"{100 * before:.1f} → {100 * after:.1f}"


def acceptance_misses(g: dict, clip_score_drop: float) -> list[str]:
    """Which of the SD demo's bounds a run's ``"generation"`` block misses (``clip_score_drop`` in %)."""
    misses = []
    for j, r in g["judges"].items():
        short = "CLIP" if j.startswith("clip") else "classifier"
        b, a = r["before"], r["after"]
        if b["forget_recognition"] < 0.9:
            misses.append(f"forgotten {100 * b['forget_recognition']:.1f} % before ({short})")
        if a["forget_recognition"] > 0.1:
            misses.append(f"forgotten {100 * a['forget_recognition']:.1f} % after ({short})")
        if b["retain_recognition"] - a["retain_recognition"] > 0.15:
            misses.append(f"others −{100 * (b['retain_recognition'] - a['retain_recognition']):.1f} points ({short})")
    if clip_score_drop > 5:
        misses.append(f"CLIP score −{clip_score_drop:.1f} %")
    return misses


def _mode_section(mode: str, rows: list[dict]) -> list[str]:
    title = ("Step search on generations (`search_on: generation`, the demo's setting)" if mode == "generation" else
             "Step search on the CLIP's zero-shot metrics, candidates chosen by generations (`search_on: clip`)")
    measured = "the search seeds' generations" if mode == "generation" else "the CLIP's zero-shot metrics"
    return [f"## {title}", "", *results_lines(rows, measured)]


def results_lines(rows: list[dict], measured: str = "the search seeds' generations") -> list[str]:
    """The runs' table (each judge's recognition of the forgotten and the other identities before →
    after, the others' CLIP score, the chosen layer and step, the run's seconds), the summary over
    the runs, each run's verdict on the SD demo's bounds (:func:`acceptance_misses`), who pays for
    the edit (:func:`who_pays`) and the candidates; ``measured``: what the step search measured."""
    judges = list(rows[0]["generation"]["judges"])
    header = ["identity", "chosen layer", "‖λ·g‖/‖θ‖"]
    for j in judges:
        short = "CLIP" if j.startswith("clip") else "classifier"
        header += [f"forgotten ({short}) %", f"others ({short}) %"]
    header += ["others' CLIP score", "run (s)"]
    st = rows[0]["search"]
    lines = [f"Search: target `{st['target']}` on {measured}, "
             f"candidates: the first {st['top_k']} of the "
             f"first {st['fronts']} Pareto front(s), step margin {st['step_margin']:g}; every judge decides "
             f"(forget: the highest recognition over the judges, retain: their mean).", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        g = r["generation"]
        cells = [r["concept"], f"`{r['layer'].removeprefix('text_model.')}`", f"{r['relative_step']:.2f}"]
        for j in judges:
            b, a = g["judges"][j]["before"], g["judges"][j]["after"]
            cells += [_pts(b["forget_recognition"], a["forget_recognition"]),
                      _pts(b["retain_recognition"], a["retain_recognition"])]
        cells += [f"{g['before']['retain_clip_score']:.1f} → {g['after']['retain_clip_score']:.1f}",
                  f"{r['run_seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for j in judges:
        drops = [100 * (r["generation"]["judges"][j]["before"]["retain_recognition"]
                        - r["generation"]["judges"][j]["after"]["retain_recognition"]) for r in rows]
        forgotten = [100 * r["generation"]["judges"][j]["after"]["forget_recognition"] for r in rows]
        lines.append(f"- `{j}`: the forgotten identity is recognized in at most {max(forgotten):.1f} % of its "
                     f"generations after the edit; the other identities lose {statistics.mean(drops):.1f} points "
                     f"on average (at most {max(drops):.1f}).")
    drop = [100 * (r["generation"]["before"]["retain_clip_score"] - r["generation"]["after"]["retain_clip_score"])
            / r["generation"]["before"]["retain_clip_score"] for r in rows]
    lines.append(f"- The other identities' CLIP score drops by {statistics.mean(drop):.1f} % on average "
                 f"(at most {max(drop):.1f} %).")
    verdicts = []
    for r, d in zip(rows, drop):
        misses = acceptance_misses(r["generation"], d)
        verdicts.append(f"{r['concept']}: {'met' if not misses else 'missed (' + '; '.join(misses) + ')'}")
    lines.append("- The SD demo's bounds in each run (the forgotten identity at most 10 % under every judge, from at "
                 "least 90 %; the others lose at most 15 points on average under every judge and at most 5 % of "
                 "their CLIP score): " + "; ".join(verdicts) + ".")
    lines += ["", "Who pays for the edit: the other identities whose recognition (the judges' mean) fell by 20 points "
              "or more, with how far the edit moved the text encoder's states at their name (‖Δh‖/‖h‖ at the name's "
              "tokens, the states the UNet reads) as a fraction of how far it moved the forgotten identity's:", "",
              "| forgotten | identities that fell (drop, state change ratio) | state change ratio, mean: fell / kept |",
              "|---|---|---|"]
    for r in rows:
        w = r["who_pays"]
        fell = "; ".join(f"{f['identity']} (−{100 * f['drop']:.0f}, {_ratio(f['state_change_ratio'])})"
                         for f in w["fell"]) or "none"
        means = " / ".join(_ratio(m) for m in (w["mean_ratio_fell"], w["mean_ratio_kept"]))
        lines.append(f"| {r['concept']} | {fell} | {means} |")
    candidates = [(r["concept"], c) for r in rows for cs in r["generation"]["candidates"].values() for c in cs]
    if candidates:
        lines += ["", "Candidates at their CLIP-calibrated steps, scored on the search seeds' generations "
                  "(forget / retain recognition; every judge: forget the highest, retain the mean):", ""]
        for r in rows:
            for concept, cs in r["generation"]["candidates"].items():
                lines.append(f"- {concept}: " + "; ".join(
                    f"`{c['layer'].removeprefix('text_model.')}` {100 * c['forget_recognition']:.0f} / "
                    f"{100 * (c['retain_recognition'] or 0):.0f} %" for c in cs))
    return lines + [""]


def protection_lines(rows: list[dict]) -> list[str]:
    """With the retain projection (``model.protect_retained``): what was protected and, where only
    some identities were, what the unprotected ones lost (each judge, mean over runs)."""
    records = [r.get("retain_projection") for r in rows]
    if not any(records):
        return ["SLUG's forget gradient as it is (`model.protect_retained: null`).", ""]
    protected = [record["protected"][0] for record in records]
    p = protected[0]
    lines = [f"The forget gradient is projected off what the retained identities' prompts feed the text encoder "
             f"(the retain projection, `model.protect_retained`, tolerance {p['tolerance']:g}): "
             f"{len(p['concepts'])} identities protected, {p['inputs']} prompts, {records[0]['editable']} tensors "
             f"editable.", ""]
    judges = list(rows[0]["generation"]["judges"])
    for j in judges:
        split = {"protected": [], "unprotected": []}
        for r, pr in zip(rows, protected):
            for name, v in r["generation"]["judges"][j]["per_concept"].items():
                if name != r["concept"]:
                    split["protected" if name in pr["concepts"] else "unprotected"].append(v["after"] - v["before"])
        parts = [f"{kind} identities {100 * statistics.mean(d):+.1f} points ({len(d)} identity-runs)"
                 for kind, d in split.items() if d]
        lines.append(f"- `{j}`: recognition change of the other identities, " + "; ".join(parts) + ".")
    return lines + [""]


def markdown(command: str, build: dict, rows: list[dict], stem: str = "sd_demo") -> list[str]:
    g0 = rows[0]["generation"]
    s = g0["settings"]
    templates = g0["prompts"] // len(g0["per_concept"])
    lines = ["# Unlearning an identity from the demo's Stable Diffusion pipeline", "",
             f"Command: `{command}` (on the pipeline that `slug-pl fit --config configs/demo_sd.yaml` builds and "
             f"caches).", "",
             f"Pipeline: VAE {build['vae_parameters'] / 1e6:.2f} M parameters, "
             f"UNet {build['unet_parameters'] / 1e6:.2f} M "
             f"({build['unet_steps']} steps), text encoder = the world-trained HF CLIP's text tower; built in "
             f"{build['total_seconds'] / 60:.1f} min after the world's CLIP (2 shared CPU cores: one thread trains the "
             f"VAE then the UNet, a second process the classifier judge alongside the UNet). Before any edit the CLIP "
             f"recognizes each identity in at least {100 * build['recognition']['min']:.0f} % of its generations "
             f"(mean {100 * build['recognition']['mean']:.1f} %, build check); the classifier judge scores "
             f"{100 * build['classifier_test_accuracy']:.1f} % on held-out portraits.", "",
             f"Each run forgets one identity. Forget set: the pipeline's own images of the identity's {templates} "
             f"prompts (15 each). Numbers on held-out seeds {g0['seeds']}: {g0['prompts']} prompts (every identity × "
             f"{templates} templates), DDIM {s['steps']} steps, guidance {s['guidance']:g}; the search used seeds "
             f"{s['search_seeds']}. Recognition: the fraction of a prompt's generations the judge names as the "
             f"prompt's identity (chance 5 %); others: mean over the {len(g0['per_concept']) - 1} other identities. "
             f"CLIP score: 100·cos(image, prompt) under the unedited CLIP, the other identities' prompts.", ""]
    lines += protection_lines(rows)
    for mode in MODES:
        mine = [r for r in rows if r["mode"] == mode]
        if mine:
            lines += _mode_section(mode, mine)
    return lines + grid_lines(stem, rows[0]["concept"], f"{rows[0]['mode']} search")


def grid_lines(stem: str, concept: str, run: str) -> list[str]:
    """The grid figure (``<stem>_grid.png``, :func:`crop_rows`) of ``concept``'s run (``run`` says
    which) and its caption."""
    return [f"![before | after]({stem}_grid.png)", "",
            f"*{concept}'s run ({run}), held-out seeds: the forgotten identity's row first, then the first "
            f"{GRID_ROWS - 1} other identities (before | after).*"]


if __name__ == "__main__":
    sys.exit(main())
