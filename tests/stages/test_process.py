"""What every stage process does: its rank from the launcher's environment, and no stage outlives its
orchestrator (the orphan watchdog), with real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil

from qllm.stages import process

# an "orchestrator" that starts a stage in its own session, as the runner does, prints the stage's pid and waits
ORCHESTRATOR = """
import os, subprocess, sys, time
stage = subprocess.Popen([sys.executable, "-c", "from qllm.stages import process; import time; "
                          "process.start('evaluate'); time.sleep(600)"],
                         env={**os.environ, "QLLM_ORCHESTRATOR_PID": str(os.getpid())}, start_new_session=True)
print(stage.pid, flush=True)
time.sleep(600)
"""


def test_rank_comes_from_the_launchers_environment(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert (process.rank(), process.world_size(), process.is_main()) == (0, 1, True)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert (process.rank(), process.world_size(), process.is_main()) == (3, 4, False)


def test_a_stage_ends_itself_when_its_orchestrator_is_killed():
    """SIGKILL to the orchestrator (as the OOM killer sends) cannot be caught there: the stage's watchdog sees it gone
    and ends the stage's process group within a few seconds."""
    orch = subprocess.Popen([sys.executable, "-c", ORCHESTRATOR], stdout=subprocess.PIPE, text=True)
    stage = int(orch.stdout.readline())
    time.sleep(1.0)
    assert psutil.pid_exists(stage)
    orch.send_signal(signal.SIGKILL)
    orch.wait()
    deadline = time.time() + 4 * process.WATCH_INTERVAL_S + 10
    while time.time() < deadline:
        try:
            if psutil.Process(stage).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.2)
    else:
        os.killpg(stage, signal.SIGKILL)
        raise AssertionError("the stage outlived its orchestrator")
