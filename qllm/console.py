"""What a finished cell prints: its scores, its checkpoint, what it cost, where it is in MLflow (rich tables)."""

from __future__ import annotations

from typing import Any, Optional

from .cell import Cell
from .names import KL_MEAN, KL_P99, KL_TOP1_AGREEMENT, speed_metric
from .records import EvalResult, QuantizeResult
from .tasks.results import primary_key


def print_summary(cell: Cell, results: EvalResult, run_id: str, uri: str, quant: Optional[QuantizeResult],
                  costs: dict[str, float], speed_kind: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{cell.name} · {cell.scheme}", title_justify="left")
    for col in ("task", "metric", "value", "± stderr", "n", "shots"):
        table.add_column(col, justify="left" if col in ("task", "metric") else "right")
    for key, t in results.tasks.items():
        value, metric = t.primary["value"], t.primary["metric"]
        name, _, filt = primary_key(metric).partition(",")
        stderr = t.metrics.get(f"{name}_stderr,{filt}")
        shown = f"{value:.4f}" if isinstance(value, float) else (
            "not judged" if value is None and t.lm_eval_task == "mt_bench" else str(value))
        table.add_row(key, metric + (" (1-10)" if t.lm_eval_task == "mt_bench" else ""), shown,
                      f"{stderr:.4f}" if isinstance(stderr, float) else "n/a",
                      str(t.n_samples["effective"]), str(t.num_fewshot))
    if results.suite:
        table.add_row("suite", "score_macro (0-100)", f"{results.suite['score_macro']:.2f}", "", "", "")
    console = Console()
    console.print(table)
    if cell.model.get("note"):
        console.print(f"model note: {cell.model['note']}")
    if quant:
        console.print(f"checkpoint: {quant.checkpoint} ({quant.manifest.checkpoint_bytes / 2**20:.1f} MiB"
                      f"{', reused from cache' if quant.reused else ''})")
    for part in _cost_lines(costs, f"{speed_kind} speed, {cell.eval['backend']}"):
        console.print(f"cost: {part}")
    if KL_MEAN in costs:
        console.print(f"KL vs baseline: {costs[KL_MEAN]:.4g} nats/token (p99 {costs[KL_P99]:.4g}), top-1 agreement "
                      f"{100 * costs[KL_TOP1_AGREEMENT]:.1f}%")
    console.print(f"MLflow: run {run_id} in {uri} — browse with `make ui` (experiment runs under 'Model training')")


def _cost_lines(m: dict[str, Any], speed_label: str) -> list[str]:
    parts = []
    if "size/params" in m:
        bits = m.get("size/bits_per_weight_quantized")
        parts.append(f"{m['size/params'] / 1e6:.1f}M params, {m['size/disk_gb'] * 1e3:.1f} MB on disk"
                     + (f", {bits:.2f} bits/weight in quantized layers" if bits else ""))
    mem = [f"{k.split('/')[1]} {v:.2f} GB" for k, v in m.items() if k.count("/") == 2 and k.endswith("/peak_rss_gb")
           and k.startswith("mem/")]
    if mem:
        parts.append("peak RSS " + ", ".join(mem))
    if speed_metric("decode_tok_s", 1) in m:
        parts.append(f"batch 1: prefill {m[speed_metric('prefill_tok_s', 1)]:.0f} tok/s, decode "
                     f"{m[speed_metric('decode_tok_s', 1)]:.1f} tok/s, TTFT {m[speed_metric('ttft_ms', 1)]:.0f} ms "
                     f"({speed_label})")
    return parts
