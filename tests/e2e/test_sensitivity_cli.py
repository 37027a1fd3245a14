"""`qllm sensitivity` as a user runs it (tiny model, a few calibration samples): the table, heatmap and summary on
disk and in one MLflow run; a second run reuses the cached table; a bad candidate is refused with the valid form."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO, mlflow_runs

ARGS = ["model=tiny-random-llama", "calibration.num_samples=8", "calibration.max_seq_len=64",
        "sensitivity.candidates=[rtn-w3g32,rtn-w8g32,gptq-w3g32]", "sensitivity.reference=gptq-w3g32",
        "sensitivity.e2e_candidate=rtn-w3g32", "sensitivity.e2e_layers=2", "sensitivity.e2e_docs=2",
        "sensitivity.e2e_doc_tokens=64"]


def _sensitivity(args, work, cache_dir, data_dir):
    env = {**os.environ, "QLLM_CACHE_DIR": str(cache_dir), "QLLM_DATA_DIR": str(data_dir)}
    cmd = [sys.executable, "-m", "qllm", "sensitivity", *args, f"tracking.uri=sqlite:///{work}/mlruns/mlflow.db",
           f"tracking.artifact_root={work}/mlruns/artifacts"]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_sensitivity_cli_writes_logs_and_reuses(tmp_path, cache_dir, data_dir):
    out = tmp_path / "out"
    proc = _sensitivity([*ARGS, "--seeds", "0,1", "--out", str(out)], tmp_path, cache_dir, data_dir)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert {"sensitivity.csv", "sensitivity.json", "sensitivity.md", "sensitivity_heatmap.png"} <= \
        {p.name for p in out.iterdir()}
    table = json.loads((out / "sensitivity.json").read_text())
    assert len(table["sqnr"]) == 14  # 2 blocks x 7 projections (lm_head ignored)
    for row in table["sqnr"].values():
        assert row["rtn-w8g32"] > row["rtn-w3g32"] and row["gptq-w3g32"] > row["rtn-w3g32"]
    assert len(table["e2e"]["rows"]) == 4 and "seed0_vs_seed1" in table["seed_spearman"]
    runs = mlflow_runs(tmp_path)
    (run,) = [r for _, r in runs.iterrows() if r["tags.qllm.kind"] == "sensitivity"]
    assert run["metrics.sensitivity/layers"] == 14

    again = _sensitivity([*ARGS, "--no-log", "--out", str(tmp_path / "again")], tmp_path, cache_dir, data_dir)
    assert again.returncode == 0 and "reusing the table" in again.stdout


def test_a_bad_candidate_is_refused_before_any_work(tmp_path, cache_dir, data_dir):
    proc = _sensitivity(["sensitivity.candidates=[awq-w4g64]", "--no-log"], tmp_path, cache_dir, data_dir)
    assert proc.returncode == 2 and "write method-w<bits>g<group>" in proc.stderr
