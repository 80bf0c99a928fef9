"""The demo benchmarks' "who pays for the edit" analyses, on hand-made runs with hand-computed
answers (the benchmarks themselves take minutes and run outside the test suite)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import comparison_demo  # noqa: E402
import llava_demo  # noqa: E402
import sd_demo  # noqa: E402


def test_llava_who_pays_names_the_fallen_and_the_attributes_they_share():
    attributes = {
        "Quinn": {"name": "Quinn", "shirt": "blue", "hair": "red", "eyes": "green"},
        "Bruno": {"name": "Bruno", "shirt": "blue", "hair": "red", "eyes": "blue"},
        "Liam": {"name": "Liam", "shirt": "blue", "hair": "grey", "eyes": "green"},
        "Alice": {"name": "Alice", "shirt": "red", "hair": "black", "eyes": "blue"},
    }
    row = {"concept": "Quinn", "per_concept": {
        "Bruno": {"before": 1.0, "after": 0.0},    # fell by 100 points, shares shirt and hair
        "Liam": {"before": 0.9, "after": 0.7},     # fell by exactly 20 points: counted
        "Alice": {"before": 1.0, "after": 0.95},   # kept
    }}
    w = llava_demo.who_pays(row, attributes)
    assert [f["identity"] for f in w["fell"]] == ["Bruno", "Liam"]
    assert w["fell"][0]["drop"] == pytest.approx(1.0)
    assert w["fell"][0]["shared"] == ["shirt blue", "hair red"]  # in the world's attribute order
    assert w["fell"][1]["shared"] == ["shirt blue", "eyes green"]
    # the shirt: worn by both that fell and by none of those kept; the hair and the eyes by one of two
    assert w["telling"] == {"attribute": "shirt blue", "fell": 2, "of_fell": 2, "kept": 0, "of_kept": 1}
    assert {a["attribute"]: (a["fell"], a["kept"]) for a in w["by_attribute"]} == {
        "shirt blue": (2, 0), "hair red": (1, 0), "eyes green": (1, 0)}


def test_sd_who_pays_uses_every_judge_and_the_state_change_ratio():
    judges = {
        "clip": {"per_concept": {"Quinn": {"before": 1.0, "after": 0.0}, "Nadia": {"before": 1.0, "after": 0.0},
                                 "Aria": {"before": 1.0, "after": 1.0}}},
        "classifier": {"per_concept": {"Quinn": {"before": 1.0, "after": 0.0}, "Nadia": {"before": 1.0, "after": 0.5},
                                       "Aria": {"before": 1.0, "after": 0.75}}},
    }
    changes = {"Quinn": 1.2, "Nadia": 0.6, "Aria": 0.12}
    w = sd_demo.who_pays("Quinn", {"judges": judges}, changes)
    # Nadia: the judges' mean falls 1.0 -> 0.25; Aria: 1.0 -> 0.875 (12.5 points: kept)
    assert w["fell"] == [{"identity": "Nadia", "drop": pytest.approx(0.75), "state_change_ratio": pytest.approx(0.5)}]
    assert w["mean_ratio_fell"] == pytest.approx(0.5) and w["mean_ratio_kept"] == pytest.approx(0.1)


def test_comparison_rows_count_lost_accuracy_as_a_positive_drop():
    """The comparison table's drops are what a method cost: before − after, in points lost."""
    class Run:
        ok = True
        summary = {"before": {"forget_top1": 1.0, "retain_top1": 0.95, "utility_top1": 0.99},
                   "mia": {"before": {"mean": 70.0}}}

    row = comparison_demo.method_row(0, "Quinn", Run(), {"method": "ga", "retain_top1": 0.80, "utility_top1": 1.0})
    assert row["retain_drop"] == pytest.approx(0.15)   # 95 % -> 80 %: 15 points lost
    assert row["utility_drop"] == pytest.approx(-0.01)  # 99 % -> 100 %: a point gained
    assert row["before_retain_top1"] == 0.95 and row["before_mia"] == 70.0 and row["method"] == "ga"

    class Failed:
        ok = False

    assert comparison_demo.method_row(1, "Alice", Failed(), {"method": "ft"}) == {
        "seed": 1, "concept": "Alice", "method": "ft"}
