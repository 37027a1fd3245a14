"""The sensitivity table's cache: a cached table is reused unless it lacks the end-to-end check the settings ask for
(the table key leaves that check out, so the same entry serves method=mixed, which runs none, and `qllm sensitivity`)."""

from __future__ import annotations

import json
from pathlib import Path

from qllm.sensitivity.analysis import Settings, Table, _reusable, e2e_settings

CHECKED = Settings.of({"candidates": ["rtn-w4g64", "rtn-w8g64"], "e2e_layers": 2})
UNCHECKED = Settings.of({"candidates": ["rtn-w4g64", "rtn-w8g64"], "e2e_layers": 0})


def _cached(tmp_path: Path, e2e: dict) -> Path:
    t = Table(sqnr={"l": {"rtn-w4g64": 20.0, "rtn-w8g64": 45.0}}, params={"l": 64}, in_features={"l": 8},
              settings={}, key="k", e2e=e2e)
    path = tmp_path / "table.json"
    path.write_text(json.dumps(t.to_dict()))
    return path


def test_a_table_without_the_check_serves_only_settings_that_ask_for_none(tmp_path: Path) -> None:
    path = _cached(tmp_path, {})
    assert _reusable(path, UNCHECKED).sqnr["l"]["rtn-w8g64"] == 45.0
    assert _reusable(path, CHECKED) is None


def test_a_table_with_another_check_is_measured_again(tmp_path: Path) -> None:
    other = Settings.of({"candidates": ["rtn-w4g64", "rtn-w8g64"], "e2e_layers": 3})
    path = _cached(tmp_path, {"settings": e2e_settings(other), "rows": []})
    assert _reusable(path, CHECKED) is None and _reusable(path, other) is not None
    assert _reusable(tmp_path / "missing.json", UNCHECKED) is None
