"""Entry point: `python -m qllm.run [overrides]` runs one cell; `-m` sweeps (one MLflow parent run per sweep).

The Hydra job is the orchestrator: it plans the cell (validation, no weights), runs the quantize and evaluate stages
in their own processes, and logs everything to MLflow. It imports no torch itself.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import hydra
import mlflow
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from . import config as _config  # noqa: F401  (registers the schema and resolvers)
from . import cost_metrics, sizes, stages, tracking
from .cell import Cell, plan_cell
from .errors import QllmConfigError
from .results import primary_key


def _print_summary(cell: Cell, results: dict, run_id: str, uri: str, quant: dict | None,
                   costs: dict[str, float]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{cell.name} · {cell.scheme}", title_justify="left")
    for col in ("task", "metric", "value", "± stderr", "n", "shots"):
        table.add_column(col, justify="left" if col in ("task", "metric") else "right")
    for key, t in results["tasks"].items():
        value, metric = t["primary"]["value"], t["primary"]["metric"]
        name, _, filt = primary_key(metric).partition(",")
        stderr = t["metrics"].get(f"{name}_stderr,{filt}")
        table.add_row(key, metric, f"{value:.4f}" if isinstance(value, float) else str(value),
                      f"{stderr:.4f}" if isinstance(stderr, float) else "n/a",
                      str(t["n_samples"]["effective"]), str(t["num_fewshot"]))
    if results.get("suite"):
        table.add_row("suite", "score_macro (0-100)", f"{results['suite']['score_macro']:.2f}", "", "", "")
    console = Console()
    console.print(table)
    if cell.model.get("note"):
        console.print(f"model note: {cell.model['note']}")
    if quant:
        console.print(f"checkpoint: {quant['checkpoint']} "
                      f"({quant['manifest']['checkpoint_bytes'] / 2**20:.1f} MiB"
                      f"{', reused from cache' if quant['manifest'].get('reused') else ''})")
    _print_costs(console, costs)
    console.print(f"MLflow: run {run_id} in {uri} — browse with `make ui` (experiment runs under 'Model training')")


def _print_costs(console: Any, m: dict[str, float]) -> None:
    parts = []
    if "size/params" in m:
        bits = m.get("size/bits_per_weight_quantized")
        parts.append(f"{m['size/params'] / 1e6:.1f}M params, {m['size/disk_gb'] * 1e3:.1f} MB on disk"
                     + (f", {bits:.2f} bits/weight in quantized layers" if bits else ""))
    mem = [f"{k.split('/')[1]} {v:.2f} GB" for k, v in m.items() if k.count("/") == 2 and k.endswith("/peak_rss_gb")
           and k.startswith("mem/")]
    if mem:
        parts.append("peak RSS " + ", ".join(mem))
    if "speed/bs1/decode_tok_s" in m:
        parts.append(f"batch 1: prefill {m['speed/bs1/prefill_tok_s']:.0f} tok/s, decode "
                     f"{m['speed/bs1/decode_tok_s']:.1f} tok/s, TTFT {m['speed/bs1/ttft_ms']:.0f} ms (dense speed, hf)")
    for part in parts:
        console.print(f"cost: {part}")


def _log_stage_logs(workdir: Path) -> None:
    for log in (workdir / "stages").glob("*.log"):
        mlflow.log_artifact(str(log), "logs")


def _base_model_dir(path: str | None, cell: Cell) -> Path | None:
    """The baseline's weights on disk: the converted/local dir, or the hub snapshot in the local HF cache."""
    if path is None:
        return None
    if Path(path).is_dir():
        return Path(path)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path, revision=cell.model["revision"], local_files_only=True))
    except Exception:  # not in the local cache: no size figures rather than a download
        return None


