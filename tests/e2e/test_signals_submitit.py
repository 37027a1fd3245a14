"""SIGTERM to a sweep under hydra/launcher=submitit_local (every cell a job process of its own, as on SLURM): every
stage ends, every run is KILLED with its finished tasks kept, and the re-run resumes with nothing recomputed."""

from __future__ import annotations

import signal
import time

import psutil

from conftest import mlflow_runs, none_alive, run_qllm, start_qllm
from qllm.planning import compose_cell
from qllm.store import cache

# the second task (40 WikiText documents of 2048 tokens) is long enough to be interrupted
CELLS = ["model=tiny-random-llama", "method=none", "eval.seed=93", "task=quick",
         "task.tasks.wikitext_offline.limit=40", "task.tasks.wikitext_offline.max_doc_tokens=2048"]
LIMITS = (5, 6)


def _cell(limit: int, cache_dir, data_dir):
    return compose_cell([f"data_dir={data_dir}", f"cache_dir={cache_dir}", *CELLS,
                         f"task.tasks.arc_easy_offline.limit={limit}"])


def test_sigterm_to_a_submitit_local_sweep_then_resume(tmp_path, cache_dir, data_dir):
    sweep = ["-m", "hydra/launcher=submitit_local", *CELLS,
             f"task.tasks.arc_easy_offline.limit={','.join(map(str, LIMITS))}"]
    proc = start_qllm(sweep, tmp_path, cache_dir, data_dir, quiet=True)
    cells = [_cell(n, cache_dir, data_dir) for n in LIMITS]
    first = lambda c: cache.eval_dir(c, "arc_easy_offline").is_dir()  # noqa: E731
    deadline = time.monotonic() + 600
    while not all(first(c) for c in cells):  # both jobs are in their second task
        assert proc.poll() is None and time.monotonic() < deadline, "the sweep ended before its cells got going"
        time.sleep(0.5)
    time.sleep(2)
    started = psutil.Process(proc.pid).children(recursive=True)
    commands = "\n".join(" ".join(p.cmdline()) for p in started)
    assert commands.count("qllm.stages.evaluate") >= 2, commands
    proc.send_signal(signal.SIGTERM)  # to the sweep's process only, as `kill PID` does
    assert proc.wait(timeout=180) == 128 + signal.SIGTERM
    time.sleep(1)
    assert none_alive(started), "a job or stage process survived SIGTERM"

    runs = mlflow_runs(tmp_path)
    parent, ran = runs[runs["tags.qllm.kind"] == "sweep"], runs[runs["tags.qllm.kind"] == "cell"]
    assert list(parent["status"]) == ["KILLED"] and list(parent["tags.qllm.kill_reason"]) == ["SIGTERM"]
    assert len(ran) == 2 and set(ran["status"]) == {"KILLED"} and set(ran["tags.qllm.status"]) == {"killed"}
    assert [(first(c), cache.eval_dir(c, "wikitext_offline").is_dir()) for c in cells] == [(True, False)] * 2

    # the re-run (shorter second task: the same cells otherwise would take minutes) finishes both cells, taking
    # arc_easy_offline from the cache: nothing that finished is computed again
    again = run_qllm([*sweep, "task.tasks.wikitext_offline.limit=2"], tmp_path, cache_dir, data_dir)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    runs = mlflow_runs(tmp_path)
    new = runs[(runs["tags.qllm.kind"] == "cell") & (runs["status"] == "FINISHED")]
    assert len(new) == 2 and set(new["tags.qllm.eval_reused_tasks"]) == {"arc_easy_offline"}, \
        new[["tags.qllm.eval_reused_tasks"]]
