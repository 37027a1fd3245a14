"""`qllm plan <hydra overrides> [-m]`: the memory plan of every cell, as one table, without running anything.

Overrides are those of `qllm run`; `-m` expands comma lists into every combination with Hydra's own override parser
and basic sweeper, after the config's own `hydra.sweeper.params` (an experiment preset's sweep), as Hydra does. Sources are not checked (a hub model absent from the local cache plans from its YAML `arch`):
planning sizes cells for the machine `plan.gpus` describes, offline (HF_HUB_OFFLINE is set for this process unless
already set). A method with a single valid bits value (fp8, smoothquant: 8) is planned at it when `bits` is not
given, and the row says so (`qllm run` would need `bits=8`).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Union

from ..errors import QllmConfigError

MULTIRUN = ("-m", "--multirun")


def expand(overrides: list[str], multirun: bool) -> list[list[str]]:
    """Every combination the overrides describe (Hydra's BasicSweeper), or the one cell they are."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as e:
        raise QllmConfigError(f"cannot parse the overrides: {e}") from None
    sweeps = [o.input_line for o in parsed if o.is_sweep_override()]
    if not multirun:
        if sweeps:
            raise QllmConfigError(f"{', '.join(sweeps)}: a sweep needs -m (qllm plan -m {' '.join(overrides)})")
        return [list(overrides)]
    cells = [cell for batch in BasicSweeper.split_arguments(parsed, None) for cell in batch]
    params = _sweeper_params(cells[0]) if cells else []
    if params:  # what BasicSweeper.sweep does: the config's hydra.sweeper.params, then the command line's
        parsed = OverridesParser.create().parse_overrides(params + list(overrides))
        cells = [cell for batch in BasicSweeper.split_arguments(parsed, None) for cell in batch]
    return cells


def _sweeper_params(overrides: list[str]) -> list[str]:
    """`hydra.sweeper.params` of the composed config (an experiment preset's sweep), as `key=value` overrides."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from ..config import CONF_DIR

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=overrides, return_hydra_config=True)
        params = OmegaConf.to_container(cfg.hydra.sweeper.get("params") or {}, resolve=False)
    except Exception:  # noqa: BLE001 - the cell itself reports what is wrong when it is planned
        return []
    return [f"{k}={v}" for k, v in (params or {}).items()]


def _bits_given(overrides: list[str]) -> bool:
    return any(o.lstrip("+").split("=", 1)[0] == "bits" for o in overrides)


def plan_overrides(overrides: list[str]) -> Union["CellPlan", tuple[str, str]]:  # noqa: F821
    """One cell's memory plan, or (its name, why planning refused it)."""
    from omegaconf import OmegaConf

    from ..planning import compose_config, plan_cell
    from .cells import PlanSettings, plan_cell_memory

    name = " ".join(overrides) or "defaults"
    try:
        cfg = compose_config(overrides)
        allowed = list(cfg.method.bits_allowed or [])
        if not _bits_given(overrides) and len(allowed) == 1 and cfg.bits != allowed[0]:
            cfg = compose_config([*overrides, f"bits={allowed[0]}"])
        cell = plan_cell(cfg, check_sources=False)
        settings = PlanSettings.of(OmegaConf.to_container(cfg.plan, resolve=True))
        return plan_cell_memory(cell, settings)
    except QllmConfigError as e:
        return name, str(e)
    except Exception as e:  # noqa: BLE001 - Hydra's composition errors (an unknown option) name what is valid
        return name, f"{type(e).__name__}: {e}"


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="qllm plan", description=__doc__.splitlines()[0],
                                epilog="e.g. qllm plan -m model=llama-3.1-405b-instruct method=none,gptq,fp8 "
                                       "plan.gpus=8xH100-80GB")
    p.add_argument("-m", "--multirun", action="store_true", help="expand comma lists into every combination")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, as for qllm run")
    multirun = any(a in MULTIRUN for a in argv)
    args = p.parse_args([a for a in argv if a not in MULTIRUN])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported: no hub probes
    from .. import config
    from .render import table

    try:
        overrides = config.rewrite_overrides(args.overrides)
        config.check_override_keys(overrides)
        cells = expand(overrides, multirun)
    except QllmConfigError as e:
        print(f"[qllm] {e}", file=sys.stderr)
        return 2
    plans = [plan_overrides(c) for c in cells]
    from rich.console import Console

    from .cells import CellPlan

    console = Console(width=max(Console().width, 160))
    console.print(table(plans))
    for x in plans:  # the reasons again, one line each (copyable; the table wraps them)
        if isinstance(x, CellPlan) and not x.fits:
            console.print(f"refused {x.name}: {x.refusal}", soft_wrap=True, markup=False, highlight=False)
        elif not isinstance(x, CellPlan):
            console.print(f"invalid {x[0]}: {x[1]}", soft_wrap=True, markup=False, highlight=False)
    fit = sum(isinstance(x, CellPlan) and x.fits for x in plans)
    refused = sum(isinstance(x, CellPlan) and not x.fits for x in plans)
    invalid = len(plans) - fit - refused
    console.print(f"{fit} of {len(plans)} cell(s) fit" + (f", {refused} refused" if refused else "")
                  + (f", {invalid} invalid" if invalid else ""))
    return 0
