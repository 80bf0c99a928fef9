"""The demo's step search on 2 CPU processes (DDP over gloo, the evaluations shared) against 1.

Both searches start from the same gradient files (``model.gradients_from`` of one demo run), so
their inputs are the same bytes. Each round runs ``slug-pl fit --config configs/demo.yaml`` once
on 1 process and once on 2 (``ddp_spawn``), one after the other, in a fresh process each; the time
compared is ``timings_s.search`` of each run's ``summary.json`` (ranking, every evaluation,
choice), and ``search.csv`` (every evaluation's layer, step and metrics) and the chosen edit must
be the same.

Two thread settings, since the machine's cores are what the processes share:

- ``default``: as a user runs it. One process uses every core (PyTorch's default threads); under
  DDP Lightning gives each of the 2 processes half of them.
- ``one thread each`` (``OMP_NUM_THREADS=1``): one core per process, as each rank of a GPU run
  has a device of its own. The closer model of adding a device.

The demo's evaluation sets are small (300 + 200 images of 32 px). ``--eval-scale N`` adds the same
comparison on evaluation sets N times larger: the demo world's seed with N × its held-out images
per person and object (a world of its own, built once), searched with the same demo CLIP; its
own pass gives the gradients both searches use.

    python benchmarks/distributed_search.py --rounds 3 --eval-scale 8
    # writes benchmarks/results/distributed_search.json and distributed_search.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_io import write_table_results

REPO = Path(__file__).resolve().parent.parent
SETTINGS = {"default": {}, "one thread each": {"OMP_NUM_THREADS": "1"}}


def fit(work: Path, out: Path, devices: int, env: dict[str, str], *extra: str,
        config: Path = REPO / "configs" / "demo.yaml") -> Path:
    """One fit of ``config`` (the demo's by default) in a fresh process (cwd ``work``: the demo
    cache ``work/.slug_cache/demo`` is shared); returns the run folder."""
    strategy = ["--trainer.strategy", "ddp_spawn"] if devices > 1 else []
    command = [sys.executable, "-m", "slug_pl.cli", "fit", "--config", str(config),
               "--trainer.devices", str(devices), *strategy, "--trainer.default_root_dir", str(out),
               "--trainer.enable_progress_bar", "false", *extra]
    done = subprocess.run(command, cwd=work, env={**os.environ, **env}, capture_output=True, text=True)
    if done.returncode not in (0, 3):
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return out / "lightning_logs" / "version_0"


def search_record(run: Path) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    return {"search_s": summary["timings_s"]["search"], "ranks": summary["devices"].get("search_ranks"),
            "edits": summary["method"]["edits"], "evaluations": summary["cost"]["evaluations"],
            "search_csv": (run / "search.csv").read_text()}


def larger_evaluation_config(work: Path, scale: int) -> Path:
    """A config searching the demo CLIP (built in ``work`` by the first demo fit) on the demo
    world's seed with ``scale`` × its held-out images per class: forget pairs mined from that
    world's corpus, its first corpus shard as the retain set."""
    import yaml

    from slug_pl.data.mining import mine_forget_set
    from slug_pl.demo.world import WorldSpec, build_world, identity_names

    base = WorldSpec()
    spec = WorldSpec(seed=base.seed, identity_val=base.identity_val * scale, object_val=base.object_val * scale)
    world = build_world(work / f"world-eval{scale}", spec)
    concept = identity_names(spec)[0]
    forget = mine_forget_set(world["corpus"], [concept], work / f"world-eval{scale}-forget").output_shards
    templates = json.loads(Path(world["templates_json"]).read_text())
    sets = {stage: {"concepts": {"shards": world[f"{stage}_identities"], "classnames": world["identities_json"],
                                 "templates": templates["identities"]},
                    "utility": {"shards": world[f"{stage}_objects"], "classnames": world["objects_json"],
                                "templates": templates["objects"]}} for stage in ("val", "test")}
    config = {
        "seed_everything": 0,
        "model": {"class_path": "slug_pl.methods.SlugModule", "init_args": {"family": {
            "class_path": "slug_pl.families.OpenClip",
            "init_args": {"model_name": "slug-demo-vit",
                          "pretrained": str(work / ".slug_cache" / "demo" / "model" / "slug-demo-vit.safetensors")}}}},
        "data": {"class_path": "slug_pl.data.datamodule.SlugDataModule", "init_args": {
            "forget": [str(p) for p in forget], "retain": world["corpus_shards"][0], "concepts": [concept],
            "batch_size": 64, "retain_batch_size": 128, "eval_batch_size": 512,
            "validation": sets["val"], "test": sets["test"]}},
        "forget_target": {"metric": "forget_top5", "value": 0.0},
        "search": {"top_k": 3, "towers": ["vision", "text"], "max_evals": 10, "initial_step_fraction": 0.1},
        "trainer": {"accelerator": "cpu", "devices": 1},
    }
    path = work / f"eval{scale}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def compare(work: Path, label: str, config: Path, rounds: int) -> dict:
    """One pass on 1 process, then ``rounds`` × (1 process, 2 processes) searches of its
    gradients per thread setting; every search must equal the pass run's own."""
    first = fit(work, work / label / "pass", 1, {}, config=config)
    gradients = ["--model.gradients_from", str(first / "gradients")]
    reference = search_record(first)
    rows = []
    for setting, env in SETTINGS.items():
        times: dict[int, list[float]] = {1: [], 2: []}
        for r in range(rounds):
            for devices in (1, 2):
                out = work / label / f"{setting}-{r}-{devices}".replace(" ", "_")
                record = search_record(fit(work, out, devices, env, *gradients, config=config))
                assert record["ranks"] == devices, record["ranks"]
                if record["search_csv"] != reference["search_csv"] or record["edits"] != reference["edits"]:
                    raise AssertionError(f"{label}, {devices} process(es), {setting}: the search differs from "
                                         f"the 1-process run's")
                times[devices].append(record["search_s"])
        one, two = statistics.median(times[1]), statistics.median(times[2])
        rows.append({"evaluation_sets": label, "threads": setting, "one_process_s": times[1],
                     "two_processes_s": times[2], "median_one_s": one, "median_two_s": two, "speedup": one / two})
    edit = reference["edits"][0]
    return {"label": label, "evaluations": reference["evaluations"], "edit": edit, "rows": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="1- and 2-process searches per thread setting")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--eval-scale", type=int, default=None,
                   help="also compare on evaluation sets this many times larger than the demo's")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        results = [compare(work, "demo", REPO / "configs" / "demo.yaml", args.rounds)]
        if args.eval_scale:
            config = larger_evaluation_config(work, args.eval_scale)
            results.append(compare(work, f"demo × {args.eval_scale}", config, args.rounds))
    command = f"python benchmarks/distributed_search.py --rounds {args.rounds}" + (
        f" --eval-scale {args.eval_scale}" if args.eval_scale else "")
    markdown = [
        "# The step search on 2 processes against 1 (demo, CPU, gloo)",
        "",
        f"Command: `{command}` (from the repository root). In each comparison both searches start from "
        "the same gradient files, and every run's `search.csv` and chosen edit were checked to equal "
        "those of the run that made the gradients.",
        "",
        f"Machine: {os.cpu_count()} CPU cores, shared. Time: `timings_s.search` (ranking, every "
        "evaluation, the choice), median of the rounds; the 1- and 2-process runs alternate.",
        "",
        "| evaluation sets | evaluations | chosen edit | threads | 1 process (s) | 2 processes (s) | speed-up |",
        "|---|---|---|---|---|---|---|",
        *[f"| {res['label']} | {res['evaluations']} | `{res['edit']['layer']}` | {r['threads']} | "
          f"{r['median_one_s']:.2f} | {r['median_two_s']:.2f} | {r['speedup']:.2f}× |"
          for res in results for r in res["rows"]],
        "",
        "The demo's sets: 300 identity and 200 object images of 32 px. Every rank of the run shares "
        "each evaluation: each encodes its part of the images and prompts, the prompt features are "
        "gathered and the hit counts summed ([scaling.md](../../docs/scaling.md#the-search-on-several-ranks)).",
    ]
    write_table_results("distributed_search", command, time.perf_counter() - t_start,
                        {"cpu_count": os.cpu_count(), "comparisons": results}, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
