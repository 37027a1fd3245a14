"""Entry point: `python -m qllm.run [overrides]` runs one cell; `-m` sweeps (one MLflow parent run per sweep).

The Hydra job is the orchestrator: it plans the cell (validation, no weights), reuses it when it already finished,
runs the quantize and evaluate stages in their own processes under their launchers, and logs everything to MLflow.
It imports no torch itself. Ctrl-C and SIGTERM end the running stage's whole process group and mark the cell (and
its sweep) KILLED; a stage past its `timeout_s` is ended and its cell KILLED while the sweep goes on, and so is a
cell at its SLURM time limit (SIGUSR2 under submitit), whose job submitit then requeues.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import hydra
import mlflow
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue

from . import config as _config
from . import console, judging
from .cell import Cell
from .errors import QllmConfigError
from .measure import cost_metrics, profiling, sizes
from .names import (EVALUATE_STAGE_WALL, KL_MEAN, KL_P99, KL_TOP1_AGREEMENT, QUANTIZE_STAGE_WALL, Kind, Status,
                    Tag)
from .plan import PlanSettings, plan_cell_memory
from .planning import plan_cell
from .records import EvalResult, QuantizeResult
from .report import consistency
from .stages import backends, runner
from .stages.runner import StageTimeout, Terminated, TimeLimit
from .store import tracking


@dataclass
class Job:
    """The Hydra job running one cell: under which sweep, with which tags, and (once opened) which MLflow store."""

    multirun: bool
    parent: Optional[str]
    overrides: list[str]
    tags: dict = field(default_factory=dict)
    experiment_id: str = ""

    @classmethod
    def start(cls) -> "Job":
        multirun = HydraConfig.get().mode == RunMode.MULTIRUN
        overrides = list(HydraConfig.get().overrides.task)
        return cls(multirun, tracking.sweep_parent() if multirun else None, overrides,
                   {Tag.KIND: Kind.CELL.value, Tag.SWEEP_ID: tracking.sweep_id(), Tag.OVERRIDES: " ".join(overrides)})

    def open_store(self, cfg: DictConfig) -> None:
        """The MLflow store, opened after planning: an invalid single run never touches (or creates) it."""
        self.experiment_id = self.experiment_id or tracking.configure(cfg.tracking)


def _name(cfg: DictConfig, cell: Optional[Cell] = None) -> str:
    if cell is not None:
        return f"{cell.name} · {cfg.task.name}"
    try:
        bits = cfg.bits if cfg.method.bits_allowed else None
        return tracking.run_name(cfg.model.name, cfg.method.name, bits, cfg.model.dtype, cfg.task.name)
    except (MissingMandatoryValue, InterpolationToMissingValueError):  # model=hf without model.path: planning says so
        return f"{cfg.method.name} · {cfg.task.name}"


# ---- plan / reuse / execute / log ----


def _plan(cfg: DictConfig, job: Job) -> Optional[Cell]:
    """The planned cell, or None when it is invalid (recorded as skipped in a sweep; exit 2 for a single run)."""
    try:
        cell = plan_cell(cfg)
        _plan_memory(cfg, cell)  # qllm.plan: the cell's memory plan; refused like any invalid cell when it cannot fit
        return cell
    except QllmConfigError as e:
        if not job.multirun:
            print(f"[qllm] invalid cell ({' '.join(job.overrides) or 'defaults'}): {e}", file=sys.stderr)
            raise SystemExit(2) from None
        params = {k: str(OmegaConf.select(cfg, k, default="?")) for k in ("model.name", "method.name", "bits",
                                                                           "task.name")}
        name = _name(cfg)
        job.open_store(cfg)
        tracking.record_skipped(name, str(e), {k.split(".")[0]: v for k, v in params.items()}, job.tags)
        print(f"[qllm] skipped {name}: {e}", flush=True)
        return None


# ---- memory plan (qllm.plan): printed before each cell; plan.enforce refuses a cell that cannot fit ----


def _plan_memory(cfg: DictConfig, cell: Cell) -> None:
    settings = PlanSettings.of(OmegaConf.to_container(cfg.plan, resolve=True))
    cluster = settings.cluster()  # a malformed plan.gpus is an invalid cell
    try:
        plan = plan_cell_memory(cell, settings, cluster)
    except Exception as e:  # noqa: BLE001 - a model the planner cannot size, or its bug, never stops a valid cell
        print(f"[qllm] memory plan unavailable: {e!r}", file=sys.stderr, flush=True)
        return
    print(f"[qllm] {plan.line()}", flush=True)
    if settings.enforce and not plan.fits:
        raise QllmConfigError(f"memory plan: {plan.refusal} (plan.enforce=false starts it anyway)")


# ---- end of memory plan ----


def _reuse(cfg: DictConfig, cell: Cell, job: Job, name: str) -> bool:
    """Resume: a cell whose evaluation already finished (same cell key) is not run again unless force=true.
    Within one sweep that is a duplicate cell (skipped); from an earlier run it is reused (its metrics are linked)."""
    if cfg.force:
        return False
    done = tracking.find_finished_cell(job.experiment_id, cell.key)
    if done is None:
        return False
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(done.info.start_time / 1000))
    earlier = f"run '{done.info.run_name}' ({done.info.run_id}, {when})"
    params = tracking.cell_params(cell, cfg.task.name)
    if job.parent and done.data.tags.get(Tag.PARENT_RUN_ID) == job.parent:
        reason = f"same cell as {earlier}, key {cell.key}" + (": method=none ignores bits" if not cell.quantized else "")
        tracking.record_skipped(name, reason, params, job.tags)
        print(f"[qllm] skipped {name}: {reason}", flush=True)
        return True
    reason = f"already evaluated in {earlier} with the same cell key {cell.key}; force=true evaluates it again"
    if job.multirun:
        tracking.record_skipped(name, reason, params, {**job.tags, Tag.REUSED_RUN_ID: done.info.run_id},
                                status=Status.REUSED, metrics=done.data.metrics)
    print(f"[qllm] reused {name}: {reason}", flush=True)
    score = done.data.metrics.get("suite/score_macro")
    if score is not None:
        print(f"[qllm] suite/score_macro of that run: {score:.2f} (make ui to browse it)", flush=True)
    return True


@dataclass
class Outcome:
    quant: Optional[QuantizeResult]
    results: EvalResult
    costs: dict


def _stages(cfg: DictConfig, cell: Cell, workdir: Path, port: int) -> Outcome:
    """Quantize (unless the baseline) and evaluate, logging each stage's results as they come."""
    launch = OmegaConf.to_container(cfg.launch, resolve=True)
    assert isinstance(launch, dict)
    judging.check_at_start(cell)  # an unreachable judge fails the cell before answers are made
    quant = None
    if cell.quantized:
        mlflow.log_text(yaml.safe_dump(cell.recipe, sort_keys=False), "recipe.yaml")
        quant = runner.quantize(cell, workdir, launch["quantize"], port, cfg.force)
        _log_quantize(quant, cfg.tracking.log_checkpoint_max_mb)
    results = runner.evaluate(cell, workdir, launch["evaluate"], port, quant.checkpoint if quant else None,
                              cfg.force)
    _log_evaluate(results, backends.get(cell.eval["backend"]))
    if cell.dialogue_tasks:
        mlflow.set_tags(judging.answers_tags(cell))
    if judging.active(cell):
        verdicts = judging.judge_tasks(cell, results, workdir, launch["evaluate"], port,
                                       mlflow.active_run().info.experiment_id)
        judging.log(cell, results, verdicts, workdir / "judge")
    costs = _log_costs(cell, quant, results, workdir)
    _log_stage_logs(workdir)
    return Outcome(quant, results, costs)


