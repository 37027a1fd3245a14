"""The SLURM presets of the study's grid (conf/experiment/paper_*.yaml) and `qllm sbatch`, their dry run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qllm import sbatch
from qllm.planning import compose_config

REPO = Path(__file__).resolve().parents[1]
SCHEMES = ["baseline", "gptq_w4", "gptq_w8", "awq_w4", "awq_w8", "smoothquant_w8a8", "fp8_w8a8"]  # 1 + 2x2 + 1 + 1
# preset: (models, schemes per model, nodes, GPUs per node, mem_gb, timeout_min)
PRESETS = {
    "paper_llama31_8b": (["llama-3.1-8b-instruct"], 7, 1, 1, 128, 1440),
    "paper_llama2": (["llama-2-7b-chat", "llama-2-13b-chat"], 7, 1, 1, 128, 1440),
    "paper_vicuna": (["vicuna-7b-v1.5", "vicuna-13b-v1.5"], 7, 1, 1, 128, 1440),
    "paper_gemma2": (["gemma-2-2b-it", "gemma-2-9b-it", "gemma-2-27b-it"], 7, 1, 1, 192, 2880),
    "paper_llama31_70b": (["llama-3.1-70b-instruct"], 7, 1, 4, 512, 2880),
    "paper_llama31_405b": (["llama-3.1-405b-instruct"], 6, 1, 8, 1800, 2880),  # no baseline: 2 nodes, below
    "paper_llama31_405b_bf16": (["llama-3.1-405b-instruct"], 1, 2, 8, 512, 1440),
}


def test_every_preset_file_is_listed():
    assert sorted(p.stem for p in (REPO / "conf/experiment").glob("*.yaml")) == sorted(PRESETS)
    assert sorted(p.stem for p in (REPO / "conf/experiment/scheme").glob("*.yaml")) == sorted(SCHEMES)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_composes_with_its_grid_and_resources(name):
    models, n_schemes, nodes, gpus, mem_gb, timeout_min = PRESETS[name]
    cfg = sbatch.compose([f"+experiment={name}"])
    assert cfg.task.name == "paper13" and cfg.model.name == models[0]
    assert cfg.hydra.launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    launcher = cfg.hydra.launcher
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (nodes, gpus, 1)
    assert (launcher.mem_gb, launcher.timeout_min) == (mem_gb, timeout_min)
    jobs = [job for batch in sbatch.expand(cfg) for job in batch]
    assert len(jobs) == len(models) * n_schemes  # models x schemes: 7+14+14+21+7+6+1 = 70 cells in all
    assert {j[0].split("=", 1)[1] for j in jobs} == set(models)
    # qllm.planning composes the same cell (what qllm run / qllm plan see for job 0)
    assert compose_config(jobs[0]).model.name == models[0]


def test_the_grid_is_the_papers_schemes():
    cells = {}
    for scheme in SCHEMES:
        cfg = compose_config(["+experiment=paper_llama31_8b", f"+experiment/scheme={scheme}"])
        cells[scheme] = (cfg.method.name, cfg.bits if cfg.method.bits_allowed else None)
        assert cfg.bits in cfg.method.bits_allowed or not cfg.method.bits_allowed  # no job the method refuses
    assert cells == {"baseline": ("none", None), "gptq_w4": ("gptq", 4), "gptq_w8": ("gptq", 8),
                     "awq_w4": ("awq", 4), "awq_w8": ("awq", 8), "smoothquant_w8a8": ("smoothquant", 8),
                     "fp8_w8a8": ("fp8", 8)}
    assert len(sbatch.expand(sbatch.compose(["+experiment=paper_llama31_8b", "+experiment/scheme=gptq_w4,awq_w4"]))[0]) == 2


def test_launchers_per_size():
    small = compose_config(["+experiment=paper_llama31_8b"])
    assert (small.eval.backend, small.launch.quantize.name, small.launch.evaluate.name) == ("hf", "local", "local")
    big = compose_config(["+experiment=paper_llama31_70b"])
    assert (big.eval.backend, big.eval.tensor_parallel_size) == ("vllm", 4)
    q405 = compose_config(["+experiment=paper_llama31_405b"])
    assert (q405.eval.backend, q405.eval.tensor_parallel_size, q405.eval.pipeline_parallel_size) == ("vllm", 8, 1)
    bf16 = sbatch.compose(["+experiment=paper_llama31_405b_bf16"])
    assert (bf16.eval.tensor_parallel_size, bf16.eval.pipeline_parallel_size) == (8, 2)
    assert bf16.eval.distributed_executor_backend == "ray" and bf16.method.name == "none"
    assert (bf16.launch.evaluate.name, bf16.launch.evaluate.nodes, bf16.launch.evaluate.gpus_per_node) == \
        ("vllm_multinode", 2, 8)
    assert bf16.hydra.launcher.additional_parameters == {"ntasks": 1}  # one orchestrator over the 2 nodes


def test_requeue_switch_composes():
    cfg = sbatch.compose(["hydra/launcher=slurm", "hydra.launcher.max_num_timeout=3"])
    assert cfg.hydra.launcher.max_num_timeout == 3 and cfg.hydra.launcher.signal_delay_s == 120
    assert sbatch.executor(dict(cfg.hydra.launcher)).max_num_timeout == 3


def test_sbatch_dry_run_prints_the_array_script_and_never_calls_sbatch(tmp_path):
    bin_dir, marker = tmp_path / "bin", tmp_path / "sbatch-called"
    bin_dir.mkdir()
    for tool in ("sbatch", "srun"):
        stub = bin_dir / tool
        stub.write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
        stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run([sys.executable, "-m", "qllm", "sbatch", "experiment=paper_llama31_8b",
                           f"hydra.sweep.dir={tmp_path}/sweep"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "jobs: 7 in 1 SLURM job array(s)" in out
    assert [line.split(": ", 1)[1].split()[1] for line in out.splitlines() if line.startswith("  #")] == \
        [f"+experiment/scheme={s}" for s in SCHEMES]
    assert out.count("#!/bin/bash") == 1  # one array: its task i runs job #i
    for flag in ("--nodes=1", "--gpus-per-node=1", "--time=1440", "--mem=128GB", "--array=0-6%7",
                 "--ntasks-per-node=1", "--signal=USR2@120", "--job-name=run"):
        assert f"#SBATCH {flag}\n" in out
    assert f"-m submitit.core._submit {tmp_path}/sweep/.submitit/%j" in out
    assert not marker.exists() and not (tmp_path / "sweep").exists()  # nothing submitted, nothing written


def test_sbatch_refuses_a_sweep_without_slurm(capsys):
    assert sbatch.main(["method=rtn,gptq"]) == 2
    assert "not SLURM" in capsys.readouterr().err
