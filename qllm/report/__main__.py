"""python -m qllm.report [--sweep-id ID] [--run-ids ID,...] [--model M] [--method M] [--bits B] [--task T] ..."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DESCRIPTION = ("Turn qllm cells (a sweep, run ids, or the experiment, filtered) into a report: tables vs each "
               "model's baseline, plots, report.md + self-contained report.html + CSVs, logged to MLflow as a run "
               "of kind 'report'.")
EPILOG = """examples:
  python -m qllm.report --sweep-id 20250101-120000-abc123
  python -m qllm.report --model smollm2-135m-instruct --method none,gptq --bits 4 --task arc_easy_offline
  python -m qllm.report --run-ids <sweep parent run id>      (a sweep's parent stands for its cells)
  make report ARGS="--sweep-id 20250101-120000-abc123"
Filters take comma lists and repeat. --bits none (or base) keeps the baselines; baselines missing from the selection
are looked up in the experiment (same model and task settings)."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m qllm.report", description=DESCRIPTION,
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", default="qllm", help="MLflow experiment (default: qllm)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow store (default: sqlite:///<cwd>/mlruns/mlflow.db, as tracking=local)")
    p.add_argument("--sweep-id", action="append", default=[], help="cells of this sweep (tag qllm.sweep_id)")
    p.add_argument("--run-ids", action="append", default=[], help="these runs (a sweep parent: its cells)")
    p.add_argument("--model", action="append", help="keep cells of these models")
    p.add_argument("--method", action="append", help="keep cells of these methods (none = baseline)")
    p.add_argument("--bits", action="append", help="keep cells of these bits (none = baseline)")
    p.add_argument("--task", action="append", help="a suite name (task param) or a task key")
    p.add_argument("--out", type=Path, default=None, help="report folder (default: reports/<timestamp>/)")
    p.add_argument("--title", default=None)
    p.add_argument("--bootstrap", type=int, default=2000, help="paired bootstrap resamples (default 2000)")
    p.add_argument("--no-log", action="store_true", help="do not log the report to MLflow")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from . import build_report

    rep = build_report(tracking_uri=args.tracking_uri, experiment=args.experiment, sweep_ids=args.sweep_id,
                       run_ids=args.run_ids, models=args.model, methods=args.method, bits=args.bits,
                       tasks=args.task, out=args.out, log=not args.no_log, n_boot=args.bootstrap, title=args.title)
    an = rep.analysis
    print(f"[qllm report] {len(an.evaluated)} evaluated cell(s), {len(an.not_evaluated)} not evaluated")
    for m in an.missing:
        print(f"[qllm report] missing: {m}")
    print(f"[qllm report] {rep.out / 'report.html'}")
    print(f"[qllm report] {rep.out / 'report.md'}")
    if rep.run_id:
        print(f"[qllm report] MLflow run {rep.run_id} (qllm.kind=report; make ui)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
