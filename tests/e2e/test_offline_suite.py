"""`task=offline` runs every offline twin end to end (tiny random model: pipeline only) and logs all of it."""

from __future__ import annotations

import json

from mlflow.tracking import MlflowClient

from conftest import mlflow_runs, run_qllm

TWINS = ["arc_easy_offline", "arc_challenge_offline", "hellaswag_offline", "winogrande_offline", "mmlu_offline",
         "truthfulqa_mc1_offline", "truthfulqa_mc2_offline", "gsm8k_offline", "ifeval_offline", "wikitext_offline"]


def test_offline_suite_on_tiny_model(tmp_path, cache_dir, data_dir):
    proc = run_qllm(["model=tiny-random-llama", "method=none", "task=offline", "task.limit=1", "task.max_gen_toks=32"],
                    tmp_path, cache_dir, data_dir)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    (run,) = [r for _, r in mlflow_runs(tmp_path).iterrows()]
    assert run["tags.qllm.status"] == "finished"
    for key in TWINS:
        expected = 57 if key == "mmlu_offline" else 1  # limit applies per MMLU subject
        assert run[f"metrics.{key}/n_samples"] == expected, key
        assert run[f"params.{key}.type"] and run[f"params.{key}.num_fewshot"] is not None
        if key != "wikitext_offline":
            assert 0 <= run[f"metrics.{key}/score"] <= 100, key
    assert run["params.gsm8k_offline.num_fewshot"] == "5" and run["params.mmlu_offline.num_fewshot"] == "5"
    assert run["metrics.mmlu_offline/mmlu_offline_anatomy/acc"] in (0.0, 1.0)  # per-subject scores
    assert 0 <= run["metrics.suite/score_macro"] <= 100 and run["metrics.suite/n_tasks_scored"] == 9
    assert run["metrics.arc_challenge_offline/difficulty/challenge/acc_norm"] >= 0
    # per-sample correctness for every twin, GSM8K labelled by reasoning steps
    client = MlflowClient()
    names = {a.path for a in client.list_artifacts(run["run_id"], "eval")}
    assert {f"eval/per_sample_{k}.jsonl" for k in TWINS} <= names
    path = client.download_artifacts(run["run_id"], "eval/per_sample_gsm8k_offline.jsonl", str(tmp_path))
    rows = [json.loads(line) for line in open(path)]
    assert {r["filter"] for r in rows} == {"strict-match", "flexible-extract"}
    assert all(isinstance(r["difficulty"], int) and r["difficulty"] >= 1 for r in rows)
