"""`python -m qllm.report`: turn a set of cells (a sweep, run ids, filters) into a report with tables and plots,
written to a folder and logged to MLflow as a run of kind `report`.

    select.py   read the cells from the MLflow store; filters, de-duplication, baselines, per-sample files
    stats.py    recovery, CIs, McNemar, paired bootstrap, flips, Spearman, Pareto front (pure)
    tables.py   the tables (pandas): cells, per task vs baseline, summary, difficulty, correlations
    plots.py    the figures (matplotlib, Okabe-Ito palette)
    render.py   Markdown and self-contained HTML
    build.py    the whole report and its MLflow run
"""

from .build import Report, build_report

__all__ = ["Report", "build_report"]
