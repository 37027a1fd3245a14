"""Running one stage (quantize, evaluate, judge) of a cell in its own process, under the stage's launcher.

A separate process per stage gives each stage its own peak memory, frees (GPU) memory between the cells of a
sequential sweep, and lets a stage run under a distributed launcher. What every launcher gets from here:

- the stage starts in a process group of its own (a new session), so that ending it ends every process it started
  (torchrun workers, vLLM engine processes, dataloader workers) and nothing else;
- Ctrl-C (KeyboardInterrupt), SIGTERM (qllm.run turns it into `Terminated`) or `timeout_s` end that whole group:
  SIGTERM first, SIGKILL after a grace period; a stage is never left running behind the orchestrator. Should the
  orchestrator itself die (SIGKILL, the OOM killer), the stage's watchdog ends the group (qllm.stages.process);
- in a SLURM job submitted by submitit the stage ignores SIGUSR2 (SLURM sends it to every process of the job step
  before the time limit): the orchestrator alone reacts, ending the group as above (qllm.run, TimeLimit);
- output is streamed through unchanged (progress bars keep working) and kept in `<stage>.log`;
- the cell's rendezvous port is in the environment (MASTER_PORT, QLLM_RENDEZVOUS_PORT) and in `{port}`.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from ..cell import Cell
from ..records import EvalResult, QuantizeResult
from . import backends, process
from .launchers import LaunchContext
from .launchers import get as get_launcher
from .launchers.deepspeed import quiet_env

GRACE_S = 10.0  # SIGTERM -> SIGKILL


class StageError(RuntimeError):
    """A stage process failed; carries the stage's own traceback (from its log) for the MLflow error artifact."""

    def __init__(self, stage: str, returncode: int, log: Path, tail: str):
        self.stage, self.returncode, self.log = stage, returncode, log
        self.stage_traceback = last_traceback(log)
        last = self.stage_traceback.strip().splitlines()[-1] if self.stage_traceback.strip() else ""
        super().__init__(f"{stage} stage failed (exit {returncode}"
                         + (", killed by a signal" if returncode < 0 else "") + f"): {last or 'see its log'}; "
                         f"log: {log}\n--- last lines ---\n{tail}")


