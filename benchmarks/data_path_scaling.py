"""Bytes each rank and data-loader worker reads in the gradient pass's data path, and its wall time,
for 1, 2 and 4 processes × 1, 2 and 4 workers, on LAION-like shards (on the CPU: no model).

The set: ``--shards`` tar shards of ``--per-shard`` samples, each a JPEG (noisy 256 × 256, some
40 KB), a caption (``txt``) and a LAION-style ``json``. Each configuration runs P rank processes
at once (rank r of P, as a DDP run's ranks; no process group is needed to read), each iterating
the retain set's :class:`~slug_pl.data.pairs.PairBatches` (global batch ``--batch``, the
evaluation transform and tokenizer of ViT-B-32) through a ``DataLoader`` of n workers. Every
worker reports the bytes its process read while it iterated (``rchar`` of ``/proc/self/io``: all
``read``/``pread`` calls, shard bytes and index files alike) and its time; a rank reports its
wall time. ``read_ratio`` = bytes read by all workers of all ranks ÷ the set's bytes.

Also measured: setting the set up (``SlugDataModule.pair_set``: counting the samples; with
indexes, building them once from the tar headers, later loading them) and the cost of the
per-batch agreement on data errors (:class:`~slug_pl.data.agreement.AgreedBatches`: one
all_gather of one integer per batch over gloo) on 2 and 4 processes.

``--src`` runs the rank processes on another checkout of slug_pl (e.g. the commit before shard
indexes, for the "before" numbers); the results then go to ``data_path_scaling_<label>.json``.

    python benchmarks/data_path_scaling.py                 # writes data_path_scaling.{json,md}
    python benchmarks/data_path_scaling.py --src /tmp/old --label before
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def rchar() -> int:
    """Bytes this process has read so far (``read``/``pread`` calls of any kind)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("no rchar in /proc/self/io (Linux only)")


# -- the set --------------------------------------------------------------------------------------

def build_set(folder: Path, shards: int, per_shard: int, seed: int = 0) -> list[str]:
    import numpy as np
    import webdataset as wds
    from PIL import Image

    rng = np.random.default_rng(seed)
    urls, k = [], 0
    base = np.linspace(0, 255, 256)[None, :, None] * np.ones((256, 1, 3))
    for s in range(shards):
        path = folder / f"laion-{s:05d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for _ in range(per_shard):
                pixels = np.clip(base + rng.normal(0, 18, size=(256, 256, 3)), 0, 255).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
                caption = f"a photo of item {k} " + " ".join(rng.choice(["red", "old", "tiny", "city", "dog"], 12))
                meta = {"url": f"https://example.com/{k}.jpg", "caption": caption, "width": 256, "height": 256,
                        "similarity": float(rng.random()), "key": f"{s:05d}{k:04d}", "status": "success"}
                sink.write({"__key__": f"{s:05d}{k:04d}", "jpg": buf.getvalue(), "txt": caption.encode(),
                            "json": json.dumps(meta).encode()})
                k += 1
        urls.append(str(path))
    return urls


# -- one rank (a subprocess) ----------------------------------------------------------------------

def run_rank(args) -> None:
    """Iterate rank ``args.rank`` of ``args.world``'s retain batches with ``args.workers`` workers;
    append one JSON line per worker, and one for the rank, to ``args.out``."""
    import torch
    from torch.utils.data import DataLoader, get_worker_info

    from slug_pl.data.datamodule import SlugDataModule
    from slug_pl.data.pairs import PairBatches
    from slug_pl.data.shards import decode_image, iter_raw_samples
    from slug_pl.families.open_clip import OpenClip

    torch.set_num_threads(1)
    urls = json.loads(Path(args.urls).read_text())
    family = OpenClip("ViT-B-32", pretrained=None)
    transform, tokenize = family.image_transform(), family.tokenize
    first = next(iter_raw_samples(urls[:1]))  # warm up (imports, vocabulary) before the workers fork
    transform(decode_image(first)), tokenize(["warm up"])

    out = args.out

    class Measured(PairBatches):
        def __iter__(self):
            before, t0 = rchar(), time.perf_counter()
            batches = 0
            for batch in super().__iter__():
                batches += 1
                yield batch
            info = get_worker_info()
            line = {"rank": self.rank, "worker": info.id if info else 0, "bytes": rchar() - before,
                    "seconds": time.perf_counter() - t0, "batches": batches}
            with open(out, "a") as f:
                f.write(json.dumps(line) + "\n")

    before, t0 = rchar(), time.perf_counter()
    pair_set = SlugDataModule(retain=urls, retain_batch_size=args.batch).pair_set("retain")
    setup = {"setup_bytes": rchar() - before, "setup_seconds": time.perf_counter() - t0}
    dataset = Measured([pair_set], transform, tokenize, args.rank, args.world)
    t0 = time.perf_counter()
    rows = sum(int(b["valid"].sum()) for b in DataLoader(dataset, batch_size=None, num_workers=args.workers))
    with open(out, "a") as f:
        f.write(json.dumps({"rank": args.rank, "rank_seconds": time.perf_counter() - t0, "rows": rows,
                            "indexed": getattr(pair_set, "index", None) is not None, **setup}) + "\n")


