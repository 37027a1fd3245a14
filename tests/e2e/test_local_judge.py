"""MT-Bench on the real default model, judged by a local server as `judge=local` starts it: SmolLM2 answers (hf
backend), SmolLM2 served by `vllm serve` on 127.0.0.1 judges, and the server is gone when judging ends."""

from __future__ import annotations

import os

import pytest

from conftest import REPO, mlflow_runs, run_qllm


@pytest.mark.slow
def test_smollm2_judged_by_a_local_vllm_server(tmp_path, cache_dir, data_dir):
    """The real default model answers, SmolLM2 served locally by vLLM judges (a weak judge: constrain_verdict makes
    its verdicts parseable). One quantized cell: the baseline's answers are generated inside it."""
    if not (REPO / ".venv-vllm" / "bin" / "python").is_file() and not os.environ.get("QLLM_VLLM_PYTHON"):
        pytest.skip("no vLLM environment (make setup builds .venv-vllm)")
    import psutil

    from qllm.planning import compose_cell
    from qllm.sources.models import prepare

    smol = compose_cell(["method=none", f"data_dir={data_dir}", f"cache_dir={cache_dir}"])
    judge_dir = prepare(smol.model, smol.data_dir, smol.cache_dir)
    proc = run_qllm(["method=rtn", "task=mt_bench", "task.limit=1", "task.max_new_tokens=16", "judge=local",
                     f"judge.model={judge_dir}", "judge.constrain_verdict=true", "judge.max_tokens=400"],
                    tmp_path, cache_dir, data_dir, timeout=1500)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "generating them" in out and "judge: server up in" in out
    run = mlflow_runs(tmp_path).iloc[0]
    assert 1.0 <= run["metrics.mt_bench/score"] <= 10.0
    assert run["metrics.mt_bench/parse_failures"] == 0 and run["metrics.mt_bench/n_judgments"] == 2
    assert run["metrics.mt_bench/pairwise/n_matches"] == 2 and run["metrics.mt_bench/pairwise/errors"] == 0
    assert run["params.judge.server"] == "vllm" and run["params.judge.kind"] == "local"
    # the server and its engine ended with the judge stage
    assert not [p for p in psutil.process_iter(["cmdline"]) if "qllm.judge.vllm_serve" in " ".join(
        p.info["cmdline"] or [])]
