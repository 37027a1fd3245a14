"""The memory planner: sizes every stage of a cell per device before launch, chooses the launch that fits, or refuses
the cell with the numbers (`qllm plan <overrides>`, and before each cell of `qllm run`).

    memory.py   pure estimates: a stage's peak per device as a named breakdown (weights, calibration cache,
                Hessians, AWQ cache, KV cache, logits, workspace, runtime), from the model's shapes and the cell
    gpus.py     the devices: the GPUs this machine sees (NVML), the ones `plan.gpus` describes, or the host's RAM
    choose.py   the launch of each stage (1 GPU, vLLM TP=k, sharded, multi-node, offload) or a refusal
    cells.py    a planned Cell -> CellPlan (plan_cell_memory)
    render.py   plans as one rich table
    cli.py      `qllm plan <hydra overrides> [-m]`

Imports no torch, transformers, llmcompressor, vllm, deepspeed or accelerate (tests/plan/test_imports.py).
"""

from .cells import CellPlan, PlanSettings, plan_cell_memory
from .render import render, table

__all__ = ["CellPlan", "PlanSettings", "plan_cell_memory", "render", "table"]
