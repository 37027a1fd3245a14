"""`qllm plan <overrides> [-m]`: one table of cells × stages, offline for hub models, Hydra's sweep expansion."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO
from qllm.errors import QllmConfigError
from qllm.plan import cli


def qllm_plan(*args: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(REPO), "COLUMNS": "200"}  # no HF token, no hub: offline
    return subprocess.run([sys.executable, "-m", "qllm", "plan", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


def test_405b_sweep_prints_stages_memory_and_launch_on_8x80():
    proc = qllm_plan("model=llama-3.1-405b-instruct", "method=none,gptq,fp8", "-m", "plan.gpus=8xH100-80GB")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for header in ("cell", "stage", "peak / device (GB)", "devices", "launch", "plan"):
        assert header in out
    assert "memory plan · 8×80 GB H100" in out
    # baseline: refused with the numbers and what would fit
    refused = next(line for line in out.splitlines() if line.startswith("refused "))
    assert refused.startswith("refused llama-3.1-405b-instruct · none · bfloat16: evaluate: needs ~8")
    assert "GB for the bfloat16 baseline of llama-3.1-405b-instruct; this node has 8×80 GB: use " in refused
    assert "launch.evaluate=vllm_multinode on 2 nodes" in refused and "method=fp8" in refused
    # gptq: quantize on 1 GPU (the model in host RAM), W4 checkpoint on vLLM TP=4; fp8 (planned at bits=8) on TP=8
    assert "llama-3.1-405b-instruct · gptq · w4" in out and "llama-3.1-405b-instruct · fp8 · w8" in out
    assert "vllm TP=4" in out and "vllm TP=8" in out and "eval.tensor_parallel_size=8" in out
    stages = [line.split("│")[2].strip() for line in out.splitlines() if line.startswith("│")]
    assert [s for s in stages if s] == ["evaluate", "quantize", "evaluate", "quantize", "evaluate"]
    assert "2 of 3 cell(s) fit, 1 refused" in out


def test_405b_on_two_nodes_is_vllm_multinode():
    proc = qllm_plan("-m", "model=llama-3.1-405b-instruct", "method=none", "plan.gpus=2x8xH100-80GB")
    assert proc.returncode == 0, proc.stderr
    assert "vllm_multinode TP=8 PP=2" in proc.stdout and "eval.pipeline_parallel_size=2" in proc.stdout
    assert "1 of 1 cell(s) fit" in proc.stdout


def test_default_cell_fits_this_host():
    """No plan.gpus on a machine without a GPU: the default SmolLM2 cell plans in host RAM."""
    proc = qllm_plan()
    assert proc.returncode == 0, proc.stderr
    assert "smollm2-135m-instruct · gptq · w4" in proc.stdout and "1 of 1 cell(s) fit" in proc.stdout


def test_a_malformed_gpu_description_is_an_invalid_row_naming_valid_ones():
    proc = qllm_plan("plan.gpus=8xH100")
    assert proc.returncode == 0
    assert "invalid" in proc.stdout and "2x8xH100-80GB" in proc.stdout


def test_a_sweep_without_m_is_refused():
    with pytest.raises(QllmConfigError, match="needs -m"):
        cli.expand(["method=none,gptq"], multirun=False)


def test_expansion_is_hydras_basic_sweeper():
    cells = cli.expand(["model=tiny-random-llama", "method=none,gptq", "bits=4,8"], multirun=True)
    assert cells == [["model=tiny-random-llama", "method=none", "bits=4"],
                     ["model=tiny-random-llama", "method=none", "bits=8"],
                     ["model=tiny-random-llama", "method=gptq", "bits=4"],
                     ["model=tiny-random-llama", "method=gptq", "bits=8"]]
    assert cli.expand(["method=range(1,3)" if False else "bits=choice(4,8)"], multirun=True) == [["bits=4"],
                                                                                               ["bits=8"]]


def test_unknown_keys_exit_2_with_the_valid_ones():
    proc = qllm_plan("plan.gpu=8xH100-80GB")
    assert proc.returncode == 2 and "valid keys there" in proc.stderr and "gpus" in proc.stderr


def test_an_experiments_sweeper_params_are_expanded_as_hydra_does():
    cells = cli.expand(["+experiment=paper_llama31_405b"], multirun=True)
    schemes = [next(o for o in c if o.startswith("+experiment/scheme=")) for c in cells]
    assert schemes == [f"+experiment/scheme={s}" for s in
                       ("gptq_w4", "gptq_w8", "awq_w4", "awq_w8", "smoothquant_w8a8", "fp8_w8a8")]
    assert all("+experiment=paper_llama31_405b" in c for c in cells)
