"""``slug-pl convert-checkpoint``: a torch pickle checkpoint's weights as a safetensors file.

slug_pl reads classifier weights from safetensors only (a safetensors file holds tensors and
nothing that runs). Some published classifiers are torch pickles, e.g. the UnlearnCanvas
benchmark's ``style50.pth`` / ``cls.pth`` (``{"model_state_dict": ...}``). Convert such a file
once, on a trusted machine::

    slug-pl convert-checkpoint style50.pth            # writes style50.safetensors beside it

It is read with ``torch.load(weights_only=True)`` (torch's restricted unpickler: tensors and plain
containers, no arbitrary objects), the state dict is taken from ``--key`` (default: the
``model_state_dict`` or ``state_dict`` entry when there is one, else the whole file), and every
entry must be a tensor. The output is new (never overwritten).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from slug_pl.atomic import atomic_output

#: Entries of a training checkpoint that hold the model's state dict, tried in order.
STATE_KEYS = ("model_state_dict", "state_dict")


def convert_checkpoint(source: str | Path, out: str | Path | None = None, key: str | None = None) -> Path:
    """Write the tensors of the torch checkpoint ``source`` (its ``key`` entry, or see the module
    docstring) to the new safetensors file ``out`` (default: ``source`` with suffix
    ``.safetensors``); returns ``out``."""
    from safetensors.torch import save_file

    source = Path(source).expanduser()
    out = source.with_suffix(".safetensors") if out is None else Path(out).expanduser()
    if not source.is_file():
        raise FileNotFoundError(f"checkpoint not found: {source}")
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {out} must end in .safetensors")
    try:
        checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as err:  # torch's restricted unpickler refuses anything but plain data
        raise ValueError(f"{source} does not load as weights only ({type(err).__name__}: "
                         f"{' '.join(str(err).split())[:300]}); it is not a plain tensor checkpoint") from err
    state = _state_dict(checkpoint, source, key)
    with atomic_output(out) as tmp:
        save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(tmp))
    return out


def _state_dict(checkpoint, source: Path, key: str | None) -> dict[str, torch.Tensor]:
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{source} holds a {type(checkpoint).__name__}, not a dict of tensors")
    if key is not None:
        if key not in checkpoint:
            raise ValueError(f"{source} has no entry {key!r}; its entries: {sorted(map(str, checkpoint))[:10]}")
        state = checkpoint[key]
    else:
        state = next((checkpoint[k] for k in STATE_KEYS if isinstance(checkpoint.get(k), dict)), checkpoint)
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad or not state:
        raise ValueError(f"{source}: the state dict must map names to tensors; entries {bad[:5]} are not "
                         f"tensors (choose the entry that holds the weights with --key)")
    return state


def main(argv: list[str] | None = None) -> int:
    """``slug-pl convert-checkpoint``; anticipated errors reach the caller (one line, status 2)."""
    parser = argparse.ArgumentParser(prog="slug-pl convert-checkpoint", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="the torch checkpoint (.pth / .pt) to convert")
    parser.add_argument("--out", default=None, help="the new .safetensors file (default: beside the checkpoint)")
    parser.add_argument("--key", default=None, help="the checkpoint entry that holds the state dict")
    args = parser.parse_args(argv)
    out = convert_checkpoint(args.checkpoint, args.out, args.key)
    print(f"wrote {out}; name it as the weights of your classifier config")
    return 0


if __name__ == "__main__":
    sys.exit(main())
