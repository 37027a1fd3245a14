"""The deepspeed launcher (evaluate stage, AutoTP over the hf backend): its composed command lines, environment and
planning refusals. Not run on GPUs here (none on this machine): the command is checked against deepspeed's own
argument parser instead."""

from __future__ import annotations

from pathlib import Path

import pytest

from qllm.errors import QllmConfigError
from qllm.stages import launchers
from qllm.stages.launchers import LaunchContext
from qllm.stages.launchers import deepspeed as ds_launcher

CTX = LaunchContext(python="/venv/bin/python", port=29577, workdir=Path("/w"))
BASE = {"name": "deepspeed", "timeout_s": None, "nproc": 4, "num_nodes": 1, "hostfile": None,
        "multinode_launcher": "slurm", "master_addr": None, "autotp": True}
GPU_CELL = {"eval": {"backend": "hf", "device": "auto"}}


@pytest.fixture(autouse=True)
def _no_visible_devices_list(monkeypatch):
    """The commands below are those of a node whose CUDA_VISIBLE_DEVICES is unset unless a test sets it."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


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


def test_cuda_visible_devices_become_an_include_list(monkeypatch):
    """`--num_gpus N` makes DeepSpeed take GPUs 0..N-1 and drop CUDA_VISIBLE_DEVICES: on one node the GPUs it lists
    are named instead (its first N), and DeepSpeed's own parser and resource filter take them."""
    runner = pytest.importorskip("deepspeed.launcher.runner")
    ds = launchers.get("deepspeed")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 3,5,7")
    cmd = ds.command({**BASE, "nproc": 2}, "qllm.stages.evaluate", ["--cell", "c.json"], CTX)
    assert cmd[3:] == ["--include", "localhost:2,3", "--master_port", "29577", "--no_local_rank", "--module",
                       "qllm.stages.evaluate", "--cell", "c.json"]
    args = runner.parse_args(cmd[3:])
    assert (args.include, args.num_gpus, args.num_nodes) == ("localhost:2,3", -1, -1)  # not both: DeepSpeed refuses
    assert runner.parse_inclusion_exclusion({"localhost": 8}, args.include, "") == {"localhost": [2, 3]}
    assert ds.ranks({**BASE, "nproc": 2}) == 2 and ds.env({**BASE, "nproc": 2}, CTX)["QLLM_AUTOTP"] == "2"


def test_with_a_hostfile_gpus_are_counted(monkeypatch, tmp_path):
    """With a hostfile DeepSpeed ignores CUDA_VISIBLE_DEVICES (its slots say which GPUs): --num_gpus stays."""
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node-0 slots=8\nnode-1 slots=8\n")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    settings = {**BASE, "nproc": 8, "num_nodes": 2, "hostfile": str(hostfile)}
    cmd = launchers.get("deepspeed").command(settings, "qllm.stages.evaluate", [], CTX)
    assert "--include" not in cmd and cmd[cmd.index("--num_gpus") + 1] == "8"
    monkeypatch.setattr(ds_launcher, "_gpus_visible", lambda: 2)
    launchers.get("deepspeed").validate(settings, "evaluate", GPU_CELL)  # other nodes' GPUs: not this node's list


@pytest.mark.parametrize("visible, message", [
    ("0", r"launch.evaluate.nproc=4: DeepSpeed tensor parallelism needs one GPU per rank, and "
          r"CUDA_VISIBLE_DEVICES='0' lists 1; valid: nproc <= 1"),
    ("GPU-5d2c,GPU-77aa", r"CUDA_VISIBLE_DEVICES='GPU-5d2c,GPU-77aa' does not name GPUs by index"),
])
def test_refuses_a_visible_devices_list_it_cannot_include(monkeypatch, visible, message):
    monkeypatch.setattr(ds_launcher, "_gpus_visible", lambda: None)  # even where NVML cannot tell
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    with pytest.raises(QllmConfigError, match=message):
        launchers.get("deepspeed").validate(BASE, "evaluate", GPU_CELL)


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
    import os

    assert ds_launcher.quiet_env({"DS_ACCELERATOR": "cuda"}) == {}
    monkeypatch.setattr(os.path, "exists", lambda p: False)
    assert ds_launcher.quiet_env({}) == {"DS_ACCELERATOR": "cpu"}
    monkeypatch.setattr(os.path, "exists", lambda p: p == "/dev/nvidia0")
    assert ds_launcher.quiet_env({}) == {}
    assert ds_launcher.quiet_env({"CUDA_VISIBLE_DEVICES": ""}) == {"DS_ACCELERATOR": "cpu"}
    monkeypatch.setattr(os.path, "exists", lambda p: p == "/dev/kfd")  # AMD (ROCm)
    assert ds_launcher.quiet_env({}) == {}


def test_the_launcher_and_planning_import_no_deepspeed_or_torch():
    import subprocess
    import sys

    code = ("import sys; from qllm.stages import launchers; launchers.get('deepspeed'); "
            "import qllm.stages.backends._deepspeed_tp; "
            "print(sorted(m for m in ('torch', 'deepspeed', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
