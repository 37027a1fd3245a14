"""Judge stage: one dialogue task's answers (and the baseline's, for the pairwise verdict) -> the judge's verdicts
and MT-Bench's numbers.

Runs in its own process (`python -m qllm.stages.judge --cell cell.json --task mt_bench --answers A.jsonl
[--baseline B.jsonl] --out DIR`), so that ending the stage (Ctrl-C, SIGTERM, timeout) ends the local judge server it
started as well. Verdicts already in the cache are not asked again; the server is started only when some are
missing. Writes `judge_<task>.json` (numbers), `judgments_<task>.jsonl` (every verdict with the judge's text) and
`per_sample_<task>.jsonl` (the rating per question and turn) into DIR.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path
from typing import Iterator, Optional

from ..cell import Cell, digest, judge_identity
from ..judge import client, grading, scores, server
from ..store import cache
from ..tasks import mt_bench
from . import process


def judge_key(judge: dict) -> str:
    """Whose verdicts these are: the judge's identity without `pairwise` (which says what is asked, not how it is
    answered)."""
    ident = judge_identity(judge) or {}
    return digest({k: v for k, v in ident.items() if k != "pairwise"})


@contextlib.contextmanager
def endpoint(judge: dict, log: Path) -> Iterator[tuple[str, str]]:
    """(base_url, model name) of the judge: the remote endpoint, or a local server for as long as it is needed."""
    if judge["kind"] == "remote":
        yield judge["base_url"], judge["model"]
        return
    from .runner import free_port

    with server.serving(judge, free_port(), log) as (url, model):
        yield url, model


def _answers(path: Path) -> dict[int, list[str]]:
    return {r["question_id"]: r["choices"][0]["turns"] for r in mt_bench.read_jsonl(path)}


def judge_task(cell: Cell, task: str, answers_file: Path, baseline_file: Optional[Path], out: Path) -> dict:
    judge, entry = cell.judge or {}, cell.tasks[task]
    settings = entry["settings"]
    answers = _answers(answers_file)
    qs = [q for q in mt_bench.questions(cell.data_dir, settings) if q["question_id"] in answers]
    prompts, refs = mt_bench.judge_prompts(cell.data_dir, settings), mt_bench.references(cell.data_dir, settings)
    js = grading.single_judgments(qs, answers, prompts, refs)
    if baseline_file is not None:
        js += grading.pair_judgments(qs, answers, _answers(baseline_file), prompts, refs)
    key = judge_key(judge)
    store = cache.judgments_dir(cell.cache_dir, key)
    done = grading.load_cached(js, store, key)
    todo = [i for i in range(len(js)) if i not in done]
    asked = len({js[i].key(key) for i in todo})  # a chat sent twice (equal answers) is asked once
    print(f"[qllm] judge: {task}: {len(js)} judgments ({len(done)} cached, {asked} to ask) by "
          f"{judge['model']} ({judge['kind']}{', ' + judge['server'] if judge['kind'] == 'local' else ''})",
          flush=True)
    t = time.perf_counter()
    if todo:
        with endpoint(judge, out / "judge_server.log") as (url, model):
            chat = client.Client.for_judge(judge, url, model).chat
            constrain = bool(judge.get("constrain_verdict"))

            def ask(j: grading.Judgment) -> str:
                return chat(j.messages, grading.constraint(j, constrain))

            new = grading.run([js[i] for i in todo], ask, store, key, judge["concurrency"])
        done |= {todo[i]: rec for i, rec in new.items()}
    records = [done[i] for i in range(len(js))]
    single = scores.single(records, judge["bootstrap_iters"], judge["seed"])
    pair = scores.pairwise(records, judge["bootstrap_iters"], judge["seed"]) if baseline_file else None
    result = {"task": task, "single": single, "pairwise": pair, "judge_key": key, "asked": asked,
              "cached": len(js) - len(todo), "wall_s": round(time.perf_counter() - t, 2)}
    if process.is_main():
        (out / f"judge_{task}.json").write_text(json.dumps(result, indent=2))
        mt_bench.write_jsonl(out / f"judgments_{task}.jsonl", records)
        mt_bench.write_jsonl(out / f"per_sample_{task}.jsonl", scores.per_sample(records, task))
    return result


def main() -> None:
    p = argparse.ArgumentParser(description="qllm judge stage")
    p.add_argument("--cell", required=True, type=Path)
    p.add_argument("--task", required=True, help="the dialogue task (its key in the cell)")
    p.add_argument("--answers", required=True, type=Path, help="the cell's answers (FastChat model_answer jsonl)")
    p.add_argument("--baseline", type=Path, default=None, help="the method=none answers: pairwise verdicts too")
    p.add_argument("--out", required=True, type=Path)
    a = p.parse_args()
    process.start("judge")
    a.out.mkdir(parents=True, exist_ok=True)
    judge_task(Cell.from_json(a.cell.read_text()), a.task, a.answers, a.baseline, a.out)


if __name__ == "__main__":
    main()