def _log_costs(cell: Cell, quant: dict | None, results: dict, stage_dir: Path) -> dict[str, float]:
    """Size of the evaluated checkpoint, memory of each stage, speed (names: qllm/cost_metrics.py)."""
    metrics: dict[str, float] = {}
    weights = Path(quant["checkpoint"]) if quant else _base_model_dir(results["model_path"], cell)
    if weights is not None:
        stats = sizes.checkpoint_stats(weights)
        metrics |= cost_metrics.size(stats, results.get("weights_in_memory"))
        mlflow.log_dict(stats, "size.json")
    profile_dir = stage_dir / "profile"
    for f in sorted(profile_dir.glob("profile_*.json")):
        metrics |= cost_metrics.memory(json.loads(f.read_text()))
    if results.get("speed"):
        metrics |= cost_metrics.speed(results["speed"])
        mlflow.set_tags(cost_metrics.speed_tags(results["speed"]) | {"qllm.speed_reused": str(results["speed_reused"]).lower()})
        mlflow.log_dict(results["speed"], "speed.json")
    mlflow.log_metrics(metrics)
    if profile_dir.is_dir():
        mlflow.log_artifacts(str(profile_dir), "profile")  # profile JSON, memory CSV + PNG, CUDA snapshots
    return metrics


def _already_done(cfg: DictConfig, cell: Cell, exp_id: str, parent: str | None, name: str, tags: dict,
                  multirun: bool) -> bool:
    """Resume: a cell whose evaluation already finished (same cell key) is not run again unless force=true.
    Within one sweep that is a duplicate cell (skipped); from an earlier run it is reused (its metrics are linked)."""
    if cfg.force:
        return False
    done = tracking.find_finished_cell(exp_id, cell.key)
    if done is None:
        return False
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(done.info.start_time / 1000))
    earlier = f"run '{done.info.run_name}' ({done.info.run_id}, {when})"
    params = tracking.cell_params(cell, cfg.task.name)
    if parent and done.data.tags.get("mlflow.parentRunId") == parent:
        reason = f"same cell as {earlier}, key {cell.key}" + (": method=none ignores bits" if not cell.quantized else "")
        tracking.record_skipped(name, reason, params, tags)
        print(f"[qllm] skipped {name}: {reason}", flush=True)
        return True
    reason = f"already evaluated in {earlier} with the same cell key {cell.key}; force=true evaluates it again"
    if multirun:
        tracking.record_skipped(name, reason, params, {**tags, "qllm.reused_run_id": done.info.run_id},
                                status="reused", metrics=done.data.metrics)
    print(f"[qllm] reused {name}: {reason}", flush=True)
    score = done.data.metrics.get("suite/score_macro")
    if score is not None:
        print(f"[qllm] suite/score_macro of that run: {score:.2f} (make ui to browse it)", flush=True)
    return True


