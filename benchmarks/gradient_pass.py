"""Pairs/s of slug_pl's gradient pass against a bare open_clip forward+backward, same model, same
batch, same process.

- bare loop: ``loss = ClipLoss(model(images, tokens)); loss.backward()`` per batch;
- slug_pl: ``Trainer.fit`` of :class:`slug_pl.methods.slug.SlugModule` over the same in-memory batches
  (retain set: the contrastive loss; one forget batch first), timed from the end of the first
  retain batch to the end of the last, so Lightning's per-batch overhead and our accumulation are
  inside the measurement and data loading is outside both (as in docs/design.md §5).

On a GPU the bare loop's batch stays on the device, while a run's batches come from host memory:
``slug_pairs_per_s`` is ours fed from host memory as Lightning moves a run's batches (pinned, as
the data module's loaders pin them on a GPU), ``slug_pageable_pairs_per_s`` from ordinary
(pageable) host memory, and ``slug_resident_pairs_per_s`` with the batch already on the device:
the pass's own overhead against the bare loop.

Both use random-init weights and random inputs. Results go to ``benchmarks/results/`` as JSON with
the command line that produced them.

    python benchmarks/gradient_pass.py                               # CPU defaults
    python benchmarks/gradient_pass.py --device cuda --precision bf16-mixed \\
        --model ViT-B-32 --batch 512 --steps 20 --out gradient_pass_gpu.json
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time

import torch
from results_io import write_result
from torch.utils.data import IterableDataset



def build(model_name: str):

    from slug_pl.families.open_clip import OpenClip, register_model_configs

    register_model_configs()
    family = OpenClip(model_name=model_name, pretrained=None)
    model = family.load()
    return family, model


def random_batch(family, model, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    size = model.visual.image_size
    size = size if isinstance(size, int) else size[0]
    images = torch.randn(batch, 3, size, size, generator=g)
    ctx = family.tokenize(["x"]).shape[1]
    tokens = torch.randint(1, 49000, (batch, ctx), generator=g)
    return images, tokens


def autocast(device: str, precision: str):
    if precision.startswith("bf16"):
        return torch.autocast(device_type=device, dtype=torch.bfloat16)
    return torch.autocast(device_type=device, enabled=False)


def bare_loop(model, images, tokens, steps: int, warmup: int, device: str, precision: str) -> float:
    from open_clip import ClipLoss

    loss_fn = ClipLoss()
    model = model.to(device).eval()
    images, tokens = images.to(device), tokens.to(device)

    def step():
        with autocast(device, precision):
            image_features, text_features, logit_scale = model(images, tokens)[:3]
            loss = loss_fn(image_features, text_features, logit_scale)
        loss.backward()

    for _ in range(warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    model.zero_grad(set_to_none=True)
    return images.shape[0] * steps / (time.perf_counter() - t0)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class _Batches(IterableDataset):
    """One forget batch, then ``n`` retain batches, all the same tensors (the stream format of
    :class:`slug_pl.data.pairs.PairBatches`)."""

    def __init__(self, images, tokens, n: int):
        self.images, self.tokens, self.n = images, tokens, n

    def __len__(self):
        return 1 + self.n

    def __iter__(self):
        valid = torch.ones(self.images.shape[0], dtype=torch.bool)
        yield {"set": "forget", "batch_index": 0, "last": True, "images": self.images,
               "tokens": self.tokens, "valid": valid}
        for k in range(self.n):
            yield {"set": "retain", "batch_index": k, "last": k == self.n - 1, "images": self.images,
                   "tokens": self.tokens, "valid": valid}


def slug_pass(family, model, images, tokens, steps: int, warmup: int, device: str, precision: str,
              feed: str = "pinned") -> tuple[float, float | None]:
    """Our pass's pairs/s and peak GiB; ``feed`` (on a GPU): where the batches are, ``pinned`` or
    ``pageable`` host memory, or ``resident`` on the device."""
    from lightning.pytorch import Callback, Trainer
    from torch.utils.data import DataLoader

    from slug_pl.methods.slug import SlugModule

    class Timer(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            sync(device)
            if batch_idx == warmup:  # forget batch is 0; retain warm-up batches 1..warmup
                self.t0 = time.perf_counter()
            self.t1 = time.perf_counter()

    class TimedPass(SlugModule):
        def _write_gradient_files(self) -> None:
            """No data module and no run folder here: the gradients stay in memory."""

    module = TimedPass(family)
    module.clip = model
    timer = Timer()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1, precision=precision,
                          max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, default_root_dir=tmp, callbacks=[timer],
                          use_distributed_sampler=False)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        if device == "cuda" and feed == "resident":
            images, tokens = images.to(device), tokens.to(device)
        elif device == "cuda" and feed == "pinned":
            images, tokens = images.pin_memory(), tokens.pin_memory()
        trainer.fit(module, DataLoader(_Batches(images, tokens, warmup + steps), batch_size=None))
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return images.shape[0] * steps / (timer.t1 - timer.t0), peak


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", help="open_clip model name (repeatable)")
    p.add_argument("--batch", type=int, action="append", help="batch size per model (repeatable)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="alternate bare/ours this many times; report medians")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--precision", default="32-true", help="Lightning precision: 32-true or bf16-mixed")
    p.add_argument("--out", default="gradient_pass_cpu.json")
    args = p.parse_args(argv)
    models = args.model or ["slug-demo-vit", "ViT-B-32"]
    batches = args.batch or [128, 32]
    if len(batches) == 1:
        batches = batches * len(models)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    rows = []
    for name, batch in zip(models, batches):
        family, model = build(name)
        images, tokens = random_batch(family, model, batch)
        bare, ours, peak = [], [], None
        feeds = ["pageable", "resident"] if args.device == "cuda" else []
        other = {feed: [] for feed in feeds}
        for _ in range(args.repeats):
            bare.append(bare_loop(model, images, tokens, args.steps, args.warmup, args.device, args.precision))
            rate, peak = slug_pass(family, model, images, tokens, args.steps, args.warmup, args.device, args.precision)
            ours.append(rate)
            for feed in feeds:
                other[feed].append(slug_pass(family, model, images, tokens, args.steps, args.warmup, args.device,
                                             args.precision, feed)[0])
        med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
        row = {"model": name, "batch": batch, "bare_pairs_per_s": med(bare), "slug_pairs_per_s": med(ours),
               "ratio": med(ours) / med(bare), "bare_runs": bare, "slug_runs": ours, "peak_gib": peak}
        for feed, runs in other.items():
            row |= {f"slug_{feed}_pairs_per_s": med(runs), f"ratio_{feed}": med(runs) / med(bare),
                    f"slug_{feed}_runs": runs}
        rows.append(row)
        print(f"{name:16s} batch {batch:4d}: bare {row['bare_pairs_per_s']:8.1f} pairs/s, slug_pl "
              f"{row['slug_pairs_per_s']:8.1f} pairs/s, ratio {row['ratio']:.3f}"
              + "".join(f"; {feed} {row[f'ratio_{feed}']:.3f}" for feed in feeds), flush=True)
    result = {
        "command": "python benchmarks/gradient_pass.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "precision": args.precision,
        "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
        "torch": torch.__version__,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "results": rows,
    }
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
