"""Cell keys are a contract with users' stores: a finished sweep must stay reusable when qllm's code changes.

tests/data/cell_keys_issue10.json holds the keys (cell, quant, task, speed keys and cache entry names) of a fixed set
of cells, computed by the code as it was before the reorganisation of issue 10. Planning the same overrides today
must give the same keys. The keys include the library versions and the absolute data_dir path (task configs name
their files), so both are pinned here: the versions to those recorded, data_dir to a fixed path (a link to the
data folder), so the test checks the hashing, not the machine.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import DATA_DIR

RECORD = json.loads((Path(__file__).parent / "data" / "cell_keys_issue10.json").read_text())


@pytest.fixture(scope="module")
def fixed_data_dir(data_dir) -> Path:
    fixed = Path(RECORD["data_dir"])
    fixed.parent.mkdir(parents=True, exist_ok=True)
    if not (fixed.is_symlink() and os.readlink(fixed) == str(DATA_DIR)):
        tmp = fixed.with_name(f".{fixed.name}.{os.getpid()}")  # replaced atomically: parallel test workers agree
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(DATA_DIR)
        os.replace(tmp, fixed)
    return fixed


@pytest.fixture(scope="module")
def plan(fixed_data_dir):
    from qllm import cell as cells
    from qllm.planning import compose_cell

    recorded = RECORD["versions"]
    original = cells.versions
    cells.versions = lambda names: {n: recorded[n] for n in names}
    try:
        yield lambda overrides: compose_cell([f"data_dir={fixed_data_dir}", "cache_dir=/qllm-key-contract-cache",
                                              *overrides])
    finally:
        cells.versions = original


@pytest.mark.parametrize("name", sorted(RECORD["cells"]))
def test_keys_unchanged(plan, name):
    from qllm.store import cache

    want = RECORD["cells"][name]
    c = plan(want["overrides"])
    got = {"key": c.key, "quant_key": c.quant_key, "task_keys": c.task_keys, "speed_key": c.speed_key,
           "checkpoint_dir": cache.checkpoint_dir(c).name if c.quantized else None,
           "eval_dirs": {t: cache.eval_dir(c, t).name for t in c.tasks}}
    assert got == {k: want[k] for k in got}, name
