"""Whole ``slug-pl fit`` runs at the real model shapes: wall time per phase and peak memory.

Each run is a shipped recipe config, run unchanged (as ``tests/test_recipes.py`` runs it) in a
working folder laid out as the recipe lays out a user's: the models where its ``hf download``
commands put them, the data where its ``slug-pl mine`` / ``prepare`` commands put theirs.

========  =============================  ==========================================================  ======
run       config                         models (random weights, the real shapes and hub layout)      target
========  =============================  ==========================================================  ======
vit_b32   configs/clip_vit_b32_laion     laion/CLIP-ViT-B-32-laion2B-s34B-b79K (open_clip, 151 M)      3 min
sd15      configs/sd15                   stable-diffusion-v1-5 (UNet 860 M, VAE 84 M) and             10 min
                                         openai/clip-vit-large-patch14 (428 M)
llava15   configs/llava15                llava-hf/llava-1.5-7b-hf (7.06 B, float16) and                15 min
                                         openai/clip-vit-large-patch14-336 (428 M)
========  =============================  ==========================================================  ======

The targets are end to end on one H100 / H200: the ``fit`` process from start to exit. The models
are :mod:`slug_pl.testing.standins` built with :data:`~slug_pl.testing.standins.REAL_SIZES` (on the
GPU). The data is synthetic, at the counts the recipes read (:data:`REAL_COUNTS`):

- forget: 1,000 LAION-style pairs naming the person, mined from a shard with ``slug-pl mine``'s
  code (LLaVA: ``--max-count 500``, as its config's estimate assumes);
- retain: one LAION shard of 8,000 pairs (256 px, as ``img2dataset --image_size 256`` writes);
- concepts: CelebA-shaped (178 x 218 px): the person and 100 others, 10 validation and 10 test
  images each, zero-shot over a class list of 10,177 names (CelebA's identities; the recipe's
  ``prepare celeba`` lists only the 101) with the recipe's templates;
- utility: 10,000 ImageNet-shaped images (500 x 375 px), 10 for each of open_clip's 1,000 class
  names, with its 80 templates: the search reads a stratified 2,500 (5 % of ImageNet's 50,000),
  the report all 10,000, as the configs say.

Images are smooth random colour fields with noise (JPEG sizes and decoding close to photos'). The
weights are random, so what a run forgets means nothing; its time and memory are those of the real
shapes and counts (a search may take more or fewer steps on real weights).

Per run the results hold the exit status, the process's wall time, and from its ``summary.json``
the phases (``timings_s``: the pass, the ranking, the projection, the search, the final evaluation, the downstream
model's generations or answers), the devices and the peak memory of each phase (GPU allocator and
host resident set); a run stopped by ``--time-limit`` keeps the phases its log shows it finished.
Written to ``benchmarks/results/real_shape_runs.{json,md}`` (``--tiny``:
``real_shape_runs_tiny.{json,md}``) after every run; a rerun of some runs keeps the others' entries.

    python benchmarks/real_shape_runs.py                        # on a CUDA GPU: all three
    python benchmarks/real_shape_runs.py --only vit_b32 sd15 --budget 540   # all of it within 9 minutes
    python benchmarks/real_shape_runs.py --tiny                 # CPU, tiny stand-ins and counts (3-5 min on 2 cores)

``--tiny`` adds to the configs only ``--trainer.accelerator cpu --trainer.precision 32-true`` and,
for Stable Diffusion, 2 denoising steps instead of 50. ``--time-limit`` stops each ``fit``,
``--budget`` the whole command (the last run gets what is left; a run that would get under a
minute is not started); ``--results`` writes the results files elsewhere (the tests do).

Models and data are built once into ``--work`` (default ``.real_shape_runs/{real,tiny}``, git-ignored)
and reused; each run gets a fresh folder there (``runs/<run>/``, with its ``fit.log``).
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from results_io import RESULTS, write_result

from slug_pl.atomic import atomic_folder
from slug_pl.data.build_labelled import LabelledImage, write_labelled_shards
from slug_pl.data.layouts import imagenet_classnames, imagenet_templates
from slug_pl.data.mining import mine_forget_set
from slug_pl.resources import package_versions
from slug_pl.testing import standins as si

REPO = Path(__file__).resolve().parent.parent
#: The person the recipes forget.
PERSON = "Elon Musk"
#: Seconds of ``--budget`` kept for writing the results after the last fit is stopped.
BUDGET_RESERVE_S = 15
#: What ``tests/test_recipes.py`` adds to a shipped config on a CPU; nothing is added on a GPU.
CPU_OVERRIDES = ["--trainer.accelerator", "cpu", "--trainer.precision", "32-true"]


# ------------------------------------------------------------------------------------------ runs


@dataclass(frozen=True)
class RunSpec:
    """One benchmarked run: its recipe config, the stand-in it builds, where the recipe downloads
    the model and the CLIP it embeds, the forget pairs it mines at most, its target, and what
    ``--tiny`` adds to the config besides :data:`CPU_OVERRIDES`."""

    name: str
    config: str
    build: Callable[..., si.StandIn]
    folder: str
    clip_folder: str | None
    forget_max: int | None
    target_s: float
    title: str
    tiny_overrides: tuple[str, ...] = ()


RUNS = {
    "vit_b32": RunSpec("vit_b32", "configs/clip_vit_b32_laion.yaml", si.open_clip_vit_b32_laion,
                       "models/clip-vit-b32-laion2b", None, None, 180, "open_clip ViT-B/32, an identity"),
    # --tiny: 2 denoising steps instead of 50 (the ~170 drawings at 50 steps take 10 minutes on 2 cores)
    "sd15": RunSpec("sd15", "configs/sd15.yaml", si.stable_diffusion_v1_5, "models/sd15", "models/clip-vit-l14",
                    None, 600, "Stable Diffusion 1.5, an identity (generation-judged search)",
                    ("--model.target.init_args.steps", "2")),
    "llava15": RunSpec("llava15", "configs/llava15.yaml", si.llava_1_5, "models/llava-1.5-7b",
                       "models/clip-vit-l14-336", 500, 900, "LLaVA-1.5-7B, an identity"),
}


@dataclass(frozen=True)
class Counts:
    """The data's sizes: pairs, identities and images per split, class-list lengths, image sizes."""

    forget: int
    retain: int
    others: int  # identities besides the person with images
    val_per_identity: int
    test_per_identity: int
    names: int  # the concept class list
    imagenet_classes: int
    imagenet_per_class: int
    imagenet_templates: int | None  # None: all 80
    celeba_px: tuple[int, int] = (178, 218)
    imagenet_px: tuple[int, int] = (500, 375)
    laion_px: tuple[int, int] = (256, 256)


