"""Unlearning identities from the demo's SDXL pipeline through either text encoder, judged on generated images.

For each encoder and each of the world's first identities: one ``slug-pl fit`` run forgetting that
identity, ``configs/demo_sdxl.yaml`` for ``text_encoder: 2`` (the second world CLIP's text tower
and projection) and with ``configs/demo_sdxl_encoder1.yaml`` added for ``text_encoder: 1`` (the
first CLIP's, the Stable Diffusion demo's); the pipeline is built once and cached under
``--cache``. Reported as ``benchmarks/sd_demo.py`` reports the Stable Diffusion demo, from each
run's ``summary.json`` ``"generation"`` block (held-out seeds): how often each judge (the run's
CLIP unedited, zero-shot, and the classifier trained on the world's portraits) recognizes the
forgotten identity and the other identities in their prompts' generations before and after, the
others' CLIP score, the chosen layer and step, the run's wall time, and whether the SD demo's
bounds hold in each run. The runs use the configs as they are: SLUG's forget gradient without a
retain projection.

    python benchmarks/sdxl_demo.py --identities 1   # sdxl_demo.md
    python benchmarks/sdxl_demo.py --identities 1 --encoders 1 --protect 0.05   # sdxl_demo_protected.md
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from results_io import RESULTS, write_table_results
from sd_demo import (GRID_ROWS, arguments, crop_rows, fit_demo, grid_lines, name_state_changes, protection_lines,
                     results_lines, who_pays)

from slug_pl.atomic import atomic_output
from slug_pl.demo.world import WorldSpec, identity_names

#: Per encoder: the configs of its run, its CLIP's folder in the cache, the pipeline's folders of
#: the encoder and of its tokenizer, and what it is.
ENCODERS = {
    2: (["demo_sdxl.yaml"], "hf_clip_2", "text_encoder_2",
        "`text_encoder_2`: the second world CLIP's text tower and text projection (`hf_clip_2`)"),
    1: (["demo_sdxl.yaml", "demo_sdxl_encoder1.yaml"], "hf_clip", "text_encoder",
        "`text_encoder`: the first world CLIP's text tower (`hf_clip`, the Stable Diffusion demo's)"),
}
#: The hidden state SDXL's UNet reads of each encoder: the penultimate.
PENULTIMATE = -2


def main(argv=None) -> int:
    p = arguments(__doc__)
    p.add_argument("--encoders", nargs="+", type=int, default=list(ENCODERS), choices=list(ENCODERS),
                   help="the text encoders to edit, one set of runs each")
    p.add_argument("--protect", type=float, default=None, metavar="TOLERANCE",
                   help="the retain projection (model.protect_retained) at this tolerance, off every retained "
                        "prompt (as the Stable Diffusion demo: 0.05); default: the configs' setting (none). "
                        "Written to sdxl_demo_protected.*")
    args = p.parse_args(argv)
    stem = "sdxl_demo" if args.protect is None else "sdxl_demo_protected"
    projection = [] if args.protect is None else [
        "--model.protect_retained", json.dumps({"tolerance": args.protect})]  # the option's own limit
    root = Path(args.cache)  # as given (relative paths keep the record free of machine paths)
    rows, t_start, grid = [], time.perf_counter(), None
    for encoder in args.encoders:
        configs, clip, encoder_folder, _ = ENCODERS[encoder]
        for concept in identity_names(WorldSpec())[: args.identities]:
            with tempfile.TemporaryDirectory() as tmp:
                code, run, seconds = fit_demo(configs, root, concept, clip, "sdxl_pipeline", "sdxl_classifier",
                                              None, Path(tmp), *projection)
                summary = json.loads((run / "summary.json").read_text())
                if grid is None:
                    grid = crop_rows(run / "generation_grid.png", GRID_ROWS)
                changes = name_state_changes(root / "sdxl_pipeline", encoder_folder, root / "world",
                                             run / "edit.safetensors", PENULTIMATE)
            g = summary["generation"]
            edit = summary["method"]["edits"][0]
            rows.append({"encoder": encoder, "concept": concept, "exit_code": code, "run_seconds": seconds,
                         "layer": edit["layer"], "step": edit["step"], "relative_step": edit["relative_step"],
                         "search": summary["method"]["search"], "generation": g,
                         "retain_projection": summary["method"].get("retain_projection"),
                         "who_pays": who_pays(concept, g, changes)})
            print(f"text_encoder {encoder}, {concept}: exit {code}, {seconds:.0f}s, layer {edit['layer']}", flush=True)
    build = json.loads((root / "sdxl_pipeline" / "slug_demo_sd.json").read_text())
    build.pop("cache_key", None)
    clips = {folder: json.loads((root / folder / "slug_demo.json").read_text())
             for folder in ("hf_clip", "hf_clip_2")}
    command = ("python benchmarks/sdxl_demo.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    if grid is not None:
        with atomic_output(RESULTS / f"{stem}_grid.png", overwrite=True) as tmp_png:
            grid.save(tmp_png, format="PNG")
    write_table_results(stem, command, time.perf_counter() - t_start, {"build": build, "runs": rows},
                        markdown(command, build, clips, rows, stem))
    return 0


def _clip_line(folder: str, record: dict) -> str:
    k = record["cache_key"]["train_kwargs"]
    return (f"`{folder}`: {k['hidden_size']} wide, {k['layers']} layers, projection {k['projection_dim']}; held-out "
            f"zero-shot top-1 {100 * record['identities_top1']:.1f} % on identities, "
            f"{100 * record['objects_top1']:.1f} % on objects")


def markdown(command: str, build: dict, clips: dict, rows: list[dict], stem: str = "sdxl_demo") -> list[str]:
    g0 = rows[0]["generation"]
    s = g0["settings"]
    templates = g0["prompts"] // len(g0["per_concept"])
    recognition = build["recognition"]
    per_clip = "; ".join(f"`{folder}` at least {100 * min(per.values()):.0f} %"
                         for folder, per in recognition["per_clip"].items())
    lines = ["# Unlearning an identity from the demo's SDXL pipeline, through either text encoder", "",
             f"Command: `{command}` (on the pipeline that `slug-pl fit --config configs/demo_sdxl.yaml` builds and "
             f"caches).", "",
             "Pipeline (`StableDiffusionXLPipeline`, `force_zeros_for_empty_prompt`): two world-trained CLIPs, "
             + "; ".join(_clip_line(f, r) for f, r in clips.items()) + f"; VAE {build['vae_parameters'] / 1e6:.2f} M "
             f"parameters; UNet {build['unet_parameters'] / 1e6:.2f} M ({build['unet_steps']} steps) with "
             f"cross-attention to both encoders' penultimate states side by side and `text_time` conditioning on "
             f"the second's pooled output. Built in {build['total_seconds'] / 60:.1f} min after the CLIPs (2 shared "
             f"CPU cores: one thread trains the VAE then the UNet, a second process the classifier judge alongside "
             f"the UNet). Before any edit each CLIP recognizes every identity in its generations ({per_clip}; build "
             f"check); the classifier judge scores {100 * build['classifier_test_accuracy']:.1f} % on held-out "
             f"portraits.", "",
             f"Each run forgets one identity through one encoder; the other encoder stays as built. Forget set: the "
             f"pipeline's own images of the identity's {templates} prompts (15 each). Numbers on held-out seeds "
             f"{g0['seeds']}: {g0['prompts']} prompts (every identity × {templates} templates), DDIM {s['steps']} "
             f"steps, guidance {s['guidance']:g}; the search used seeds {s['search_seeds']}. Recognition: the "
             f"fraction of a prompt's generations the judge names as the prompt's identity (chance 5 %); the CLIP "
             f"judge is the run's own CLIP, unedited; others: mean over the {len(g0['per_concept']) - 1} other "
             f"identities. CLIP score: 100·cos(image, prompt) under that CLIP, the other identities' prompts. The "
             f"states in \"who pays\" are the edited encoder's penultimate hidden states (what the UNet reads of "
             f"it).", ""]
    for encoder, (_, _, _, what) in ENCODERS.items():
        mine = [r for r in rows if r["encoder"] == encoder]  # each encoder's runs judge with its own CLIP
        if mine:
            lines += [f"## `text_encoder: {encoder}`", "", f"Edited: {what}.", "", *protection_lines(mine),
                      *results_lines(mine)]
    return lines + grid_lines(stem, rows[0]["concept"], f"through `text_encoder: {rows[0]['encoder']}`")


if __name__ == "__main__":
    sys.exit(main())