def _log_quantize(quant: QuantizeResult, max_mb: float) -> None:
    mlflow.log_dict({**quant.manifest.to_dict(), "reused": quant.reused}, "manifest.json")
    mlflow.log_metrics({**cost_metrics.quantization(quant.manifest), QUANTIZE_STAGE_WALL: quant.wall_s})
    mlflow.set_tag(Tag.QUANTIZE_REUSED, str(quant.reused).lower())
    if quant.manifest.sensitivity or quant.manifest.allocation:
        from .sensitivity import artifacts

        artifacts.log_to_run(quant.manifest)  # the per-layer table, a mixed cell's allocation
    tracking.log_checkpoint(quant, max_mb)


def _log_evaluate(results: EvalResult, backend: backends.EvalBackend) -> None:
    mlflow.log_metrics(tracking.task_metrics(results))
    mlflow.log_metric(EVALUATE_STAGE_WALL, results.stage_wall_s)
    mlflow.set_tags({Tag.EVAL_SPEED: backend.speed_tag,
                     Tag.EVALUATED_WEIGHTS: json.dumps(results.fingerprint),
                     # tasks whose finished result (same task key) came from the cache, not this run
                     Tag.EVAL_REUSED_TASKS: ",".join(results.reused_tasks) or "none"})
    mlflow.log_artifacts(results.out_dir, "eval")  # per-sample correctness; full samples if asked


