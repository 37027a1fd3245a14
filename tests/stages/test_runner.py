"""The stage runner with real processes but no model: a local launcher whose prefix runs a small script instead of
the stage (`python -c SCRIPT -m qllm.stages.<stage> ...`). What every launcher gets from the runner: its own process
group ended whole on Ctrl-C/SIGTERM/timeout, SIGKILL for a stage that ignores SIGTERM, the stage's traceback on
failure, the rendezvous port in the environment, the exact command kept."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from qllm.planning import compose_cell
from qllm.stages import runner

# writes its pid, its child's pid and its environment, then waits; the child (same process group) waits too
STAGE = """
import json, os, subprocess, sys, time, signal
out = os.environ["OUT"]
if os.environ.get("IGNORE_TERM"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import time, signal, os\\n"
                          + ("signal.signal(signal.SIGTERM, signal.SIG_IGN)\\n" if os.environ.get("IGNORE_TERM") else "")
                          + "time.sleep(600)"])
json.dump({"pid": os.getpid(), "child": child.pid, "argv": sys.argv,
           "env": {k: v for k, v in os.environ.items() if k.startswith(("MASTER_", "QLLM_"))}}, open(out, "w"))
print("stage started", flush=True)
if os.environ.get("FAIL"):
    raise RuntimeError("the stage broke")
time.sleep(float(os.environ.get("SLEEP", "600")))
"""


@pytest.fixture(scope="module")
def cell(data_dir):
    return compose_cell([f"data_dir={data_dir}", "model=tiny-random-llama", "method=none", "task=arc_easy_offline"])


def launch(**kw) -> dict:
    return {"name": "local", "prefix": ["{python}", "-c", STAGE], "nproc": 1, "timeout_s": None, **kw}


def started(out: Path, timeout: float = 30) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            return json.loads(out.read_text())
        except (OSError, ValueError):
            time.sleep(0.05)
    raise AssertionError("the stage did not start")


def gone(*pids: int, within: float = 30) -> bool:
    deadline = time.time() + within
    while time.time() < deadline:
        if not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids):
            return True
        time.sleep(0.1)
    return False


def test_stage_command_environment_and_script(tmp_path, cell, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path / "info.json"))
    monkeypatch.setenv("SLEEP", "0")
    port = runner.free_port()
    wall = runner.run_stage("evaluate", cell, tmp_path / "stages", launch(), ["--out", "x"], port)
    info = started(tmp_path / "info.json")
    assert wall > 0 and info["argv"][1:5] == ["-m", "qllm.stages.evaluate", "--cell", str(tmp_path / "stages" /
                                                                                           "cell.json")]
    assert info["env"]["MASTER_PORT"] == info["env"]["QLLM_RENDEZVOUS_PORT"] == str(port)
    assert info["env"]["QLLM_ORCHESTRATOR_PID"] == str(os.getpid())
    assert os.getpgid(os.getpid()) != info["pid"]  # the stage led a process group of its own
    script = (tmp_path / "stages" / "launch_evaluate.sh").read_text()
    assert "qllm.stages.evaluate" in script and "--out x" in script and script.startswith("#!/usr/bin/env bash")
    assert "stage started" in (tmp_path / "stages" / "evaluate.log").read_text()
    assert gone(info["child"])


@pytest.mark.parametrize("how", ["Ctrl-C", "SIGTERM"])
def test_interrupt_ends_the_whole_process_group(tmp_path, cell, monkeypatch, how):
    """The orchestrator's main thread is waiting for the stage when the signal comes: the stage and the process it
    started are both ended, and the interrupt goes on up (the cell is then marked KILLED)."""
    monkeypatch.setenv("OUT", str(tmp_path / "info.json"))
    sig = signal.SIGINT if how == "Ctrl-C" else signal.SIGTERM
    handler = signal.default_int_handler if how == "Ctrl-C" else runner.raise_terminated
    previous = signal.signal(sig, handler)
    try:
        def fire(*_):
            info = started(tmp_path / "info.json")
            fire.info = info
            os.kill(os.getpid(), sig)

        signal.signal(signal.SIGALRM, fire)
        signal.setitimer(signal.ITIMER_REAL, 1.0)
        t0 = time.time()
        with pytest.raises(KeyboardInterrupt) as e:
            runner.run_stage("quantize", cell, tmp_path / "stages", launch(), [], runner.free_port())
        assert isinstance(e.value, runner.Terminated) == (how == "SIGTERM")
        assert gone(fire.info["pid"], fire.info["child"], within=5) and time.time() - t0 < 15
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(sig, previous)


def test_timeout_ends_a_stage_that_ignores_sigterm(tmp_path, cell, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path / "info.json"))
    monkeypatch.setenv("IGNORE_TERM", "1")
    monkeypatch.setattr(runner, "GRACE_S", 1.0)
    t0 = time.time()
    with pytest.raises(runner.StageTimeout, match=r"ran past launch.evaluate.timeout_s=2 s"):
        runner.run_stage("evaluate", cell, tmp_path / "stages", launch(timeout_s=2), [], runner.free_port())
    info = started(tmp_path / "info.json")
    assert gone(info["pid"], info["child"], within=5)  # SIGTERM ignored: SIGKILL after the grace period
    assert 2 <= time.time() - t0 < 15


def test_failure_carries_the_stage_traceback(tmp_path, cell, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path / "info.json"))
    monkeypatch.setenv("FAIL", "1")
    with pytest.raises(runner.StageError) as e:
        runner.run_stage("evaluate", cell, tmp_path / "stages", launch(), [], runner.free_port())
    assert e.value.returncode == 1 and "RuntimeError: the stage broke" in str(e.value)
    assert e.value.stage_traceback.startswith("Traceback (most recent call last)")
    info = started(tmp_path / "info.json")
    assert gone(info["child"], within=15)  # what the failed stage left in its group is ended too


def test_free_ports_are_bindable():
    import socket

    ports = {runner.free_port() for _ in range(5)}
    for p in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))
    assert len(ports) >= 4


def test_a_signal_caught_by_another_thread_interrupts_the_wait():
    """A signal the OS hands to a thread other than the main one (the output pump, MLflow's monitor) does not
    interrupt the main thread's waitpid; the wait returns to the interpreter in slices, so the handler runs within
    one (seen under load: a Ctrl-C'd cell ran to the end and exited 0)."""
    import subprocess
    import sys
    import threading

    class Interrupted(Exception):
        pass

    def handler(*_):
        raise Interrupted

    old = signal.signal(signal.SIGUSR1, handler)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    busy = threading.Event()

    def other_thread():
        busy.set()
        time.sleep(0.5)
        signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)  # delivered to this thread, not the main one
        time.sleep(0.5)

    t = threading.Thread(target=other_thread)
    try:
        t.start()
        busy.wait()
        start = time.monotonic()
        with pytest.raises(Interrupted):
            runner._wait(proc, timeout=None)
        assert time.monotonic() - start < 5, "the handler waited for the child to end"
    finally:
        signal.signal(signal.SIGUSR1, old)
        proc.kill()
        proc.wait()
        t.join()


def test_wait_still_times_out():
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        start = time.monotonic()
        with pytest.raises(subprocess.TimeoutExpired):
            runner._wait(proc, timeout=1.2)
        assert 1.1 < time.monotonic() - start < 5
    finally:
        proc.kill()
        proc.wait()
