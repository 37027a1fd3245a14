"""MLflow names and report colours: fixed, whatever the process."""

from __future__ import annotations

import os
import subprocess
import sys

from qllm.names import METHOD_COLORS, Status, metric_name, method_color, speed_metric


def test_method_colours_are_fixed_and_the_same_in_every_process():
    assert method_color("none") == "#000000" and method_color("gptq") == "#56B4E9"
    assert len(set(METHOD_COLORS.values())) == len(METHOD_COLORS)
    code = "from qllm.names import method_color; print(method_color('my_new_method'))"
    seen = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout.strip() for seed in ("1", "2", "3")}
    assert seen == {method_color("my_new_method")}  # hash() would differ between these processes


def test_names():
    assert metric_name("acc,none") == "acc" and metric_name("exact_match,strict-match") == "exact_match_strict-match"
    assert speed_metric("decode_tok_s", 1) == "speed/bs1/decode_tok_s" and speed_metric("x") == "speed/x"
    assert Status.KILLED == "killed" and f"{Status.FINISHED}" == "finished"