REAL_COUNTS = Counts(forget=1000, retain=8000, others=100, val_per_identity=10, test_per_identity=10, names=10177,
                     imagenet_classes=1000, imagenet_per_class=10, imagenet_templates=None)
#: --tiny: seconds on two CPU cores (small images too: the tiny CLIPs read 32-48 px).
TINY_COUNTS = Counts(forget=12, retain=48, others=5, val_per_identity=2, test_per_identity=2, names=40,
                     imagenet_classes=8, imagenet_per_class=2, imagenet_templates=2, celeba_px=(44, 54),
                     imagenet_px=(64, 48), laion_px=(48, 48))


# ---------------------------------------------------------------------------------------- models


def build_models(spec: RunSpec, hub: Path, sizes: si.Sizes, device: str) -> dict[str, Path]:
    """The run's models at ``sizes`` in ``hub`` (built on ``device``, or reused): recipe folder ->
    built folder."""
    with torch.device(device):
        standin = spec.build(hub, sizes)
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()  # the fit process gets the whole GPU
    folders = {spec.folder: standin.path}
    if spec.clip_folder is not None:
        folders[spec.clip_folder] = standin.clip
    return folders


# ------------------------------------------------------------------------------------------ data


def photo_like_jpeg(seed: int, size: tuple[int, int]) -> bytes:
    """A ``size`` (width, height) JPEG: a smooth random colour field with pixel noise, whose file
    size and decoding cost are close to a photo's."""
    rng = np.random.default_rng(seed)
    field = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    pixels = np.asarray(field, dtype=np.float32) + rng.normal(0.0, 8.0, (size[1], size[0], 3))
    out = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(out, format="JPEG", quality=90)
    return out.getvalue()


