"""What runs in a stage process, and the seams that start one.

    quantize.py    python -m qllm.stages.quantize: model + recipe + calibration -> checkpoint in the cache
    evaluate.py    python -m qllm.stages.evaluate: checkpoint + tasks -> lm-eval results (+ speed)
    calibration.py calibration samples;  compat.py  version-guarded workarounds for dependencies
    process.py     what every stage process does: its rank (only the main rank writes), the orphan watchdog
    backends/      evaluation backends (EvalBackend): hf today; one module + one conf/eval YAML each
    launchers/     stage launchers (Launcher): local today; one module + one conf/launch YAML each
    runner.py      (orchestrator side) start a stage under its launcher: process group, signals, timeout, logs

The stage modules import torch, transformers, llmcompressor and lm-eval, inside functions: the orchestrator imports
runner, backends and launchers (planning asks a backend what it supports) without loading any of them.
qllm.measure and qllm.store never import from here.
"""
