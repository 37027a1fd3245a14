"""The vllm_multinode launcher: the composed command for 2 nodes × 8 GPUs, its refusals, and launch/ray_slurm.sh run
under stub scontrol / srun / ray executables (a fake SLURM allocation on this machine): head, then workers, then the
wait, then the stage with RAY_ADDRESS, then `ray stop` on every node, also when the stage fails or gets SIGTERM.
Not run on a real cluster here."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from qllm.errors import QllmConfigError
from qllm.stages import launchers
from qllm.stages.launchers import LaunchContext
from qllm.stages.launchers.vllm_multinode import SCRIPT

CTX = LaunchContext(python="/venvs/vllm/bin/python", port=29577, workdir=Path("/w"))
BASE = {"name": "vllm_multinode", "timeout_s": None, "nodes": 2, "gpus_per_node": 8, "ray_port": None,
        "ray_start_timeout_s": 600.0, "ray": None}
CELL = {"eval": {"backend": "vllm", "device": "auto", "tensor_parallel_size": 8, "pipeline_parallel_size": 2,
                 "distributed_executor_backend": "ray"}}


def test_command_for_two_nodes_of_eight_gpus():
    lm = launchers.get("vllm_multinode")
    cmd = lm.command(BASE, "qllm.stages.evaluate", ["--cell", "c.json", "--out", "o"], CTX)
    assert cmd == ["bash", str(SCRIPT), "--port", "29577", "--ray", "/venvs/vllm/bin/ray", "--timeout", "600",
                   "--nodes", "2", "--gpus-per-node", "8", "--", "/venvs/vllm/bin/python", "-m",
                   "qllm.stages.evaluate", "--cell", "c.json", "--out", "o"]
    assert lm.command({**BASE, "ray_port": 6379, "ray": "/opt/ray"}, "m", [], CTX)[2:6] == [
        "--port", "6379", "--ray", "/opt/ray"]
    assert lm.ranks(BASE) == 1 and lm.env(BASE, CTX) == {}
    for seconds, arg in ((1e6, "1000000"), (0.5, "1")):  # whole seconds, never 1e+06
        assert lm.command({**BASE, "ray_start_timeout_s": seconds}, "m", [], CTX)[6:8] == ["--timeout", arg]
    lm.validate(BASE, "evaluate", CELL)


def test_the_script_has_every_step():
    text = SCRIPT.read_text()
    for piece in ('scontrol show hostnames "$SLURM_JOB_NODELIST"', "srun --overlap --nodes=1 --ntasks=1 -w",
                  '"$ray" start --head', '--port="$port"', '"$ray" start --address="$address"', "--block &",
                  '"$ray" status --address="$address"', 'RAY_ADDRESS="$address" "$@"', "trap 'teardown' EXIT",
                  "trap 'teardown; exit 143' TERM", "trap 'teardown; exit 130' INT", '"$ray" stop --force'):
        assert piece in text, piece
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


@pytest.mark.parametrize("stage, settings, cell, message", [
    ("quantize", {}, CELL, "evaluate stage only"),
    ("evaluate", {}, {"eval": {**CELL["eval"], "backend": "hf"}}, "valid: eval=vllm"),
    ("evaluate", {}, {"eval": {**CELL["eval"], "distributed_executor_backend": "mp"}},
     "needs eval.distributed_executor_backend=ray"),
    ("evaluate", {}, {"eval": {**CELL["eval"], "tensor_parallel_size": 8, "pipeline_parallel_size": 4}},
     r"8 × 4 = 32 GPUs, more than launch.evaluate.nodes × gpus_per_node = 2 × 8 = 16"),
    ("evaluate", {"nodes": 0}, CELL, "nodes must be >= 1 or null"),
    ("evaluate", {"ray_start_timeout_s": 0}, CELL, "ray_start_timeout_s must be > 0"),
    ("evaluate", {}, {"eval": {**CELL["eval"], "device": "cpu"}}, "GPU nodes"),
])
def test_refuses_what_it_cannot_launch(stage, settings, cell, message):
    with pytest.raises(QllmConfigError, match=message):
        launchers.get("vllm_multinode").validate({**BASE, **settings}, stage, cell)


def test_refuses_more_nodes_than_the_job_has(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "1")
    with pytest.raises(QllmConfigError, match="this SLURM job has 1 node"):
        launchers.get("vllm_multinode").validate(BASE, "evaluate", CELL)


# ---- a fake SLURM allocation: stubs that log their argv ----

STUBS = {
    "scontrol": """#!/usr/bin/env bash