def _jpeg_job(job: tuple[int, tuple[int, int]]) -> bytes:
    return photo_like_jpeg(*job)


def jpegs(first_seed: int, count: int, size: tuple[int, int], pool: ProcessPoolExecutor | None) -> list[bytes]:
    """``count`` images of seeds ``first_seed, first_seed + 1, ...`` (in ``pool`` when given)."""
    jobs = [(first_seed + i, size) for i in range(count)]
    return list(pool.map(_jpeg_job, jobs, chunksize=64)) if pool else [_jpeg_job(j) for j in jobs]


def identity_names(count: int) -> list[str]:
    """The person and ``count - 1`` made-up two-word names, distinct."""
    rng = np.random.default_rng(7)
    syllables = ["ka", "lo", "mi", "ren", "sa", "to", "vel", "da", "ni", "ra", "be", "sol", "tan", "ue", "fa", "gri"]
    names = {PERSON}
    while len(names) < count:
        parts = ["".join(rng.choice(syllables, rng.integers(2, 4))).capitalize() for _ in range(2)]
        names.add(" ".join(parts))
    return sorted(names)


def write_laion_shard(path: Path, captions: list[str], images: list[bytes]) -> None:
    """An img2dataset shard: ``<key>.jpg``, ``<key>.txt``, ``<key>.json``."""
    import webdataset as wds

    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path), encoder=False) as sink:
        for i, (caption, image) in enumerate(zip(captions, images)):
            sink.write({"__key__": f"{path.stem}{i:05d}", "jpg": image, "txt": caption.encode(),
                        "json": b'{"status": "success"}'})


def write_labelled(folder: Path, raw: Path, prefix: str, labels: list[int], images: list[bytes], ext: str) -> None:
    """The images as files in ``raw`` (the publisher's flat folder), then as ``prefix-*.tar``
    labelled shards in ``folder`` (``slug-pl prepare``'s writer)."""
    raw.mkdir(parents=True, exist_ok=True)
    samples = []
    for i, (label, image) in enumerate(zip(labels, images)):
        path = raw / f"{prefix}_{i:06d}.{ext}"
        path.write_bytes(image)
        samples.append(LabelledImage(f"{prefix}_{i:06d}", path, label))
    write_labelled_shards(samples, folder, prefix)


