"""Parallel and cluster launchers: cells run by other processes (joblib workers, submitit jobs) all land in one MLflow
store under the sweep's one parent run, none lost or duplicated; jobs that start without the launcher's environment
(SLURM --export=NONE) find their sweep through the file in the sweep dir; the SLURM preset composes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from itertools import combinations

import pytest

from conftest import REPO, mlflow_runs, run_qllm
from qllm import config as qllm_config
from qllm.store import tracking

CELLS = ["model=tiny-random-llama", "calibration=wikitext2-small", "method=none,rtn",
         "task=arc_easy_offline,wikitext_offline"]


@pytest.mark.parametrize("launcher, args", [
    pytest.param("joblib", ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "task.limit=3"], id="joblib"),
    # another limit: other cell keys, so this sweep evaluates too instead of reusing the joblib sweep's results
    pytest.param("submitit_local", ["hydra/launcher=submitit_local", "task.limit=2"], id="submitit_local"),
])
def test_parallel_cells_land_under_one_parent(launcher, args, tmp_path, cache_dir, data_dir):
    t0 = time.perf_counter()
    proc = run_qllm(["-m", *CELLS, *args], tmp_path, cache_dir, data_dir)
    t_first = time.perf_counter() - t0
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]

    runs = mlflow_runs(tmp_path)
    parents, cells = runs[runs["tags.qllm.kind"] == "sweep"], runs[runs["tags.qllm.kind"] == "cell"]
    assert len(parents) == 1
    parent = parents.iloc[0]
    assert parent["status"] == "FINISHED" and parent["tags.qllm.launcher"] == launcher
    assert parent["metrics.cells_finished"] == 4 and "method=none,rtn" in parent["params.overrides"]

    assert len(cells) == 4 and cells["tags.qllm.cell_key"].nunique() == 4, cells[["tags.qllm.cell_key"]]
    assert sorted(zip(cells["params.method"], cells["params.task"])) == [
        ("none", "arc_easy_offline"), ("none", "wikitext_offline"), ("rtn", "arc_easy_offline"),
        ("rtn", "wikitext_offline")]
    assert set(cells["tags.mlflow.parentRunId"]) == {parent["run_id"]}
    assert (cells["status"] == "FINISHED").all() and (cells["tags.qllm.status"] == "finished").all()
    assert set(cells["tags.qllm.sweep_id"]) == {parent["tags.qllm.sweep_id"]}
    assert cells["metrics.arc_easy_offline/acc"].notna().sum() == 2
    assert cells["metrics.wikitext_offline/word_perplexity"].notna().sum() == 2

    # the cells really ran side by side (joblib: 2 workers; submitit_local: every job at once)
    spans = list(zip(cells["start_time"], cells["end_time"]))
    assert any(a0 < b1 and b0 < a1 for (a0, a1), (b0, b1) in combinations(spans, 2)), spans

    info = json.loads((tmp_path / "outputs" / "sweep" / tracking.SWEEP_FILE).read_text())
    assert info["parent_run_id"] == parent["run_id"] and info["sweep_id"] == parent["tags.qllm.sweep_id"]
    assert info["launcher"] == launcher

    if launcher == "joblib":
        _rerun_reuses_everything(args, tmp_path, cache_dir, data_dir, t_first, cells)


def _rerun_reuses_everything(args, tmp_path, cache_dir, data_dir, t_first, first_cells) -> None:
    """Re-running the finished 4-cell sweep (one cell at a time) evaluates and quantizes nothing: every cell is
    found finished in MLflow and recorded as reused, linked to the run that evaluated it, with its metrics."""
    t0 = time.perf_counter()
    again = run_qllm(["-m", *CELLS, *[a for a in args if not a.startswith("hydra")]], tmp_path, cache_dir, data_dir)
    t_again = time.perf_counter() - t0
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert "[qllm] evaluate:" not in again.stdout and "[qllm] quantize:" not in again.stdout
    assert again.stdout.count("[qllm] reused ") == 4
    runs = mlflow_runs(tmp_path)
    parents = runs[runs["tags.qllm.kind"] == "sweep"].sort_values("start_time")
    second = runs[runs["tags.mlflow.parentRunId"] == parents.iloc[1]["run_id"]]
    assert len(second) == 4 and set(second["tags.qllm.status"]) == {"reused"}
    assert parents.iloc[1]["metrics.cells_reused"] == 4
    originals = first_cells.set_index("run_id")
    for _, r in second.iterrows():
        src = originals.loc[r["tags.qllm.reused_run_id"]]
        assert src["tags.qllm.cell_key"] == r["tags.qllm.cell_key"]
        for col in ("metrics.arc_easy_offline/acc", "metrics.wikitext_offline/word_perplexity"):
            assert (src[col] != src[col] and r[col] != r[col]) or src[col] == r[col], col  # equal, or both NaN
    print(f"first run (joblib, 2 workers) {t_first:.1f} s, sequential re-run {t_again:.1f} s, "
          f"ratio {t_again / t_first:.3f}")
    # generous: the first run had 2 workers; bench/sweep_reuse.py measures the sequential ratio (0.022)
    assert t_again < 0.25 * t_first


JOB = """
import json, sys
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import open_dict
import mlflow
import qllm.config  # noqa: F401  (the schema and resolvers, as in a job)
from qllm.store import tracking

