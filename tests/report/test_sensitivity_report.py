"""The report's per-layer section: one entry per distinct table the cells logged, each mixed cell's allocation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

from qllm.report import sensitivity


class _Client:
    """download_artifacts from a folder per run (what MlflowClient does from the store)."""

    def __init__(self, root: Path):
        self.root = root

    def download_artifacts(self, run_id: str, path: str, dst: str) -> str:
        src = self.root / run_id / path
        if not src.is_file():
            raise OSError(f"no {path}")
        out = Path(dst) / path
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, out)
        return str(out)


def _run(root: Path, run_id: str, key: str, allocation: dict | None = None) -> SimpleNamespace:
    d = root / run_id / "sensitivity"
    d.mkdir(parents=True)
    (d / "sensitivity.json").write_text(json.dumps({"key": key}))
    (d / "sensitivity.md").write_text(f"Sensitivity: table {key}\n  most sensitive: v_proj")
    (d / "sensitivity_heatmap.png").write_bytes(b"png")
    if allocation:
        (d / "allocation.json").write_text(json.dumps(allocation))
    return SimpleNamespace(is_baseline=False, source_run_id=run_id, label=f"cell {run_id}", model="m")


def test_tables_once_with_their_cells_and_the_allocations(tmp_path: Path) -> None:
    alloc = {"target_bits": 4.5, "avg_bits": 4.49, "counts": {"gptq-w3g64": 100, "gptq-w8g64": 20}, "objective": 1.5}
    cells = [_run(tmp_path / "store", "a", "k1"), _run(tmp_path / "store", "b", "k1"),
             _run(tmp_path / "store", "c", "k2", alloc),
             SimpleNamespace(is_baseline=True, source_run_id="base", label="base", model="m")]
    tables, allocations = sensitivity.section(cells, SimpleNamespace(client=_Client(tmp_path / "store")),
                                              tmp_path / "report" / "plots")
    assert [(t["key"], t["cells"]) for t in tables] == [("k1", ["cell a", "cell b"]), ("k2", ["cell c"])]
    assert tables[0]["summary"].startswith("Sensitivity: table k1")
    assert (tmp_path / "report" / "plots" / "sensitivity_k1.png").is_file()
    assert allocations.to_dict("records") == [{"model": "m", "cell": "cell c", "budget": 4.5, "avg_bits": 4.49,
                                                "layers per candidate": "gptq-w3g64 100, gptq-w8g64 20",
                                                "summed NSR": 1.5}]


def test_cells_without_a_table_give_nothing(tmp_path: Path) -> None:
    (tmp_path / "store").mkdir()
    cells = [SimpleNamespace(is_baseline=False, source_run_id="x", label="x", model="m")]
    tables, allocations = sensitivity.section(cells, SimpleNamespace(client=_Client(tmp_path / "store")),
                                              tmp_path / "plots")
    assert tables == [] and allocations.empty