class StageTimeout(RuntimeError):
    """A stage ran past its launcher's `timeout_s` and was ended (the whole process group)."""

    def __init__(self, stage: str, timeout_s: float, log: Path):
        self.stage, self.timeout_s, self.log = stage, timeout_s, log
        super().__init__(f"{stage} stage ran past launch.{stage}.timeout_s={timeout_s:g} s and was ended; log: {log}")


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, timeout, SLURM at its time limit) in the orchestrator: handled like Ctrl-C."""


def raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(f"signal {signal.Signals(signum).name}")


class TimeLimit(Terminated):
    """SIGUSR2 from SLURM (submitit's `--signal=USR2@<signal_delay_s>`) before the job's time limit: handled like
    SIGTERM, then handed to submitit's own handler (`hand_over`), which requeues the job when
    hydra.launcher.max_num_timeout allows it (the re-run resumes from the cache)."""

    def __init__(self, previous: object, signum: int):
        super().__init__("SIGUSR2 (SLURM time limit)")
        self.previous, self.signum = previous, signum

    def hand_over(self) -> None:
        """Call submitit's handler, once (the cell's handler and qllm.run.run_cell's may both get here)."""
        previous, self.previous = self.previous, None
        if callable(previous):
            previous(self.signum, None)


def raise_time_limit_when(previous: object) -> object:
    """A SIGUSR2 handler raising TimeLimit that remembers submitit's `previous` one (never one of these: installed
    twice, it would hand the signal over to itself)."""
    previous = getattr(previous, "qllm_previous", previous)

    def handler(signum: int, frame: object) -> None:
        raise TimeLimit(previous, signum)
    handler.qllm_previous = previous  # type: ignore[attr-defined]
    return handler


def time_limit_signalled() -> bool:
    """Whether this is a SLURM job submitted by submitit, whose time limit comes as SIGUSR2 to every process of the
    job step (`--signal=USR2@<signal_delay_s>`): the orchestrator then handles it, and its stages ignore it."""
    return os.environ.get("SUBMITIT_EXECUTOR") == "slurm"


def _ignoring_time_limit(cmd: list[str]) -> list[str]:
    """`cmd` started with SIGUSR2 ignored, a disposition exec keeps and every process of the stage inherits: SLURM's
    SIGUSR2 would otherwise end each stage process on its own (the default action) while the orchestrator ends the
    stage's group in order (SIGTERM, then SIGKILL) and marks the cell."""
    return ["/bin/sh", "-c", 'trap "" USR2; exec "$@"', "sh", *cmd]


def last_traceback(log: Path, max_chars: int = 50_000) -> str:
    text = log.read_bytes().decode(errors="replace").replace("\r", "\n")
    i = text.find("Traceback (most recent call last)")  # the whole chain: causes come first
    return text[i:][-max_chars:] if i >= 0 else ""


def free_port() -> int:
    """A TCP port free on this host now (the OS picks it), for a cell's rendezvous (torchrun, accelerate, ...)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def end_group(proc: subprocess.Popen, grace_s: float = GRACE_S) -> None:
    """SIGTERM to the stage's process group, SIGKILL to what is left after `grace_s`; then reap the leader."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if proc.poll() is not None and not process.exists(proc.pid, group=True):
                return
            time.sleep(0.05)
    proc.wait()


def _pump(proc: subprocess.Popen, log: Path, tail: collections.deque) -> None:
    """Copy the stage's output to our stdout and its log as it comes."""
    assert proc.stdout is not None
    # the orchestrator's signals are for its main thread (see _wait): not for this one
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGUSR2})
    with open(log, "wb") as logf:
        for chunk in iter(lambda: proc.stdout.read1(65536), b""):  # type: ignore[union-attr]
            with contextlib.suppress(ValueError, OSError):  # our stdout closed: keep the log going
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
            logf.write(chunk)
            logf.flush()
            tail.extend(chunk.splitlines(keepends=True))


