"""What a run used: peak memory of the process and the versions of the packages that can change
its numbers (recorded in every run's summary and gradient files)."""

from __future__ import annotations

import platform
from importlib import metadata as importlib_metadata

import torch


def peak_memory(device: torch.device) -> dict[str, object]:
    """Peak memory of this process so far: the accelerator's allocator on CUDA, else the
    resident set size (GiB)."""
    if device.type == "cuda":
        return {"device": torch.cuda.get_device_name(device),
                "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}
    import resource

    return {"device": "cpu", "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def peak_mem_mb(memory: dict | None) -> float | None:
    """The peak of a :func:`peak_memory` record in MB (allocated on an accelerator, resident on a CPU)."""
    if not memory:
        return None
    gib = memory.get("peak_allocated_gib", memory.get("peak_rss_gib"))
    return None if gib is None else gib * 1024


def package_versions() -> dict[str, str]:
    """Versions of Python and of the packages that can change the numbers (PIL decodes images)."""
    out = {"python": platform.python_version()}
    for pkg in ("slug_pl", "torch", "lightning", "open_clip_torch", "torchmetrics", "webdataset",
                "safetensors", "transformers", "diffusers", "pillow", "numpy"):
        try:
            out[pkg] = importlib_metadata.version(pkg)
        except importlib_metadata.PackageNotFoundError:
            pass
    return out
