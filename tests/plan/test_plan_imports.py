"""Planning memory is pure and fast: importing qllm.plan and planning cells loads no torch, transformers,
llmcompressor, compressed-tensors, vllm, deepspeed or accelerate; and it works offline for hub models."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO

HEAVY = ("torch", "transformers", "llmcompressor", "compressed_tensors", "accelerate", "deepspeed", "vllm")


def test_planning_a_sweep_imports_nothing_heavy():
    code = f"""
import sys, time
t0 = time.perf_counter()
from qllm.plan import cli, render
plans = [cli.plan_overrides(o) for o in cli.expand(
    ["model=llama-3.1-405b-instruct,smollm2-135m-instruct,tiny-random-llama", "method=none,gptq,awq,fp8",
     "plan.gpus=8xH100-80GB"], multirun=True)]
text = render(plans)
assert all(not isinstance(p, tuple) for p in plans), [p for p in plans if isinstance(p, tuple)]
heavy = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})
assert not heavy, heavy
print(f"{{len(plans)}} plans in {{time.perf_counter() - t0:.1f}} s")
"""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "12 plans" in proc.stdout
