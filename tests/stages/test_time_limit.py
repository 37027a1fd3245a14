"""SLURM's SIGUSR2 before a submitit job's time limit: the cell is ended like SIGTERM (its run KILLED, finished tasks
kept) and the signal is then handed to submitit's own handler, which requeues the job (max_num_timeout)."""

from __future__ import annotations

import os
import signal

import pytest

from qllm import run
from qllm.stages.runner import Terminated, TimeLimit


def test_sigusr2_in_a_submitit_slurm_job_raises_time_limit_then_hands_over(monkeypatch):
    calls = []
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR2)}
    try:
        signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))  # stands in for submitit's handler
        monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
        run._handle_sigterm()
        with pytest.raises(TimeLimit) as e:
            os.kill(os.getpid(), signal.SIGUSR2)
        assert isinstance(e.value, Terminated) and "SLURM time limit" in str(e.value)
        assert calls == []  # qllm first ends the cell (marks it KILLED) ...
        e.value.hand_over()
        assert calls == [signal.SIGUSR2]  # ... then submitit requeues
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def test_outside_slurm_sigusr2_is_left_alone(monkeypatch):
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR2)}
    try:
        monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
        run._handle_sigterm()
        assert signal.getsignal(signal.SIGUSR2) == saved[signal.SIGUSR2]
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
