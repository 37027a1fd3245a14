"""Issue 5 on one cell: W4 g128 effective bits, the speed benchmark (dense speed on the hf backend), the memory
profile artifacts, MLflow system metrics; and the same figures on the real default model."""

from __future__ import annotations

import json
from pathlib import Path

from mlflow.tracking import MlflowClient

from conftest import mlflow_runs, run_qllm

SPEED = ["profile.speed=true", "profile.speed_batch_sizes=[1,4]", "profile.speed_prompt_len=32",
         "profile.speed_output_len=8", "profile.speed_repeats=2", "profile.system_metrics_interval_s=1"]


def test_w4_g128_cell_with_speed(tmp_path, cache_dir, data_dir):
    # a wider random model (hidden 128, FFN 256) so that group size 128 divides every layer
    proc = run_qllm(["model=tiny-random-llama", "model.arch.hidden_size=128", "model.arch.intermediate_size=256",
                     "method=rtn", "bits=4", "method.settings.group_size=128", "task=arc_easy_offline",
                     "task.limit=4", *SPEED], tmp_path, cache_dir, data_dir)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    run = mlflow_runs(tmp_path).iloc[0]
    # 4 bits + one fp32 scale per 128 weights = 4.25 (+ the tiny int64 weight_shape per layer)
    assert 4.25 <= run["metrics.size/bits_per_weight_quantized"] < 4.26
    assert 4 < run["metrics.size/bits_per_weight_quantized"] < 5
    for bs in (1, 4):
        for fig in ("prefill_tok_s", "decode_tok_s", "ttft_ms", "tpot_ms"):
            med, lo, hi = (run[f"metrics.speed/bs{bs}/{fig}{s}"] for s in ("", "_min", "_max"))
            assert 0 < lo <= med <= hi, (bs, fig, lo, med, hi)
    assert run["metrics.speed/bs1/prefill_tok_s"] > run["metrics.speed/bs1/decode_tok_s"]
    assert "dense" in run["tags.qllm.speed_backend"]
    assert run["metrics.mem/evaluate/benchmark/peak_rss_gb"] > 0
    art = Path(MlflowClient().download_artifacts(run["run_id"], "speed.json"))
    speed = json.loads(art.read_text())
    assert speed["settings"]["output_len"] == 8 and set(speed["per_batch"]) == {"1", "4"}
    system = [c for c in run.index if c.startswith("metrics.system/")]
    assert system and run[system].notna().any(), "MLflow system metrics missing"