out = []
for sweep_dir in sys.argv[2:]:  # what a job of that sweep dir sees, composed as Hydra composes a job's config
    with initialize_config_dir(config_dir=sys.argv[1], version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra.sweep.dir={sweep_dir}"], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.mode = RunMode.MULTIRUN
    HydraConfig.instance().set_config(cfg)
    out.append({"parent": tracking.sweep_parent(), "sweep": tracking.sweep_id()})
info = json.loads(open(f"{sys.argv[2]}/{tracking.SWEEP_FILE}").read())
tracking.configure({"uri": info["tracking_uri"], "artifact_root": "", "experiment": "qllm"})
with mlflow.start_run(run_name="job", parent_run_id=out[0]["parent"],
                      tags={"qllm.kind": "cell", "qllm.sweep_id": out[0]["sweep"], tracking.STATUS: "finished"}):
    pass
print(json.dumps(out))
"""


def test_jobs_without_the_environment_find_the_sweep_in_the_sweep_dir(tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir

    for var in (tracking.ENV_PARENT, tracking.ENV_SWEEP):
        monkeypatch.setenv(var, "stale")  # the callback replaces them; monkeypatch restores them after the test
    sweep_dir = tmp_path / "sweep"
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", return_hydra_config=True, overrides=[
            f"tracking.uri=sqlite:///{tmp_path}/mlruns/mlflow.db", f"tracking.artifact_root={tmp_path}/mlruns/a",
            f"hydra.sweep.dir={sweep_dir}", "hydra/launcher=slurm", "method=rtn"])
    callback = tracking.SweepParentRun()
    callback.on_multirun_start(cfg)
    assert os.environ[tracking.ENV_PARENT] == callback.run_id

    # a job process started without QLLM_SWEEP_* (as SLURM --export=NONE does), in the sweep dir and in another one
    env = {k: v for k, v in os.environ.items()
           if k not in (tracking.ENV_PARENT, tracking.ENV_SWEEP, "MLFLOW_TRACKING_URI")}
    proc = subprocess.run([sys.executable, "-c", JOB, str(REPO / "conf"), str(sweep_dir), str(tmp_path / "other")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    found, elsewhere = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found == {"parent": callback.run_id, "sweep": os.environ[tracking.ENV_SWEEP]}
    assert elsewhere == {"parent": None, "sweep": ""}

    callback.on_multirun_end(cfg)
    runs = mlflow_runs(tmp_path)
    parent = runs[runs["tags.qllm.kind"] == "sweep"].iloc[0]
    child = runs[runs["tags.qllm.kind"] == "cell"].iloc[0]
    assert parent["tags.qllm.launcher"] == "slurm" and "method=rtn" in parent["params.overrides"].split()
    assert child["tags.mlflow.parentRunId"] == parent["run_id"]
    assert child["tags.qllm.sweep_id"] == parent["tags.qllm.sweep_id"]
    assert parent["metrics.cells_finished"] == 1 and parent["status"] == "FINISHED"


def test_launcher_presets_compose_and_pass_the_key_check():
    from hydra import compose, initialize_config_dir

    overrides = ["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=4",
                 "+hydra.launcher.additional_parameters.export=NONE", "tracking=server"]
    qllm_config.check_override_keys(overrides)  # qllm's typo check lets Hydra's own keys through
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        slurm = compose("config", overrides=overrides, return_hydra_config=True)
        local = compose("config", overrides=["hydra/launcher=local_parallel"], return_hydra_config=True)
    launcher = slurm.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.tasks_per_node, launcher.nodes) == ("gpu", 4, 1, 1)
    assert launcher.additional_parameters == {"export": "NONE"}
    assert slurm.tracking.uri == "http://127.0.0.1:5000" and slurm.tracking.artifact_root == ""
    assert local.hydra.launcher._target_.endswith("JoblibLauncher") and local.hydra.launcher.n_jobs == 2


OPEN = """
import os, sys, time
from qllm.store import tracking
uri, ready, n, artifacts = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
open(os.path.join(ready, str(os.getpid())), "w").close()
while len(os.listdir(ready)) < n:  # every process opens the new store at the same moment
    time.sleep(0.01)
print(tracking.configure({"uri": uri, "artifact_root": artifacts, "experiment": "qllm"}))
"""


def test_parallel_jobs_open_a_new_sqlite_store_together(tmp_path):
    """Bare MLflow on a new sqlite file: every process runs the schema migrations at once and most fail ("table
    experiments already exists", "duplicate column name", alembic's "expected to match one row"), and two may create
    the experiment. configure() opens the store under a file lock: one migrates, the others find it ready."""
    uri, ready = f"sqlite:///{tmp_path}/mlruns/mlflow.db", tmp_path / "ready"
    ready.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", OPEN, uri, str(ready), "3", str(tmp_path / "a")], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    assert len({out.strip().splitlines()[-1] for out, _ in outs}) == 1  # one experiment, the same id everywhere


def test_sqlite_uri_gets_a_connect_timeout():
    from qllm.store import mlflow_store

    assert mlflow_store.tracking_uri("sqlite:////x/mlflow.db") == "sqlite:////x/mlflow.db?timeout=60"
    assert mlflow_store.tracking_uri("sqlite:////x/m.db?timeout=5") == "sqlite:////x/m.db?timeout=5"
    assert mlflow_store.tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert mlflow_store.sqlite_path("sqlite:////x/m.db?timeout=5") == mlflow_store.Path("/x/m.db")


def test_parallel_cells_through_make_server(tmp_path, cache_dir, data_dir):
    """`make server` + `tracking=server`: cells of a parallel sweep log through the MLflow server, which stores them
    in its sqlite db and their artifacts in its artifact folder (uploaded through the server)."""
    import signal
    import socket
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server_dir = tmp_path / "server"
    server_dir.mkdir()
    server = subprocess.Popen(
        ["make", "-s", "-f", str(REPO / "Makefile"), "-C", str(server_dir), "server",
         f"BIN={os.path.dirname(sys.executable)}", f"SERVER_PORT={port}", "SERVER_ARGS=--workers 1"],
        stdout=open(tmp_path / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read() == b"OK":
                    break
            except OSError:
                pass
            assert server.poll() is None and time.time() < deadline, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(0.5)

        uri = f"http://127.0.0.1:{port}"
        proc = subprocess.run(
            [sys.executable, "-m", "qllm.run", "-m", "hydra/launcher=local_parallel", "tracking=server",
             f"tracking.uri={uri}", "model=tiny-random-llama", "calibration=wikitext2-small", "method=none,rtn",
             "task=arc_easy_offline", "task.limit=3", f"hydra.sweep.dir={tmp_path}/sweep"],
            cwd=tmp_path, capture_output=True, text=True, timeout=600,
            env={**os.environ, "QLLM_CACHE_DIR": str(cache_dir), "QLLM_DATA_DIR": str(data_dir)})
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]

        import mlflow
        mlflow.set_tracking_uri(uri)
        runs = mlflow.search_runs(experiment_names=["qllm"])
        parent = runs[runs["tags.qllm.kind"] == "sweep"]
        cells = runs[runs["tags.qllm.kind"] == "cell"]
        assert len(parent) == 1 and parent.iloc[0]["tags.qllm.launcher"] == "local_parallel"
        assert len(cells) == 2 and set(cells["tags.mlflow.parentRunId"]) == {parent.iloc[0]["run_id"]}
        assert (cells["tags.qllm.status"] == "finished").all()
        assert cells["artifact_uri"].str.startswith("mlflow-artifacts:/").all()
        for run_id in cells["run_id"]:  # stored by the server, in the server's folders
            assert list((server_dir / "mlruns" / "artifacts").glob(f"*/{run_id}/artifacts/cell.json"))
        assert (server_dir / "mlruns" / "mlflow.db").exists()
    finally:  # stop make, the mlflow CLI and uvicorn: the process group this test started
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
        for _ in range(120):  # the mlflow CLI waits for its server to shut down gracefully
            try:
                os.killpg(server.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.5)
        else:
            os.killpg(server.pid, signal.SIGKILL)
