"""Reading the cells a report covers out of the MLflow store: selection, filters, de-duplication, baselines and
per-sample files.

A cell is a run tagged `qllm.kind=cell`. The same cell (tag `qllm.cell_key`) may appear several times: finished once,
reused by later sweeps (a copy of the metrics, tag `qllm.reused_run_id`), skipped as a duplicate in one sweep; one
row per cell key is kept, preferring finished, then reused, failed, killed, skipped.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from ..names import Kind, Status, Tag, backend_label, metric_name
from ..store import mlflow_store

STATUS_ORDER = tuple(s.value for s in (Status.FINISHED, Status.REUSED, Status.FAILED, Status.KILLED, Status.RUNNING,
                                        Status.LOST, Status.SKIPPED))
EVALUATED = (Status.FINISHED.value, Status.REUSED.value)
LOWER_IS_BETTER = ("perplexity", "bits_per_byte")
# task settings a baseline must share with a quantized cell to be compared with it
TASK_SETTINGS = ("limit", "num_fewshot", "max_doc_tokens", "max_gen_toks")


def default_uri() -> str:
    """The local store, as conf/tracking/local.yaml writes it from the current directory."""
    return f"sqlite:///{Path.cwd()}/mlruns/mlflow.db"


@dataclass
class TaskSpec:
    key: str
    type: str
    metric: str  # lm-eval name, e.g. "acc_norm" or "exact_match,strict-match"
    settings: tuple  # (limit, shots, caps..., chat template): what a baseline must share

    @property
    def metric_key(self) -> str:
        return metric_name(self.metric)

    @property
    def higher_is_better(self) -> bool:
        return self.type != "perplexity" and not any(w in self.metric for w in LOWER_IS_BETTER)

    @property
    def sample_field(self) -> tuple[str, str]:
        """(field, filter) of this metric in the per-sample records."""
        name, _, filt = self.metric.partition(",")
        return name, filt or "none"


@dataclass
class CellRun:
    run_id: str
    name: str
    status: str  # qllm.status, or running / lost for a run that never said
    run_status: str  # MLflow's: FINISHED, FAILED, KILLED, RUNNING
    model: str
    method: str
    bits: str  # "4", "8", "none" (baseline)
    suite: str
    tasks: dict[str, TaskSpec]
    metrics: dict[str, float]
    params: dict[str, str]
    tags: dict[str, str]
    start_time: int
    duplicates: list[str] = field(default_factory=list)  # run ids of the same cell dropped by de-duplication

    @property
    def is_baseline(self) -> bool:
        return self.method == "none"

    @property
    def source_run_id(self) -> str:
        """The run that evaluated this cell (the earlier run for a reused cell): where its artifacts are."""
        return self.tags.get(Tag.REUSED_RUN_ID) or self.run_id

    @property
    def sweep_id(self) -> str:
        return self.tags.get(Tag.SWEEP_ID, "")

    @property
    def cell_key(self) -> str:
        return self.tags.get(Tag.CELL_KEY, "")

    @property
    def label(self) -> str:
        """"gptq · w4" or "none · float32" (as in the run name, without the model and the task)."""
        return f"{self.method} · {self.weights_label}{self.backend_label}"

    @property
    def weights_label(self) -> str:
        """"w4", the baseline's dtype, or a mixed cell's budget and the candidates it used ("≤4.5b w4ch/w4g64/w8g64":
        two mixed cells of one budget differ by their candidates, and `bits` only labels them)."""
        if self.is_baseline or self.bits in ("", "none"):
            return self.params.get("model.dtype", "base")
        if self.method == "mixed" and "mixed/target_bits" in self.metrics:
            used = sorted(k.removeprefix("mixed/layers/").removeprefix("gptq-") for k, v in self.metrics.items()
                          if k.startswith("mixed/layers/") and v > 0)
            return f"≤{self.metrics['mixed/target_bits']:g}b {'/'.join(used)}"
        return f"w{self.bits}"

    @property
    def backend_label(self) -> str:
        return backend_label(self.params.get("eval.backend", "hf"), self.params.get("eval.cpu_int4_w4a8") == "True")

    @property
    def full_label(self) -> str:
        return f"{self.model} · {self.label}"

    @property
    def note(self) -> str:
        text = {"failed": self.tags.get(Tag.ERROR, ""), "skipped": self.tags.get(Tag.SKIP_REASON, ""),
                "reused": f"metrics of run {self.tags.get(Tag.REUSED_RUN_ID, '?')}",
                "lost": "no qllm.status: the job died without reporting",
                "killed": "interrupted (Ctrl-C or a kill)"}.get(self.status, "")
        text = text.strip()
        return text.splitlines()[0][:200] if text else ""

    @property
    def baseline_bits(self) -> float:
        """The bits of the unquantized weights (the model's dtype), for plots: 32 for float32, else 16."""
        bpw = self.metrics.get("size/bits_per_weight")
        if bpw and math.isfinite(bpw):
            return float(round(bpw))
        return 32.0 if "32" in self.params.get("model.dtype", "") else 16.0

    @property
    def bits_value(self) -> Optional[float]:
        try:
            return float(self.bits)
        except ValueError:
            return None


def task_specs(params: dict[str, str], tags: Optional[dict[str, str]] = None) -> dict[str, TaskSpec]:
    keys = [k for k in params.get("tasks", "").split(",") if k]
    chat = params.get("eval.apply_chat_template", "False")
    backend = params.get("eval.backend", "hf")  # a baseline is compared on its own backend (the last setting)
    judge = (tags or {}).get(Tag.JUDGE_IDENTITY, "")  # a dialogue task's baseline: rated by the same judge

    def settings(k: str) -> tuple:
        base = tuple(params.get(f"{k}.{s}", "") for s in TASK_SETTINGS) + (chat, backend)
        return base + (judge,) if params.get(f"{k}.type") == "dialogue" else base

    return {k: TaskSpec(k, params.get(f"{k}.type", ""), params.get(f"{k}.metric", ""), settings(k)) for k in keys}


def cell_from_run(run: Run) -> CellRun:
    tags, params = dict(run.data.tags), dict(run.data.params)
    status = tags.get(Tag.STATUS) or (Status.RUNNING.value if run.info.status == "RUNNING" else Status.LOST.value)
    return CellRun(run_id=run.info.run_id, name=run.info.run_name or "", status=status, run_status=run.info.status,
                   model=params.get("model", "?"), method=params.get("method", "?"), bits=params.get("bits", "none"),
                   suite=params.get("task", ""), tasks=task_specs(params, tags), metrics=dict(run.data.metrics),
                   params=params, tags=tags, start_time=run.info.start_time or 0)


class Store:
    """The MLflow store a report reads (and logs to)."""

    def __init__(self, tracking_uri: Optional[str] = None, experiment: str = "qllm"):
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per per-sample file
        self.display_uri = tracking_uri or default_uri()
        db = mlflow_store.sqlite_path(self.display_uri)
        if db is not None and not db.exists():  # MLflow would create an empty store there
            raise SystemExit(f"[qllm report] no MLflow store at {db} (run from the repo root, or --tracking-uri)")
        self.uri = mlflow_store.tracking_uri(self.display_uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            raise SystemExit(f"[qllm report] no experiment {experiment!r} in {tracking_uri or default_uri()}")
        self.experiment_id = exp.experiment_id
        self._tmp = tempfile.TemporaryDirectory(prefix="qllm-report-")
        self._samples: dict[tuple[str, str], Optional[list[dict]]] = {}

    def search(self, filter_string: str) -> list[Run]:
        runs, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id], filter_string=filter_string, max_results=5000,
                                           page_token=token, order_by=["attributes.start_time ASC"])
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def cells(self, sweep_ids: Iterable[str] = (), run_ids: Iterable[str] = ()) -> list[CellRun]:
        """The cell runs of the sweeps and run ids given (a sweep's parent run id stands for its cells), or of the
        whole experiment when neither is given."""
        sweep_ids, run_ids = list(sweep_ids), list(run_ids)
        if not sweep_ids and not run_ids:
            return [cell_from_run(r) for r in self.search(f"tags.`{Tag.KIND}` = '{Kind.CELL}'")]
        found: dict[str, Run] = {}
        for s in sweep_ids:
            for r in self.search(f"tags.`{Tag.KIND}` = '{Kind.CELL}' and tags.`{Tag.SWEEP_ID}` = '{s}'"):
                found[r.info.run_id] = r
        for rid in run_ids:
            run = self.client.get_run(rid)
            kind = run.data.tags.get(Tag.KIND, Kind.CELL.value)
            if kind == "sweep":
                for r in self.search(f"tags.`{Tag.PARENT_RUN_ID}` = '{rid}' and tags.`{Tag.KIND}` = '{Kind.CELL}'"):
                    found[r.info.run_id] = r
            elif kind == "cell":
                found[rid] = run
        return [cell_from_run(r) for r in sorted(found.values(), key=lambda r: r.info.start_time or 0)]

    def baselines(self, model: str) -> list[CellRun]:
        """Every finished baseline run (method=none) of a model in the experiment, latest first."""
        runs = self.search(f"tags.`{Tag.KIND}` = '{Kind.CELL}' and params.model = '{model}' and params.method = 'none' "
                           f"and tags.`{Tag.STATUS}` = '{Status.FINISHED}'")
        return [cell_from_run(r) for r in sorted(runs, key=lambda r: -(r.info.start_time or 0))]

    def sweep_parent(self, sweep_id: str) -> Optional[Run]:
        runs = self.search(f"tags.`{Tag.KIND}` = '{Kind.SWEEP}' and tags.`{Tag.SWEEP_ID}` = '{sweep_id}'")
        return runs[-1] if runs else None

    def per_sample(self, run_id: str, task: str) -> Optional[list[dict]]:
        """The per-sample records (eval/per_sample_<task>.jsonl) of a run, None when it has none."""
        key = (run_id, task)
        if key not in self._samples:
            try:
                path = self.client.download_artifacts(run_id, f"eval/per_sample_{task}.jsonl",
                                                      str(Path(self._tmp.name) / run_id))
                with open(path) as f:
                    self._samples[key] = [json.loads(line) for line in f if line.strip()]
            except Exception:  # noqa: BLE001 - no such artifact (or an unreadable one): no paired test
                self._samples[key] = None
        return self._samples[key]

    def close(self) -> None:
        self._tmp.cleanup()