def measure(urls_file: Path, world: int, workers: int, batch: int, env: dict, work: Path) -> dict:
    out = work / f"p{world}_w{workers}.jsonl"
    out.unlink(missing_ok=True)
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, __file__, "--rank", str(r), "--world", str(world), "--workers",
                               str(workers), "--batch", str(batch), "--urls", str(urls_file), "--out", str(out)],
                              env=env) for r in range(world)]
    codes = [p.wait() for p in procs]
    wall = time.perf_counter() - t0
    if any(codes):
        raise RuntimeError(f"a rank process failed: {codes}")
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    readers = sorted((x for x in lines if "worker" in x), key=lambda x: (x["rank"], x["worker"]))
    ranks = sorted((x for x in lines if "rank_seconds" in x), key=lambda x: x["rank"])
    return {"processes": world, "workers": workers, "wall_seconds": wall, "readers": readers, "ranks": ranks}


# -- the agreement's collective -------------------------------------------------------------------

def _agreement_worker(rank: int, world: int, port: int, steps: int, out: str) -> None:
    import torch.distributed as dist

    from slug_pl.data.agreement import AgreedBatches

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    plain = list(range(steps))
    dist.barrier()
    t0 = time.perf_counter()
    assert sum(1 for _ in AgreedBatches(plain)) == steps
    seconds = time.perf_counter() - t0
    dist.barrier()
    if rank == 0:
        Path(out).write_text(json.dumps({"processes": world, "batches": steps,
                                         "us_per_batch": 1e6 * seconds / steps}))
    dist.destroy_process_group()


def agreement_cost(world: int, steps: int, work: Path) -> dict:
    import torch.multiprocessing as mp

    out = work / f"agreement_{world}.json"
    mp.start_processes(_agreement_worker, args=(world, 29600 + world, steps, str(out)), nprocs=world,
                       start_method="spawn")
    return json.loads(out.read_text())


# -- the driver -----------------------------------------------------------------------------------

def setup_cost(urls_file: Path, env: dict) -> dict:
    """Bytes and seconds of ``pair_set`` in a new process: the ``first`` time (indexes built from
    the tar headers) and ``again`` (indexes loaded)."""
    script = ("import json, sys, time; sys.path.insert(0, %r); from data_path_scaling import rchar; "
              "from slug_pl.data.datamodule import SlugDataModule; urls = json.load(open(%r)); "
              "b, t = rchar(), time.perf_counter(); s = SlugDataModule(retain=urls).pair_set('retain'); "
              "print(json.dumps({'bytes': rchar() - b, 'seconds': time.perf_counter() - t, 'samples': s.num_samples}))"
              % (str(HERE), str(urls_file)))
    out = {}
    for phase in ("first", "again"):
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
        out[phase] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def read_cost(urls: list[str], repeats: int = 3) -> dict:
    """CPU µs to read one sample (undecoded), streamed from the tar or through its index (the
    best of ``repeats`` passes over the whole set, in this process, indexes already built)."""
    from slug_pl.data.indexed_reader import IndexedReader
    from slug_pl.data.shard_index import IndexStore
    from slug_pl.data.shards import iter_raw_samples

    streamed, indexed = [], []
    for _ in range(repeats):
        t0 = time.process_time()
        n = sum(1 for _ in iter_raw_samples(urls))
        streamed.append((time.process_time() - t0) / n)
        t0 = time.process_time()
        with IndexedReader(IndexStore()) as reader:
            for url in urls:
                for i in range(len(reader.index_of(url))):
                    reader.sample(url, i)
        indexed.append((time.process_time() - t0) / n)
    return {"streamed_us_per_sample": 1e6 * min(streamed), "indexed_us_per_sample": 1e6 * min(indexed)}


