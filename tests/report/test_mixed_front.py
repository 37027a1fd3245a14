"""The iso-memory note for method=mixed cells: measured against the best uniform cell no larger than it."""

from __future__ import annotations

import pandas as pd

from qllm.report.plots import _mixed_vs_front


def _cells(mixed_value: float) -> pd.DataFrame:
    return pd.DataFrame([
        {"model": "m", "method": "none", "cell": "base", "size_gb": 0.54, "value": 30.0},
        {"model": "m", "method": "gptq", "cell": "gptq w8", "size_gb": 0.18, "value": 30.2},
        {"model": "m", "method": "gptq", "cell": "gptq w4", "size_gb": 0.11, "value": 33.0},
        {"model": "m", "method": "mixed", "cell": "mixed w4", "size_gb": 0.115, "value": mixed_value},
    ])


def test_a_mixed_cell_better_than_every_smaller_uniform_cell_is_on_the_front() -> None:
    (note,) = _mixed_vs_front(_cells(32.0), "wikitext", higher=False)
    assert "is on or above" in note and "best uniform at <= its size: 33" in note and "margin +1" in note


def test_a_worse_mixed_cell_is_below_by_its_margin() -> None:
    (note,) = _mixed_vs_front(_cells(33.5), "wikitext", higher=False)
    assert "is below" in note and "margin -0.5" in note


def test_higher_is_better_scores_compare_the_other_way() -> None:
    df = _cells(0.0).assign(value=[60.0, 59.0, 50.0, 52.0])
    (note,) = _mixed_vs_front(df, "arc", higher=True)
    assert "on or above" in note and "margin +2" in note
