"""What a run records of its resources: each phase's peak memory (``slug_pl/resources.py``),
as ``summary.json``'s ``memory`` block holds it."""

from __future__ import annotations

import pytest
import torch

from slug_pl.resources import PhaseMemory


def test_phase_memory_records_each_phase_and_the_host_peak():
    memory = PhaseMemory()
    for phase in ("search", "final_evaluation"):
        memory.start(torch.device("cpu"))
        memory.end(phase, torch.device("cpu"))
    record = memory.record(torch.device("cpu"))
    assert list(record["phases"]) == ["search", "final_evaluation"]
    peaks = [record["phases"][p]["host_peak_rss_gib"] for p in ("search", "final_evaluation")]
    assert 0 < peaks[0] <= peaks[1] <= record["host_peak_rss_gib"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_phase_gpu_peak_is_its_own_and_the_run_peak_spans_every_phase():
    device = torch.device("cuda")
    memory = PhaseMemory()
    memory.start(device)
    big = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    del big
    memory.end("large", device)
    memory.start(device)
    small = torch.empty(16 * 2**20, dtype=torch.uint8, device=device)
    del small
    memory.end("small", device)
    record = memory.record(device)
    large, small = record["phases"]["large"]["peak_allocated_gib"], record["phases"]["small"]["peak_allocated_gib"]
    assert small < large <= record["peak_allocated_gib"]
    assert large - small >= 0.2  # 256 MiB against 16 MiB
