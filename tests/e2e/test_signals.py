"""SIGTERM (what `kill`, `timeout` and SLURM send) to `python -m qllm.run`, as for Ctrl-C: the running stage's whole
process group ends, the cell's run (and the sweep's parent run) is KILLED, finished tasks stay cached."""

from __future__ import annotations

import signal

from conftest import mlflow_runs, none_alive, run_qllm, signal_when, start_qllm
from qllm.planning import compose_cell
from qllm.store import cache

# the second task (40 WikiText documents of 2048 tokens) is long enough to be interrupted
SLOW_SECOND_TASK = ["model=tiny-random-llama", "task=quick", "task.tasks.arc_easy_offline.limit=5",
                    "task.tasks.wikitext_offline.limit=40", "task.tasks.wikitext_offline.max_doc_tokens=2048"]
SECOND_TASK = "[qllm] evaluate: wikitext_offline ("


def _cached(overrides: list[str], cache_dir, data_dir) -> dict[str, bool]:
    """Which tasks of that cell have a finished entry in the cache."""
    cell = compose_cell([f"data_dir={data_dir}", f"cache_dir={cache_dir}", *overrides])
    return {t: cache.eval_dir(cell, t).is_dir() for t in cell.tasks}


def test_sigterm_to_a_single_cell(tmp_path, cache_dir, data_dir):
    args = ["method=none", "eval.seed=91", *SLOW_SECOND_TASK]  # its own eval seed: its own task keys
    proc = start_qllm(args, tmp_path, cache_dir, data_dir)
    out, stage, commands = signal_when(proc, SECOND_TASK, signal.SIGTERM)
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert "qllm.stages.evaluate" in commands
    assert none_alive(stage), "a stage process survived SIGTERM"
    runs = mlflow_runs(tmp_path)
    assert list(runs["status"]) == ["KILLED"] and list(runs["tags.qllm.status"]) == ["killed"]
    assert list(runs["tags.qllm.kill_reason"]) == ["SIGTERM"]
    assert _cached(args, cache_dir, data_dir) == {"arc_easy_offline": True, "wikitext_offline": False}


def test_sigterm_to_a_sweep(tmp_path, cache_dir, data_dir):
    cells = ["method=none", "eval.seed=92", *SLOW_SECOND_TASK]
    proc = start_qllm(["-m", *cells, "task.tasks.arc_easy_offline.limit=5,6"], tmp_path, cache_dir, data_dir)
    out, stage, commands = signal_when(proc, SECOND_TASK, signal.SIGTERM)
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert "qllm.stages.evaluate" in commands
    assert none_alive(stage), "a stage process survived SIGTERM"
    runs = mlflow_runs(tmp_path)
    parent = runs[runs["tags.qllm.kind"] == "sweep"]
    runs_of_cells = runs[runs["tags.qllm.kind"] == "cell"]
    assert list(parent["status"]) == ["KILLED"] and list(parent["tags.qllm.kill_reason"]) == ["SIGTERM"]
    assert len(runs_of_cells) == 1 and list(runs_of_cells["status"]) == ["KILLED"]  # the second never started
    assert list(runs_of_cells["tags.qllm.status"]) == ["killed"]
    first, second = ([*cells, f"task.tasks.arc_easy_offline.limit={n}"] for n in (5, 6))
    assert _cached(first, cache_dir, data_dir) == {"arc_easy_offline": True, "wikitext_offline": False}
    assert _cached(second, cache_dir, data_dir) == {"arc_easy_offline": False, "wikitext_offline": False}


def test_a_stage_timeout_kills_its_cell_and_the_sweep_goes_on(tmp_path, cache_dir, data_dir):
    """launch.quantize.timeout_s ends a quantize stage that runs over (here a stand-in that sleeps): that cell is
    KILLED with the reason, the next cell (a baseline: no quantize stage) finishes, the sweep exits non-zero."""
    sleeper = "launch.quantize.prefix=['{python}','-c','import time; time.sleep(300)']"
    proc = run_qllm(["-m", "model=tiny-random-llama", "method=rtn,none", "task=arc_easy_offline", "task.limit=2",
                     "launch.quantize.timeout_s=3", sleeper], tmp_path, cache_dir, data_dir)
    assert proc.returncode != 0 and "1 cell(s) failed or were killed" in proc.stdout + proc.stderr
    runs = mlflow_runs(tmp_path)
    cells = runs[runs["tags.qllm.kind"] == "cell"].set_index("params.method")
    assert cells.loc["rtn", "status"] == "KILLED" and cells.loc["rtn", "tags.qllm.status"] == "killed"
    assert "ran past launch.quantize.timeout_s=3 s" in cells.loc["rtn", "tags.qllm.kill_reason"]
    assert cells.loc["none", "tags.qllm.status"] == "finished"
    parent = runs[runs["tags.qllm.kind"] == "sweep"].iloc[0]
    assert parent["status"] == "FAILED" and parent["metrics.cells_killed"] == 1 and parent["metrics.cells_finished"] == 1
