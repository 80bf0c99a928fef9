"""``slug-pl transplant``: a run's edit copied into a downstream model that embeds the CLIP, offline.

The edit file (``edit.safetensors``) holds each edited CLIP tensor, edited and original. The
command finds the adapter whose model the folder holds (:data:`ADAPTERS`: each says whether it
recognizes a folder; an SDXL folder offers both of its text encoders), writes the edited tensors
into it and saves a new folder in which only those tensors change
(:meth:`~slug_pl.targets.base.DownstreamAdapter.save_pretrained`). Each edited tensor must map
to a tensor the model reads, and its original must be the model's: an edit computed on another
CLIP is refused, naming the tensor::

    slug-pl transplant --into models/sd15 --edit lightning_logs/version_0/edit.safetensors --out models/sd15-unlearned
    slug-pl transplant --into models/llava-1.5-7b --edit lightning_logs/version_3/edit.safetensors --out models/llava-unlearned
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from slug_pl.edit import EditMismatchError, load_edits
from slug_pl.targets.base import DownstreamAdapter
from slug_pl.targets.llava import LlavaAdapter
from slug_pl.targets.sdxl import StableDiffusionXLAdapter
from slug_pl.targets.stable_diffusion import StableDiffusionAdapter

#: Every adapter, with how to make its candidates for a folder it recognizes (``dtype``: the dtype
#: it is loaded in to check the edit).
ADAPTERS: dict[type[DownstreamAdapter], Callable[[str, str], list[DownstreamAdapter]]] = {
    StableDiffusionAdapter: lambda folder, dtype: [StableDiffusionAdapter(folder, device="cpu", dtype=dtype)],
    StableDiffusionXLAdapter: lambda folder, dtype: [StableDiffusionXLAdapter(folder, text_encoder=k, device="cpu",
                                                                              dtype=dtype) for k in (1, 2)],
    LlavaAdapter: lambda folder, dtype: [LlavaAdapter(folder, device="cpu", dtype=dtype)],
}


def candidates(folder: str, dtype: str = "float32") -> list[DownstreamAdapter]:
    """The adapters (not loaded; on the CPU in ``dtype``) that may hold the edit's CLIP tower in
    ``folder``: those whose model the folder holds."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"--into: {folder} is not a folder; give the downstream model's folder (a "
                                f"Stable Diffusion / SDXL pipeline or a LLaVA model, as downloaded)")
    return [c for cls, make in ADAPTERS.items() if cls.recognizes(path) for c in make(str(path), dtype)]


def transplant_edit_file(folder: str, edit: str, out: str, dtype: str = "float32") -> tuple[DownstreamAdapter, list[str]]:
    """Copy the edited tensors of ``edit`` into the model in ``folder`` and save it to the new
    folder ``out``; returns the adapter that took it and the downstream names changed."""
    edits, _ = load_edits(edit)
    found = candidates(folder, dtype)
    if not found:
        raise ValueError(f"--into: {folder} holds no model slug_pl transplants into; it handles Stable Diffusion "
                         f"1.x/2.x and SDXL pipeline folders (model_index.json) and LLaVA-1.5 model folders "
                         f"(config.json with model_type llava)")
    refusals = []
    for adapter in found:
        try:
            changed = adapter.apply_edit_file(edits, str(edit))
        except EditMismatchError as err:
            refusals.append(str(err))
            continue
        adapter.save_pretrained(out)
        return adapter, changed
    raise EditMismatchError(" / ".join(refusals))


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--into", "--pipeline", required=True, dest="into", metavar="DIR",
                        help="the downstream model's folder whose CLIP tower the edit's CLIP is (a Stable Diffusion "
                             "or SDXL pipeline, a LLaVA model); --pipeline is the same option")
    parser.add_argument("--edit", required=True, metavar="FILE", help="a run's edit.safetensors")
    parser.add_argument("--out", required=True, metavar="DIR", help="new folder for the edited model")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                        help="dtype the model is loaded in to check the edit (default float32); the saved copy keeps "
                             "its files' own dtypes (a model without safetensors files is saved in this dtype)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``slug-pl transplant``: returns 0, or 2 on bad input."""
    parser = argparse.ArgumentParser(
        prog="slug-pl transplant",
        description="Copy a SLUG edit of a CLIP tower into the downstream model that embeds it (Stable Diffusion, "
                    "SDXL, LLaVA) and save the edited model, which its plain library loads.")
    add_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    try:
        adapter, changed = transplant_edit_file(args.into, args.edit, args.out, dtype=args.dtype)
    except (EditMismatchError, FileExistsError, FileNotFoundError, ValueError) as err:
        print(f"slug-pl transplant: error: {err}", file=sys.stderr)
        return 2
    where = getattr(adapter, "encoder", None)
    names = [f"{where}.{c}" if where else c for c in changed]
    print(f"wrote {args.out}: {args.into} with {', '.join(names)} edited")
    return 0