def run_cell(cfg: DictConfig) -> None:
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    exp_id = tracking.configure(cfg.tracking)
    parent = tracking.sweep_parent() if multirun else None
    name = tracking.run_name(cfg.model.name, cfg.method.name, cfg.bits if cfg.method.bits_allowed else None,
                             cfg.model.dtype, cfg.task.name)
    overrides = list(HydraConfig.get().overrides.task)
    tags = {"qllm.kind": "cell", "qllm.sweep_id": tracking.sweep_id(),
            "qllm.overrides": " ".join(overrides)}
    try:
        cell = plan_cell(cfg)
    except QllmConfigError as e:
        if not multirun:
            print(f"[qllm] invalid cell ({' '.join(overrides) or 'defaults'}): {e}", file=sys.stderr)
            raise SystemExit(2) from None
        tracking.record_skipped(name, str(e), {"model": cfg.model.name, "method": cfg.method.name,
                                               "bits": cfg.bits, "task": cfg.task.name}, tags)
        print(f"[qllm] skipped {name}: {e}", flush=True)
        return

    tags.update({"qllm.cell_key": cell.key, "qllm.quant_key": cell.quant_key})
    if _already_done(cfg, cell, exp_id, parent, name, tags, multirun):
        return

    workdir = Path(HydraConfig.get().runtime.output_dir)
    shutil.rmtree(workdir / "stages" / "profile", ignore_errors=True)  # a re-run in the same dir: no stale profiles
    launch = OmegaConf.to_container(cfg.launch, resolve=True)
    system_metrics = cell.profile["enabled"] and cell.profile["system_metrics"]
    if system_metrics:
        mlflow.set_system_metrics_sampling_interval(cell.profile["system_metrics_interval_s"])
    with mlflow.start_run(run_name=name, parent_run_id=parent, tags=tags, log_system_metrics=system_metrics) as run:
        mlflow.log_params({k: str(v)[:500] for k, v in tracking.cell_params(cell, cfg.task.name).items()})
        mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
        mlflow.log_text(cell.to_json(), "cell.json")
        try:
            quant = None
            if cell.quantized:
                mlflow.log_text(yaml.safe_dump(cell.recipe, sort_keys=False), "recipe.yaml")
                quant = stages.quantize(cell, workdir / "stages", launch, cfg.force)
                manifest = quant["manifest"]
                mlflow.log_dict(manifest, "manifest.json")
                mlflow.log_metrics({**cost_metrics.quantization(manifest), "quantize/stage_wall_s": quant["wall_s"]})
                mlflow.set_tag("qllm.quantize_reused", str(manifest.get("reused", False)).lower())
                tracking.log_checkpoint(quant["checkpoint"], manifest, cfg.tracking.log_checkpoint_max_mb)
            results = stages.evaluate(cell, workdir / "stages", launch, quant["checkpoint"] if quant else None,
                                      cfg.force)
            mlflow.log_metrics(tracking.task_metrics(results))
            mlflow.log_metric("evaluate/stage_wall_s", results["stage_wall_s"])
            fp = results["fingerprint"]
            mlflow.set_tags({"qllm.eval_speed": "dense (hf backend decompresses weights)",
                             "qllm.evaluated_weights": json.dumps(fp),
                             # tasks whose finished result (same task key) came from the cache, not this run
                             "qllm.eval_reused_tasks": ",".join(results["reused_tasks"]) or "none"})
            mlflow.log_artifacts(results["out_dir"], "eval")  # per-sample correctness; full samples if asked
            costs = _log_costs(cell, quant, results, workdir / "stages")
            _log_stage_logs(workdir)
            mlflow.set_tag(tracking.STATUS, "finished")
        except KeyboardInterrupt:
            mlflow.set_tag(tracking.STATUS, "killed")
            mlflow.end_run("KILLED")
            if multirun:
                tracking.mark_sweep_killed()
            print(f"[qllm] interrupted: run {run.info.run_id} marked KILLED; finished tasks are cached and a "
                  "re-run resumes with the missing ones", file=sys.stderr, flush=True)
            raise
        except Exception as e:  # one failing cell must not take the sweep down
            mlflow.set_tags({tracking.STATUS: "failed", "qllm.error": str(e)[:5000]})
            stage_tb = getattr(e, "stage_traceback", "")
            mlflow.log_text(traceback.format_exc()
                            + (f"\n--- traceback of the {e.stage} stage process ---\n{stage_tb}" if stage_tb else ""),
                            "error.txt")
            _log_stage_logs(workdir)
            mlflow.end_run("FAILED")
            print(f"[qllm] FAILED {name}: {e}", file=sys.stderr, flush=True)
            if not multirun:
                raise SystemExit(1) from None
            return
    _print_summary(cell, results, run.info.run_id, cfg.tracking.uri, quant, costs)


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_cell(cfg)


def cli() -> None:
    try:
        _config.check_override_keys(sys.argv[1:])
    except QllmConfigError as e:
        print(f"[qllm] {e}", file=sys.stderr)
        raise SystemExit(2) from None
    main()


if __name__ == "__main__":
    cli()
