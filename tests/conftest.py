"""Shared fixtures: the data folder, an isolated MLflow store and cache, and running qllm as a user does.

The tree mirrors the package (tests/<subpackage>/test_<module>.py: in-process unit tests); tests/e2e/ holds what only
real processes can show (the CLI, stage processes, launchers, signals) and is marked `e2e` here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("QLLM_DATA_DIR", REPO.parent / "shared" / "data"))

# Under pytest-xdist (`make test` runs 2 workers), each worker and every process it starts gets its share of the
# cores: OpenMP threads of two processes on 2 cores contend. Measured: two SmolLM2 evaluations side by side took
# 39-43 s with 2 threads each and 31-33 s with 1 thread each (one alone: 31 s with 2 threads, 34 s with 1).
if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in os.environ:
    _share = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(_share)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    e2e = REPO / "tests" / "e2e"
    for item in items:
        if e2e in Path(item.fspath).parents:
            item.add_marker(pytest.mark.e2e)
    # Longest first: `make test` hands whole modules to 2 workers in this order (--dist loadscope
    # --no-loadscope-reorder). xdist's default order (most tests first) put the long one-test e2e modules last, and
    # one worker ran alone for minutes at the end (measured: 20 min 16 s).
    slow = {str(i.fspath) for i in items if i.get_closest_marker("slow")}
    items.sort(key=lambda i: 0 if str(i.fspath) in slow else 1 if e2e in Path(i.fspath).parents else 2)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "arc_easy").is_dir():
        pytest.skip(f"benchmark data not found at {DATA_DIR} (set QLLM_DATA_DIR to the ../shared/data folder)")
    return DATA_DIR


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache per test session: converted models and checkpoints are shared between tests, as between runs."""
    return tmp_path_factory.mktemp("qllm-cache")


def _qllm(args: list[str], workdir: Path, cache_dir: Path, data_dir: Path | None) -> tuple[list[str], dict]:
    """The command line and environment of `python -m qllm.run ARGS` with its store and outputs under workdir."""
    env = {**os.environ, "QLLM_CACHE_DIR": str(cache_dir), "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "")}
    if data_dir is not None:
        env["QLLM_DATA_DIR"] = str(data_dir)
    cmd = [sys.executable, "-m", "qllm.run", *args,
           f"tracking.uri=sqlite:///{workdir}/mlruns/mlflow.db", f"tracking.artifact_root={workdir}/mlruns/artifacts",
           f"hydra.run.dir={workdir}/outputs/run", f"hydra.sweep.dir={workdir}/outputs/sweep"]
    return cmd, env


def run_qllm(args: list[str], workdir: Path, cache_dir: Path, data_dir: Path | None = None,
             timeout: int = 900) -> subprocess.CompletedProcess:
    """`python -m qllm.run ARGS` in a fresh process, with its MLflow store and Hydra outputs under workdir."""
    cmd, env = _qllm(args, workdir, cache_dir, data_dir)
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    (workdir / "qllm.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    return proc


def start_qllm(args: list[str], workdir: Path, cache_dir: Path, data_dir: Path | None = None,
               quiet: bool = False) -> subprocess.Popen:
    """`python -m qllm.run ARGS` started in the background (its output readable line by line unless quiet)."""
    cmd, env = _qllm(args, workdir, cache_dir, data_dir)
    out = subprocess.DEVNULL if quiet else subprocess.PIPE
    return subprocess.Popen(cmd, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)


def signal_when(proc: subprocess.Popen, marker: str, sig: int) -> tuple[str, list, str]:
    """Send `sig` to the orchestrator `proc` (only to it, as `kill PID` or a terminal does) once its output shows
    `marker`; wait for it to end. Returns its whole output, the processes it had started (psutil) and their command
    lines as they were."""
    import psutil

    seen = []
    for line in proc.stdout:  # type: ignore[union-attr]
        seen.append(line)
        if marker in line:
            break
    started = psutil.Process(proc.pid).children(recursive=True)
    assert started, "".join(seen)[-3000:]
    commands = "\n".join(" ".join(p.cmdline()) for p in started)
    proc.send_signal(sig)
    return "".join(seen) + proc.communicate(timeout=120)[0], started, commands


def none_alive(procs: list) -> bool:
    """No process of the list runs any more (zombies waiting to be reaped do not count)."""
    import psutil

    return not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in procs)


def mlflow_runs(workdir: Path):
    """All runs of the store as a DataFrame (params, metrics, tags as columns)."""
    mlflow.set_tracking_uri(f"sqlite:///{workdir}/mlruns/mlflow.db")
    return mlflow.search_runs(experiment_names=["qllm"], max_results=10000)