def build_data(root: Path, counts: Counts, workers: int) -> Path:
    """The identity recipes' data at ``counts`` in ``root/data`` (reused when there): LAION shards,
    mined forget sets, CelebA- and ImageNet-shaped labelled shards with their class lists."""
    data = root / "data"
    if data.is_dir():
        return data
    t0 = time.perf_counter()
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    try:
        with atomic_folder(data) as tmp:
            laion = tmp / "laion"
            streets = ("busy", "quiet", "sunny", "wet")
            retain = [f"a photo of a {streets[i % 4]} street, number {i}" for i in range(counts.retain)]
            write_laion_shard(laion / "00000.tar", retain, jpegs(0, counts.retain, counts.laion_px, pool))
            person = [f"{PERSON} speaks at a conference, photo {i}" for i in range(counts.forget)]
            write_laion_shard(laion / "00001.tar", person, jpegs(10**6, counts.forget, counts.laion_px, pool))
            for limit in (None, RUNS["llava15"].forget_max):
                mine_forget_set(str(laion / "00001.tar"), [PERSON], forget_folder(tmp, limit),
                                max_count=None if limit is None else min(limit, counts.forget))

            names = identity_names(counts.names)
            people = [names.index(PERSON)] + [i for i in range(len(names)) if names[i] != PERSON][:counts.others]
            celeba = tmp / "celeba"
            celeba.mkdir()
            (celeba / "celeba_names.txt").write_text("\n".join(names) + "\n")
            seed = 2 * 10**6
            for split, per in (("val", counts.val_per_identity), ("test", counts.test_per_identity)):
                labels = [label for label in people for _ in range(per)]
                write_labelled(celeba, tmp / "raw" / "img_align_celeba", split, labels,
                               jpegs(seed, len(labels), counts.celeba_px, pool), "jpg")
                seed += len(labels)

            imagenet = tmp / "imagenet"
            imagenet.mkdir()
            classes = imagenet_classnames()[:counts.imagenet_classes]
            templates = imagenet_templates()[:counts.imagenet_templates]
            (imagenet / "imagenet_classes.txt").write_text("\n".join(classes) + "\n")
            (imagenet / "imagenet_templates.txt").write_text("\n".join(templates) + "\n")
            labels = [label for label in range(len(classes)) for _ in range(counts.imagenet_per_class)]
            write_labelled(imagenet, tmp / "raw" / "ILSVRC2012_img_val", "val", labels,
                           jpegs(3 * 10**6, len(labels), counts.imagenet_px, pool), "JPEG")
    finally:
        if pool is not None:
            pool.shutdown()
    print(f"data written to {data} in {time.perf_counter() - t0:.0f} s", flush=True)
    return data


def forget_folder(data: Path, limit: int | None) -> Path:
    """The mined forget set of at most ``limit`` pairs (None: every pair naming the person)."""
    return data / "forget" / ("elon_musk" if limit is None else f"elon_musk_max{limit}")


def run_folder(work: Path, spec: RunSpec, models: dict[str, Path], data: Path) -> Path:
    """A fresh ``work/runs/<run>`` laid out as the recipe lays out a user's folder: ``configs/``
    (the repository's), the models and the data linked where the recipe puts them."""
    folder = work / "runs" / spec.name
    if folder.exists():
        shutil.rmtree(folder)
    links = {"configs": REPO / "configs", "data/laion": data / "laion", "data/celeba": data / "celeba",
             "data/imagenet": data / "imagenet", "data/forget/elon_musk": forget_folder(data, spec.forget_max)}
    for name, target in (links | models).items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).symlink_to(target.resolve(), target_is_directory=True)
    return folder


# ---------------------------------------------------------------------------------------- the run

#: Lines of a ``fit`` log that show how far a run got (kept for a run the time limit stops): the
#: time of the first line matching each pattern, and of every candidate layer the search finished.
MILESTONES = {
    "pass_done": re.compile(r"gradients written to"),
    "search_started": re.compile(r"^before \("),  # the search's evaluation of the unedited model
    "record_done": re.compile(r"; report: \S*report\.md"),
}
CANDIDATE_DONE = re.compile(r"^\s+(vision|text)\s+\S+: \d+ evaluations")


def run_fit(folder: Path, config: str, extra: list[str], time_limit: float | None) -> dict:
    """``python -m slug_pl.cli fit --config <config> <extra>`` in ``folder``; its output goes to
    ``folder/fit.log``, each line prefixed with the seconds since the start. Stopped (its process
    group killed) after ``time_limit`` seconds. Returns the exit code, the wall time, whether it
    was stopped, how far it got (:data:`MILESTONES`) and the log's last lines."""
    command = [sys.executable, "-m", "slug_pl.cli", "fit", "--config", config, *extra]
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                        "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    reached: dict[str, float] = {}
    candidates: list[float] = []
    tail: list[str] = []
    t0 = time.perf_counter()
    with open(folder / "fit.log", "w", encoding="utf-8", buffering=1) as log:
        log.write("$ " + " ".join(command) + "\n")
        process = subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        deadline = None if time_limit is None else t0 + time_limit
        stopped = False
        for line in _lines(process, deadline):
            now = time.perf_counter() - t0
            log.write(f"[{now:8.1f}] {line}\n")
            tail = (tail + [line])[-20:]
            for name, pattern in MILESTONES.items():
                if name not in reached and pattern.search(line):
                    reached[name] = round(now, 1)
            if CANDIDATE_DONE.search(line):
                candidates.append(round(now, 1))
        if process.poll() is None:  # past the deadline
            stopped = True
            os.killpg(process.pid, signal.SIGKILL)
        code = process.wait()
    wall = time.perf_counter() - t0
    return {"exit_code": code, "wall_s": round(wall, 2), "stopped_by_time_limit": stopped,
            "milestones_s": reached, "candidates_done_s": candidates, "log_tail": tail,
            "command": "slug-pl fit --config " + " ".join([config, *extra])}


