"""Sweeps that survive: one quantization per checkpoint, failure isolation, resume, Ctrl-C, a corrupt cache.

Real processes (the CLI as users start it), a real MLflow store and cache, the tiny random model.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import mlflow_runs, none_alive, run_qllm, signal_when, start_qllm

TINY = ["model=tiny-random-llama", "method=rtn", "bits=4", "task.limit=3"]


def _broken_task_conf(root: Path) -> Path:
    """A task whose data file is corrupt: it plans fine (the file exists) and fails inside lm-eval/datasets."""
    bad = root / "broken.jsonl"
    bad.write_text('{"query": "Question: 1+1?", "choices": ["1", "2"], "gold": 1}\n{"query": "unterminated\n')
    (root / "conf" / "task").mkdir(parents=True)
    (root / "conf" / "task" / "broken_arc.yaml").write_text(json.dumps({
        "name": "broken_arc",
        "tasks": {"broken_arc": {
            "type": "commonsense", "metric": "acc", "data_files": [str(bad)],
            "lm_eval": {"task": "broken_arc", "dataset_path": "json",
                        "dataset_kwargs": {"data_files": {"test": str(bad)}}, "test_split": "test",
                        "output_type": "multiple_choice", "doc_to_text": "{{query}}\nAnswer:",
                        "doc_to_target": "{{gold}}", "doc_to_choice": "{{choices}}",
                        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]},
        }},
    }))
    return root / "conf"


@pytest.fixture(scope="module")
def failing_sweep(tmp_path_factory, data_dir):
    """3 tasks × 1 quantized cell, the middle task broken, on a fresh cache."""
    work, cache = tmp_path_factory.mktemp("failing"), tmp_path_factory.mktemp("cache")
    conf = _broken_task_conf(work)
    proc = run_qllm(["-m", *TINY, "task=arc_easy_offline,broken_arc,wikitext_offline",
                     f"hydra.searchpath=[file://{conf}]"], work, cache, data_dir)
    return proc, mlflow_runs(work), cache, work


def test_three_tasks_quantize_once(failing_sweep):
    proc, runs, cache, work = failing_sweep
    cells = runs[runs["tags.qllm.kind"] == "cell"]
    assert cells["tags.qllm.quant_key"].nunique() == 1
    checkpoints = [p for p in (cache / "quantized").iterdir() if not p.name.startswith(".")]
    assert len(checkpoints) == 1 and (checkpoints[0] / "qllm_manifest.json").is_file()
    logs = [p.read_text() for p in (work / "outputs" / "sweep").glob("*/stages/quantize.log")]
    assert len(logs) == 3  # every cell ran the stage ...
    assert sum("reusing cached checkpoint" in log for log in logs) == 2  # ... and two found the first one's checkpoint
    assert sorted(cells["tags.qllm.quantize_reused"]) == ["false", "true", "true"]


def test_failing_cell_is_recorded_and_the_sweep_goes_on(failing_sweep):
    proc, runs, _, _ = failing_sweep
    assert proc.returncode != 0  # a failed cell makes the sweep exit non-zero ...
    assert "1 cell(s) failed" in proc.stderr + proc.stdout
    cells = runs[runs["tags.qllm.kind"] == "cell"].set_index("params.task")
    assert cells.loc["arc_easy_offline", "tags.qllm.status"] == "finished"  # ... after finishing the others
    assert cells.loc["wikitext_offline", "tags.qllm.status"] == "finished"
    assert cells.loc["broken_arc", "tags.qllm.status"] == "failed" and cells.loc["broken_arc", "status"] == "FAILED"
    assert "evaluate stage failed" in cells.loc["broken_arc", "tags.qllm.error"]
    error = Path(MlflowClient().download_artifacts(cells.loc["broken_arc", "run_id"], "error.txt")).read_text()
    # the orchestrator's traceback and the stage process's own (where the data file broke)
    assert error.count("Traceback (most recent call last)") >= 2 and "traceback of the evaluate stage" in error
    assert "broken.jsonl" in error or "JSON" in error
    parent = runs[runs["tags.qllm.kind"] == "sweep"].iloc[0]
    assert parent["status"] == "FAILED"
    assert parent["metrics.cells_finished"] == 2 and parent["metrics.cells_failed"] == 1


def test_corrupt_checkpoint_is_never_reused(failing_sweep, data_dir):
    """A checkpoint whose file no longer matches its manifest is moved aside and made again."""
    _, _, cache, work = failing_sweep
    ckpt = next(p for p in (cache / "quantized").iterdir() if not p.name.startswith("."))
    weights = ckpt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-8] ^= 0xFF  # one flipped byte, same size: only the sha256 can tell
    weights.write_bytes(bytes(data))
    proc = run_qllm([*TINY, "task=winogrande_offline"], work, cache, data_dir)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "failed its integrity check" in proc.stdout and "does not match its sha256" in proc.stdout
    assert bytes(data) != weights.read_bytes()  # quantized again ...
    cli = [sys.executable, "-m", "qllm.cache", "--cache-dir", str(cache)]
    assert subprocess.run([*cli, "verify"], capture_output=True).returncode == 0  # ... and whole
    quarantined = [p for p in (cache / "quantized").iterdir() if ".corrupt-" in p.name]
    assert len(quarantined) == 1
    gc = subprocess.run([*cli, "gc"], capture_output=True, text=True)
    assert gc.returncode == 0 and quarantined[0].name in gc.stdout and not quarantined[0].exists()
    assert ckpt.exists()


def test_ctrl_c_marks_killed_and_resumes_with_missing_tasks(tmp_path, cache_dir, data_dir):
    """Ctrl-C during the second task: the run is KILLED, no stage process is left, and a re-run evaluates only the
    task that had not finished."""
    args = ["model=tiny-random-llama", "method=none", "task=quick", "task.tasks.arc_easy_offline.limit=5",
            "task.tasks.wikitext_offline.limit=40", "task.tasks.wikitext_offline.max_doc_tokens=2048", "seed=11"]
    proc = start_qllm(args, tmp_path, cache_dir, data_dir)
    out, stage, commands = signal_when(proc, "[qllm] evaluate: wikitext_offline", signal.SIGINT)
    assert proc.returncode == 128 + signal.SIGINT, out[-3000:]
    assert "qllm.stages.evaluate" in commands
    assert none_alive(stage), "stage left running"
    killed = mlflow_runs(tmp_path)
    assert list(killed["status"]) == ["KILLED"] and list(killed["tags.qllm.status"]) == ["killed"]

    again = run_qllm(args, tmp_path, cache_dir, data_dir)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert "arc_easy_offline: reusing the result" in again.stdout
    assert "[qllm] evaluate: arc_easy_offline (" not in again.stdout
    assert "[qllm] evaluate: wikitext_offline (" in again.stdout
    runs = mlflow_runs(tmp_path)
    done = runs[runs["tags.qllm.status"] == "finished"]
    assert len(done) == 1 and done.iloc[0]["tags.qllm.eval_reused_tasks"] == "arc_easy_offline"
    assert done.iloc[0]["metrics.arc_easy_offline/n_samples"] == 5
    assert done.iloc[0]["metrics.wikitext_offline/n_samples"] == 40
