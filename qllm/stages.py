"""Running a stage (quantize, evaluate) in its own process, under the configured launch prefix.

A separate process per stage gives each stage its own peak memory, frees (GPU) memory between the cells of a
sequential sweep, and lets a stage run under `accelerate launch` / `deepspeed` / `torchrun`. Output is streamed
through unchanged (progress bars keep working) and also kept in a log file that is logged to MLflow.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .cell import Cell


class StageError(RuntimeError):
    """A stage process failed; carries the stage's own traceback (from its log) for the MLflow error artifact."""

    def __init__(self, stage: str, returncode: int, log: Path, tail: str):
        self.stage, self.returncode, self.log = stage, returncode, log
        self.stage_traceback = _last_traceback(log)
        last = self.stage_traceback.strip().splitlines()[-1] if self.stage_traceback.strip() else ""
        super().__init__(f"{stage} stage failed (exit {returncode}"
                         + (", killed by a signal" if returncode < 0 else "") + f"): {last or 'see its log'}; "
                         f"log: {log}\n--- last lines ---\n{tail}")


def _last_traceback(log: Path, max_chars: int = 50_000) -> str:
    text = log.read_bytes().decode(errors="replace").replace("\r", "\n")
    i = text.find("Traceback (most recent call last)")  # the whole chain: causes come first
    return text[i:][-max_chars:] if i >= 0 else ""


def run_stage(stage: str, cell: Cell, workdir: Path, launch: dict, args: list[str]) -> float:
    """Run `python -m qllm.<stage> --cell <workdir>/cell.json ARGS` under the launch prefix; return wall seconds."""
    workdir.mkdir(parents=True, exist_ok=True)
    cell_file = workdir / "cell.json"
    cell_file.write_text(cell.to_json())
    cmd = [p.format(python=sys.executable) for p in launch["prefix"]]
    cmd += ["-m", f"qllm.{stage}", "--cell", str(cell_file), *args]
    log = workdir / f"{stage}.log"
    tail: collections.deque[bytes] = collections.deque(maxlen=40)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    with open(log, "wb") as logf:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        assert proc.stdout is not None
        try:
            for chunk in iter(lambda: proc.stdout.read1(65536), b""):  # type: ignore[union-attr]
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
                logf.write(chunk)
                tail.extend(chunk.splitlines(keepends=True))
            proc.wait(timeout=launch.get("timeout_s"))
        except BaseException:
            proc.kill()  # Ctrl-C or timeout: never leave a stage running behind the orchestrator
            proc.wait()
            raise
    if proc.returncode != 0:
        text = b"".join(tail).decode(errors="replace").replace("\r", "\n")
        raise StageError(stage, proc.returncode, log, "\n".join(text.splitlines()[-25:]))
    return time.perf_counter() - t0


def quantize(cell: Cell, workdir: Path, launch: dict, force: bool = False) -> dict:
    """Stage result: {"checkpoint": dir, "manifest": {...}, "wall_s": ...}."""
    out = workdir / "quantize.json"
    args = ["--out", str(out), "--profile-dir", str(workdir / "profile")] + (["--force"] if force else [])
    wall = run_stage("quantize", cell, workdir, launch, args)
    return {**json.loads(out.read_text()), "wall_s": wall}


def evaluate(cell: Cell, workdir: Path, launch: dict, model_path: str | None, force: bool = False) -> dict:
    """Stage result: the evaluate stage's results.json, plus the folder it wrote (samples)."""
    out = workdir / "eval"
    args = ["--out", str(out), "--profile-dir", str(workdir / "profile")]
    args += (["--model", model_path] if model_path else []) + (["--force"] if force else [])
    wall = run_stage("evaluate", cell, workdir, launch, args)
    return {**json.loads((out / "results.json").read_text()), "out_dir": str(out), "stage_wall_s": wall}
