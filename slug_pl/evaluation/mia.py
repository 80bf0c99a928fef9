"""Membership inference (MIA), docs/design.md §2.

The attack's only feature is the cosine similarity of each image–caption pair under the model.
Members are the forget pairs, non-members an unseen set of pairs; a logistic regression tells them
apart, scored by accuracy on held-out folds. Before unlearning the forget pairs usually score
higher than unseen pairs (the model has fit them); after unlearning an accuracy close to 50 %
means the forget set can no longer be told from unseen data.

Protocol (fixed, so numbers are comparable between runs):

- equal class sizes: the larger set is subsampled to the smaller one's size with a fixed seed
  (NumPy ``default_rng(0)``, independent of the split seeds), so chance level is exactly 50 %;
- the feature is standardized inside each training fold (``StandardScaler``), then
  ``LogisticRegression`` with default settings (L2, C = 1) is fit — the scaling keeps the default
  regularization from flattening the small spread of raw cosine similarities;
- for every seed, ``StratifiedKFold(n_splits, shuffle=True, random_state=seed)``; each fold's test
  accuracy is one measurement; the result is the mean and the (population) standard deviation
  over all ``n_splits × len(seeds)`` measurements, in percent.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from slug_pl.families.base import ModelFamily

#: Seed of the subsampling that equalizes member and non-member counts.
BALANCE_SEED = 0


@torch.no_grad()
def pair_similarities(
    family: ModelFamily,
    model: nn.Module,
    images: torch.Tensor,
    tokens: torch.Tensor,
    batch_size: int = 256,
) -> torch.Tensor:
    """Cosine similarity of each image–caption pair, ``(N,)`` float32 on the CPU.

    ``images``: preprocessed ``(N, 3, H, W)``; ``tokens``: token ids ``(N, L)`` of the captions
    (``family.tokenize``), pair ``i`` = ``(images[i], tokens[i])``. The model runs in eval mode
    (its mode is restored afterwards).
    """
    if images.shape[0] != tokens.shape[0]:
        raise ValueError(f"pair_similarities needs as many captions as images, got "
                         f"{images.shape[0]} images and {tokens.shape[0]} captions")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        out = []
        for start in range(0, images.shape[0], batch_size):
            img = images[start : start + batch_size].to(device)
            tok = tokens[start : start + batch_size].to(device)
            u = F.normalize(family.encode_image(model, img).float(), dim=-1)
            v = F.normalize(family.encode_text(model, tok).float(), dim=-1)
            out.append((u * v).sum(dim=-1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def _as_scores(values, what: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{what} scores must be 1-D (one similarity per pair), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} scores contain NaN or infinite values")
    return arr


def membership_inference(
    member_scores,
    nonmember_scores,
    n_splits: int = 5,
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
) -> dict[str, float | int]:
    """Accuracy of a logistic-regression attack that separates members from non-members.

    Args:
        member_scores: pair similarities of the members (forget set), 1-D tensor / array.
        nonmember_scores: pair similarities of unseen pairs, 1-D.
        n_splits: folds per seed (stratified); fewer when a class has fewer pairs than that.
        seeds: shuffling seeds of the folds.

    Returns:
        ``{"mean": %, "std": %, "n": pairs per class used, "n_members": given members,
        "n_nonmembers": given non-members, "folds": number of measurements}``. See the module
        docstring for the exact protocol.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    members = _as_scores(member_scores, "member")
    nonmembers = _as_scores(nonmember_scores, "non-member")
    if n_splits < 2:
        raise ValueError(f"n_splits must be at least 2, got {n_splits}")
    if not seeds:
        raise ValueError("membership_inference needs at least one seed")
    n_members, n_nonmembers = len(members), len(nonmembers)
    n = min(n_members, n_nonmembers)
    if n < 2:
        raise ValueError(f"membership inference needs at least 2 members and 2 non-members, "
                         f"got {n_members} and {n_nonmembers}")
    n_splits = min(n_splits, n)  # small forget sets: fewer folds (each fold keeps both classes)
    rng = np.random.default_rng(BALANCE_SEED)
    if len(members) > n:
        members = members[np.sort(rng.choice(len(members), n, replace=False))]
    if len(nonmembers) > n:
        nonmembers = nonmembers[np.sort(rng.choice(len(nonmembers), n, replace=False))]
    x = np.concatenate([members, nonmembers]).reshape(-1, 1)
    y = np.concatenate([np.ones(n, dtype=int), np.zeros(n, dtype=int)])
    accuracies = []
    for seed in seeds:
        folds = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=int(seed))
        for train, test in folds.split(x, y):
            attack = make_pipeline(StandardScaler(), LogisticRegression())
            attack.fit(x[train], y[train])
            accuracies.append(float((attack.predict(x[test]) == y[test]).mean()))
    acc = np.asarray(accuracies) * 100.0
    return {
        "mean": float(acc.mean()),
        "std": float(acc.std()),
        "n": int(n),
        "n_members": int(n_members),
        "n_nonmembers": int(n_nonmembers),
        "folds": int(acc.size),
    }


def model_membership_inference(family: ModelFamily, model: nn.Module, pairs) -> dict[str, float | int]:
    """Membership inference of a model, the one definition every report uses: ``pairs`` =
    ``((member images, member tokens), (non-member images, non-member tokens))`` (a data module's
    ``mia_pairs()``); returns ``{"mean": %, "std": %, "n": pairs per class}`` (see
    :func:`membership_inference`)."""
    (m_img, m_tok), (n_img, n_tok) = pairs
    result = membership_inference(pair_similarities(family, model, m_img, m_tok),
                                  pair_similarities(family, model, n_img, n_tok))
    return {"mean": result["mean"], "std": result["std"], "n": result["n"]}
