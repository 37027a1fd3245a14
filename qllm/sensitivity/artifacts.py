"""A sensitivity table's files (CSV, JSON, heatmap, summary) and what a cell run logs of it (qllm.run)."""

from __future__ import annotations

import csv
import json
import tempfile
from pathlib import Path
from typing import Any, Optional


def write(table: Any, out: Path, model: str, stability: Optional[dict] = None, wall: float = 0.0) -> None:
    """The table as CSV + JSON, its heatmap and its summary, into `out`."""
    from . import heatmap

    stability = stability or {}
    labels = list(next(iter(table.sqnr.values())))
    with open(out / "sensitivity.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["layer", "params", *labels])
        for layer, row in table.sqnr.items():
            w.writerow([layer, table.params[layer], *[row[lb] for lb in labels]])
    (out / "sensitivity.json").write_text(json.dumps({**table.to_dict(), "seed_spearman": stability,
                                                      "wall_s_total": round(wall, 2)}, indent=1))
    heatmap.render(table, out / "sensitivity_heatmap.png", f"{model}: per-layer SQNR (each layer quantized alone)")
    (out / "sensitivity.md").write_text(summary(table, stability, wall) + "\n")


def summary(table: Any, stability: dict, wall: float) -> str:
    """The table in a few lines: the most and least sensitive layers, per projection type, the checks."""
    from .analysis import block_and_projection

    ref = table.settings["reference"]
    ranked = table.ranking(ref)
    lines = [f"Sensitivity: {len(ranked)} layers x {len(table.settings['candidates'])} candidates, SQNR dB of each "
             f"layer's output quantized alone; ranked by {ref} ({wall:.0f} s)",
             "  most sensitive:  " + ", ".join(f"{ly} {table.sqnr[ly][ref]:.1f}" for ly in ranked[:5]),
             "  least sensitive: " + ", ".join(f"{ly} {table.sqnr[ly][ref]:.1f}" for ly in ranked[-5:])]
    by_proj: dict[str, list[float]] = {}
    for ly in ranked:
        by_proj.setdefault(block_and_projection(ly)[1], []).append(table.sqnr[ly][ref])
    lines.append("  mean by projection: " + ", ".join(f"{p} {sum(v) / len(v):.1f}" for p, v in by_proj.items()))
    e = table.e2e
    if e:
        rho = "n/a" if e["spearman_rho"] is None else f"{e['spearman_rho']:.2f}"
        lines.append(f"  end to end ({e['candidate']}, {e['docs']} docs, {e['tokens']} tokens; baseline ppl "
                     f"{e['baseline_ppl']:.3f}): only a most-sensitive layer quantized {e['mean_delta_most_pct']:+.3f}% "
                     f"ppl, only a least-sensitive one {e['mean_delta_least_pct']:+.3f}%; Spearman(SQNR, -dppl) {rho}")
    for k, v in stability.items():
        lines.append(f"  ranking stability {k}: Spearman rho {v:.3f}" if v is not None else f"  {k}: n/a")
    return "\n".join(lines)


def log_to_run(manifest: Any) -> None:
    """Into the active MLflow run: the sensitivity table the checkpoint was made with or measured beside
    (profile.sensitivity, method=mixed) under `sensitivity/`, and a mixed cell's allocation with its figures."""
    import mlflow

    from .analysis import Table

    if manifest.sensitivity:
        entry = Path(manifest.sensitivity["entry"]) / "table.json"
        if entry.is_file():
            table = Table.from_dict(json.loads(entry.read_text()))
            with tempfile.TemporaryDirectory(prefix="qllm-sensitivity-") as tmp:
                write(table, Path(tmp), manifest.model.get("name", ""), wall=sum(table.wall_s.values()))
                if manifest.allocation:
                    (Path(tmp) / "allocation.json").write_text(json.dumps(manifest.allocation, indent=1))
                mlflow.log_artifacts(tmp, "sensitivity")
    if manifest.allocation:
        a = manifest.allocation
        mlflow.log_metrics({"mixed/avg_bits": a["avg_bits"], "mixed/target_bits": a["target_bits"],
                            "mixed/summed_nsr": a["objective"],
                            **{f"mixed/layers/{k}": v for k, v in a["counts"].items()}})