def summarise(config: dict, set_bytes: int) -> dict:
    readers = config["readers"]
    total = sum(r["bytes"] for r in readers)
    return {"processes": config["processes"], "workers": config["workers"],
            "read_ratio": total / set_bytes,
            "bytes_per_reader_max": max(r["bytes"] for r in readers),
            "bytes_per_reader_min": min(r["bytes"] for r in readers),
            "wall_seconds": config["wall_seconds"],
            "rank_seconds_max": max(r["rank_seconds"] for r in config["ranks"]),
            "rows": sum(r["rows"] for r in config["ranks"]),
            "indexed": all(r["indexed"] for r in config["ranks"])}


#: Options whose values are folders of the machine that ran the benchmark (recorded as placeholders).
MACHINE_FOLDERS = {"--work": "<scratch folder>", "--src": "<checkout of the earlier commit>"}


def portable_command(args: list[str]) -> str:
    """The command line as run from the repository root, with the folders of the machine that ran
    it replaced by placeholders (a result file names no machine's paths)."""
    shown = list(args)
    for i, arg in enumerate(shown[:-1]):
        if arg in MACHINE_FOLDERS:
            shown[i + 1] = MACHINE_FOLDERS[arg]
    return " ".join(["python benchmarks/data_path_scaling.py", *shown])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--per-shard", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64, help="global retain batch size")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--agreement-steps", type=int, default=2000)
    parser.add_argument("--src", help="run the rank processes on this slug_pl checkout")
    parser.add_argument("--label", default="", help="results file suffix (data_path_scaling_<label>)")
    parser.add_argument("--work", help="working folder (default: a temporary one)")
    # one rank (internal)
    parser.add_argument("--rank", type=int)
    parser.add_argument("--world", type=int)
    parser.add_argument("--urls")
    parser.add_argument("--out")
    parser.add_argument("--markdown-only", action="store_true",
                        help="rewrite data_path_scaling.md from the recorded data_path_scaling.json")
    args = parser.parse_args()
    if args.markdown_only:
        sys.path.insert(0, str(HERE))
        from results_io import write_result

        record = json.loads((HERE / "results" / "data_path_scaling.json").read_text())
        write_result("data_path_scaling.md", markdown(record, HERE / "results" / "data_path_scaling_before.json"))
        return
    if args.rank is not None:
        run_rank(argparse.Namespace(**{**vars(args), "workers": args.workers[0]}))
        return

    sys.path.insert(0, str(HERE))
    from results_io import write_result

    work = Path(args.work or tempfile.mkdtemp(prefix="data_path_"))
    (work / "set").mkdir(parents=True, exist_ok=True)
    urls = build_set(work / "set", args.shards, args.per_shard)
    urls_file = work / "urls.json"
    urls_file.write_text(json.dumps(urls))
    set_bytes = sum(os.path.getsize(u) for u in urls)
    src = str(Path(args.src).resolve()) if args.src else str(HERE.parent)
    cache = work / "cache"
    env = {**os.environ, "PYTHONPATH": src, "SLUG_PL_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    label = f"_{args.label}" if args.label else ""

    setup = setup_cost(urls_file, env)
    index_bytes = sum(p.stat().st_size for p in cache.rglob("*.idx")) if cache.exists() else 0
    configs = []
    for world in args.processes:
        for workers in args.workers:
            config = measure(urls_file, world, workers, args.batch, env, work)
            configs.append(config)
            s = summarise(config, set_bytes)
            print(f"{world} processes x {workers} workers: read_ratio {s['read_ratio']:.3f}, "
                  f"wall {s['wall_seconds']:.1f} s", flush=True)
    agreement, reading = [], {}
    if not args.src:
        agreement = [agreement_cost(w, args.agreement_steps, work) for w in args.processes if w > 1]
        os.environ["SLUG_PL_CACHE"] = str(cache)
        reading = read_cost(urls)

    import platform

    import torch

    record = {
        "command": portable_command(sys.argv[1:]), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} usable CPU cores (shared)",
        "slug_pl_source": "another checkout (--src)" if args.src else "this checkout",
        "set": {"shards": args.shards, "samples": args.shards * args.per_shard, "bytes": set_bytes,
                "batch": args.batch},
        "index_files_bytes": index_bytes,
        "setup": setup,
        "summary": [summarise(c, set_bytes) for c in configs],
        "agreement": agreement,
        "read_cost": reading,
        "configs": configs,
    }
    write_result(f"data_path_scaling{label}.json", record)
    if not args.src:
        write_result("data_path_scaling.md", markdown(record, HERE / "results" / "data_path_scaling_before.json"))