def _base_model_dir(path: Optional[str], cell: Cell) -> Optional[Path]:
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


def _log_costs(cell: Cell, quant: Optional[QuantizeResult], results: EvalResult, workdir: Path) -> dict[str, float]:
    """Size of the evaluated checkpoint, memory of each stage, speed, KL against the baseline (names: qllm.names)."""
    metrics: dict[str, float] = {}
    weights = Path(quant.checkpoint) if quant else _base_model_dir(results.model_path, cell)
    if weights is not None:
        stats = sizes.checkpoint_stats(weights)
        metrics |= cost_metrics.size(stats, results.weights_in_memory)
        mlflow.log_dict(stats, "size.json")
    profile_dir = workdir / "profile"
    for f in sorted(profile_dir.glob("profile_*.json")):
        profile = json.loads(f.read_text())
        metrics |= cost_metrics.memory(profile)
        metrics |= cost_metrics.ranks(profile, profiling.rank_profiles(profile_dir, profile["stage"]))
    if results.speed:
        metrics |= cost_metrics.speed(results.speed)
        mlflow.set_tags(cost_metrics.speed_tags(results.speed) | {Tag.SPEED_REUSED: str(results.speed_reused).lower()})
        mlflow.log_dict(results.speed, "speed.json")
    metrics |= _log_kl(results)
    mlflow.log_metrics(metrics)
    if profile_dir.is_dir():
        mlflow.log_artifacts(str(profile_dir), "profile")  # profile JSON, memory CSV + PNG, CUDA snapshots
    return metrics


def _log_kl(results: EvalResult) -> dict[str, float]:
    """A quantized cell's KL against its baseline: its metrics, and kl.json (settings, token count, what the top-k
    approximation means). A malformed result logs nothing rather than failing the cell."""
    if not results.kl:
        return {}
    try:
        kl = results.kl
        metrics = {KL_MEAN: float(kl["mean"]), KL_P99: float(kl["p99"]),
                   KL_TOP1_AGREEMENT: float(kl["top1_agreement"])}
        mlflow.log_dict({**kl, "reused": results.kl_reused}, "kl.json")
        return metrics
    except Exception as e:  # noqa: BLE001 - KL is measured besides the tasks: it never fails a cell
        print(f"[qllm] KL against the baseline not logged: {e!r}", file=sys.stderr, flush=True)
        return {}


def _log_stage_logs(workdir: Path) -> None:
    for f in [*workdir.glob("*.log"), *workdir.glob("launch_*.sh")]:
        mlflow.log_artifact(str(f), "logs")


