"""MLflow: one run per cell, nested under one parent run per multirun (sweep).

The store is a sqlite db with artifacts beside it, both at absolute paths (Hydra's output dirs do not matter).
The parent run is created by a Hydra callback in the launching process and its id handed to every job through the
environment and a file in the sweep dir, so jobs nest under it even when they run in other processes (joblib
workers, submitit jobs, SLURM jobs started without the launcher's environment).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, Optional

import mlflow
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from ..cell import Cell
from ..names import EVALUATE_LOAD_WALL, SWEEP_STATUSES, Kind, Status, Tag, metric_name, task_metric
from ..records import EvalResult, QuantizeResult, TaskResult
from . import mlflow_store

ENV_PARENT = "QLLM_SWEEP_PARENT_RUN_ID"
ENV_SWEEP = "QLLM_SWEEP_ID"
SWEEP_FILE = "qllm_sweep.json"  # in hydra.sweep.dir: the sweep identity for jobs that did not inherit the environment
STATUS = Tag.STATUS


def configure(tracking: Any) -> str:
    """Point MLflow at the store and return the experiment id (created with an absolute artifact location, or with
    the server's own when `artifact_root` is empty). Safe when parallel jobs open one sqlite store: see mlflow_store."""
    t = OmegaConf.to_container(tracking, resolve=True) if isinstance(tracking, DictConfig) else dict(tracking)
    location = (Path(t["artifact_root"]).absolute() / t["experiment"]).as_uri() if t.get("artifact_root") else None
    return mlflow_store.open_experiment(t["uri"], t["experiment"], location)


def git_commit() -> str:
    root = Path(__file__).resolve().parents[2]  # the repository
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return sha.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_name(model: str, method: str, bits: Optional[int], dtype: str, task: str) -> str:
    return f"{model} · {method} · {'w' + str(bits) if bits else dtype} · {task}"


def cell_params(cell: Cell, task_name: str) -> dict[str, Any]:
    p: dict[str, Any] = {
        "model": cell.model["name"], "model.path": cell.model["path"], "model.revision": cell.model["revision"],
        "model.source": cell.model["source"], "model.dtype": cell.model["dtype"],
        "model.params_b": cell.model["params_b"], "method": cell.method, "bits": cell.bits or "none",
        "scheme": cell.scheme, "group_size": cell.group_size or "none", "task": task_name,
        "tasks": ",".join(cell.tasks), "eval.backend": cell.eval["backend"],
        "eval.batch_size": cell.eval["batch_size"],
        "eval.apply_chat_template": cell.eval.get("apply_chat_template", False), "seed": cell.seed, "git_commit": git_commit(),
    }
    for key in ("note", "content"):  # provenance caveat; a local model dir's fingerprint (model=hf)
        if cell.model.get(key):
            p[f"model.{key}"] = cell.model[key]
    for k, v in (cell.calibration or {}).items():
        p[f"calibration.{k}"] = v
    for key, e in cell.tasks.items():
        p[f"{key}.type"] = e["type"]
        p[f"{key}.metric"] = e["metric"]
        p[f"{key}.num_fewshot"] = e["num_fewshot"]
        p[f"{key}.limit"] = e["limit"] if e["limit"] is not None else "all"
        for cap in ("max_doc_tokens", "max_gen_toks"):
            if e.get(cap):
                p[f"{key}.{cap}"] = e[cap]
    for k, v in cell.eval.items():  # the backend's own settings (dtype, max_model_len, cpu_int4_w4a8, ...)
        p.setdefault(f"eval.{k}", v)
    for lib, v in {**cell.quant_versions, **cell.eval_versions}.items():
        p[f"version.{lib}"] = v
    return p


def task_metrics(results: EvalResult) -> dict[str, float]:
    """Every number of the evaluate stage as an MLflow metric: `<task>/<metric>`, `<task>/<metric>_stderr`,
    `<task>/score` (0-100; a dialogue task's own `score` metric is its judge's 1-10 rating), `<task>/n_samples`,
    `<task>/<subtask>/<metric>`, `<task>/difficulty/<label>/<metric>`, and `suite/score_macro`."""
    from ..tasks.results import primary_key

    out: dict[str, float] = {}
    for key, t in results.tasks.items():
        out |= result_metrics(key, t)
        primary = metric_name(primary_key(t.primary["metric"]))
        for label, b in t.by_difficulty.items():
            out[task_metric(key, "difficulty", label, primary)] = b["mean"]
            out[task_metric(key, "difficulty", label, "n")] = b["n"]
        if t.score is not None:
            out[task_metric(key, "score")] = t.score
        out[task_metric(key, "n_samples")] = float(t.n_samples["effective"])
        out[task_metric(key, "eval_wall_s")] = float(t.wall_s)
    for name, value in results.suite.items():
        out[f"suite/{name}"] = value
    if results.wall_s.get("load"):  # loading the model (a serving engine's startup), apart from the tasks' time
        out[EVALUATE_LOAD_WALL] = float(results.wall_s["load"])
    return out


def result_metrics(key: str, t: TaskResult) -> dict[str, float]:
    """A task's result metrics (`<task>/<metric>`, `<task>/<subtask>/<metric>`): what a judge adds to a dialogue
    task, without the evaluation's own counts and times."""
    from ..tasks.results import numeric_metrics

    out = {task_metric(key, metric_name(name)): value for name, value in numeric_metrics(t.metrics).items()}
    for sub, metrics in t.subtasks.items():
        for name, value in metrics.items():
            out[task_metric(key, sub, metric_name(name))] = value
    return out


def _sweep_file() -> dict:
    """Inside a multirun job: the sweep identity the callback wrote into the sweep dir ({} if none)."""
    try:
        hc = HydraConfig.get()
    except ValueError:  # not inside a Hydra job
        return {}
    if hc.mode != RunMode.MULTIRUN:
        return {}
    try:
        return json.loads((Path(hc.sweep.dir) / SWEEP_FILE).read_text())
    except (OSError, ValueError):
        return {}


def sweep_parent() -> Optional[str]:
    """The sweep's parent run id: from the environment, else (jobs started without it, e.g. SLURM --export=NONE)
    from `<hydra.sweep.dir>/qllm_sweep.json`."""
    return os.environ.get(ENV_PARENT) or _sweep_file().get("parent_run_id")


def sweep_id() -> str:
    """The sweep id ("" outside a sweep), found like sweep_parent()."""
    return os.environ.get(ENV_SWEEP) or _sweep_file().get("sweep_id", "")


def find_finished_cell(experiment_id: str, cell_key: str) -> Optional[Any]:
    """The latest run that finished evaluating this cell (same cell key) in the experiment, from any sweep."""
    runs = MlflowClient().search_runs(
        [experiment_id],
        filter_string=f"tags.`{Tag.CELL_KEY}` = '{cell_key}' and tags.`{Tag.STATUS}` = '{Status.FINISHED}' "
                      "and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def record_skipped(name: str, reason: str, params: dict, tags: dict, status: Status = Status.SKIPPED,
                   metrics: Optional[dict] = None) -> str:
    """A cell that will not run (invalid, duplicate, already evaluated) still gets a run saying so, then the sweep
    goes on. A reused cell carries the earlier run's metrics, so the sweep's runs line up in the UI's compare view."""
    with mlflow.start_run(run_name=name, parent_run_id=sweep_parent(),
                          tags={**tags, Tag.STATUS: status.value, Tag.SKIP_REASON: reason[:5000]}) as run:
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        if metrics:
            mlflow.log_metrics(metrics)
        mlflow.log_text(reason, "skip_reason.txt")
    return run.info.run_id


# Hydra launchers whose cells run in processes that end with the launching process (joblib's workers are killed
# with it): a cell of theirs still RUNNING when the sweep is interrupted will never report, so the sweep says it.
# SLURM and submitit jobs go on by themselves and report for themselves.
DYING_WITH_THE_SWEEP = ("basic", "joblib", "local_parallel")


def mark_sweep_killed(why: str = "interrupted") -> None:
    """Ctrl-C or SIGTERM inside a sweep: the parent run is KILLED too (Hydra does not call on_multirun_end then), and
    so are its cells that were running in workers ended with it."""
    parent = sweep_parent()
    if not parent:
        return
    client = MlflowClient()
    run = client.get_run(parent)
    if run.info.status != "RUNNING":
        return
    client.set_tag(parent, Tag.KILL_REASON, why)
    client.set_terminated(parent, status="KILLED")
    launcher = run.data.tags.get(Tag.LAUNCHER, "basic")
    if launcher not in DYING_WITH_THE_SWEEP:
        return
    running = client.search_runs([run.info.experiment_id], max_results=10000,
                                 filter_string=f"tags.`{Tag.PARENT_RUN_ID}` = '{parent}' and attributes.status = 'RUNNING'")
    for cell in running:
        client.set_tag(cell.info.run_id, Tag.STATUS, Status.KILLED.value)
        client.set_tag(cell.info.run_id, Tag.KILL_REASON, f"{why} to the sweep: its {launcher} worker was ended")
        client.set_terminated(cell.info.run_id, status="KILLED")


def log_checkpoint(result: QuantizeResult, max_mb: float) -> None:
    checkpoint, manifest = result.checkpoint, result.manifest
    size_mb = manifest.checkpoint_bytes / 2**20
    digest = hashlib.sha256(json.dumps(manifest.files, sort_keys=True).encode()).hexdigest()
    mlflow.set_tags({Tag.CHECKPOINT_PATH: checkpoint, Tag.CHECKPOINT_SHA256: digest})
    if size_mb <= max_mb:
        mlflow.log_artifacts(checkpoint, "checkpoint")
    else:
        mlflow.log_text(
            f"path: {checkpoint}\nsha256 of the manifest's file digests: {digest}\nsize: {size_mb:.1f} MiB "
            f"(over tracking.log_checkpoint_max_mb={max_mb}: not copied into MLflow)\n",
            "checkpoint_location.txt",
        )


class SweepParentRun(Callback):
    """Hydra callback: one MLflow parent run per multirun, holding the sweep's overrides and its outcome."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        exp_id = configure(config.tracking)
        sweep_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        overrides = " ".join(config.hydra.overrides.task)
        launcher = config.hydra.runtime.choices.get("hydra/launcher") or "basic"  # basic | joblib | submitit_* | slurm
        sweep_dir = Path(config.hydra.sweep.dir).absolute()
        run = MlflowClient().create_run(
            exp_id, run_name=f"sweep {sweep_id}",
            tags={Tag.KIND: Kind.SWEEP.value, Tag.SWEEP_ID: sweep_id, Tag.OVERRIDES: overrides,
                  Tag.LAUNCHER: launcher, Tag.SWEEP_DIR: str(sweep_dir)},
        )
        MlflowClient().log_param(run.info.run_id, "overrides", overrides[:6000])
        # Jobs find the sweep through the environment (inherited by joblib workers and submitit jobs) or, when they
        # start without it (SLURM --export=NONE), through this file in the sweep dir.
        sweep_dir.mkdir(parents=True, exist_ok=True)
        tmp = sweep_dir / f".{SWEEP_FILE}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({"parent_run_id": run.info.run_id, "sweep_id": sweep_id, "experiment_id": exp_id,
                                   "tracking_uri": config.tracking.uri, "launcher": launcher,
                                   "overrides": overrides}, indent=2))
        os.replace(tmp, sweep_dir / SWEEP_FILE)
        os.environ[ENV_PARENT], os.environ[ENV_SWEEP] = run.info.run_id, sweep_id
        self.run_id, self.exp_id = run.info.run_id, exp_id

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        client = MlflowClient()
        children = client.search_runs(
            [self.exp_id], max_results=10000,  # cells only: a report nested under the sweep is not a cell
            filter_string=f"tags.`{Tag.PARENT_RUN_ID}` = '{self.run_id}' and tags.`{Tag.KIND}` = '{Kind.CELL}'",
            order_by=["attributes.start_time ASC"],
        )
        # a child without a qllm.status never ended: its job died without reporting (e.g. a SLURM time limit)
        counts = {s.value: 0 for s in SWEEP_STATUSES}
        for r in children:
            status = r.data.tags.get(Tag.STATUS, Status.LOST.value)
            counts[status] = counts.get(status, 0) + 1
        for status, n in counts.items():
            client.log_metric(self.run_id, f"cells_{status}", n)
        failed = counts[Status.FAILED] + counts[Status.KILLED] + counts.get(Status.LOST, 0)
        client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")
        _print_sweep(children, counts, sweep_id(), self.run_id)
        os.environ.pop(ENV_PARENT, None)
        os.environ.pop(ENV_SWEEP, None)
        if failed:
            raise SystemExit(f"[qllm] {failed} cell(s) failed or were killed; see their MLflow runs (tag "
                             "qllm.status=failed or killed) and error.txt; a re-run of the sweep redoes only the cells "
                             "that did not finish")


def _print_sweep(children: list, counts: dict[str, int], sweep: str, parent_id: str) -> None:
    """The sweep's outcome, one line per cell: what finished, what was reused or skipped and why, what failed."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"sweep {sweep}: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n or s in
                                                       [x.value for x in SWEEP_STATUSES]), title_justify="left")
    for col in ("cell", "status", "suite score", "note"):
        table.add_column(col, justify="right" if col == "suite score" else "left")
    for r in children:
        tags, status = r.data.tags, r.data.tags.get(Tag.STATUS, Status.LOST.value)
        note = {Status.FAILED: tags.get(Tag.ERROR, ""), Status.SKIPPED: tags.get(Tag.SKIP_REASON, ""),
                Status.KILLED: tags.get(Tag.KILL_REASON, ""),
                Status.REUSED: f"from run {tags.get(Tag.REUSED_RUN_ID, '?')}"}.get(status, "")
        score = r.data.metrics.get("suite/score_macro")
        table.add_row(r.info.run_name, status, f"{score:.2f}" if score is not None else "",
                      note.strip().splitlines()[0][:120] if note.strip() else "")
    console = Console(width=max(Console().width, 160))
    console.print()
    console.print(table)
    console.print(f"MLflow parent run {parent_id} (make ui)")
