"""`qllm <command> ...` (or `python -m qllm <command>`): run | plan | sbatch | cache | report | compare-backends | judge."""

from __future__ import annotations

import sys

COMMANDS = {"run": "compose and run cells (Hydra overrides; -m sweeps)", "cache": "ls | verify | rm | gc the cache",
            "report": "tables and plots of a set of runs, logged back to MLflow",
            "compare-backends": "one checkpoint through two backends: per-item agreement, paired delta, verdict",
            "judge": "judge the dialogue answers (MT-Bench) of finished runs; verdicts logged into them",
            "plan": "the memory plan of cells (Hydra overrides; -m sweeps): peak per stage and device, launch",
            "sensitivity": "per-layer SQNR of candidate quantizers (Hydra overrides): table, heatmap, checks",
            "sbatch": "dry run of a SLURM sweep: its jobs and the sbatch script, submitting nothing"}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print("usage: qllm <command> [args]\n" + "\n".join(f"  {c:16s} {h}" for c, h in COMMANDS.items()),
              file=sys.stderr)
        raise SystemExit(0 if len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help") else 2)
    cmd = sys.argv.pop(1)
    sys.argv[0] = f"qllm {cmd}"
    if cmd == "run":
        from .run import cli

        cli()
    elif cmd == "cache":
        from .cache import main as cache_main

        raise SystemExit(cache_main())
    elif cmd == "judge":
        from .judging import main as judge_main

        raise SystemExit(judge_main())
    elif cmd == "plan":
        from .plan.cli import main as plan_main

        raise SystemExit(plan_main())
    elif cmd == "sensitivity":
        from .sensitivity.cli import main as sensitivity_main

        raise SystemExit(sensitivity_main())
    elif cmd == "sbatch":
        from .sbatch import main as sbatch_main

        raise SystemExit(sbatch_main())
    elif cmd == "compare-backends":
        from .report.consistency import main as compare_main

        raise SystemExit(compare_main())
    else:
        from .report.__main__ import main as report_main

        raise SystemExit(report_main())


if __name__ == "__main__":
    main()
