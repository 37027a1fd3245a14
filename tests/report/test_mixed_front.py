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


def test_two_mixed_cells_of_one_budget_are_labelled_by_the_candidates_they_used() -> None:
    from qllm.report.select import CellRun

    def mixed(layers: dict[str, float]) -> CellRun:
        metrics = {"mixed/target_bits": 4.5, **{f"mixed/layers/{k}": v for k, v in layers.items()}}
        return CellRun(run_id="r", name="", status="finished", run_status="FINISHED", model="m", method="mixed",
                       bits="4", suite="s", tasks={}, metrics=metrics, params={}, tags={}, start_time=0)

    a = mixed({"gptq-w8g64": 30, "gptq-w4ch": 41, "gptq-w4g64": 139})
    b = mixed({"gptq-w3g64": 18, "gptq-w4g64": 164, "gptq-w8g64": 28, "gptq-w2g64": 0})
    assert a.label == "mixed · ≤4.5b w4ch/w4g64/w8g64" and b.label == "mixed · ≤4.5b w3g64/w4g64/w8g64"