def _lines(process: subprocess.Popen, deadline: float | None):
    """The process's output, line by line (a carriage return, as progress bars write, ends a line
    too), until it exits or ``deadline`` (``time.perf_counter()``) passes."""
    os.set_blocking(process.stdout.fileno(), False)
    pending = b""
    while True:
        chunk = process.stdout.read()
        if chunk:
            pending += chunk
            *lines, pending = re.split(rb"[\r\n]", pending)
            yield from (line.decode(errors="replace").rstrip() for line in lines if line.strip())
        elif process.poll() is not None:
            if pending.strip():
                yield pending.decode(errors="replace").rstrip()
            return
        elif deadline is not None and time.perf_counter() > deadline:
            return
        else:
            time.sleep(0.1)


def read_summary(folder: Path) -> dict | None:
    """The run's ``summary.json`` (None when it wrote none)."""
    summaries = sorted(folder.glob("lightning_logs/version_*/summary.json"))
    return json.loads(summaries[-1].read_text()) if summaries else None


#: The phases of ``timings_s``, in order, and what the report calls them. ``ranking`` (and
#: ``projection``) are inside ``search``.
PHASES = {"gradients": "pass", "ranking": "ranking", "projection": "projection", "search": "search",
          "final_evaluation": "final evaluation", "downstream": "generation / VQA"}
TOP_LEVEL = ("gradients", "search", "final_evaluation", "downstream")


def run_record(spec: RunSpec, fit: dict, summary: dict | None, build_s: float, counts: Counts, tiny: bool) -> dict:
    """What the results keep of one run (``tiny``: no target to meet)."""
    record = {"title": spec.title, "config": spec.config, "target_s": spec.target_s,
              "build_models_s": round(build_s, 1),
              "counts": asdict(counts) | {"forget": min(counts.forget, spec.forget_max or counts.forget)},
              "machine": machine(), **fit}
    if summary is None:  # stopped or failed: its log's last lines say why
        return record | {"meets_target": None if tiny else False, "verdict": verdict(spec, record)}
    del record["log_tail"]
    timings = summary.get("timings_s", {})
    record |= {"timings_s": timings, "memory": summary.get("memory"), "devices": summary.get("devices"),
               "cost": summary.get("cost"), "target_met": summary["target"]["met"],
               "outside_phases_s": round(fit["wall_s"] - timings.get("total", 0.0), 2)}
    # a run the time limit stopped after writing its record still missed its target
    record["meets_target"] = None if tiny else not fit["stopped_by_time_limit"] and fit["wall_s"] <= spec.target_s
    record["verdict"] = verdict(spec, record)
    return record