echo "scontrol $*" >> "$LOG"
[ "$1 $2" = "show hostnames" ] && printf 'gpu-001\\ngpu-002\\n'
""",
    # srun [options] -w NODE COMMAND...: log, then run COMMAND here (as that node)
    "srun": """#!/usr/bin/env bash
args=("$@"); node=""
while [ $# -gt 0 ]; do case "$1" in -w) node="$2"; shift 2 ;; --*) shift ;; *) break ;; esac; done
echo "srun[$node] $*" >> "$LOG"
NODE="$node" exec "$@"
""",
    "hostname": """#!/usr/bin/env bash
echo "10.0.0.1"
""",
    "ray": """#!/usr/bin/env bash
case "$1" in
  start) echo "ray start on ${NODE:-?}: ${*:2}" >> "$LOG"; touch "$STATE/up.${NODE:-x}"
         trap 'exit 0' TERM; while :; do sleep 0.1; done ;;
  status) for f in "$STATE"/up.*; do [ -e "$f" ] && echo " 1 node_${f##*.}"; done; exit 0 ;;
  stop) echo "ray stop on ${NODE:-?}" >> "$LOG"; rm -f "$STATE/up.${NODE:-x}" ;;
esac
""",
    # the stage: logs its argv and RAY_ADDRESS; STAGE_MODE=fail exits 7, =hang waits to be ended
    "python": """#!/usr/bin/env bash
