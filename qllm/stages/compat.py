"""Narrow, version-guarded workarounds for defects in dependencies. Each says what, where and until when."""

from __future__ import annotations

import importlib.metadata

from packaging.version import Version


def awq_cpu_pin_memory() -> bool:
    """llmcompressor <= 0.14: AWQ pins cached activations with `Tensor.pin_memory()`, which raises "Cannot access
    accelerator device when none is available" on a CPU-only machine. Pinning only speeds host-to-device copies, so
    without an accelerator it is safely skipped. Returns True when the patch was applied."""
    import torch

    if torch.accelerator.is_available():
        return False
    if Version(importlib.metadata.version("llmcompressor")) >= Version("0.15"):
        return False  # not known to be affected: let a newer release fail loudly if the defect remains
    from llmcompressor.pipelines.cache import IntermediatesCache

    IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None  # type: ignore[method-assign]
    return True
