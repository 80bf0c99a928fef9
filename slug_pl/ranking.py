"""Layer ranking: importance, alignment and the per-tower Pareto front (docs/design.md §1).

For each rankable tensor l (Frobenius norms, vec = flattened):

- importance  I_l = ‖g_f,l‖ / ‖θ_l‖          (dimensionless; high = the forget loss is steep here);
- alignment   A_l = |cos(vec g_f,l, vec g_r,l)|  (in [0, 1]; low = editing l barely moves the
  retain loss to first order).

A layer is on its tower's Pareto front if no other layer of that tower has both strictly lower
alignment and strictly higher importance. Removing the front and repeating gives the second
front, and so on (non-dominated sorting): ``LayerScore.front`` is 1 for the Pareto front, 2 for
the next, ... Candidates for the step search are the layers of the first ``fronts`` fronts, by
front then by importance (descending).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from slug_pl.atomic import atomic_output
from slug_pl.families.base import ModelFamily


@dataclass
class LayerScore:
    name: str
    tower: str
    numel: int
    param_norm: float
    forget_grad_norm: float
    retain_grad_norm: float
    importance: float
    alignment: float
    on_front: bool = False
    front: int = 0  # 1 = the Pareto front, 2 = the front once the first is removed, ...; 0 = unranked
    readable: bool = True  # read by the model that consumes the edit (else never a candidate)


def has_candidates(family: ModelFamily, named_parameters: Iterable[tuple[str, torch.Tensor]],
                   towers: Sequence[str] | None = None, readable: Callable[[str], bool] | None = None) -> bool:
    """Whether any tensor of ``named_parameters`` ((name, tensor) pairs) can be a candidate layer:
    rankable under the family's filters (:meth:`~slug_pl.families.base.ModelFamily.is_rankable`),
    in one of ``towers`` (None: any) and read by the model that consumes the edit (``readable``;
    None: every tensor). The check a run makes before its gradient pass, so a filter that leaves
    nothing fails in seconds."""
    return any(family.is_rankable(name, param)
               and (towers is None or family.tower_of(name) in towers)
               and (readable is None or readable(name))
               for name, param in named_parameters)


def layer_scores(
    family: ModelFamily,
    params: Mapping[str, torch.Tensor],
    forget_grads: Mapping[str, torch.Tensor],
    retain_grads: Mapping[str, torch.Tensor],
    readable: Callable[[str], bool] | None = None,
) -> list[LayerScore]:
    """Scores of every rankable tensor with a non-zero forget gradient, fronts marked.

    ``readable(name)``: whether the model that consumes the edit reads the tensor (a downstream
    target, see :mod:`slug_pl.targets`); tensors it does not read are scored (and shown) but take
    no part in the fronts (``front`` 0), so they are never candidates. None: every tensor.
    """
    scores = []
    for name, param in params.items():
        if name not in forget_grads or not family.is_rankable(name, param):
            continue
        gf = forget_grads[name].double().flatten()
        gr = retain_grads[name].double().flatten()
        theta = param.detach().double().flatten().cpu()
        gf_norm, gr_norm, p_norm = gf.norm().item(), gr.norm().item(), theta.norm().item()
        if gf_norm == 0.0 or p_norm == 0.0:
            continue
        alignment = abs(torch.dot(gf, gr).item()) / (gf_norm * gr_norm) if gr_norm > 0 else 0.0
        scores.append(LayerScore(name, family.tower_of(name), param.numel(), p_norm, gf_norm, gr_norm,
                                 gf_norm / p_norm, alignment, readable=readable is None or readable(name)))
    for tower in {s.tower for s in scores}:
        members = [s for s in scores if s.tower == tower and s.readable]
        for s, depth in zip(members, pareto_depths([m.importance for m in members], [m.alignment for m in members])):
            s.front, s.on_front = depth, depth == 1
    return scores


def pareto_front(importance: Sequence[float], alignment: Sequence[float]) -> list[bool]:
    """``True`` for points not dominated: no other point has strictly higher importance *and*
    strictly lower alignment."""
    n = len(importance)
    return [
        not any(importance[j] > importance[i] and alignment[j] < alignment[i] for j in range(n))
        for i in range(n)
    ]


def pareto_depths(importance: Sequence[float], alignment: Sequence[float]) -> list[int]:
    """Non-dominated sorting: 1 for the points of the Pareto front, 2 for the front of the rest,
    and so on."""
    depth = [0] * len(importance)
    left = list(range(len(importance)))
    level = 0
    while left:
        level += 1
        on = pareto_front([importance[i] for i in left], [alignment[i] for i in left])
        for i, flag in zip(left, on):
            if flag:
                depth[i] = level
        left = [i for i, flag in zip(left, on) if not flag]
    return depth


def candidates(scores: Sequence[LayerScore], tower: str, top_k: int | None, fronts: int = 1) -> list[LayerScore]:
    """Layers of ``tower`` on its first ``fronts`` Pareto fronts, by front then descending
    importance, at most ``top_k`` of them (None: all)."""
    pool = sorted((s for s in scores if s.tower == tower and 1 <= _depth(s) <= fronts),
                  key=lambda s: (_depth(s), -s.importance))
    return pool if top_k is None else pool[:top_k]


def _depth(s: LayerScore) -> int:
    return s.front or (1 if s.on_front else 0)  # scores built by hand may only set on_front


def write_ranking_csv(scores: Sequence[LayerScore], path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Every score as a CSV row (by tower, then descending importance); ``overwrite`` only for a
    run's own earlier version of the file."""
    path = Path(path)
    with atomic_output(path, overwrite=overwrite) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[fl.name for fl in fields(LayerScore)])
        writer.writeheader()
        for s in sorted(scores, key=lambda s: (s.tower, -s.importance)):
            writer.writerow(asdict(s))
    return path


