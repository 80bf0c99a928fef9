"""Membership inference: pair similarities and the logistic-regression attack (docs/design.md §2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from slug_pl.evaluation.mia import membership_inference, pair_similarities


def test_separable_scores_are_recognised():
    rng = np.random.default_rng(0)
    members = rng.normal(0.8, 0.01, 100)
    nonmembers = rng.normal(0.2, 0.01, 100)
    result = membership_inference(torch.tensor(members), nonmembers)
    assert result["mean"] >= 99.0 and result["std"] <= 2.0
    assert (result["n"], result["n_members"], result["n_nonmembers"], result["folds"]) == (100, 100, 100, 25)


def test_identical_distributions_give_chance():
    """Members and non-members from one distribution: the attack cannot beat 50 %.

    Per seed, every one of the 2n = 2,000 pairs is predicted once on a held-out fold. For a
    classifier with no signal each prediction is right with probability 1/2, so the per-seed
    accuracy has a standard deviation of sqrt(0.25 / 2000) ≈ 1.1 points; averaging over seeds
    only lowers it. A tolerance of 4 points is about 3.5 standard deviations (and the data are
    seeded, so the test is deterministic anyway).
    """
    rng = np.random.default_rng(123)
    scores = rng.normal(0.3, 0.05, 2000)
    result = membership_inference(scores[:1000], scores[1000:])
    assert abs(result["mean"] - 50.0) < 4.0, result
    assert result["n"] == 1000


def test_unequal_sizes_are_balanced_deterministically():
    rng = np.random.default_rng(1)
    members = rng.normal(0.6, 0.02, 40)
    nonmembers = rng.normal(0.3, 0.02, 400)
    first = membership_inference(members, nonmembers, n_splits=4, seeds=(0, 1))
    assert (first["n"], first["n_members"], first["n_nonmembers"], first["folds"]) == (40, 40, 400, 8)
    assert first["mean"] >= 99.0
    assert membership_inference(members, nonmembers, n_splits=4, seeds=(0, 1)) == first
    # the larger side may be either one
    swapped = membership_inference(nonmembers[:30], members, n_splits=3, seeds=(0,))
    assert swapped["n"] == 30 and swapped["mean"] >= 99.0


def test_accuracy_is_measured_on_held_out_folds():
    """Two members (-3, +1) and two non-members (+3, -1): with n_splits = 2 each fold trains on one
    member a and one non-member b and tests the other two. On two standardized points (±1) the
    logistic regression is symmetric: it predicts "member" for x nearer to a than to b. So a
    fold whose training pair is (-3, +3) scores 0 (+1 → non-member, -1 → member) and one whose
    training pair is (-3, -1) or (+1, +3) scores 1/2; the folds come from the protocol's
    StratifiedKFold. Fitting and scoring on the same samples would give 100 % (each fold's own
    two points) or 50 % (all four: the threshold 0 of the symmetric data); held out, the hand
    count below gives less.
    """
    from sklearn.model_selection import StratifiedKFold

    members, nonmembers = [-3.0, 1.0], [3.0, -1.0]
    x = np.array(members + nonmembers)
    y = np.array([1, 1, 0, 0])
    seeds = (0, 1, 2, 3, 4)
    accuracies = []
    for seed in seeds:
        for train, test in StratifiedKFold(2, shuffle=True, random_state=seed).split(x.reshape(-1, 1), y):
            a, b = x[train][y[train] == 1][0], x[train][y[train] == 0][0]
            predicted = (np.abs(x[test] - a) < np.abs(x[test] - b)).astype(int)
            accuracies.append(100.0 * (predicted == y[test]).mean())
    assert set(accuracies) == {0.0, 50.0}  # both kinds of folds occur
    result = membership_inference(members, nonmembers, n_splits=2, seeds=seeds)
    assert result["mean"] == pytest.approx(np.mean(accuracies)) and result["mean"] < 50.0
    assert result["folds"] == 10


def test_spread_is_the_population_std_over_all_folds_and_seeds():
    """Four members (10, 11, 12 and one at -11.5 among the non-members), four non-members (-10 …
    -13); n_splits = 4, so each fold tests one member and one non-member. The attack puts its
    threshold between the clusters (the stray member cannot move it past three of each class), so
    a fold scores 1/2 when it holds the stray member out and 1 otherwise: every seed gives the
    measurements (50, 100, 100, 100) %, whatever the shuffle. Mean 87.5 %; population standard
    deviation over the 4 × 3 measurements sqrt(3)/8 = 21.65 % (the sample standard deviation
    would be 22.61 %, the spread of the seeds' means 0)."""
    members, nonmembers = [10.0, 11.0, 12.0, -11.5], [-10.0, -11.0, -12.0, -13.0]
    result = membership_inference(members, nonmembers, n_splits=4, seeds=(0, 1, 2))
    assert result["folds"] == 12
    assert result["mean"] == pytest.approx(87.5)
    assert result["std"] == pytest.approx(100 * np.sqrt(3) / 8)
    assert np.std([50.0, 100, 100, 100] * 3) == pytest.approx(100 * np.sqrt(3) / 8)


def test_invalid_inputs():
    with pytest.raises(ValueError, match="at least 2 members"):
        membership_inference([0.1], [0.1] * 10)
    small = membership_inference([0.9, 0.8, 0.95], [0.1] * 10)  # fewer folds for 3 pairs per class
    assert small["n"] == 3 and small["mean"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="1-D"):
        membership_inference(np.zeros((10, 2)), np.zeros(10))
    with pytest.raises(ValueError, match="NaN"):
        membership_inference([float("nan")] * 10, [0.0] * 10)


@pytest.fixture(scope="module")
def tiny():
    from slug_pl.families.open_clip import OpenClip

    family = OpenClip(model_name="slug-tiny-vit")
    torch.manual_seed(0)
    return family, family.load()


def test_pair_similarities_match_a_naive_loop(tiny):
    family, model = tiny
    torch.manual_seed(1)
    images = torch.randn(5, 3, 32, 32)
    captions = ["a photo of alice.", "bob at the beach", "a red car", "a cat", "two dogs"]
    tokens = family.tokenize(captions)
    model.train()
    sims = pair_similarities(family, model, images, tokens, batch_size=2)
    assert model.training  # mode restored
    model.eval()
    assert sims.shape == (5,) and sims.dtype == torch.float32
    with torch.no_grad():
        naive = torch.stack([
            F.cosine_similarity(model.encode_image(images[i : i + 1]),
                                model.encode_text(tokens[i : i + 1]))[0]
            for i in range(5)
        ])
    torch.testing.assert_close(sims, naive, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="as many captions as images"):
        pair_similarities(family, model, images, tokens[:3])
