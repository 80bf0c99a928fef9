"""Per-evaluation speed-up of the search's cached evaluation over a full re-evaluation.

A random-init ViT-B-32 (open_clip config; 12 vision blocks of width 768, 12 text blocks of width
512) on the CPU. For an early, a middle and a late block of each tower, one tensor of that block
is edited and the zero-shot logits of an image set over a class set are computed (a) fully (both
towers from scratch, as without caching) and (b) by the :class:`Evaluator` with its caches warm
(the other tower's features and the hidden states entering the edited block). Both are timed in
the same run (median of ``--repeats``); the relative error between their logits is recorded.

    python benchmarks/eval_cache.py          # writes benchmarks/results/eval_cache.json
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch
from results_io import write_result

from slug_pl.data.labelled import LoadedSet
from slug_pl.edit import stepped
from slug_pl.evaluation.evaluator import Evaluator
from slug_pl.families.open_clip import OpenClip



def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--templates", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default="eval_cache.json")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    family = OpenClip(args.model)
    model = family.load()
    size = model.visual.image_size if isinstance(model.visual.image_size, int) else model.visual.image_size[0]
    data = LoadedSet("bench", torch.randn(args.images, 3, size, size), torch.arange(args.images) % args.classes,
                     [f"class {i}" for i in range(args.classes)],
                     [f"a photo of {{}}, variant {t}." for t in range(args.templates)])
    n_vis, n_txt = len(model.visual.transformer.resblocks), len(model.transformer.resblocks)
    layers = {
        "vision_early": "visual.transformer.resblocks.0.mlp.c_fc.weight",
        "vision_middle": f"visual.transformer.resblocks.{n_vis // 2}.mlp.c_fc.weight",
        "vision_late": f"visual.transformer.resblocks.{n_vis - 1}.mlp.c_fc.weight",
        "text_early": "transformer.resblocks.0.mlp.c_fc.weight",
        "text_middle": f"transformer.resblocks.{n_txt // 2}.mlp.c_fc.weight",
        "text_late": f"transformer.resblocks.{n_txt - 1}.mlp.c_fc.weight",
    }
    evaluator = Evaluator(family, data, ["class 0"], batch_size=32)
    evaluator.evaluate(model)  # warm the unedited-model caches, as the search does
    speedup, timings, max_err = {}, {}, 0.0
    for key, layer in layers.items():
        grad = torch.randn_like(dict(model.named_parameters())[layer])
        with stepped(model, layer, grad, 1e-3), torch.no_grad():
            evaluator.logits(model, "concepts", edited=layer)  # first call fills the hidden cache
            full_t, fast_t = [], []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                full = Evaluator(family, data, ["class 0"], batch_size=32).logits(model, "concepts")
                full_t.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                fast = evaluator.logits(model, "concepts", edited=layer)
                fast_t.append(time.perf_counter() - t0)
        err = float((fast - full).norm() / full.norm())
        max_err = max(max_err, err)
        speedup[key] = statistics.median(full_t) / statistics.median(fast_t)
        timings[key] = {"layer": layer, "full_s": statistics.median(full_t), "cached_s": statistics.median(fast_t),
                        "rel_err": err}
        print(f"{key:14s} {layer:50s} full {timings[key]['full_s']:.3f}s cached {timings[key]['cached_s']:.3f}s "
              f"speed-up {speedup[key]:5.1f}x rel.err {err:.1e}", flush=True)
    result = {
        "command": "python benchmarks/eval_cache.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "model": args.model, "images": args.images, "classes": args.classes, "templates": args.templates,
        "device": "cpu", "processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "speedup": speedup, "max_rel_err": max_err, "timings": timings,
    }
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
