"""The orchestrator's side of dialogue tasks (MT-Bench): the judge checked when the cell starts, the baseline's answers
found (cache, then MLflow) or generated, the judge stage run per task, its verdicts merged into the cell's results
and logged. Used by `python -m qllm.run` and by `qllm judge --run-ids` (judging finished runs later).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
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
                "judge.constrain_verdict": str(bool(judge.get("constrain_verdict"))).lower(),
                "judge.server_version": judge.get("server_version", ""),
                "judge.model.content": judge.get("content", "")}
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


def log(cell: Cell, results: EvalResult, verdicts: dict[str, dict], judge_dir: Path) -> None:
    """Into the active run: the judged tasks' metrics, per-sample ratings (`eval/`) and every verdict (`judge/`)."""
    from .cell import judge_identity
    from .store import tracking

    mlflow.log_metrics({name: value for key in verdicts
                        for name, value in tracking.result_metrics(key, results.tasks[key]).items()})
    for key, v in verdicts.items():
        mlflow.log_artifact(str(judge_dir / f"per_sample_{key}.jsonl"), "eval")
        for name in (f"judge_{key}.json", f"judgments_{key}.jsonl"):
            mlflow.log_artifact(str(judge_dir / name), "judge")
        single, pair = v["single"], v.get("pairwise") or {}
        score = f"score {single['score']:.2f} (1-10)" if "score" in single else "no rating could be parsed"
        line = f"[qllm] judge: {key}: {score}; {single['parse_failures']} of {single['n_judgments']} verdicts unparsed"
        if pair and pair["n_matches"]:
            line += (f"; vs baseline: win {pair['win']:.2f} / tie {pair['tie']:.2f} / loss {pair['loss']:.2f}, "
                     f"adjusted win rate {pair['win_rate_adjusted']:.2f}, position bias {pair['position_bias']:.2f}"
                     f" ({pair['errors']} of {pair['n_matches'] + pair['errors']} matches unparsed)")
        elif pair:
            line += f"; vs baseline: all {pair['errors']} matches unparsed"
        print(line, flush=True)
    if (judge_dir / "judge_server.log").is_file():
        mlflow.log_artifact(str(judge_dir / "judge_server.log"), "logs")
    mlflow.set_tags({Tag.JUDGED: ",".join(verdicts) or "none",
                     Tag.JUDGE_IDENTITY: json.dumps(judge_identity(cell.judge), sort_keys=True)})


def read_verdicts(judge_dir: Path, key: str) -> dict:
    return json.loads((judge_dir / f"judge_{key}.json").read_text())


# ---- `qllm judge --run-ids ...`: judging finished runs (judge=none, or answers judged by nobody yet) ----


