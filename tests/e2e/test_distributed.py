"""Stages as several ranks on this CPU (gloo): llmcompressor's distributed GPTQ under torchrun gives the same
checkpoint as one process, and lm-eval's data parallelism under accelerate the same per-item results; every rank's
peak memory is logged with the maximum, and the stage's exact command is kept as launch_<stage>.sh."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file

from conftest import mlflow_runs, run_qllm
from qllm.planning import compose_cell
from qllm.store import cache

GPTQ = ["model=tiny-random-llama", "method=gptq", "calibration.num_samples=15", "calibration.max_seq_len=128",
        "task=arc_easy_offline", "task.limit=2"]


def _tensors(checkpoint: Path) -> dict:
    out = {}
    for f in sorted(checkpoint.glob("*.safetensors")):
        out |= load_file(f)
    return out


def test_torchrun_gptq_equals_one_process(tmp_path, data_dir):
    checkpoints = {}
    for launch in ("local", "torchrun"):
        work, cache_dir = tmp_path / launch, tmp_path / f"cache-{launch}"  # own caches: launch is not in the key
        work.mkdir()
        proc = run_qllm([*GPTQ, f"launch.quantize={launch}"], work, cache_dir, data_dir)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        cell = compose_cell([f"data_dir={data_dir}", f"cache_dir={cache_dir}", *GPTQ])
        checkpoints[launch] = cache.checkpoint_dir(cell)
        run = mlflow_runs(work).iloc[0]
        if launch == "torchrun":
            out = proc.stdout + proc.stderr
            assert "rank 1 of 2 (not the main rank: writes no results)" in out
            script = (work / "outputs/run/stages/launch_quantize.sh").read_text()
            assert "-m torch.distributed.run --nproc_per_node=2" in script and "qllm.stages.quantize" in script
            assert run["metrics.mem/quantize/ranks"] == 2
            peaks = [run[f"metrics.mem/quantize/rank{r}/peak_rss_gb"] for r in (0, 1)]
            assert min(peaks) > 0.1 and run["metrics.mem/quantize/max_rank/peak_rss_gb"] == max(peaks)
            manifest = json.loads((checkpoints[launch] / cache.MANIFEST).read_text())
            assert manifest["ranks"] == 2 and manifest["calibration_samples"] == 15  # 8 + 7 on the two ranks
    one, two = (_tensors(checkpoints[k]) for k in ("local", "torchrun"))
    assert one.keys() == two.keys() and len(one) > 20
    differ = [k for k in one if not (one[k] == two[k]).all()]
    assert differ == [], f"{len(differ)} tensors differ from one process's: {differ[:5]}"


def test_accelerate_data_parallel_equals_one_process(tmp_path, cache_dir, data_dir):
    args = ["model=tiny-random-llama", "method=none", "task=arc_easy_offline", "task.limit=9", "eval.seed=77"]
    records = {}
    for launch in ("local", "accelerate"):
        work = tmp_path / launch
        work.mkdir()
        proc = run_qllm([*args, f"launch.evaluate={launch}", "force=true"], work, cache_dir, data_dir)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out[-4000:]
        lines = (work / "outputs/run/stages/eval/per_sample_arc_easy_offline.jsonl").read_text().splitlines()
        records[launch] = sorted((json.loads(x) for x in lines), key=lambda r: r["doc_id"])
        if launch == "accelerate":
            # the requests were split: the main rank ran 5 of the 9 items (x 4 choices), not all 36 requests
            assert "Running loglikelihood requests: 100%|██████████| 20/20 [" in out and "| 36/36 [" not in out
            run = mlflow_runs(work).iloc[0]
            assert run["metrics.mem/evaluate/ranks"] == 2 and run["metrics.mem/evaluate/max_rank/peak_rss_gb"] > 0
            script = (work / "outputs/run/stages/launch_evaluate.sh").read_text()
            assert "accelerate.commands.launch" in script and "ACCELERATE_USE_CPU=1" in script
    assert len(records["local"]) == 9 and records["local"] == records["accelerate"]
