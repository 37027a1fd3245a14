"""The deepspeed launcher (evaluate stage, AutoTP over the hf backend): its composed command lines, environment and
planning refusals. Not run on GPUs here (none on this machine): the command is checked against deepspeed's own
argument parser instead."""

from __future__ import annotations

from pathlib import Path

import pytest

from qllm.errors import QllmConfigError
from qllm.stages import launchers
from qllm.stages.backends import _deepspeed_tp
from qllm.stages.launchers import LaunchContext
from qllm.stages.launchers import deepspeed as ds_launcher

CTX = LaunchContext(python="/venv/bin/python", port=29577, workdir=Path("/w"))
BASE = {"name": "deepspeed", "timeout_s": None, "nproc": 4, "num_nodes": 1, "hostfile": None,
        "multinode_launcher": "slurm", "master_addr": None, "autotp": True}
GPU_CELL = {"eval": {"backend": "hf", "device": "auto"}}


def test_single_node_command_and_env():
    ds = launchers.get("deepspeed")
    cmd = ds.command(BASE, "qllm.stages.evaluate", ["--cell", "c.json", "--out", "o"], CTX)
    assert cmd == ["/venv/bin/python", "-m", "deepspeed.launcher.runner", "--num_gpus", "4", "--master_port", "29577",
                   "--no_local_rank", "--module", "qllm.stages.evaluate", "--cell", "c.json", "--out", "o"]
    assert ds.ranks(BASE) == 4
    env = ds.env(BASE, CTX)
    assert env["QLLM_AUTOTP"] == "4" and env["DS_ACCELERATOR"] in ("cuda", __import__("os").environ.get(
        "DS_ACCELERATOR", "cuda"))
    assert "QLLM_AUTOTP" not in ds.env({**BASE, "autotp": False}, CTX)


def test_multi_node_command(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node-0 slots=8\nnode-1 slots=8\n")
    settings = {**BASE, "nproc": 8, "num_nodes": 2, "hostfile": str(hostfile), "master_addr": "node-0"}
    cmd = launchers.get("deepspeed").command(settings, "qllm.stages.evaluate", ["--cell", "c.json"], CTX)
    assert cmd[:3] == ["/venv/bin/python", "-m", "deepspeed.launcher.runner"]
    assert " ".join(cmd[3:]) == (f"--num_gpus 8 --master_port 29577 --no_local_rank --num_nodes 2 --hostfile {hostfile} "
                                 "--launcher slurm --master_addr node-0 --module qllm.stages.evaluate --cell c.json")
    assert launchers.get("deepspeed").ranks(settings) == 16


def test_command_parses_with_deepspeeds_own_cli():
    runner = pytest.importorskip("deepspeed.launcher.runner")
    cmd = launchers.get("deepspeed").command(BASE, "qllm.stages.evaluate", ["--cell", "c.json", "--force"], CTX)
    args = runner.parse_args(cmd[3:])
    assert (args.num_gpus, args.master_port, args.module, args.no_local_rank) == (4, 29577, True, True)
    assert args.user_script == "qllm.stages.evaluate" and args.user_args == ["--cell", "c.json", "--force"]


@pytest.mark.parametrize("stage, settings, cfg, message", [
    ("quantize", {}, GPU_CELL, "llmcompressor has no DeepSpeed path.*torchrun"),
    ("evaluate", {"nproc": 0}, GPU_CELL, r"launch.evaluate.nproc must be >= 1; got 0"),
    ("evaluate", {"num_nodes": 0}, GPU_CELL, r"num_nodes must be >= 1"),
    ("evaluate", {"num_nodes": 2}, GPU_CELL, r"num_nodes=2 needs launch.evaluate.hostfile"),
    ("evaluate", {"hostfile": "/nonexistent/hosts"}, GPU_CELL, "is not a file"),
    ("evaluate", {"multinode_launcher": "ssh"}, GPU_CELL, "valid: pdsh, slurm"),
    ("evaluate", {}, {"eval": {"backend": "vllm", "device": "auto"}}, "valid: eval=hf.*|tensor_parallel_size"),
    ("evaluate", {}, {"eval": {"backend": "hf", "device": "cpu"}}, "splits the model across GPUs.*eval.device=cpu"),
])
def test_refuses_what_it_cannot_launch(stage, settings, cfg, message, monkeypatch):
    monkeypatch.setattr(ds_launcher, "_gpus_visible", lambda: 8)
    with pytest.raises(QllmConfigError, match=message):
        launchers.get("deepspeed").validate({**BASE, **settings}, stage, cfg)


def test_gpu_count_is_checked_without_torch(monkeypatch):
    ds = launchers.get("deepspeed")
    monkeypatch.setattr(ds_launcher, "_gpus_visible", lambda: 0)
    with pytest.raises(QllmConfigError, match="needs one GPU per rank, and this machine shows 0"):
        ds.validate(BASE, "evaluate", GPU_CELL)
    monkeypatch.setattr(ds_launcher, "_gpus_visible", lambda: 2)
    with pytest.raises(QllmConfigError, match="valid: nproc <= 2"):
        ds.validate(BASE, "evaluate", GPU_CELL)
    monkeypatch.setattr(ds_launcher, "_gpus_visible", lambda: None)  # no NVML (login node): the job's node decides
    ds.validate(BASE, "evaluate", GPU_CELL)
    monkeypatch.setattr(ds_launcher, "_gpus_visible", lambda: 4)
    ds.validate(BASE, "evaluate", GPU_CELL)


def test_planning_refuses_deepspeed_on_this_cpu_machine():
    """Through planning as a user composes it: on a machine without GPUs the refusal names the reason."""
    from qllm.planning import compose_config, plan_cell

    cfg = compose_config(["launch.evaluate=deepspeed", "launch.evaluate.nproc=2", "eval.device=cpu"])
    assert cfg.launch.evaluate.name == "deepspeed" and cfg.launch.evaluate.autotp is True
    with pytest.raises(QllmConfigError, match="splits the model across GPUs"):
        plan_cell(cfg)
    with pytest.raises(QllmConfigError, match="llmcompressor has no DeepSpeed path"):
        plan_cell(compose_config(["launch.quantize=deepspeed"]))


def test_quiet_env_only_where_there_is_no_gpu(monkeypatch):
    assert _deepspeed_tp.quiet_env({"DS_ACCELERATOR": "cuda"}) == {}
    monkeypatch.setattr(_deepspeed_tp.os.path, "exists", lambda p: False)
    assert _deepspeed_tp.quiet_env({}) == {"DS_ACCELERATOR": "cpu"}
    monkeypatch.setattr(_deepspeed_tp.os.path, "exists", lambda p: p == "/dev/nvidia0")
    assert _deepspeed_tp.quiet_env({}) == {}
    assert _deepspeed_tp.quiet_env({"CUDA_VISIBLE_DEVICES": ""}) == {"DS_ACCELERATOR": "cpu"}


def test_the_launcher_and_planning_import_no_deepspeed_or_torch():
    import subprocess
    import sys

    code = ("import sys; from qllm.stages import launchers; launchers.get('deepspeed'); "
            "import qllm.stages.backends._deepspeed_tp; "
            "print(sorted(m for m in ('torch', 'deepspeed', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
