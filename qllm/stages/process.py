"""What every stage process does, whatever launched it: know its rank, and never outlive the orchestrator.

- Rank: distributed launchers (torchrun, accelerate, deepspeed) set RANK (and LOCAL_RANK, WORLD_SIZE) in each process
  they start; a plain process is rank 0 of 1. Only the main rank writes results, checkpoints and cache entries:
  every rank runs the stage's collective work, one reports it. Every rank writes its own memory profile (the main
  rank's `profile_<stage>.json` in the profile dir, rank r's in `<profile dir>/rank<r>/`: qllm.measure.profiling).
- Orphans: the orchestrator starts each stage in a process group of its own and ends that group on Ctrl-C, SIGTERM
  or a timeout. Should the orchestrator itself die without doing so (SIGKILL, the OOM killer), a watchdog thread in
  every stage process sees it gone and ends the stage's group (QLLM_ORCHESTRATOR_PID, set by qllm.stages.runner).
"""

from __future__ import annotations

import os
import signal
import threading

ORCHESTRATOR_PID = "QLLM_ORCHESTRATOR_PID"
WATCH_INTERVAL_S = 2.0


def rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def is_main() -> bool:
    return rank() == 0


def exists(pid: int, group: bool = False) -> bool:
    """Whether a process (or, with `group`, any process of a process group) still exists: signal 0 tests for it
    without sending anything."""
    try:
        (os.killpg if group else os.kill)(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _watch(pid: int) -> None:
    stop = threading.Event()
    while not stop.wait(WATCH_INTERVAL_S):
        if not exists(pid):
            print(f"[qllm] the orchestrator (pid {pid}) is gone: ending this stage", flush=True)
            os.killpg(os.getpgrp(), signal.SIGTERM)
            return


def start(stage: str) -> None:
    """Call first in a stage's main(): the orphan watchdog, and a line saying which rank this is when there are
    several."""
    pid = os.environ.get(ORCHESTRATOR_PID)
    if pid and pid.isdigit():
        threading.Thread(target=_watch, args=(int(pid),), name="qllm-orphan-watchdog", daemon=True).start()
    if world_size() > 1:
        print(f"[qllm] {stage} stage: rank {rank()} of {world_size()}"
              + ("" if is_main() else " (not the main rank: writes no results)"), flush=True)