def _as_list(values: Optional[Iterable[str]]) -> list[str]:
    """Repeatable options that also take comma lists: ["a,b", "c"] -> ["a", "b", "c"]."""
    return [v.strip() for item in (values or []) for v in str(item).split(",") if v.strip()]


def apply_filters(cells: list[CellRun], models=None, methods=None, bits=None, tasks=None) -> tuple[list[CellRun],
                                                                                                   Optional[set]]:
    """Cells matching every filter, and the task keys to report (None: all). A --task value is a suite name (the
    `task` param: all of its tasks) or a task key (cells that ran it; only that task is reported)."""
    models, methods, bits, tasks = map(_as_list, (models, methods, bits, tasks))
    out = []
    keep_tasks: Optional[set] = set() if tasks else None
    for c in cells:
        if models and c.model not in models:
            continue
        if methods and c.method not in methods:
            continue
        if bits and c.bits not in bits and not (c.is_baseline and ("none" in bits or "base" in bits)):
            continue
        if tasks:
            if c.suite in tasks:
                keep_tasks |= set(c.tasks)
            elif set(c.tasks) & set(tasks):
                keep_tasks |= set(c.tasks) & set(tasks)
            else:
                continue
        out.append(c)
    return out, keep_tasks


def dedupe(cells: list[CellRun]) -> list[CellRun]:
    """One cell per cell key (finished > reused > failed > killed > running > lost > skipped; the latest among
    equals). Cells without a key (invalid configurations, skipped before planning) are all kept."""
    rank = {s: i for i, s in enumerate(STATUS_ORDER)}
    best: dict[str, CellRun] = {}
    out: list[CellRun] = []
    for c in cells:
        if not c.cell_key:
            out.append(c)
            continue
        cur = best.get(c.cell_key)
        if cur is None:
            best[c.cell_key] = c
            continue
        better = (rank.get(c.status, 99), -c.start_time) < (rank.get(cur.status, 99), -cur.start_time)
        keep, drop = (c, cur) if better else (cur, c)
        keep.duplicates.extend([drop.run_id, *drop.duplicates])
        drop.duplicates = []
        best[c.cell_key] = keep
    return sorted(out + list(best.values()), key=lambda c: c.start_time)
