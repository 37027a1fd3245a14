"""The report's per-layer section: each sensitivity table the selected cells logged (profile.sensitivity, or a
method=mixed cell's), once per table, with its heatmap; and each mixed cell's allocation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Optional

import pandas as pd


def _artifact(store: Any, run_id: str, path: str, dst: Path) -> Optional[Path]:
    try:
        return Path(store.client.download_artifacts(run_id, path, str(dst)))
    except Exception:  # noqa: BLE001 - the run has none
        return None


def section(cells: list, store: Any, plots_dir: Path) -> tuple[list[dict], pd.DataFrame]:
    """([{key, cells, summary, heatmap file}] one per distinct table, the mixed cells' allocations)."""
    tables: dict[str, dict] = {}
    rows = []
    tmp = plots_dir.parent / ".sensitivity"
    for c in cells:
        if c.is_baseline:
            continue
        dst = tmp / c.source_run_id
        found = _artifact(store, c.source_run_id, "sensitivity/sensitivity.json", dst)
        if found is None:
            continue
        data = json.loads(found.read_text())
        key = data["key"]
        if key not in tables:
            png = _artifact(store, c.source_run_id, "sensitivity/sensitivity_heatmap.png", dst)
            name = f"sensitivity_{key}.png"
            if png is not None:
                plots_dir.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(png, plots_dir / name)
            md = _artifact(store, c.source_run_id, "sensitivity/sensitivity.md", dst)  # written by the run
            tables[key] = {"key": key, "cells": [], "summary": md.read_text() if md else "",
                           "heatmap": name if png is not None else None}
        tables[key]["cells"].append(c.label)
        alloc = _artifact(store, c.source_run_id, "sensitivity/allocation.json", dst)
        if alloc is not None:
            a = json.loads(alloc.read_text())
            rows.append({"model": c.model, "cell": c.label, "budget": a["target_bits"], "avg_bits": a["avg_bits"],
                         "layers per candidate": ", ".join(f"{k} {v}" for k, v in a["counts"].items()),
                         "summed NSR": a["objective"]})
    shutil.rmtree(tmp, ignore_errors=True)
    return list(tables.values()), pd.DataFrame(rows)
