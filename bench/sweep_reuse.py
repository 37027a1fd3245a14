"""What re-running a finished sweep costs: first run vs re-run wall time and the number of quantizations.

Runs one sweep twice through `python -m qllm.run -m ...` on a fresh cache and MLflow store (in a temp dir), side by
side in one invocation. The re-run must evaluate and quantize nothing (every cell is found finished in MLflow).
Quantizations are counted from the stage logs (a quantize stage that did not reuse a cached checkpoint), not assumed.

    python bench/sweep_reuse.py                       # default: tiny model, method=none,rtn,gptq × 2 tasks (6 cells)
    python bench/sweep_reuse.py model=smollm2-135m-instruct method=none,rtn task=arc_easy_offline,wikitext_offline
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT = ["model=tiny-random-llama", "method=none,rtn,gptq", "bits=4", "calibration=wikitext2-small",
           "task=arc_easy_offline,wikitext_offline", "task.limit=20"]


def sweep(overrides: list[str], work: Path) -> tuple[float, str]:
    cmd = [sys.executable, "-m", "qllm.run", "-m", *overrides, f"tracking.uri=sqlite:///{work}/mlruns/mlflow.db",
           f"tracking.artifact_root={work}/mlruns/artifacts", f"hydra.sweep.dir={work}/multirun"]
    env = {**os.environ, "QLLM_CACHE_DIR": str(work / "cache")}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"sweep failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return wall, proc.stdout


def counts(stdout: str) -> dict[str, int]:
    return {
        "quantized": len(re.findall(r"^\[qllm\] quantize: (?!reusing|cached).* \.\.\.$", stdout, re.M)),
        "checkpoints reused": stdout.count("quantize: reusing cached checkpoint"),
        "tasks evaluated": len(re.findall(r"^\[qllm\] evaluate: \S+ \(", stdout, re.M)),
        "cells reused": stdout.count("[qllm] reused "),
    }


def main() -> None:
    overrides = sys.argv[1:] or DEFAULT
    with tempfile.TemporaryDirectory(prefix="qllm-bench-") as tmp:
        work = Path(tmp)
        # the base model conversion happens once per cache; do it before timing so both runs start equal
        subprocess.run([sys.executable, "-c", "import sys; from qllm.planning import compose_cell; from qllm.sources.models "
                        "import prepare; c = compose_cell(sys.argv[1:]); prepare(c.model, c.data_dir, c.cache_dir)",
                        *[o.split(",")[0] for o in overrides if o.startswith("model=")]],
                       cwd=REPO, env={**os.environ, "QLLM_CACHE_DIR": str(work / "cache")}, check=True)
        first, out1 = sweep(overrides, work)
        again, out2 = sweep(overrides, work)
    print(f"sweep: {' '.join(overrides)}")
    print(f"{'':18s} {'wall s':>8s}  " + "  ".join(f"{k:>18s}" for k in counts(out1)))
    for name, wall, out in (("first run", first, out1), ("re-run", again, out2)):
        print(f"{name:18s} {wall:8.1f}  " + "  ".join(f"{v:18d}" for v in counts(out).values()))
    print(f"re-run / first run = {again / first:.3f}  (target < 0.10)")


if __name__ == "__main__":
    main()