def _end_unfinished(status: Status, tags: dict, e: BaseException, workdir: Path, name: str, job: Job) -> None:
    """A failed or timed-out cell: status, error.txt (the orchestrator's and the stage's tracebacks), stage logs.
    A single run then exits 1; a sweep goes on with its next cell."""
    mlflow.set_tags({Tag.STATUS: status.value, **tags})
    stage_tb = getattr(e, "stage_traceback", "")
    mlflow.log_text(traceback.format_exc()
                    + (f"\n--- traceback of the {e.stage} stage process ---\n{stage_tb}" if stage_tb else ""),
                    "error.txt")
    _log_stage_logs(workdir)
    mlflow.end_run(status.name)
    print(f"[qllm] {status.name} {name}: {e}", file=sys.stderr, flush=True)
    if not job.multirun:
        raise SystemExit(1) from None


def _end_killed(e: KeyboardInterrupt, workdir: Path, job: Job, run_id: str) -> None:
    """The running cell's run KILLED, with why. Ctrl-C or SIGTERM end the sweep too (its parent run KILLED); SLURM's
    time limit (TimeLimit) ends this job only, which submitit then requeues or gives up (`hand_over`): the sweep's
    other jobs go on, so its parent run stays as it is."""
    why = str(e) if isinstance(e, TimeLimit) else "SIGTERM" if isinstance(e, Terminated) else "Ctrl-C"
    mlflow.set_tags({Tag.STATUS: Status.KILLED.value, Tag.KILL_REASON: why})
    _log_stage_logs(workdir)
    mlflow.end_run("KILLED")
    if job.multirun and not isinstance(e, TimeLimit):
        tracking.mark_sweep_killed(why)
    print(f"[qllm] {why}: run {run_id} marked KILLED; finished tasks are cached and a re-run resumes with the "
          "missing ones", file=sys.stderr, flush=True)
    if isinstance(e, TimeLimit):
        e.hand_over()  # submitit: requeue (hydra.launcher.max_num_timeout) or give up


def _execute(cfg: DictConfig, cell: Cell, job: Job, name: str) -> None:
    """One MLflow run for the cell: its stages, and what ended it (finished, failed, killed)."""
    workdir = Path(HydraConfig.get().runtime.output_dir) / "stages"
    shutil.rmtree(workdir / "profile", ignore_errors=True)  # a re-run in the same dir: no stale profiles
    port = runner.free_port()  # this cell's rendezvous port, for every stage's launcher
    system_metrics = cell.profile["enabled"] and cell.profile["system_metrics"]
    if system_metrics:
        mlflow.set_system_metrics_sampling_interval(cell.profile["system_metrics_interval_s"])
    tags = {**job.tags, Tag.RENDEZVOUS_PORT: str(port),
            Tag.STAGE_LAUNCHERS: ",".join(f"{s}={cfg.launch[s].name}" for s in _config.STAGES)}
    with mlflow.start_run(run_name=name, parent_run_id=job.parent, tags=tags, log_system_metrics=system_metrics) as run:
        try:  # from the run's first logging on: a signal at any point marks it KILLED (not FAILED by start_run)
            mlflow.log_params({k: str(v)[:500] for k, v in
                               (tracking.cell_params(cell, cfg.task.name) | judging.params(cell)).items()})
            mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
            mlflow.log_text(cell.to_json(), "cell.json")
            outcome = _stages(cfg, cell, workdir, port)
            mlflow.set_tag(Tag.STATUS, Status.FINISHED.value)
        except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM (Terminated), SLURM's SIGUSR2: the stage's group is gone
            _end_killed(e, workdir, job, run.info.run_id)
            raise
        except StageTimeout as e:  # this cell only: the sweep goes on
            _end_unfinished(Status.KILLED, {Tag.KILL_REASON: str(e), Tag.ERROR: str(e)}, e, workdir, name, job)
            return
        except Exception as e:  # one failing cell must not take the sweep down
            _end_unfinished(Status.FAILED, {Tag.ERROR: str(e)[:5000]}, e, workdir, name, job)
            return
    backend = backends.get(cell.eval["backend"])
    console.print_summary(cell, outcome.results, run.info.run_id, cfg.tracking.uri, outcome.quant, outcome.costs,
                          backend.speed_kind)
    _check_consistency(cfg, cell, run.info.run_id)


