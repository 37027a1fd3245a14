"""MT-Bench through `python -m qllm.run` as users run it: answers from the evaluate stage, verdicts from a judge over
HTTP (a scripted OpenAI-compatible server on 127.0.0.1, or a local vLLM server for the real model), logged to MLflow.

Checks: single and pairwise metrics in the runs, the baseline's answers reused from the cache, the API key never
written anywhere, an unreachable judge failing the cell before any answer, an interrupted judging resumed with only
the missing verdicts, `qllm judge --run-ids` over a judge=none sweep, and the report's MT-Bench section."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import _qllm, mlflow_runs, run_qllm
from scripted_judge import ScriptedJudge, user_text

SECRET = "sk-qllm-test-secret-0123456789"
TINY = ["model=tiny-random-llama", "task=mt_bench", "task.limit=2", "task.max_new_tokens=4"]


def _scripted(url: str) -> list[str]:
    return ["judge=openai", f"judge.base_url={url}", "judge.model=scripted", "judge.api_key_env=QLLM_TEST_JUDGE_KEY",
            "judge.backoff_s=0.05"]


def _rule(messages):
    user = user_text(messages)
    if "Assistant A" in user and "Assistant B" in user:
        return "Both are poor; A is shown first. [[A]]"  # always the first shown: position bias 1, all ties
    return "Rating: [[6]]" if "[Question]" in user or "<|The Start of Assistant A's Conversation" in user else "?"


def _distinct_chats(data_dir, base_run: str, quant_run: str) -> int:
    """How many different chats the judge must see for a baseline and a quantized cell (single grading of both,
    pairwise of the quantized one): a chat asked once is answered from the verdict cache afterwards, and a quantized
    tiny model can give the baseline's very answer."""
    import mlflow

    from qllm.judge.grading import pair_judgments, single_judgments
    from qllm.tasks import mt_bench

    settings = {"questions": "mt_bench/question.jsonl", "references": "mt_bench/reference_answer/gpt-4.jsonl",
                "judge_prompts": "mt_bench/judge_prompts.jsonl"}

    def answers(run_id):
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="eval/answers_mt_bench.jsonl")
        return {r["question_id"]: r["choices"][0]["turns"] for r in mt_bench.read_jsonl(Path(path))}

    base, quant = answers(base_run), answers(quant_run)
    qs = [q for q in mt_bench.questions(str(data_dir), settings) if q["question_id"] in base]
    prompts, refs = mt_bench.judge_prompts(str(data_dir), settings), mt_bench.references(str(data_dir), settings)
    js = (single_judgments(qs, base, prompts, refs) + single_judgments(qs, quant, prompts, refs)
          + pair_judgments(qs, quant, base, prompts, refs))
    return len({json.dumps(j.messages) for j in js})


def _asked_once_each(judge: ScriptedJudge) -> bool:
    chats = [json.dumps(r["messages"]) for r in judge.requests]
    return len(chats) == len(set(chats))


def _files_containing(root, needle: bytes) -> list[str]:
    hits = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            try:
                with open(path, "rb") as fh:
                    if needle in fh.read():
                        hits.append(path)
            except OSError:
                continue
    return hits


def test_sweep_with_a_scripted_judge(tmp_path, cache_dir, data_dir, monkeypatch):
    monkeypatch.setenv("QLLM_TEST_JUDGE_KEY", SECRET)
    with ScriptedJudge(_rule) as judge:
        proc = run_qllm(["-m", "method=none,rtn", *TINY, *_scripted(judge.url)], tmp_path, cache_dir, data_dir)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "baseline answers from the cache" in out  # the none cell ran first: its answers are reused
    assert set(judge.authorizations) == {f"Bearer {SECRET}"}
    runs = mlflow_runs(tmp_path)
    cells = runs[runs["tags.qllm.kind"] == "cell"].set_index("params.method")
    base, rtn = cells.loc["none"], cells.loc["rtn"]
    # none: 2 questions x 2 turns; rtn: the same single grading, plus 4 matches x 2 orders; each chat asked once
    assert _asked_once_each(judge) and len(judge.requests) == _distinct_chats(data_dir, base["run_id"], rtn["run_id"])
    assert 4 + 8 <= len(judge.requests) <= 4 + 4 + 8
    assert base["metrics.mt_bench/n_judgments"] == rtn["metrics.mt_bench/n_judgments"] == 4
    assert base["metrics.mt_bench/score"] == 6.0 and base["metrics.mt_bench/parse_failures"] == 0
    assert base["metrics.mt_bench/turn1"] == base["metrics.mt_bench/turn2"] == 6.0
    assert "metrics.mt_bench/pairwise/win_rate_adjusted" not in base or \
        str(base["metrics.mt_bench/pairwise/win_rate_adjusted"]) == "nan"  # the baseline is not paired with itself
    assert rtn["metrics.mt_bench/pairwise/tie"] == 1.0 and rtn["metrics.mt_bench/pairwise/position_bias"] == 1.0
    assert rtn["metrics.mt_bench/pairwise/win_rate_adjusted"] == 0.5
    assert rtn["metrics.mt_bench/pairwise/first_shown_wins"] == 1.0
    assert rtn["metrics.mt_bench/writing/score"] == 6.0
    assert rtn["params.judge.host"] == judge.url.split("/")[2] and rtn["params.judge.model"] == "scripted"
    prompts = (data_dir / "mt_bench" / "judge_prompts.jsonl").read_bytes()
    assert rtn["params.judge.mt_bench.prompts_sha256"] == hashlib.sha256(prompts).hexdigest()
    assert rtn["params.judge.api_key_env"] == "QLLM_TEST_JUDGE_KEY"
    # the key: sent to the judge, written nowhere (MLflow's database and artifacts, Hydra outputs, logs, cache)
    assert SECRET not in out
    assert _files_containing(tmp_path, SECRET.encode()) == []
    assert _files_containing(cache_dir, SECRET.encode()) == []

    report = subprocess.run([sys.executable, "-m", "qllm.report", "--tracking-uri",
                             f"sqlite:///{tmp_path}/mlruns/mlflow.db", "--sweep-id", rtn["tags.qllm.sweep_id"],
                             "--out", str(tmp_path / "report"), "--no-log"], capture_output=True, text=True,
                            cwd=tmp_path, timeout=300)
    assert report.returncode == 0, report.stderr[-3000:]
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## MT-Bench: mt_bench" in md and "0.50 [" in md  # rtn's adjusted win rate with its CI
    assert "the pairwise verdict 0 of 1" in md
    assert (tmp_path / "report" / "plots" / "mt_bench_categories.png").is_file()


