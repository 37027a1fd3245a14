"""`python -m qllm.report`: turn a set of cells (a sweep, run ids, filters) into a report with tables and plots,
written to a folder and logged to MLflow as a run of kind `report`.

    select.py   read the cells from the MLflow store; filters, de-duplication, baselines, per-sample files
    stats.py    recovery, CIs, McNemar, paired bootstrap, flips, Spearman, Pareto front (pure)
    tables.py   the tables (pandas): cells, per task vs baseline, summary, difficulty, correlations
    plots.py    the figures (matplotlib, Okabe-Ito palette)
    render.py   Markdown and self-contained HTML
    build.py    the whole report and its MLflow run
"""

from __future__ import annotations

from typing import Any

__all__ = ["Report", "build_report"]


def __getattr__(name: str) -> Any:
    # lazily: `qllm.run` imports qllm.report.consistency for every cell, and build pulls in matplotlib and pandas
    # plotting (~1.5 s per orchestrator start)
    if name in __all__:
        from . import build

        return getattr(build, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
