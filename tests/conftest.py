"""Shared fixtures: the data folder, an isolated MLflow store and cache, and running qllm as a user does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("QLLM_DATA_DIR", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "arc_easy").is_dir():
        pytest.skip(f"benchmark data not found at {DATA_DIR} (set QLLM_DATA_DIR to the ../shared/data folder)")
    return DATA_DIR


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache per test session: converted models and checkpoints are shared between tests, as between runs."""
    return tmp_path_factory.mktemp("qllm-cache")


def run_qllm(args: list[str], workdir: Path, cache_dir: Path, data_dir: Path | None = None,
             timeout: int = 900) -> subprocess.CompletedProcess:
    """`python -m qllm.run ARGS` in a fresh process, with its MLflow store and Hydra outputs under workdir."""
    env = {**os.environ, "QLLM_CACHE_DIR": str(cache_dir), "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "")}
    if data_dir is not None:
        env["QLLM_DATA_DIR"] = str(data_dir)
    cmd = [sys.executable, "-m", "qllm.run", *args,
           f"tracking.uri=sqlite:///{workdir}/mlruns/mlflow.db", f"tracking.artifact_root={workdir}/mlruns/artifacts",
           f"hydra.run.dir={workdir}/outputs/run", f"hydra.sweep.dir={workdir}/outputs/sweep"]
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    (workdir / "qllm.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    return proc


def mlflow_runs(workdir: Path):
    """All runs of the store as a DataFrame (params, metrics, tags as columns)."""
    mlflow.set_tracking_uri(f"sqlite:///{workdir}/mlruns/mlflow.db")
    return mlflow.search_runs(experiment_names=["qllm"], max_results=10000)
