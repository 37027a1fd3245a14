"""The orchestrator's side of dialogue tasks (MT-Bench): the judge checked when the cell starts, the baseline's answers
found (cache, then MLflow) or generated, the judge stage run per task, its verdicts merged into the cell's results
and logged. Used by `python -m qllm.run` and by `qllm judge --run-ids` (judging finished runs later).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Optional

import mlflow

from .cell import Cell
from .judge import client, scores
from .names import Tag
from .records import EvalResult, TaskResult
from .stages import runner
from .stages.launchers.local import LocalConfig
from .store import cache

JUDGE_LAUNCH = dataclasses.asdict(LocalConfig())  # an HTTP client (and maybe a server): one local process, no timeout


def active(cell: Cell) -> bool:
    return bool(cell.dialogue_tasks) and bool(cell.judge) and cell.judge["kind"] != "none"


def check_at_start(cell: Cell) -> None:
    """A remote judge that cannot be reached (or refuses the key) fails the cell now, before any answer is made."""
    if active(cell) and cell.judge["kind"] == "remote":  # type: ignore[index]
        judge = cell.judge or {}
        client.check(judge["base_url"], client.api_key(judge))
        print(f"[qllm] judge: {judge['model']} at {client.host_of(judge['base_url'])} is reachable", flush=True)


def params(cell: Cell) -> dict[str, str]:
    """The judge's identity as MLflow params (never its key: only the variable's name)."""
    judge = cell.judge
    if not judge or not cell.dialogue_tasks:
        return {}
    out = {"judge.kind": judge["kind"], "judge.name": judge.get("name", "")}
    if judge["kind"] == "none":
        return out
    out |= {"judge.model": judge["model"], "judge.temperature": str(judge["temperature"]),
            "judge.max_tokens": str(judge["max_tokens"]), "judge.pairwise": str(judge["pairwise"]).lower()}
    if judge["kind"] == "remote":
        out |= {"judge.host": client.host_of(judge["base_url"]), "judge.api_key_env": judge.get("api_key_env") or ""}
    else:
        out |= {"judge.host": "127.0.0.1 (local server)", "judge.server": judge["server"],
                "judge.server_version": judge.get("server_version", ""), "judge.model.content": judge.get("content", "")}
    for key in cell.dialogue_tasks:
        prompts = Path(cell.data_dir) / cell.tasks[key]["settings"]["judge_prompts"]
        out[f"judge.{key}.prompts_sha256"] = hashlib.sha256(prompts.read_bytes()).hexdigest()
    return out


def answers_tags(cell: Cell) -> dict[str, str]:
    """Tags that let a later run find this cell's answers in MLflow (`eval/answers_<task>.jsonl`)."""
    return {f"{Tag.ANSWERS}.{k}": cell.task_keys[k] for k in cell.dialogue_tasks}


def _from_mlflow(experiment_id: str, key: str, task_key: str, dest: Path) -> Optional[Path]:
    runs = mlflow.search_runs(experiment_ids=[experiment_id], output_format="list", max_results=5,
                              filter_string=f"tags.`{Tag.ANSWERS}.{key}` = '{task_key}'")
    for run in runs:
        try:
            return Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                            artifact_path=f"eval/answers_{key}.jsonl",
                                                            dst_path=str(dest)))
        except Exception:  # noqa: BLE001 - artifacts gone: try the next run, else generate
            continue
    return None


def baseline_answers(cell: Cell, key: str, workdir: Path, launch: dict, port: int,
                     experiment_id: Optional[str]) -> Path:
    """The same model's method=none answers to the task: from the cache, else from an MLflow run that logged them,
    else generated now by the baseline's evaluate stage (and cached, for the baseline cell to reuse)."""
    base = cell.baseline()
    cached = cache.eval_dir(base, key) / "answers.jsonl"
    if cached.is_file():
        print(f"[qllm] judge: baseline answers from the cache ({cached.parent.name})", flush=True)
        return cached
    if experiment_id:
        found = _from_mlflow(experiment_id, key, base.task_keys[key], workdir / "baseline_answers")
        if found is not None:
            print(f"[qllm] judge: baseline answers from MLflow (task key {base.task_keys[key]})", flush=True)
            return found
    print(f"[qllm] judge: no method=none answers to {key} for {cell.model['name']} yet: generating them",
          flush=True)
    res = runner.evaluate(base, workdir / "baseline", launch, port, None)
    return Path(res.out_dir) / f"answers_{key}.jsonl"


def merge(task: TaskResult, verdicts: dict) -> None:
    """The judge's numbers into the task's result: `score` (1-10) is its primary value; it has no 0-100 score and
    stays out of suite/score_macro (as perplexity does)."""
    metrics, subtasks = scores.task_metrics(verdicts["single"], verdicts.get("pairwise"))
    task.metrics, task.subtasks = metrics, subtasks
    task.primary = {**task.primary, "value": verdicts["single"].get("score")}


def judge_tasks(cell: Cell, results: EvalResult, workdir: Path, launch: dict, port: int,
                experiment_id: Optional[str]) -> dict[str, dict]:
    """Judge every dialogue task of the cell; merge and return the verdicts per task (the run logs them)."""
    out = {}
    judge = cell.judge or {}
    for key in cell.dialogue_tasks:
        answers = Path(results.out_dir) / f"answers_{key}.jsonl"
        base = None
        if cell.quantized and judge.get("pairwise"):
            base = baseline_answers(cell, key, workdir, launch, port, experiment_id)
        verdicts = runner.judge(cell, workdir, JUDGE_LAUNCH, port, key, answers, base)
        merge(results.tasks[key], verdicts)
        out[key] = verdicts
    return out


def log(results: EvalResult, verdicts: dict[str, dict], judge_dir: Path) -> None:
    """Into the active run: the judged tasks' metrics, per-sample ratings (`eval/`) and every verdict (`judge/`)."""
    from .store import tracking

    mlflow.log_metrics({k: v for k, v in tracking.task_metrics(results).items()
                        if k.split("/", 1)[0] in verdicts})
    for key, v in verdicts.items():
        mlflow.log_artifact(str(judge_dir / f"per_sample_{key}.jsonl"), "eval")
        for name in (f"judge_{key}.json", f"judgments_{key}.jsonl"):
            mlflow.log_artifact(str(judge_dir / name), "judge")
        single, pair = v["single"], v.get("pairwise") or {}
        line = f"[qllm] judge: {key}: score {single.get('score', float('nan')):.2f} (1-10; {single['parse_failures']}" \
               f" of {single['n_judgments']} verdicts unparsed)"
        if pair:
            line += (f"; vs baseline: win {pair.get('win', 0):.2f} / tie {pair.get('tie', 0):.2f} / loss "
                     f"{pair.get('loss', 0):.2f}, adjusted win rate {pair.get('win_rate_adjusted', float('nan')):.2f}"
                     f", position bias {pair.get('position_bias', float('nan')):.2f}")
        print(line, flush=True)
    mlflow.set_tag(Tag.JUDGED, ",".join(verdicts) or "none")


def read_verdicts(judge_dir: Path, key: str) -> dict:
    return json.loads((judge_dir / f"judge_{key}.json").read_text())
