"""What profiling costs a cell: the same cell with the default profiling (memory sampler per stage, memory timeline
CSV + PNG, sizes, MLflow system metrics) vs `profile.enabled=false`, speed and CUDA snapshots off in both.

Runs are interleaved (off, on, off, on, ...) with `force=true`, so every run quantizes and evaluates from scratch,
in one invocation on one machine; prints each wall time, the medians and the ratio on/off (target < 1.05).

    python bench/profile_overhead.py [--repeats N] [overrides]
    default: model=smollm2-135m-instruct method=rtn bits=4 task=arc_easy_offline task.limit=100
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT = ["model=smollm2-135m-instruct", "method=rtn", "bits=4", "task=arc_easy_offline", "task.limit=100"]


def run(overrides: list[str], profiled: bool, work: Path) -> float:
    cmd = [sys.executable, "-m", "qllm.run", *overrides, "force=true", f"profile.enabled={str(profiled).lower()}",
           "profile.speed=false", "profile.memory_snapshot=false", f"tracking.uri=sqlite:///{work}/mlruns/mlflow.db",
           f"tracking.artifact_root={work}/mlruns/artifacts", f"hydra.run.dir={work}/outputs/{time.time_ns()}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"run failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    a, overrides = p.parse_known_args()
    overrides = overrides or DEFAULT
    walls: dict[bool, list[float]] = {False: [], True: []}
    with tempfile.TemporaryDirectory(prefix="qllm-bench-") as tmp:
        work = Path(tmp)
        os.environ.setdefault("QLLM_CACHE_DIR", str(work / "cache"))
        run(overrides, False, work)  # warm-up: base model conversion, OS file cache (not counted)
        for i in range(a.repeats):
            for profiled in (False, True):
                walls[profiled].append(run(overrides, profiled, work))
                print(f"repeat {i + 1}: profiling {'on ' if profiled else 'off'} {walls[profiled][-1]:7.1f} s",
                      flush=True)
    off, on = statistics.median(walls[False]), statistics.median(walls[True])
    print(f"cell: {' '.join(overrides)}")
    print(f"median wall: profiling off {off:.1f} s, on {on:.1f} s; ratio on/off = {on / off:.3f} (target < 1.05)")


if __name__ == "__main__":
    main()
