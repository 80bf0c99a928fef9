"""Layer ranking: Pareto front, importance / alignment, candidates and the ranking CSV.

Expected values are computed by hand (norms of small integer tensors) or by an independent
brute-force dominance check, never copied from the code's output.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from slug_pl.families.open_clip import OpenClip
from slug_pl.ranking import (
    LayerScore,
    candidates,
    layer_scores,
    pareto_depths,
    pareto_front,
    read_ranking_csv,
    write_ranking_csv,
)

# -- pareto_front ------------------------------------------------------------------------------


def test_single_point_is_on_front():
    assert pareto_front([0.3], [0.9]) == [True]


def test_empty_input():
    assert pareto_front([], []) == []


def test_dominated_point():
    # point 1 has strictly higher importance and strictly lower alignment than point 0
    assert pareto_front([1.0, 2.0], [0.5, 0.1]) == [False, True]


def test_equal_importance_does_not_dominate():
    # same importance, lower alignment: not *strictly* higher importance -> both stay
    assert pareto_front([1.0, 1.0], [0.5, 0.2]) == [True, True]


def test_equal_alignment_does_not_dominate():
    # same alignment, higher importance: not *strictly* lower alignment -> both stay
    assert pareto_front([1.0, 2.0], [0.3, 0.3]) == [True, True]


def test_identical_points_both_on_front():
    assert pareto_front([1.0, 1.0], [0.3, 0.3]) == [True, True]


def test_trade_off_curve_and_interior_points():
    # front: (I, A) = (1, 0.1), (2, 0.2), (3, 0.5); interior: (1.5, 0.3) dominated by (2, 0.2),
    # (0.5, 0.6) dominated by all three; (3, 0.9) not dominated by (3, 0.5) (equal importance)
    imp = [1.0, 2.0, 3.0, 1.5, 0.5, 3.0]
    ali = [0.1, 0.2, 0.5, 0.3, 0.6, 0.9]
    assert pareto_front(imp, ali) == [True, True, True, False, False, True]


@pytest.mark.parametrize("seed", range(5))
def test_front_properties_on_random_points_with_ties(seed):
    rng = random.Random(seed)
    n = 40
    imp = [float(rng.randint(0, 6)) for _ in range(n)]  # few distinct values: many ties
    ali = [float(rng.randint(0, 6)) for _ in range(n)]
    on = pareto_front(imp, ali)

    def dominates(j, i):
        return imp[j] > imp[i] and ali[j] < ali[i]

    for i in range(n):
        dominated = any(dominates(j, i) for j in range(n))
        assert on[i] == (not dominated)
    front = [i for i in range(n) if on[i]]
    assert front, "a non-empty set always has a non-empty front"
    # every dominated point is dominated by some front point (dominance is transitive)
    for i in range(n):
        if not on[i]:
            assert any(dominates(j, i) for j in front)


# -- layer_scores ------------------------------------------------------------------------------


def _t(rows):
    return torch.tensor(rows, dtype=torch.float32)


@pytest.fixture(scope="module")
def family():
    # open_clip's filter (biases, logit scale, embeddings, visual.conv1); no model is loaded
    return OpenClip(model_name="slug-tiny-vit", pretrained=None)


@pytest.fixture
def scored(family):
    """Hand-made parameters / gradients and their hand-computed scores.

    Vision (I = |g_f|/|θ|, A = |cos(g_f, g_r)|):
      visual.proj                         |θ|=5 |g_f|=5  -> I=1,   g_r ⟂ g_f -> A=0
      visual.transformer...c_fc.weight    |θ|=2 |g_f|=5  -> I=2.5, g_r=-2 g_f -> A=1
      visual.ln_post.weight               |θ|=5 |g_f|=1  -> I=0.2, A=1/√2
    Text:
      transformer...in_proj_weight        |θ|=1 |g_f|=3  -> I=3,   A=0
      text_projection                     |θ|=2 |g_f|=1  -> I=0.5, A=1
    """
    params = {
        "visual.proj": _t([[1, 2], [2, 4]]),
        "visual.transformer.resblocks.0.mlp.c_fc.weight": _t([[1, 1], [1, 1]]),
        "visual.ln_post.weight": _t([3, 4]),
        "transformer.resblocks.0.attn.in_proj_weight": _t([[1, 0], [0, 0]]),
        "text_projection": _t([[2, 0], [0, 0]]),
        # never ranked (non-zero gradients on purpose)
        "visual.conv1.weight": _t([[[[1.0]]]]),
        "visual.class_embedding": _t([1, 1]),
        "visual.positional_embedding": _t([[1, 1]]),
        "visual.ln_post.bias": _t([1, 1]),
        "visual.transformer.resblocks.0.attn.in_proj_bias": _t([1, 1]),
        "token_embedding.weight": _t([[1, 1]]),
        "positional_embedding": _t([[1, 1]]),
        "ln_final.bias": _t([1, 1]),
        "logit_scale": torch.tensor(2.0),
        # zero forget gradient: dropped
        "visual.transformer.resblocks.0.attn.out_proj.weight": _t([[1, 1], [1, 1]]),
    }
    gf = {
        "visual.proj": _t([[3, 4], [0, 0]]),
        "visual.transformer.resblocks.0.mlp.c_fc.weight": _t([[0, 3], [4, 0]]),
        "visual.ln_post.weight": _t([1, 0]),
        "transformer.resblocks.0.attn.in_proj_weight": _t([[3, 0], [0, 0]]),
        "text_projection": _t([[0, 1], [0, 0]]),
        "visual.transformer.resblocks.0.attn.out_proj.weight": torch.zeros(2, 2),
    }
    gr = {
        "visual.proj": _t([[4, -3], [0, 0]]),
        "visual.transformer.resblocks.0.mlp.c_fc.weight": _t([[0, -6], [-8, 0]]),
        "visual.ln_post.weight": _t([1, 1]),
        "transformer.resblocks.0.attn.in_proj_weight": _t([[0, 5], [0, 0]]),
        "text_projection": _t([[0, -2], [0, 0]]),
        "visual.transformer.resblocks.0.attn.out_proj.weight": _t([[1, 0], [0, 0]]),
    }
    for name, p in params.items():
        if name not in gf:
            gf[name] = torch.ones_like(p)
            gr[name] = torch.ones_like(p)
    expected = {  # name: (tower, numel, |θ|, |g_f|, |g_r|, I, A, on_front)
        "visual.proj": ("vision", 4, 5.0, 5.0, 5.0, 1.0, 0.0, True),
        "visual.transformer.resblocks.0.mlp.c_fc.weight": ("vision", 4, 2.0, 5.0, 10.0, 2.5, 1.0, True),
        "visual.ln_post.weight": ("vision", 2, 5.0, 1.0, math.sqrt(2), 0.2, 1 / math.sqrt(2), False),
        "transformer.resblocks.0.attn.in_proj_weight": ("text", 4, 1.0, 3.0, 5.0, 3.0, 0.0, True),
        "text_projection": ("text", 4, 2.0, 1.0, 2.0, 0.5, 1.0, False),
    }
    return layer_scores(family, params, gf, gr), expected


def test_layer_scores_values(scored):
    scores, expected = scored
    by_name = {s.name: s for s in scores}
    assert set(by_name) == set(expected)
    for name, (tower, numel, pn, fn, rn, imp, ali, front) in expected.items():
        s = by_name[name]
        assert s.tower == tower, name
        assert s.numel == numel, name
        assert s.param_norm == pytest.approx(pn, abs=1e-12), name
        assert s.forget_grad_norm == pytest.approx(fn, abs=1e-12), name
        assert s.retain_grad_norm == pytest.approx(rn, abs=1e-12), name
        assert s.importance == pytest.approx(imp, abs=1e-12), name
        assert s.alignment == pytest.approx(ali, abs=1e-12), name
        assert s.on_front is front and (s.front == 1) is front, name


def test_excluded_and_zero_gradient_tensors_are_not_scored(scored):
    names = {s.name for s in scored[0]}
    for excluded in ("visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding",
                     "visual.ln_post.bias", "visual.transformer.resblocks.0.attn.in_proj_bias",
                     "token_embedding.weight", "positional_embedding", "ln_final.bias", "logit_scale",
                     "visual.transformer.resblocks.0.attn.out_proj.weight"):
        assert excluded not in names


def test_fronts_are_per_tower(scored):
    # The text layer (I=3, A=0) would dominate the vision c_fc layer (I=2.5, A=1) if the towers
    # shared one front; it must stay on the vision front.
    by_name = {s.name: s for s in scored[0]}
    assert by_name["visual.transformer.resblocks.0.mlp.c_fc.weight"].on_front
    assert pareto_front([3.0, 2.5], [0.0, 1.0]) == [True, False]  # the merged view would drop it


def test_parameters_without_forget_gradient_are_skipped(family):
    params = {"visual.proj": _t([[1, 0]]), "text_projection": _t([[1, 0]])}
    gf = {"visual.proj": _t([[1, 0]])}
    gr = {"visual.proj": _t([[0, 1]])}
    scores = layer_scores(family, params, gf, gr)
    assert [s.name for s in scores] == ["visual.proj"]
    assert scores[0].alignment == pytest.approx(0.0)


def test_include_filter_restricts_ranking():
    fam = OpenClip(model_name="slug-tiny-vit", pretrained=None, include=[r"\.mlp\."])
    params = {
        "visual.transformer.resblocks.0.mlp.c_fc.weight": _t([[1, 0]]),
        "visual.transformer.resblocks.0.attn.out_proj.weight": _t([[1, 0]]),
    }
    g = {k: _t([[1, 1]]) for k in params}
    assert [s.name for s in layer_scores(fam, params, g, g)] == [
        "visual.transformer.resblocks.0.mlp.c_fc.weight"
    ]


# -- pareto_depths (non-dominated sorting) -----------------------------------------------------


def test_depths_peel_fronts_one_after_another():
    # the trade-off example: front {0, 1, 2, 5}; of the rest, (1.5, 0.3) dominates (0.5, 0.6)
    imp = [1.0, 2.0, 3.0, 1.5, 0.5, 3.0]
    ali = [0.1, 0.2, 0.5, 0.3, 0.6, 0.9]
    assert pareto_depths(imp, ali) == [1, 1, 1, 2, 3, 1]
    assert pareto_depths([], []) == []


def _dominates(a, b):
    return a[0] > b[0] and a[1] < b[1]


def test_depths_match_brute_force_dominance():
    rng = random.Random(1)
    for _ in range(30):
        pts = [(rng.random(), rng.random()) for _ in range(rng.randint(1, 25))]
        depth = pareto_depths([p[0] for p in pts], [p[1] for p in pts])
        for i, p in enumerate(pts):
            assert not any(_dominates(q, p) for j, q in enumerate(pts) if depth[j] >= depth[i])
            if depth[i] > 1:  # something on the front just above dominates it
                assert any(_dominates(q, p) for j, q in enumerate(pts) if depth[j] == depth[i] - 1)


def test_candidates_from_several_fronts():
    def score(name, imp, ali, depth):
        return LayerScore(name, "vision", 4, 1.0, imp, 1.0, imp, ali, depth == 1, depth)

    scores = [score("f1_low", 1.0, 0.1, 1), score("f1_high", 3.0, 0.5, 1), score("f2", 2.5, 0.6, 2),
              score("f3", 0.5, 0.7, 3)]
    assert [s.name for s in candidates(scores, "vision", None)] == ["f1_high", "f1_low"]
    assert [s.name for s in candidates(scores, "vision", None, fronts=2)] == ["f1_high", "f1_low", "f2"]
    assert [s.name for s in candidates(scores, "vision", 3, fronts=3)] == ["f1_high", "f1_low", "f2"]
    assert [s.name for s in candidates(scores, "vision", None, fronts=3)][-1] == "f3"


# -- candidates --------------------------------------------------------------------------------


def _score(name, tower, imp, ali, front):
    return LayerScore(name, tower, 4, 1.0, imp, 1.0, imp, ali, front)


def test_candidates_order_tower_and_top_k():
    scores = [
        _score("v_a", "vision", 0.5, 0.1, True),
        _score("v_b", "vision", 2.0, 0.9, True),
        _score("v_c", "vision", 3.0, 0.5, False),  # highest importance but not on the front
        _score("v_d", "vision", 1.0, 0.3, True),
        _score("t_a", "text", 9.0, 0.0, True),
    ]
    assert [s.name for s in candidates(scores, "vision", None)] == ["v_b", "v_d", "v_a"]
    assert [s.name for s in candidates(scores, "vision", 2)] == ["v_b", "v_d"]
    assert [s.name for s in candidates(scores, "vision", 10)] == ["v_b", "v_d", "v_a"]
    assert [s.name for s in candidates(scores, "text", 1)] == ["t_a"]
    assert candidates(scores, "text", 0) == []


# -- CSV ---------------------------------------------------------------------------------------


def test_ranking_csv_round_trip(tmp_path):
    scores = [
        LayerScore("visual.proj", "vision", 2048, 5.0, 0.1 + 0.2, 1e-30, 1 / 3, 0.0, True, 1),
        LayerScore("visual.ln_post.weight", "vision", 64, 7.25, 2.0, 3.0, 2 / 7, 0.123456789012345, False, 2),
        LayerScore("text_projection", "text", 2048, 1e10, math.pi, math.e, 12.5, 1.0, True, 1),
    ]
    path = write_ranking_csv(scores, tmp_path / "ranking.csv")
    assert path == tmp_path / "ranking.csv"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ranking.csv"]  # no temp file left
    back = read_ranking_csv(path)
    key = lambda s: s.name  # noqa: E731
    assert sorted(back, key=key) == sorted(scores, key=key)  # dataclass equality: exact floats
    for s in back:
        assert isinstance(s.on_front, bool) and isinstance(s.numel, int) and isinstance(s.front, int)
