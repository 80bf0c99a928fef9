"""Generated forget sets (``slug-pl generate``): images of one prompt drawn by a Stable Diffusion
pipeline, written as webdataset shards that SLUG reads like any other forget set.

To unlearn a concept from a text-to-image model, SLUG needs image–text pairs of the concept; the
model itself can draw them. Sample ``i`` is the prompt drawn with seed ``seed0 + i`` (one CPU
generator per image, so an image depends on its seed, not on the batching) and is stored as

- ``<key>.png``: the image; ``<key>.txt``: the prompt (the caption);
- ``<key>.json``: ``{"seed", "prompt", "steps", "guidance", "height", "width", "dtype",
  "pipeline"}`` (``pipeline``: the resolved pipeline folder),

with keys ``seed00000000``, ``seed00000001``, … in shards ``generated-000000.tar``, … of at most
``shard_size`` samples, plus ``manifest.json`` (the settings, shard names and per-shard counts).
The output directory must be new or empty; everything is written into a temporary directory beside
it and renamed into place at the end, so an interrupted run leaves no half-written output.

Command line::

    slug-pl generate --pipeline models/sd --prompt "a photo of Alice Abara." --n 500 \\
        --out data/forget/alice_generated
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from slug_pl.atomic import atomic_folder
from slug_pl.data.shard_writer import ShardWriter
from slug_pl.pipelines import DTYPES, PipelineError, check_pipeline_dir, iter_image_batches, load_pipeline, resolve_dtype

MANIFEST_NAME = "manifest.json"
SHARD_PREFIX = "generated"
#: The largest seed a torch generator takes.
MAX_SEED = 2**63 - 1


def sample_key(seed: int) -> str:
    return f"seed{seed:08d}"


def _check_output(out: Path) -> Path:
    resolved = out.expanduser().resolve()
    if resolved.exists() and (not resolved.is_dir() or any(resolved.iterdir())):
        raise FileExistsError(f"output {out} already exists and is not an empty directory; "
                              f"generate never overwrites, choose a new directory")
    return resolved


def generate_forget_set(
    pipeline_dir: str | os.PathLike,
    prompt: str,
    n: int,
    out: str | os.PathLike,
    seed0: int = 0,
    batch_size: int = 8,
    steps: int = 50,
    guidance: float = 7.5,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    height: int | None = None,
    width: int | None = None,
    shard_size: int = 1000,
    progress: bool = True,
) -> Path:
    """Draw ``prompt`` with seeds ``seed0 … seed0 + n - 1`` and write the images as shards in the
    new folder ``out``; return ``out``. ``device`` defaults to CUDA when available; ``dtype``
    (``float32`` / ``float16`` / ``bfloat16``) to float16 on CUDA, float32 elsewhere.

    Raises :class:`PipelineError` for a missing / non-diffusers pipeline folder or bad settings and
    :class:`FileExistsError` for an existing non-empty ``out``.
    """
    if not prompt or not prompt.strip():
        raise PipelineError("the prompt is empty: give the text to draw, e.g. 'a photo of Alice Abara.'")
    for name, value in (("n", n), ("batch_size", batch_size), ("steps", steps), ("shard_size", shard_size)):
        if isinstance(value, bool) or int(value) < 1:
            raise PipelineError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(seed0, bool) or seed0 < 0 or seed0 + n > MAX_SEED + 1:
        raise PipelineError(f"the seeds {seed0}..{seed0 + n - 1} must lie in 0..{MAX_SEED} (a torch generator's "
                            f"seed): give a smaller --seed or --n")
    pipeline_path = check_pipeline_dir(pipeline_dir)  # every argument checked before any work
    out = Path(out)
    final_dir = _check_output(out)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = resolve_dtype(dtype, device)
    seeds = range(seed0, seed0 + n)  # distinct and valid by the check above; never a list of n
    pipe = load_pipeline(pipeline_path, device, torch_dtype)

    metadata = {"prompt": prompt, "steps": int(steps), "guidance": float(guidance), "height": height,
                "width": width, "dtype": str(torch_dtype).removeprefix("torch."),
                "pipeline": str(pipeline_path)}
    batches = (images for start in range(0, n, batch_size)
               for images in iter_image_batches(pipe, [prompt] * len(seeds[start:start + batch_size]),
                                                seeds[start:start + batch_size], steps, guidance,
                                                batch_size, height, width))
    with atomic_folder(final_dir, empty_ok=True) as tmp_dir:
        with ShardWriter(tmp_dir, SHARD_PREFIX, shard_size) as writer, \
                tqdm(total=n, desc="generating", unit="img", disable=not progress) as bar:
            index = 0
            for images in batches:
                for image in images:
                    seed = seeds[index]
                    png = io.BytesIO()
                    image.save(png, format="PNG")
                    writer.write({
                        "__key__": sample_key(seed),
                        "png": png.getvalue(),
                        "txt": prompt.encode("utf-8"),
                        "json": json.dumps({"seed": seed, **metadata}, ensure_ascii=False).encode("utf-8"),
                    })
                    index += 1
                    bar.update(1)
        manifest = {**metadata, "n": n, "seeds": [seeds[0], seeds[-1]],
                    "scheduler": type(pipe.scheduler).__name__, "device": str(device),
                    "shards": writer.names, "counts": writer.counts}
        (tmp_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n",
                                             encoding="utf-8")
    return out


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``generate`` options to ``parser`` (for mounting as ``slug-pl generate``)."""
    parser.add_argument("--pipeline", required=True, metavar="DIR",
                        help="a Stable Diffusion pipeline folder (StableDiffusionPipeline.save_pretrained)")
    parser.add_argument("--prompt", required=True, metavar="TEXT", help="the text to draw (also the caption)")
    parser.add_argument("--n", type=int, required=True, help="number of images")
    parser.add_argument("--out", required=True, metavar="DIR", help="new output directory for the shards")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first image (image i: seed + i)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per pipeline call")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    parser.add_argument("--height", type=int, default=None, help="image height (default: the pipeline's)")
    parser.add_argument("--width", type=int, default=None, help="image width (default: the pipeline's)")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if available)")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                        help="pipeline dtype (default: float16 on CUDA, float32 on the CPU)")
    return parser


def run(args: argparse.Namespace) -> int:
    """Generate for parsed ``args``; print a one-line summary. Returns 0, or 2 on bad input."""
    try:
        out = generate_forget_set(args.pipeline, args.prompt, args.n, args.out, seed0=args.seed,
                                  batch_size=args.batch_size, steps=args.steps, guidance=args.guidance,
                                  device=args.device, dtype=args.dtype, height=args.height,
                                  width=args.width, shard_size=args.shard_size)
    except (PipelineError, FileExistsError) as err:
        print(f"slug-pl generate: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.n} images of {args.prompt!r} (seeds {args.seed}–{args.seed + args.n - 1}) to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="slug-pl generate",
        description="Draw a forget set with a Stable Diffusion pipeline, as webdataset shards.")
    add_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse printed usage / help already
        return exc.code if isinstance(exc.code, int) else 2
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