def test_unreachable_judge_fails_the_cell_before_any_answer(tmp_path, cache_dir, data_dir):
    with ScriptedJudge(_rule) as judge:
        url = judge.url  # closed when the block ends: nothing listens there any more
    proc = run_qllm(["method=none", *TINY, "judge=openai", f"judge.base_url={url}", "judge.model=x",
                     "judge.api_key_env=null"], tmp_path, cache_dir, data_dir)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert f"unreachable: GET {url}/models failed" in out
    assert "evaluate:" not in out  # failed at the start: no answer generated
    run = mlflow_runs(tmp_path).iloc[0]
    assert run["status"] == "FAILED" and url in run["tags.qllm.error"]


def test_interrupted_judging_resumes_with_the_missing_verdicts(tmp_path, cache_dir, data_dir, monkeypatch):
    monkeypatch.setenv("QLLM_TEST_JUDGE_KEY", SECRET)
    args = ["method=none", "model=tiny-random-llama", "task=mt_bench", "task.limit=4", "task.max_new_tokens=4",
            "judge.concurrency=1"]
    with ScriptedJudge(lambda m: "Rating: [[7]]", delay_s=0.7) as judge:
        cmd, env = _qllm([*args, *_scripted(judge.url)], tmp_path, cache_dir, data_dir)
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        deadline = time.monotonic() + 300
        while len(judge.requests) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)  # mid-judging: 8 verdicts needed, 3 asked
        first = proc.communicate(timeout=120)[0]
        assert proc.returncode == 143, first[-3000:]
        asked_first = len(judge.requests)
        assert 3 <= asked_first < 8
        rerun = run_qllm([*args, *_scripted(judge.url)], tmp_path, cache_dir, data_dir)
    out = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, out[-3000:]
    kept = int(out.split("judgments (")[1].split(" cached")[0])  # verdicts of the killed run, saved as they came
    assert asked_first - 1 <= kept <= asked_first  # the one in flight when killed may be lost
    assert len(judge.requests) - asked_first == 8 - kept  # the re-run asked only the missing ones
    assert "reusing the result" in out  # the answers came from the cache
    runs = mlflow_runs(tmp_path).sort_values("start_time")
    assert list(runs["status"]) == ["KILLED", "FINISHED"]
    assert runs.iloc[1]["metrics.mt_bench/score"] == 7.0


def test_judge_later_over_a_finished_sweep(tmp_path, cache_dir, data_dir, monkeypatch):
    monkeypatch.setenv("QLLM_TEST_JUDGE_KEY", SECRET)
    tiny3 = [*TINY[:-2], "task.limit=3", "task.max_new_tokens=4"]  # answers no other test has cached
    proc = run_qllm(["-m", "method=rtn,none", *tiny3, "judge=none"], tmp_path, cache_dir, data_dir)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert proc.stdout.count("not judged") == 2
    runs = mlflow_runs(tmp_path)
    parent = runs[runs["tags.qllm.kind"] == "sweep"].iloc[0]["run_id"]
    with ScriptedJudge(_rule) as judge:
        cmd = [sys.executable, "-m", "qllm", "judge", "--run-ids", parent, "--tracking-uri",
               f"sqlite:///{tmp_path}/mlruns/mlflow.db", *_scripted(judge.url), f"data_dir={data_dir}"]
        later = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                               env={**os.environ, "QLLM_CACHE_DIR": str(cache_dir)})
    assert later.returncode == 0, (later.stdout + later.stderr)[-3000:]
    assert "2 finished cell(s)" in later.stdout and "baseline answers from the cache" in later.stdout
    cells = mlflow_runs(tmp_path).query("`tags.qllm.kind` == 'cell'").set_index("params.method")
    # the baseline graded (6), the rtn cell graded (6) and paired with it (12): each different chat asked once
    assert _asked_once_each(judge)
    assert len(judge.requests) == _distinct_chats(data_dir, cells.loc["none", "run_id"], cells.loc["rtn", "run_id"])
    assert cells.loc["rtn", "metrics.mt_bench/pairwise/n_matches"] == 6
    assert cells.loc["none", "metrics.mt_bench/score"] == 6.0
    assert cells.loc["rtn", "metrics.mt_bench/score"] == 6.0
    assert cells.loc["rtn", "metrics.mt_bench/pairwise/tie"] == 1.0
    assert set(cells["tags.qllm.judged"]) == {"mt_bench"}
    assert SECRET not in later.stdout + later.stderr and _files_containing(tmp_path, SECRET.encode()) == []