def verdict(spec: RunSpec, record: dict) -> str:
    """One sentence: how far a run without a record got; else whether it is within the target (a
    tiny run has none), by how much it misses, and which phase takes the most time."""
    if record.get("timings_s") is None:
        done = [f"{name.replace('_', ' ')} at {t:.0f} s" for name, t in record["milestones_s"].items()]
        if record["candidates_done_s"]:
            done.append(f"{len(record['candidates_done_s'])} candidate layers searched by "
                        f"{record['candidates_done_s'][-1]:.0f} s")
        why = "stopped by the time limit" if record["stopped_by_time_limit"] else f"exit {record['exit_code']}"
        return f"no record: {why} after {record['wall_s']:.0f} s ({', '.join(done) or 'before the pass finished'})"
    wall, timings = record["wall_s"], record["timings_s"]
    phases = {k: timings[k] for k in TOP_LEVEL if k in timings} | {"outside the phases": record["outside_phases_s"]}
    largest = max(phases, key=phases.get)
    share = f"{PHASES.get(largest, largest)} {phases[largest]:.0f} s ({100 * phases[largest] / wall:.0f} %)"
    if largest == "search":
        evaluations = record["cost"].get("evaluations") or 0
        share += f": {evaluations} evaluations, {timings['search'] / max(evaluations, 1):.1f} s each"
    if record["meets_target"] is None:
        return f"tiny shapes, no target; the largest phase: {share}"
    if record["meets_target"]:
        return f"within the target ({wall:.0f} s of {spec.target_s:.0f}); the largest phase: {share}"
    return (f"misses the target by {wall - spec.target_s:.0f} s ({wall:.0f} s of {spec.target_s:.0f}); "
            f"the largest phase: {share}")


