"""SLURM's SIGUSR2 before a submitit job's time limit: the cell is ended like SIGTERM (its run KILLED, finished tasks
kept; the sweep's parent run untouched) and the signal is then handed to submitit's own handler, which requeues the
job (max_num_timeout), wherever in the cell it came; stage processes ignore it (only the orchestrator reacts)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from qllm import run
from qllm.names import Status, Tag
from qllm.stages import runner
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


def test_installed_twice_it_still_hands_over_to_submitit_once(monkeypatch):
    """A handler installed over qllm's own (cli() and run_cell() both install it) must not hand the signal over to
    itself; and the cell's run and run_cell may both call hand_over: submitit's handler runs once."""
    calls = []
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR2)}
    try:
        signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
        monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
        run._handle_sigterm()
        run._handle_sigterm()
        with pytest.raises(TimeLimit) as e:
            os.kill(os.getpid(), signal.SIGUSR2)
        e.value.hand_over()
        e.value.hand_over()
        assert calls == [signal.SIGUSR2]
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def test_a_time_limit_outside_the_stages_is_handed_over_and_the_handler_restored(monkeypatch):
    """SIGUSR2 while the cell is planned or reused (no stage running): submitit still gets it, to requeue; after the
    cell, SIGUSR2 goes to submitit's handler directly (no TimeLimit raised inside Hydra's code)."""
    calls = []

    def submitit(signum, frame):
        calls.append(signum)

    def planning(cfg):
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(5)  # the handler raises before this ends

    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR2)}
    try:
        signal.signal(signal.SIGUSR2, submitit)
        monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
        monkeypatch.setattr(run, "_run_cell", planning)
        with pytest.raises(TimeLimit):
            run.run_cell(None)
        assert calls == [signal.SIGUSR2]
        assert signal.getsignal(signal.SIGUSR2) is submitit
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


@pytest.mark.parametrize("error, sweep_killed", [
    (TimeLimit(None, signal.SIGUSR2), False),  # this job only: submitit requeues it, the sweep's other jobs go on
    (Terminated("signal SIGTERM"), True),
    (KeyboardInterrupt(), True),
])
def test_a_time_limit_kills_the_running_cell_not_the_sweep(monkeypatch, tmp_path, error, sweep_killed):
    calls = []
    monkeypatch.setattr(run.mlflow, "set_tags", lambda tags: calls.append(("tags", tags[Tag.STATUS])))
    monkeypatch.setattr(run.mlflow, "end_run", lambda status: calls.append(("end", status)))
    monkeypatch.setattr(run, "_log_stage_logs", lambda workdir: None)
    monkeypatch.setattr(run.tracking, "mark_sweep_killed", lambda why: calls.append(("sweep", why)))
    run._end_killed(error, tmp_path, run.Job(multirun=True, parent="parent-run", overrides=[]), "cell-run")
    assert calls[:2] == [("tags", Status.KILLED.value), ("end", "KILLED")]
    assert any(c[0] == "sweep" for c in calls) == sweep_killed


@pytest.fixture
def cell(data_dir):
    from qllm.planning import compose_cell

    return compose_cell([f"data_dir={data_dir}", "model=tiny-random-llama", "method=none", "task=arc_easy_offline"])


@pytest.mark.parametrize("slurm", [True, False])
def test_stage_processes_ignore_sigusr2_in_a_slurm_job(monkeypatch, tmp_path, cell, slurm):
    """SLURM sends SIGUSR2 to every process of the job step: a stage (and what it starts) ignores it, the
    orchestrator alone ends the stage; the kept command (launch_<stage>.sh) stays the launcher's own."""
    if slurm:
        monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    else:
        monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    check = ("import signal, subprocess, sys; ignored = signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN; "
             "child = subprocess.run([sys.executable, '-c', 'import signal, sys; "
             "sys.exit(signal.getsignal(signal.SIGUSR2) != signal.SIG_IGN)']).returncode == 0; "
             "sys.exit(0 if ignored and child else 5)")
    launch = {"name": "local", "prefix": ["{python}", "-c", check], "nproc": 1, "timeout_s": None}
    if slurm:
        runner.run_stage("evaluate", cell, tmp_path, launch, [], runner.free_port())
    else:
        with pytest.raises(runner.StageError, match="exit 5"):
            runner.run_stage("evaluate", cell, tmp_path, launch, [], runner.free_port())
    script = (tmp_path / "launch_evaluate.sh").read_text()
    assert "trap" not in script and "-m qllm.stages.evaluate" in script