def read_ranking_csv(path: str | os.PathLike) -> list[LayerScore]:
    with open(path, newline="") as f:
        return [
            LayerScore(r["name"], r["tower"], int(r["numel"]), float(r["param_norm"]),
                       float(r["forget_grad_norm"]), float(r["retain_grad_norm"]),
                       float(r["importance"]), float(r["alignment"]), r["on_front"] == "True",
                       int(r.get("front") or 0), r.get("readable", "True") == "True")
            for r in csv.DictReader(f)
        ]


def pareto_figure(scores: Sequence[LayerScore], tower: str, chosen: str | None = None):
    """Log–log scatter of alignment (x) vs importance (y) of one tower, front highlighted and
    labelled, the chosen layer starred. Returns a matplotlib Figure."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    members = [s for s in scores if s.tower == tower]
    fig, ax = plt.subplots(figsize=(7, 5), dpi=110)
    unread = [s for s in members if not s.readable]
    rest = [s for s in members if not s.on_front and s.readable]
    front = sorted((s for s in members if s.on_front), key=lambda s: s.alignment)
    floor = 1e-12
    ax.scatter([max(s.alignment, floor) for s in rest], [s.importance for s in rest], s=14, c="0.6",
               label="layers")
    if unread:
        ax.scatter([max(s.alignment, floor) for s in unread], [s.importance for s in unread], s=14, c="0.85",
                   marker="x", label="not read by the target model")
    ax.plot([max(s.alignment, floor) for s in front], [s.importance for s in front], "o-", c="tab:red",
            ms=6, label="Pareto front")
    for s in front:
        ax.annotate(s.name, (max(s.alignment, floor), s.importance), fontsize=7, xytext=(4, 3),
                    textcoords="offset points")
    for s in members:
        if s.name == chosen:
            ax.scatter([max(s.alignment, floor)], [s.importance], marker="*", s=220, c="gold",
                       edgecolors="k", zorder=5, label=f"chosen: {s.name}")
    if members:
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel("alignment |cos(g_forget, g_retain)|  (lower = safer)")
    ax.set_ylabel("importance ‖g_forget‖ / ‖θ‖  (higher = stronger)")
    ax.set_title(f"{tower} tower: {len(members)} layers, {len(front)} on the front")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig
