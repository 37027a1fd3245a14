"""MLflow: one run per cell, nested under one parent run per multirun (sweep).

The store is a sqlite db with artifacts beside it, both at absolute paths (Hydra's output dirs do not matter).
The parent run is created by a Hydra callback in the launching process and its id handed to every job through the
environment, so jobs nest under it even when they run in other processes.
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
from hydra.experimental.callback import Callback
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from .cell import Cell

ENV_PARENT = "QLLM_SWEEP_PARENT_RUN_ID"
ENV_SWEEP = "QLLM_SWEEP_ID"
STATUS = "qllm.status"  # finished | skipped | failed


def configure(tracking: Any) -> str:
    """Point MLflow at the store and return the experiment id (created with an absolute artifact location)."""
    t = OmegaConf.to_container(tracking, resolve=True) if isinstance(tracking, DictConfig) else dict(tracking)
    if t["uri"].startswith("sqlite:///"):
        Path(t["uri"][len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(t["uri"])
    exp = mlflow.get_experiment_by_name(t["experiment"])
    if exp is None:
        location = Path(t["artifact_root"]).absolute() / t["experiment"]
        exp_id = MlflowClient().create_experiment(t["experiment"], artifact_location=location.as_uri())
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def git_commit() -> str:
    root = Path(__file__).resolve().parent.parent
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
    if cell.model.get("note"):
        p["model.note"] = cell.model["note"]
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
    for lib, v in {**cell.quant_versions, **cell.eval_versions}.items():
        p[f"version.{lib}"] = v
    return p


def _metric_name(lm_eval_key: str) -> str:
    """lm-eval's "acc,none" -> "acc"; "exact_match,strict-match" -> "exact_match_strict-match"."""
    metric, _, filt = lm_eval_key.partition(",")
    return metric if filt in ("", "none") else f"{metric}_{filt}"


def task_metrics(results: dict) -> dict[str, float]:
    """Every number of the evaluate stage as an MLflow metric: `<task>/<metric>`, `<task>/<metric>_stderr`,
    `<task>/score` (0-100), `<task>/n_samples`, `<task>/<subtask>/<metric>`, `<task>/difficulty/<label>/<metric>`,
    and `suite/score_macro`."""
    from .results import numeric_metrics, primary_key

    out: dict[str, float] = {}
    for key, t in results["tasks"].items():
        for name, value in numeric_metrics(t["metrics"]).items():
            out[f"{key}/{_metric_name(name)}"] = value
        for sub, metrics in t.get("subtasks", {}).items():
            for name, value in metrics.items():
                out[f"{key}/{sub}/{_metric_name(name)}"] = value
        primary = _metric_name(primary_key(t["primary"]["metric"]))
        for label, b in t.get("by_difficulty", {}).items():
            out[f"{key}/difficulty/{label}/{primary}"] = b["mean"]
            out[f"{key}/difficulty/{label}/n"] = b["n"]
        if t.get("score") is not None:
            out[f"{key}/score"] = t["score"]
        out[f"{key}/n_samples"] = float(t["n_samples"]["effective"])
        out[f"{key}/eval_wall_s"] = float(t["wall_s"])
    for name, value in results.get("suite", {}).items():
        out[f"suite/{name}"] = value
    return out


def sweep_parent() -> Optional[str]:
    return os.environ.get(ENV_PARENT)


def find_cell_run(experiment_id: str, cell_key: str, parent: Optional[str]) -> Optional[Any]:
    """A finished run of the same cell in this sweep (a duplicate cell such as method=none at bits=4 and 8)."""
    if not parent:
        return None
    runs = MlflowClient().search_runs(
        [experiment_id],
        filter_string=f"tags.`qllm.cell_key` = '{cell_key}' and tags.`mlflow.parentRunId` = '{parent}' "
                      f"and tags.`{STATUS}` = 'finished'",
        max_results=1,
    )
    return runs[0] if runs else None


def record_skipped(name: str, reason: str, params: dict, tags: dict) -> str:
    """A cell that will not run (invalid, duplicate) still gets a run saying so, then the sweep goes on."""
    with mlflow.start_run(run_name=name, parent_run_id=sweep_parent(),
                          tags={**tags, STATUS: "skipped", "qllm.skip_reason": reason[:5000]}) as run:
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        mlflow.log_text(reason, "skip_reason.txt")
    return run.info.run_id


def log_checkpoint(checkpoint: str, manifest: dict, max_mb: float) -> None:
    size_mb = manifest["checkpoint_bytes"] / 2**20
    digest = hashlib.sha256(json.dumps(manifest["files"], sort_keys=True).encode()).hexdigest()
    mlflow.set_tags({"qllm.checkpoint_path": checkpoint, "qllm.checkpoint_sha256": digest})
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
        run = MlflowClient().create_run(
            exp_id, run_name=f"sweep {sweep_id}",
            tags={"qllm.kind": "sweep", "qllm.sweep_id": sweep_id, "qllm.overrides": overrides},
        )
        MlflowClient().log_param(run.info.run_id, "overrides", overrides[:6000])
        os.environ[ENV_PARENT], os.environ[ENV_SWEEP] = run.info.run_id, sweep_id
        self.run_id, self.exp_id = run.info.run_id, exp_id

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        client = MlflowClient()
        children = client.search_runs(
            [self.exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{self.run_id}'", max_results=10000
        )
        counts: dict[str, int] = {}
        for r in children:
            counts[r.data.tags.get(STATUS, "unknown")] = counts.get(r.data.tags.get(STATUS, "unknown"), 0) + 1
        for status, n in counts.items():
            client.log_metric(self.run_id, f"cells_{status}", n)
        failed = counts.get("failed", 0)
        client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")
        summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        print(f"\n[qllm] sweep {os.environ.get(ENV_SWEEP)}: {len(children)} cells: {summary}. "
              f"MLflow parent run {self.run_id} (make ui)", flush=True)
        os.environ.pop(ENV_PARENT, None)
        if failed:
            raise SystemExit(f"[qllm] {failed} cell(s) failed; see their MLflow runs (tag qllm.status=failed)")
