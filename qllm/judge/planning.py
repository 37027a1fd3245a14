"""The judge of a cell with dialogue tasks, checked at planning: before any weights load, and without network (the
endpoint's reachability is checked when the cell starts, qllm.judge.client.check)."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import QllmConfigError
from ..sources import models

KINDS = ("remote", "local", "none")
SERVERS = ("auto", "vllm", "transformers")


def _vllm_python(judge: dict) -> str | None:
    """The vLLM environment's python, found as eval=vllm finds it (None: there is none)."""
    from ..stages.backends import vllm

    try:
        return vllm.interpreter({"python": judge.get("python")})
    except QllmConfigError:
        if judge.get("python"):
            raise
        return None


def plan(judge: dict, tasks: dict, data_dir: str) -> dict:
    """The resolved judge settings (what the cell and the judge stage use), or a QllmConfigError naming the key."""
    kind = judge["kind"]
    if kind not in KINDS:
        raise QllmConfigError(f"judge.kind={kind!r}; valid: {', '.join(KINDS)} (presets: judge=openai | local | none)")
    judge = dict(judge)
    if kind == "none":
        return judge
    for key, low in (("max_tokens", 1), ("concurrency", 1), ("retries", 0), ("bootstrap_iters", 0)):
        if judge[key] < low:
            raise QllmConfigError(f"judge.{key} must be >= {low}; got {judge[key]}")
    for key in ("timeout_s", "backoff_s", "startup_timeout_s"):
        if judge[key] <= 0:
            raise QllmConfigError(f"judge.{key} must be > 0 seconds; got {judge[key]}")
    if judge["temperature"] < 0:
        raise QllmConfigError(f"judge.temperature must be >= 0; got {judge['temperature']}")
    if not judge.get("model"):
        raise QllmConfigError(f"judge.model is not set (judge={judge['name']}): the judge model's "
                              + ("served name" if kind == "remote" else "dir or hub id"))
    judge = _plan_remote(judge) if kind == "remote" else _plan_local(judge)
    if judge.get("constrain_verdict") and not (kind == "local" and judge["server"] == "vllm"):
        raise QllmConfigError("judge.constrain_verdict=true needs a local vLLM server (judge=local judge.server="
                              f"vllm, with the vLLM environment); this judge is {kind}"
                              + (f" with server={judge['server']}" if kind == "local" else ""))
    return judge


def _plan_remote(judge: dict) -> dict:
    url = judge.get("base_url") or ""
    if not url.startswith(("http://", "https://")):
        raise QllmConfigError(f"judge.base_url={url!r} must be an http(s) URL of an OpenAI-compatible API "
                              "(e.g. https://api.openai.com/v1)")
    env = judge.get("api_key_env")
    if env and not os.environ.get(env):
        raise QllmConfigError(
            f"judge.api_key_env={env}: that environment variable is not set (the judge at {url} needs its key). "
            "Export it; or judge with a local model (judge=local judge.model=<dir>); or keep the answers only "
            "(judge=none) and judge them later with `qllm judge --run-ids ...`")
    return judge


def _plan_local(judge: dict) -> dict:
    server = judge["server"]
    if server not in SERVERS:
        raise QllmConfigError(f"judge.server={server!r}; valid: {', '.join(SERVERS)}")
    local = Path(str(judge["model"])).expanduser()
    if local.is_dir():
        judge.update(model=str(local.resolve()), content=models.dir_fingerprint(local.resolve()))
    elif str(judge["model"]).startswith((".", "/", "~")) or str(judge["model"]).count("/") != 1:
        raise QllmConfigError(f"judge.model={judge['model']!r}: no such directory, and not a hub id (owner/name)")
    if server in ("auto", "vllm"):
        python = _vllm_python(judge)
        if python is None and server == "vllm":
            raise QllmConfigError("judge.server=vllm, but there is no vLLM environment (make setup builds "
                                  ".venv-vllm; or judge.python=<its python>); judge.server=transformers needs none")
        server = "vllm" if python else "transformers"
        judge["python"] = python
    judge["server"] = server
    if server == "vllm":  # the engine's build and version decide verdicts as much as the weights do
        from ..stages.backends import vllm

        env = vllm.environment({"python": judge["python"]})
        judge.update(build=env["build"], server_version=env["version:vllm"])
    else:
        from ..cell import versions

        judge.update(build="transformers", server_version=versions(("transformers",))["transformers"])
    return judge
