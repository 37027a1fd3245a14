"""With several ranks (torchrun, accelerate, deepspeed set RANK), only the main rank writes: results, profiles,
cache entries, checkpoints. In-process, on the tiny model (the quantize stage needs a real process group:
tests/e2e/test_distributed.py runs it as 2 torchrun ranks)."""

from __future__ import annotations

import json

from qllm.planning import compose_cell
from qllm.records import CachedEval, TaskResult
from qllm.stages import evaluate
from qllm.store import cache


def _cell(data_dir, cache_dir, *overrides):
    return compose_cell([f"data_dir={data_dir}", f"cache_dir={cache_dir}", "model=tiny-random-llama",
                         "task=arc_easy_offline", "task.limit=2", *overrides])


def test_evaluate_writes_results_and_profile_on_the_main_rank_only(tmp_path, data_dir, monkeypatch):
    cell = _cell(data_dir, tmp_path / "cache", "method=none")
    per_sample = tmp_path / "per_sample.jsonl"
    per_sample.write_text(json.dumps({"task": "arc_easy_offline", "doc_id": 0, "filter": "none", "acc": 1}) + "\n")
    summary = TaskResult(lm_eval_task="arc_easy_offline", metrics={"acc_norm,none": 0.5}, num_fewshot=0,
                         n_samples={"effective": 2, "original": 2}, primary={"metric": "acc_norm", "value": 0.5},
                         score=50.0)
    cache.save_eval(cache.eval_dir(cell, "arc_easy_offline"),  # as an earlier run left it
                    CachedEval(summary=summary, task="arc_easy_offline", model_path="/m").to_dict(),
                    {"per_sample.jsonl": per_sample})
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (1, 0):
        monkeypatch.setenv("RANK", str(rank))
        out, prof = tmp_path / f"out{rank}", tmp_path / f"profile{rank}"
        result = evaluate.evaluate(cell, None, out, profile_dir=prof)
        assert result.tasks["arc_easy_offline"].score == 50.0 and result.reused_tasks == ["arc_easy_offline"]
        assert result.model_path == "/m"  # the baseline's dir, from the cached result: nothing left to load
        assert (out / "results.json").is_file() == (rank == 0)
        assert (out / "per_sample_arc_easy_offline.jsonl").is_file() == (rank == 0)  # the cached copy, too
        assert (prof / "profile_evaluate.json").is_file() == (rank == 0)
        assert (prof / "rank1" / "profile_evaluate.json").is_file() == (rank == 1)  # its peaks, for the maximum
    written = json.loads((tmp_path / "out0" / "results.json").read_text())
    assert written["tasks"]["arc_easy_offline"]["reused"] is True and "out_dir" not in written


def test_per_sample_files_and_runner_output_come_from_the_main_rank_only(tmp_path, monkeypatch):
    """Under DeepSpeed AutoTP every rank runs every request and has the task's results: one writes them."""
    records, samples = [{"doc_id": 0, "acc": 1}], {"arc_easy": [{"doc_id": 0}]}
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (1, 0):
        monkeypatch.setenv("RANK", str(rank))
        out = tmp_path / f"out{rank}"
        out.mkdir()
        evaluate._write_samples(out, "arc", records, samples)
        with evaluate._rank_out_dir(out) as runner_out:  # where a task runner (MT-Bench) writes its answers
            (runner_out / "answers_arc.jsonl").write_text("{}\n")
        names = sorted(f.name for f in out.iterdir())
        assert names == (["answers_arc.jsonl", "per_sample_arc.jsonl", "samples_arc.jsonl"] if rank == 0 else [])
        assert (runner_out == out) == (rank == 0) and not (rank and runner_out.exists())  # scratch: removed