def _check_consistency(cfg: DictConfig, cell: Cell, run_id: str) -> None:
    """The same checkpoint finished on another backend (`-m eval=hf,vllm`): compare item by item (logged to this
    run). A comparison that fails never fails the cell."""
    try:
        result = consistency.check_against_twins(cfg.tracking.uri, cfg.tracking.experiment, run_id, cell.quant_key,
                                                 cell.eval["backend"])
    except Exception as e:  # noqa: BLE001
        print(f"[qllm] backend consistency check failed: {e!r}", file=sys.stderr, flush=True)
        return
    if result and result["tasks"]:
        print("[qllm] backend consistency: " + consistency.render(result), flush=True)


def _handle_sigterm() -> None:
    """SIGTERM as Ctrl-C, in whatever process runs the cell (the CLI, or a launcher's worker process). In a SLURM job
    submitted by submitit, also its SIGUSR2 before the time limit (then passed on to submitit: runner.TimeLimit)."""
    with contextlib.suppress(ValueError):  # not the main thread: the process's own handler stays
        signal.signal(signal.SIGTERM, runner.raise_terminated)
        if runner.time_limit_signalled():
            signal.signal(signal.SIGUSR2, runner.raise_time_limit_when(signal.getsignal(signal.SIGUSR2)))


def run_cell(cfg: DictConfig) -> None:
    usr2 = signal.getsignal(signal.SIGUSR2)
    _handle_sigterm()
    try:
        _run_cell(cfg)
    except TimeLimit as e:  # also outside a cell's stages (planning, reuse, the summary): submitit must requeue
        e.hand_over()  # once: a no-op when the cell's run handed it over already
        raise
    finally:  # after the cell, SIGUSR2 reaches submitit's handler itself (not a TimeLimit raised in Hydra's code)
        with contextlib.suppress(ValueError, TypeError):  # not the main thread; a handler not set from Python
            signal.signal(signal.SIGUSR2, usr2)


def _run_cell(cfg: DictConfig) -> None:
    job = Job.start()
    cell = _plan(cfg, job)
    if cell is None:
        return
    job.open_store(cfg)
    job.tags.update({Tag.CELL_KEY: cell.key, Tag.QUANT_KEY: cell.quant_key})
    name = _name(cfg, cell)
    if not _reuse(cfg, cell, job, name):
        _execute(cfg, cell, job, name)


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_cell(cfg)


def _end_local_jobs(grace_s: float = 90.0) -> None:
    """SIGTERM to this sweep under hydra/launcher=submitit_local: pass it on to the job processes submitit started on
    this machine (as SLURM signals every job at its time limit) and wait for them: each cell then ends its stage,
    marks its run KILLED and keeps its finished tasks, exactly as a cell signalled by itself. (Ctrl-C in a terminal
    reaches them already: they share its process group.)"""
    import psutil

    jobs = []
    for p in psutil.Process().children():
        with contextlib.suppress(psutil.Error):  # a child that just ended
            if "submitit.local._local" in " ".join(p.cmdline()):  # submitit's per-job controller
                jobs.append(p)
    for p in jobs:
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGTERM)  # it forwards the signal to the job's task process
    psutil.wait_procs(jobs, timeout=grace_s)


def cli() -> None:
    try:
        sys.argv[1:] = _config.rewrite_overrides(sys.argv[1:])
        _config.check_override_keys(sys.argv[1:])
    except QllmConfigError as e:
        print(f"[qllm] {e}", file=sys.stderr)
        raise SystemExit(2) from None
    _handle_sigterm()  # kill, timeout(1), SLURM: like Ctrl-C
    try:
        main()
    except KeyboardInterrupt as e:  # also between the cells of a sweep: its parent run is KILLED
        why = "SIGTERM" if isinstance(e, Terminated) else "Ctrl-C"
        if isinstance(e, Terminated):
            _end_local_jobs()
        with contextlib.suppress(Exception):  # the store may be unreachable: the exit status still says it
            tracking.mark_sweep_killed(why)
        raise SystemExit(128 + (signal.SIGTERM if why == "SIGTERM" else signal.SIGINT)) from None


if __name__ == "__main__":
    cli()
