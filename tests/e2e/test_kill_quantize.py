"""SIGKILL a quantize stage of the real default model while it writes its checkpoint (as the OOM killer would):
the half-written checkpoint is never taken as complete, a re-run makes a correct one, `gc` removes the leftover."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import mlflow_runs, run_qllm, start_qllm

pytestmark = pytest.mark.slow
# seed=7 gives this checkpoint its own quant key: the session cache holds SmolLM2's other RTN checkpoints
ARGS = ["model=smollm2-135m-instruct", "method=rtn", "bits=8", "seed=7", "task=arc_easy_offline", "task.limit=5"]


def test_sigkill_mid_write_then_rerun(tmp_path, cache_dir, data_dir):
    quantized = cache_dir / "quantized"
    proc = start_qllm(ARGS, tmp_path, cache_dir, data_dir, quiet=True)

    def writing() -> list:
        return [p for p in quantized.glob(".smollm2-135m-instruct-rtn-w8-*.tmp-*")] if quantized.is_dir() else []

    deadline = time.time() + 600
    while not writing() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    partial = writing()
    assert partial, "the quantize stage never started writing its checkpoint"
    stage = [p for p in psutil.Process(proc.pid).children(recursive=True) if "qllm.stages.quantize" in " ".join(p.cmdline())]
    assert len(stage) == 1
    stage[0].send_signal(signal.SIGKILL)
    assert proc.wait(timeout=120) != 0

    final = partial[0].name[1:].split(".tmp-")[0]
    assert not (quantized / final).exists()  # nothing at the final path: nothing a later job could take as done
    assert partial[0].exists()  # the leftover is hidden and named as such
    runs = mlflow_runs(tmp_path)
    assert list(runs["tags.qllm.status"]) == ["failed"] and "killed by a signal" in runs.iloc[0]["tags.qllm.error"]

    again = run_qllm(ARGS, tmp_path, cache_dir, data_dir)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert "reusing cached checkpoint" not in again.stdout
    runs = mlflow_runs(tmp_path)
    done = runs[runs["tags.qllm.status"] == "finished"]
    assert len(done) == 1 and done.iloc[0]["tags.qllm.quantize_reused"] == "false"
    assert done.iloc[0]["tags.qllm.checkpoint_path"].endswith(final)
    cli = [sys.executable, "-m", "qllm.cache", "--cache-dir", str(cache_dir)]
    verify = subprocess.run([*cli, "verify"], capture_output=True, text=True)
    assert verify.returncode == 0 and f"OK      {final}" in verify.stdout
    gc = subprocess.run([*cli, "gc"], capture_output=True, text=True)
    assert gc.returncode == 0 and partial[0].name in gc.stdout and not partial[0].exists()
    assert (quantized / final / "qllm_manifest.json").is_file()
