"""Fixed-seed stratified subsets of a labelled set: every class keeps its share, and the subset
depends only on the seed and the item keys (not on the machine, the Python or NumPy version, or
the order in which files were listed)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence


def _hash_rank(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}/{key}".encode()).hexdigest()


def stratified_subset(
    files_per_class: Sequence[Sequence[str]], fraction: float, seed: int
) -> list[list[int]]:
    """Indices of a fixed-seed stratified random subset, per class.

    The subset holds ``round(fraction * N)`` items in all. Each class gets ``floor(fraction * n_c)``
    of its items and the remaining items go to the classes with the largest remainders (ties
    broken at random), so every class keeps its share up to one item. Within a class, the chosen
    items are those with the smallest ``sha256(f"{seed}/{key}")`` — the subset depends only on
    the seed and the item keys (relative paths), not on the machine, the Python / NumPy version
    or the order of listing. Returned indices are sorted.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"subset_fraction must lie in (0, 1], got {fraction}")
    sizes = [len(f) for f in files_per_class]
    total = math.floor(fraction * sum(sizes) + 0.5)
    quotas = [fraction * n for n in sizes]
    take = [math.floor(q) for q in quotas]
    order = sorted(range(len(sizes)),
                   key=lambda c: (-(quotas[c] - take[c]), _hash_rank(seed, f"class:{c}")))
    for c in order[: max(0, total - sum(take))]:
        take[c] += 1
    chosen = []
    for keys, k in zip(files_per_class, take):
        ranked = sorted(range(len(keys)), key=lambda i: _hash_rank(seed, keys[i]))
        chosen.append(sorted(ranked[:k]))
    return chosen


def stratified_sample(keys_per_class: Sequence[Sequence[str]], count: int, seed: int) -> list[list[int]]:
    """Indices (per class, sorted) of a stratified subset of exactly ``min(count, N)`` items:
    :func:`stratified_subset` with the fraction ``count / N``."""
    total = sum(len(k) for k in keys_per_class)
    if isinstance(count, bool) or count < 1:
        raise ValueError(f"max_samples must be a positive integer, got {count}")
    if count >= total:
        return [list(range(len(k))) for k in keys_per_class]
    return stratified_subset(keys_per_class, count / total, seed)