echo "stage RAY_ADDRESS=$RAY_ADDRESS argv: $*" >> "$LOG"
[ "${STAGE_MODE:-}" = fail ] && exit 7
if [ "${STAGE_MODE:-}" = hang ]; then trap 'echo "stage got TERM" >> "$LOG"; exit 143' TERM; while :; do sleep 0.1; done; fi
exit 0
""",
}


@pytest.fixture
def fake_slurm(tmp_path):
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for name, text in STUBS.items():
        (bin_ / name).write_text(text)
        (bin_ / name).chmod(0o755)
    (tmp_path / "state").mkdir()
    log = tmp_path / "log"
    env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "LOG": str(log), "STATE": str(tmp_path / "state"),
           "SLURM_JOB_NODELIST": "gpu-[001-002]", "SLURM_JOB_NUM_NODES": "2"}
    ctx = LaunchContext(python=str(bin_ / "python"), port=29577, workdir=tmp_path)
    cmd = launchers.get("vllm_multinode").command({**BASE, "ray_start_timeout_s": 30.0}, "qllm.stages.evaluate",
                                                  ["--cell", "c.json"], ctx)
    return cmd, env, log


def _events(log: Path) -> list[str]:
    return log.read_text().splitlines()


def _check_order(lines: list[str]) -> None:
    head = next(i for i, l in enumerate(lines) if l.startswith("ray start on gpu-001: --head"))
    worker = next(i for i, l in enumerate(lines) if l.startswith("ray start on gpu-002: --address=10.0.0.1:29577"))
    stage = next(i for i, l in enumerate(lines) if l.startswith("stage "))
    stops = [i for i, l in enumerate(lines) if l.startswith("ray stop on")]
    assert {lines[i] for i in stops} == {"ray stop on gpu-001", "ray stop on gpu-002"}, lines
    assert max(head, worker) < stage < min(stops), lines
    assert "--port=29577" in lines[head] and "--num-gpus=8" in lines[head] and "--block" in lines[head]
    assert lines[stage] == "stage RAY_ADDRESS=10.0.0.1:29577 argv: -m qllm.stages.evaluate --cell c.json"


def test_fake_slurm_order_and_teardown_on_success(fake_slurm):
    cmd, env, log = fake_slurm
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    _check_order(_events(log))
    assert "ray cluster up: 2 node(s)" in proc.stderr


def test_fake_slurm_teardown_when_the_stage_fails(fake_slurm):
    cmd, env, log = fake_slurm
    proc = subprocess.run(cmd, env={**env, "STAGE_MODE": "fail"}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 7, proc.stderr  # the stage's own status
    _check_order(_events(log))


def test_fake_slurm_teardown_on_sigterm(fake_slurm):
    cmd, env, log = fake_slurm
    proc = subprocess.Popen(cmd, env={**env, "STAGE_MODE": "hang"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 30
    while not (log.exists() and any(l.startswith("stage ") for l in _events(log))):
        assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else ""
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # what SLURM (or qllm's runner, to the process group) sends
    proc.communicate(timeout=30)
    assert proc.returncode == 143
    lines = _events(log)
    _check_order(lines)
    assert "stage got TERM" in lines


def test_fake_slurm_cluster_that_never_comes_up_times_out_and_tears_down(fake_slurm, tmp_path):
    """A node whose Ray never joins: the script gives up after --timeout, runs no stage, and stops Ray everywhere."""
    cmd, env, log = fake_slurm
    (tmp_path / "bin" / "scontrol").write_text(STUBS["scontrol"].replace("gpu-002", "gpu-002\\ngpu-003"))
    (tmp_path / "bin" / "srun").write_text(STUBS["srun"].replace('NODE="$node" exec', '[ "$node" = gpu-003 ] && '
                                                                 '[ "$1" != hostname ] && [ "$2" = start ] && exit 1\n'
                                                                 'NODE="$node" exec'))
    cmd[cmd.index("--timeout") + 1], cmd[cmd.index("--nodes") + 1] = "3", "3"
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3 and "ray cluster not up after 3s: 2 of 3 node(s) joined" in proc.stderr, proc.stderr
    assert time.monotonic() - t0 < 20
    lines = _events(log)
    assert not any(l.startswith("stage ") for l in lines)
    assert {l for l in lines if l.startswith("ray stop")} == {f"ray stop on gpu-00{i}" for i in (1, 2, 3)}


def test_fake_slurm_dead_head_is_reported_and_no_worker_starts(fake_slurm, tmp_path):
    """A head whose `ray start` fails: the script says so at once (not a timeout on workers that cannot join), starts
    no worker and no stage, and still stops Ray everywhere."""
    cmd, env, log = fake_slurm
    (tmp_path / "bin" / "srun").write_text(STUBS["srun"].replace('NODE="$node" exec', '[ "$node" = gpu-001 ] && '
                                                                 '[ "$2" = start ] && exit 4\nNODE="$node" exec'))
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert "ray head on gpu-001 (10.0.0.1:29577) ended (status 4) before the cluster was up" in proc.stderr
    assert time.monotonic() - t0 < 15
    lines = _events(log)
    assert not any(l.startswith(("ray start", "stage ")) for l in lines), lines
    assert {l for l in lines if l.startswith("ray stop")} == {"ray stop on gpu-001", "ray stop on gpu-002"}


def test_fake_slurm_worker_that_never_joins_is_named(fake_slurm, tmp_path):
    cmd, env, log = fake_slurm
    (tmp_path / "bin" / "srun").write_text(STUBS["srun"].replace('NODE="$node" exec', '[ "$node" = gpu-002 ] && '
                                                                 '[ "$2" = start ] && exit 1\nNODE="$node" exec'))
    cmd[cmd.index("--timeout") + 1] = "3"
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3 and "1 of 2 node(s) joined; ray start ended on: gpu-002" in proc.stderr, proc.stderr


@pytest.mark.parametrize("hostname, address", [
    ('[ "$1" = -I ] && exit 64\necho "127.0.1.1 10.0.0.9"', "10.0.0.9"),  # no -I: --ip-address, loopback skipped
    ("exit 1", "gpu-001"),  # no address from hostname at all: the head's name
])
def test_fake_slurm_head_address_without_hostname_dash_i(fake_slurm, tmp_path, hostname, address):
    cmd, env, log = fake_slurm
    (tmp_path / "bin" / "hostname").write_text(f"#!/usr/bin/env bash\n{hostname}\n")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert f"stage RAY_ADDRESS={address}:29577 argv:" in log.read_text()


def test_fake_slurm_one_node_without_gpu_count(fake_slurm, tmp_path):
    """No worker and no --gpus-per-node: the empty arrays expand to nothing under `set -u`."""
    _, env, log = fake_slurm
    ctx = LaunchContext(python=str(tmp_path / "bin" / "python"), port=29577, workdir=tmp_path)
    cmd = launchers.get("vllm_multinode").command({**BASE, "nodes": 1, "gpus_per_node": None}, "qllm.stages.evaluate",
                                                  [], ctx)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "workers: none" in proc.stderr and "ray cluster up: 1 node(s)" in proc.stderr
    lines = _events(log)
    assert [l for l in lines if l.startswith("ray start")] == [
        "ray start on gpu-001: --head --node-ip-address=10.0.0.1 --port=29577 --block"]
    assert {l for l in lines if l.startswith("ray stop")} == {"ray stop on gpu-001"}


def test_fake_slurm_refuses_a_timeout_that_is_not_seconds(fake_slurm):
    cmd, env, _ = fake_slurm
    cmd[cmd.index("--timeout") + 1] = "1e+06"
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--timeout must be seconds (e.g. 600); got 1e+06" in proc.stderr


# ---- the vLLM backend's parallelism settings ----

@pytest.mark.parametrize("overrides, message", [
    (["eval.tensor_parallel_size=2"], r"on CPU: qllm runs vLLM-CPU as one worker"),
    (["eval.pipeline_parallel_size=2"], r"on CPU: qllm runs vLLM-CPU as one worker"),
    (["eval.pipeline_parallel_size=0"], r"eval.pipeline_parallel_size must be a positive integer"),
    (["eval.distributed_executor_backend=ray"], r"the vLLM environment has no ray"),
    (["eval.distributed_executor_backend=uni"], r"valid: null \(vLLM picks\), mp, ray"),
])
def test_vllm_parallel_settings_are_checked_at_planning(overrides, message):
    from qllm.planning import compose_cell
    from qllm.stages.backends import vllm

    try:
        vllm.environment({"python": None})
    except QllmConfigError:
        pytest.skip("no vLLM environment (.venv-vllm) here")
    with pytest.raises(QllmConfigError, match=message):
        compose_cell(["eval=vllm", "method=none", *overrides])


def test_vllm_parallel_settings_stay_out_of_the_cell_key_and_reach_the_engine():
    from qllm.stages import backends
    from qllm.stages.backends.vllm import parallel_args

    settings = {"backend": "vllm", "tensor_parallel_size": 8, "pipeline_parallel_size": 2,
                "distributed_executor_backend": "ray", "data_parallel_size": 1, "dtype": "bfloat16"}
    assert backends.key_settings(settings) == {"backend": "vllm", "dtype": "bfloat16"}
    assert parallel_args(settings) == {"pipeline_parallel_size": 2, "distributed_executor_backend": "ray"}
    assert parallel_args({"pipeline_parallel_size": 1, "distributed_executor_backend": None}) == {}
