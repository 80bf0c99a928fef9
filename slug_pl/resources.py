"""What a run used: peak memory of the process and of each phase of a run, and the versions of
the packages that can change its numbers (recorded in every run's summary and gradient files)."""

from __future__ import annotations

import platform
import resource
from importlib import metadata as importlib_metadata

import torch

#: Per CUDA device index, the allocator's peaks (GiB) before the last :func:`start_accelerator_peak`:
#: the process's peak is the larger of these and the allocator's peak since.
_PEAKS_BEFORE_RESET: dict[int, dict[str, float]] = {}


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _accelerator_peaks(device: torch.device) -> dict[str, float]:
    """The CUDA allocator's peaks (GiB) since its last reset."""
    return {"peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}


def _process_peaks(device: torch.device) -> dict[str, float]:
    """The CUDA allocator's peaks (GiB) since the process started, across resets."""
    before = _PEAKS_BEFORE_RESET.get(_index(device), {})
    return {k: max(v, before.get(k, 0.0)) for k, v in _accelerator_peaks(device).items()}


def start_accelerator_peak(device: torch.device) -> None:
    """Start measuring a phase's peak on ``device``: the CUDA allocator's peak is reset
    (``torch.cuda.reset_peak_memory_stats``), the peak before kept for :func:`peak_memory`.
    Nothing to do on the CPU: the host's resident peak cannot be reset."""
    if device.type != "cuda":
        return
    _PEAKS_BEFORE_RESET[_index(device)] = _process_peaks(device)
    torch.cuda.reset_peak_memory_stats(device)


def host_peak_rss_gib() -> float:
    """The largest resident set of this process so far, in GiB (data-loader workers, being other
    processes, are not counted)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def peak_memory(device: torch.device) -> dict[str, object]:
    """Peak memory of this process so far: the accelerator's allocator on CUDA (across the resets
    of :func:`start_accelerator_peak`), else the resident set size (GiB)."""
    if device.type == "cuda":
        return {"device": torch.cuda.get_device_name(device), **_process_peaks(device)}
    return {"device": "cpu", "peak_rss_gib": host_peak_rss_gib()}


class PhaseMemory:
    """Peak memory of each phase of a run (``summary.json``'s ``memory.phases``).

    A phase is measured between :meth:`start` and :meth:`end` on the device it runs on. Its record
    holds, on CUDA, the allocator's peaks during the phase (``peak_allocated_gib``,
    ``peak_reserved_gib``: reset when it starts), and always the host's resident peak of the
    process up to its end (``host_peak_rss_gib``: the kernel keeps one peak per process, which
    only grows, so a phase's host figure includes every earlier phase's).
    """

    def __init__(self) -> None:
        self.phases: dict[str, dict[str, float]] = {}

    def start(self, device: torch.device) -> None:
        start_accelerator_peak(device)

    def end(self, name: str, device: torch.device) -> None:
        peaks = _accelerator_peaks(device) if device.type == "cuda" else {}
        self.phases[name] = peaks | {"host_peak_rss_gib": host_peak_rss_gib()}

    def record(self, device: torch.device) -> dict[str, object]:
        """The run's ``memory`` block: the process's peak so far (:func:`peak_memory`), the host's
        resident peak and every measured phase's peaks."""
        return peak_memory(device) | {"host_peak_rss_gib": host_peak_rss_gib(), "phases": dict(self.phases)}


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