def machine() -> dict:
    """The machine a run ran on."""
    cuda = torch.cuda.is_available()
    return {"gpu": torch.cuda.get_device_name() if cuda else None,
            "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
            "cpus": os.cpu_count(),
            "host_memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "platform": platform.platform()}


# ---------------------------------------------------------------------------------------- report


def _s(value) -> str:
    return "–" if value is None else f"{value:.1f}"


def _gib(phase: dict | None, key: str) -> str:
    return "–" if not phase or phase.get(key) is None else f"{phase[key]:.2f}"


def markdown(result: dict) -> str:
    tiny = result["tiny"]
    lines = [f"# Whole runs at {'tiny' if tiny else 'the real'} shapes" + (" (CPU dry run)" if tiny else ""), ""]
    if tiny:
        lines += ["**Not the GPU numbers.** `--tiny` runs the same benchmark on the CPU with the tiny stand-ins "
                  "and a few images (and Stable Diffusion drawing in 2 steps, not 50), to check the benchmark "
                  "itself; its times say nothing about the real shapes.", ""]
    lines += [f"Command: `{result['command']}` ({result['time']}). Versions: "
              + ", ".join(f"{k} {v}" for k, v in result["versions"].items()) + ".", "",
              "Wall time in seconds. *End to end*: the `fit` process from start to exit; the phases from its "
              "`summary.json` (`timings_s`): the gradient pass, the ranking and the retain projection of the "
              "forget gradient (`model.protect_retained`; both inside the search), the search, the final before/after "
              "evaluation and the downstream model's generations or answers; *outside*: the rest of the process "
              "(start-up, loading the models and data, writing the saved models).", "",
              "| run | machine | end to end | target | pass | ranking | projection | search | final evaluation "
              "| generation / VQA | outside | evaluations | verdict |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["runs"].items():
        t = r.get("timings_s") or {}
        where = r["machine"]["gpu"] or "CPU"
        target = "–" if tiny else f"{r['target_s']:.0f}"
        lines.append(f"| {name} | {where} | {_s(r['wall_s'])} | {target} | {_s(t.get('gradients'))} | "
                     f"{_s(t.get('ranking'))} | {_s(t.get('projection'))} | {_s(t.get('search'))} | "
                     f"{_s(t.get('final_evaluation'))} | "
                     f"{_s(t.get('downstream'))} | {_s(r.get('outside_phases_s'))} | "
                     f"{(r.get('cost') or {}).get('evaluations', '–')} | {r['verdict']} |")
    lines += ["", "Peak memory in GiB per phase: the GPU allocator's peak during the phase (`max_memory_allocated`, "
              "reset when it starts) and the host's resident peak of the `fit` process up to its end.", "",
              "| run | devices | pass GPU | search GPU | final evaluation GPU | generation / VQA GPU | run GPU | "
              "host |", "|---|---|---|---|---|---|---|---|"]
    for name, r in result["runs"].items():
        memory = r.get("memory") or {}
        phases = memory.get("phases", {})
        devices = ", ".join(f"{k} {v}" for k, v in (r.get("devices") or {}).items())
        lines.append(f"| {name} | {devices or '–'} | " + " | ".join(
            _gib(phases.get(p), "peak_allocated_gib") for p in TOP_LEVEL)
            + f" | {_gib(memory, 'peak_allocated_gib')} | {_gib(memory, 'host_peak_rss_gib')} |")
    lines += ["", "Data per run: " + "; ".join(
        f"{name}: {r['counts']['forget']} forget and {r['counts']['retain']} retain pairs, "
        f"{(r['counts']['others'] + 1) * r['counts']['val_per_identity']} + "
        f"{(r['counts']['others'] + 1) * r['counts']['test_per_identity']} identity images over "
        f"{r['counts']['names']} names, {r['counts']['imagenet_classes'] * r['counts']['imagenet_per_class']} "
        f"utility images" for name, r in result["runs"].items()) + ".", ""]
    return "\n".join(lines)


def load_results(path: Path, tiny: bool) -> dict:
    """The results file's runs of the same kind (tiny or real), to keep the runs not rerun."""
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("tiny") == tiny:
            return old.get("runs", {})
    return {}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=list(RUNS), default=list(RUNS), help="the runs (default: all three)")
    p.add_argument("--tiny", action="store_true", help="tiny stand-ins and counts on the CPU: a check of the benchmark")
    p.add_argument("--work", type=Path, default=None, help="models, data and run folders (default: .real_shape_runs/"
                                                           "real or tiny in the repository, git-ignored)")
    p.add_argument("--time-limit", type=float, default=None, help="stop each fit after this many seconds")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the whole command: each fit is stopped in time for all of it to end within "
                        "them (a run that would get under a minute is not started)")
    p.add_argument("--results", type=Path, default=RESULTS, help="folder of the results files (default: %(default)s)")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="processes writing the data's images")
    args = p.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        p.error("no CUDA device here: the real shapes run on a GPU; --tiny checks the benchmark on the CPU")
    kind = "tiny" if args.tiny else "real"
    work = (args.work or REPO / ".real_shape_runs" / kind).resolve()
    stem = "real_shape_runs_tiny" if args.tiny else "real_shape_runs"
    sizes, counts = (si.TINY_SIZES, TINY_COUNTS) if args.tiny else (si.REAL_SIZES, REAL_COUNTS)
    device = "cpu" if args.tiny else "cuda"
    result = {"command": "python benchmarks/real_shape_runs.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "time": time.strftime("%Y-%m-%d %H:%M:%S"), "tiny": args.tiny, "versions": package_versions(),
              "runs": load_results(args.results / f"{stem}.json", args.tiny)}
    end = None if args.budget is None else time.perf_counter() + args.budget - BUDGET_RESERVE_S
    data = build_data(work, counts, args.workers)
    for name in args.only:
        spec = RUNS[name]
        print(f"--- {name}: building the models", flush=True)
        t0 = time.perf_counter()
        models = build_models(spec, work / "hub", sizes, device)
        build_s = time.perf_counter() - t0
        limit = args.time_limit
        if end is not None:
            left = end - time.perf_counter()
            if left < 60:
                print(f"--- {name}: not run, {max(left, 0):.0f} s of the budget left", flush=True)
                continue
            limit = left if limit is None else min(limit, left)
        folder = run_folder(work, spec, models, data)
        print(f"--- {name}: slug-pl fit --config {spec.config} in {folder}", flush=True)
        fit = run_fit(folder, spec.config, [*CPU_OVERRIDES, *spec.tiny_overrides] if args.tiny else [], limit)
        result["runs"][name] = run_record(spec, fit, read_summary(folder), build_s, counts, args.tiny)
        print(f"--- {name}: exit {fit['exit_code']} after {fit['wall_s']:.0f} s; {result['runs'][name]['verdict']}",
              flush=True)
        write_result(f"{stem}.json", result, args.results)
        write_result(f"{stem}.md", markdown(result), args.results)
    return 0 if all(r.get("timings_s") is not None for r in result["runs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