def _wait(proc: subprocess.Popen, timeout: Optional[float], slice_s: float = 0.5) -> None:
    """proc.wait(timeout) in short slices. A signal (Ctrl-C, SIGTERM) may be delivered to any thread; if it lands on
    the output pump while the main thread sits in one blocking waitpid, Python runs its handler only after the stage
    has ended (seen under load: a Ctrl-C'd cell finished and exited 0). Waiting in slices returns to the interpreter
    every slice, so the handler runs within one."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        left = slice_s if deadline is None else min(slice_s, deadline - time.monotonic())
        if left <= 0:
            raise subprocess.TimeoutExpired(proc.args, timeout or 0)
        try:
            proc.wait(timeout=left)
            return
        except subprocess.TimeoutExpired:
            continue


def run_stage(stage: str, cell: Cell, workdir: Path, launch: dict, args: list[str], port: int,
              python: Optional[str] = None, stage_env: Optional[dict[str, str]] = None) -> float:
    """Run `python -m qllm.stages.<stage> --cell <workdir>/cell.json ARGS` under the stage's launcher
    (`launch` = the resolved `launch.<stage>` settings), with `python` (default: this interpreter) and `stage_env`
    added to the environment; return its wall seconds."""
    workdir.mkdir(parents=True, exist_ok=True)
    cell_file = workdir / "cell.json"
    cell_file.write_text(cell.to_json())
    launcher = get_launcher(launch["name"])
    ctx = LaunchContext(python=python or sys.executable, port=port, workdir=workdir)
    cmd = launcher.command(launch, f"qllm.stages.{stage}", ["--cell", str(cell_file), *args], ctx)
    added = {**(stage_env or {}), **launcher.env(launch, ctx)}
    (workdir / f"launch_{stage}.sh").write_text(_script(cmd, added))  # rerun a stage by hand: the exact command
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
           "MASTER_ADDR": os.environ.get("MASTER_ADDR", "127.0.0.1"), "MASTER_PORT": str(port),
           "QLLM_RENDEZVOUS_PORT": str(port), process.ORCHESTRATOR_PID: str(os.getpid()),
           **quiet_env(), **added}
    log = workdir / f"{stage}.log"
    tail: collections.deque[bytes] = collections.deque(maxlen=40)
    timeout: Optional[float] = launch.get("timeout_s")
    t0 = time.perf_counter()
    started = _ignoring_time_limit(cmd) if time_limit_signalled() else cmd
    proc = subprocess.Popen(started, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    pump = threading.Thread(target=_pump, args=(proc, log, tail), name=f"qllm-{stage}-output", daemon=True)
    pump.start()
    try:
        _wait(proc, timeout)
    except subprocess.TimeoutExpired:
        end_group(proc)
        pump.join(timeout=10)
        raise StageTimeout(stage, float(timeout or 0), log) from None
    except BaseException:  # Ctrl-C, SIGTERM (Terminated): never leave a stage running behind the orchestrator
        end_group(proc)
        pump.join(timeout=10)
        raise
    if process.exists(proc.pid, group=True):  # the leader left processes in its group (they hold the output pipe)
        end_group(proc, grace_s=2.0)
    pump.join()
    if proc.returncode != 0:
        text = b"".join(tail).decode(errors="replace").replace("\r", "\n")
        raise StageError(stage, proc.returncode, log, "\n".join(text.splitlines()[-25:]))
    return time.perf_counter() - t0


def _script(cmd: list[str], env: dict[str, str]) -> str:
    return ("#!/usr/bin/env bash\n# the command qllm ran for this stage, to rerun it by hand\n"
            + "".join(f"export {k}={shlex.quote(v)}\n" for k, v in sorted(env.items()))
            + " ".join(shlex.quote(c) for c in cmd) + "\n")


# ---- the two stages, as the orchestrator calls them ----


def quantize(cell: Cell, workdir: Path, launch: dict, port: int, force: bool = False) -> QuantizeResult:
    out = workdir / "quantize.json"
    args = ["--out", str(out), "--profile-dir", str(workdir / "profile")] + (["--force"] if force else [])
    wall = run_stage("quantize", cell, workdir, launch, args, port)
    result = QuantizeResult.from_dict(json.loads(out.read_text()))
    result.wall_s = wall
    return result


def evaluate(cell: Cell, workdir: Path, launch: dict, port: int, model_path: Optional[str],
             force: bool = False) -> EvalResult:
    out = workdir / "eval"
    args = ["--out", str(out), "--profile-dir", str(workdir / "profile")]
    args += (["--model", model_path] if model_path else []) + (["--force"] if force else [])
    backend = backends.get(cell.eval["backend"])  # a backend with its own environment (vLLM) names its python
    wall = run_stage("evaluate", cell, workdir, launch, args, port, python=backend.python(cell.eval),
                     stage_env=backend.env(cell.eval))
    result = EvalResult.from_dict(json.loads((out / "results.json").read_text()))
    result.out_dir, result.stage_wall_s = str(out), wall
    return result


def judge(cell: Cell, workdir: Path, launch: dict, port: int, task: str, answers: Path,
          baseline: Optional[Path]) -> dict:
    """The judge stage for one dialogue task; its numbers (`judge_<task>.json`)."""
    out = workdir / "judge"
    args = ["--task", task, "--answers", str(answers), "--out", str(out)]
    args += ["--baseline", str(baseline)] if baseline else []
    run_stage("judge", cell, workdir, launch, args, port)
    return json.loads((out / f"judge_{task}.json").read_text())