def markdown(record: dict, before_file: Path) -> str:
    before = json.loads(before_file.read_text()) if before_file.is_file() else None
    old = {(s["processes"], s["workers"]): s for s in before["summary"]} if before else {}
    st = record["set"]
    mib = 1 << 20
    lines = [
        "# Data path scaling: bytes read per rank and worker",
        "",
        f"`{record['command']}` ({record['time']}, torch {record['torch']}; {record['machine']}).",
        f"The set: {st['shards']} LAION-like shards, {st['samples']} samples (JPEG ~40 KB, caption, json), "
        f"{st['bytes'] / mib:.1f} MiB; retain batches of {st['batch']}, ViT-B/32's transform and tokenizer, no model. "
        "Bytes are what each reader process read while it iterated (`rchar`: shards and index files).",
        "",
        "`read_ratio` = bytes read by all workers of all ranks ÷ the set's bytes. *before*: the "
        "same benchmark on the commit before shard indexes (every reader streamed every byte).",
        "",
        "| processes | workers | read_ratio | before | MiB per reader (max) | before | wall s | before |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in record["summary"]:
        b = old.get((s["processes"], s["workers"]))

        def pair(key: str, fmt: str, scale: float = 1.0) -> str:
            return f"{s[key] / scale:{fmt}} | " + (f"{b[key] / scale:{fmt}}" if b else "–")

        lines.append(f"| {s['processes']} | {s['workers']} | {pair('read_ratio', '.3f')} | "
                     f"{pair('bytes_per_reader_max', '.2f', mib)} | {pair('wall_seconds', '.1f')} |")
    setup = record["setup"]
    lines += [
        "",
        "Wall times are of all P × n reader processes together, on a machine shared with other jobs "
        "(before and after measured at different moments): with more reader processes than cores they "
        "mostly measure contention, and JPEG decoding dominates. The bytes do not depend on the machine. "
        f"Reading one sample costs {record['read_cost']['indexed_us_per_sample']:.0f} µs of CPU through its "
        f"index and {record['read_cost']['streamed_us_per_sample']:.0f} µs streamed (one process, undecoded); "
        "each reader now reads 1 / (P × n) of the samples instead of all of them.",
        "",
        "## Setting the set up (counting its samples), one process",
        "",
        "| | MiB read | seconds |",
        "|---|---:|---:|",
        f"| first run: indexes built from the tar headers | {setup['first']['bytes'] / mib:.2f} | "
        f"{setup['first']['seconds']:.2f} |",
        f"| later runs: indexes loaded | {setup['again']['bytes'] / mib:.3f} | {setup['again']['seconds']:.2f} |",
    ]
    if before:
        bs = before["setup"]
        lines.append(f"| before (every run, every rank): tar headers counted | {bs['again']['bytes'] / mib:.2f} | "
                     f"{bs['again']['seconds']:.2f} |")
    lines += [
        "",
        f"The index files take {record['index_files_bytes']} bytes for {st['samples']} samples "
        f"({record['index_files_bytes'] / st['bytes'] * 100:.3f} % of the set); every reader loads the "
        "indexes of the shards it reads from, which is included in the bytes above. Under DDP the "
        "first run's indexing is shared: each rank indexes every P-th shard.",
        "",
        "## The agreement on data errors (one all_gather of one integer per batch, gloo)",
        "",
        "| processes | µs per batch |",
        "|---:|---:|",
    ]
    lines += [f"| {a['processes']} | {a['us_per_batch']:.0f} |" for a in record["agreement"]]
    lines += ["", "Measured on the shared cores above: with 4 processes on 2 cores each exchange waits for "
                  "the processes to be scheduled, so these are upper bounds. The exchange runs on the host "
                  "between two fetches, on a gloo group, so it does not synchronise a GPU (not measured on "
                  "one here)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
