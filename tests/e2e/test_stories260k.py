"""Model sources through the real CLI: the llama2.c stories260K model (converted from data_dir) is quantized and
evaluated like any other; its per-channel 2-bit grid is what lm-eval evaluated."""

from __future__ import annotations

import json

from conftest import mlflow_runs, run_qllm


def test_stories260k_cell_end_to_end(tmp_path, cache_dir, data_dir):
    args = ["model=stories260k", "task=arc_easy_offline", "task.limit=8"]
    for extra in (["method=none"], ["method=rtn", "bits=2"]):
        proc = run_qllm([*args, *extra], tmp_path, cache_dir, data_dir, timeout=300)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    runs = mlflow_runs(tmp_path).set_index("params.method")
    assert (runs["tags.qllm.status"] == "finished").all() and len(runs) == 2
    assert (runs["metrics.arc_easy_offline/n_samples"] == 8).all()
    base, w2 = (json.loads(runs.loc[m, "tags.qllm.evaluated_weights"]) for m in ("none", "rtn"))
    assert w2["group_size"] is None and w2["group_width"] == 172  # per-channel: FFN width 172 has no group size
    assert w2["max_distinct_per_group"] <= 4 < base["max_distinct_per_group"]
    assert runs.loc["rtn", "params.scheme"] == "W2A16 int per-channel sym"