def _judge_run(run_id: str, judge_cfg: dict, launch: dict, data_dir: str, experiment_id: str, force: bool) -> None:
    import dataclasses as dc
    import tempfile

    from .errors import QllmConfigError
    from .judge import planning as judges
    from .stages.runner import free_port

    run = mlflow.get_run(run_id)
    cell = Cell.from_json(Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="cell.json"))
                          .read_text())
    if not cell.dialogue_tasks:
        print(f"[qllm judge] {run_id} ({run.info.run_name}): no dialogue task; nothing to judge", flush=True)
        return
    if not Path(cell.data_dir, "mt_bench").is_dir():  # the run was made on another machine
        cell = dc.replace(cell, data_dir=data_dir)
    judge = judges.plan(judge_cfg, cell.tasks, cell.data_dir)
    if judge["kind"] == "none":
        raise QllmConfigError("qllm judge needs a judge: judge=openai (or another endpoint) or judge=local "
                              "judge.model=<dir>")
    judged_by = run.data.tags.get(Tag.JUDGE_IDENTITY)
    from .cell import judge_identity

    ident = json.dumps(judge_identity(judge), sort_keys=True)
    if judged_by and judged_by != ident and not force:
        raise QllmConfigError(f"run {run_id} was judged by another judge ({judged_by}); --force records this "
                              "judge's verdicts over them (or run the cell again with this judge: its answers and "
                              "verdicts are cached)")
    cell = dc.replace(cell, judge=judge)
    check_at_start(cell)
    workdir = Path(tempfile.mkdtemp(prefix=f"qllm-judge-{run_id[:8]}-"))
    results = EvalResult(tasks={k: TaskResult(lm_eval_task=k, primary={"metric": cell.tasks[k]["metric"]})
                                for k in cell.dialogue_tasks}, out_dir=str(workdir / "eval"))
    (workdir / "eval").mkdir()
    for key in cell.dialogue_tasks:
        got = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"eval/answers_{key}.jsonl",
                                                  dst_path=str(workdir / "downloaded"))
        shutil.copyfile(got, workdir / "eval" / f"answers_{key}.jsonl")
    print(f"[qllm judge] {run_id} ({run.info.run_name}): judging {', '.join(cell.dialogue_tasks)} with "
          f"{judge['model']} ...", flush=True)
    verdicts = judge_tasks(cell, results, workdir, launch, free_port(), experiment_id)
    with mlflow.start_run(run_id=run_id):
        log(cell, results, verdicts, workdir / "judge")
        mlflow.log_dict({**params(cell), "judged_later": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
                        "judge/judge_params.json")
    print(f"[qllm judge] {run_id}: verdicts logged to the run", flush=True)


def _cells_of(run_ids: list[str], experiment_id: str) -> list[str]:
    """The runs to judge: a sweep's parent run stands for its finished cells (baselines first)."""
    from .names import Kind, Status

    out: list[str] = []
    for run_id in run_ids:
        run = mlflow.get_run(run_id)
        if run.data.tags.get(Tag.KIND) != Kind.SWEEP.value:
            out.append(run_id)
            continue
        children = mlflow.search_runs(experiment_ids=[experiment_id], output_format="list",
                                      filter_string=f"tags.`{Tag.PARENT_RUN_ID}` = '{run_id}'")
        cells = [c for c in children if c.data.tags.get(Tag.KIND) == Kind.CELL.value
                 and c.data.tags.get(Tag.STATUS) == Status.FINISHED.value]
        print(f"[qllm judge] sweep {run_id}: {len(cells)} finished cell(s)", flush=True)
        out += [c.info.run_id for c in sorted(cells, key=lambda c: c.data.params.get("method") != "none")]
    return out


def main(argv: Optional[list[str]] = None) -> int:
    """`qllm judge --run-ids A [B ...] [judge overrides]`: judge the dialogue answers of finished runs and log the
    verdicts into them (a quantized run is also judged against its model's method=none answers)."""
    import argparse
    import sys

    from omegaconf import OmegaConf

    from .planning import compose_config
    from .report.select import default_uri

    p = argparse.ArgumentParser(prog="qllm judge", description=main.__doc__,
                                epilog="overrides: the judge (and data_dir), as for qllm run: judge=openai, "
                                       "judge=local judge.model=<dir>, judge.base_url=..., judge.model=...")
    p.add_argument("--run-ids", nargs="+", required=True, help="cell runs, or a sweep's parent run (its cells)")
    p.add_argument("--tracking-uri", default=None, help="default: the local store (mlruns/ here)")
    p.add_argument("--experiment", default="qllm")
    p.add_argument("--force", action="store_true", help="judge runs already judged by another judge")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    try:
        cfg = OmegaConf.to_container(compose_config(a.overrides), resolve=True)
    except Exception as e:  # noqa: BLE001 - Hydra's own message names the bad override
        print(f"[qllm judge] {e}", file=sys.stderr)
        return 2
    assert isinstance(cfg, dict)
    mlflow.set_tracking_uri(a.tracking_uri or default_uri())
    experiment = mlflow.get_experiment_by_name(a.experiment)
    if experiment is None:
        print(f"[qllm judge] no experiment {a.experiment!r} in {mlflow.get_tracking_uri()}", file=sys.stderr)
        return 2
    failed = 0
    for run_id in _cells_of(a.run_ids, experiment.experiment_id):
        try:
            _judge_run(run_id, cfg["judge"], cfg["launch"]["evaluate"], cfg["data_dir"], experiment.experiment_id,
                       a.force)
        except Exception as e:  # noqa: BLE001 - one run that cannot be judged must not stop the others
            print(f"[qllm judge] {run_id}: {e}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0
