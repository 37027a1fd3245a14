"""`qllm sbatch <overrides>` (or `python -m qllm.sbatch`): a dry run of a SLURM sweep. Prints the jobs the sweep
would have and the sbatch script that `python -m qllm.run -m <the same overrides>` would submit; submits nothing
(sbatch is never called, nothing is written).

    qllm sbatch +experiment=paper_llama31_8b
    qllm sbatch +experiment=paper_llama31_70b hydra.launcher.partition=gpu '+experiment/scheme=gptq_w4,awq_w4'

Everything goes through the machinery the real sweep uses: the config is composed by Hydra (`-m` implied), the jobs
are the expansion of `hydra.sweeper.params` and the command line's comma lists by Hydra's BasicSweeper, the
executor parameters are mapped from `hydra.launcher` exactly as hydra-submitit-launcher's SlurmLauncher.launch
maps them, and the script is rendered by submitit's SlurmExecutor (its `_make_sbatch_string`). submitit submits one
job array per sweep batch (all of a sweep without hydra.sweeper.max_batch_size): one script whose array task i runs
job i of the batch; that script is what is printed, once per batch. `experiment=<name>` is read as
`+experiment=<name>` (the presets are added to the defaults, Hydra's convention for experiment configs).
Cells are not planned here (no hub, data or GPU needed): `qllm plan -m <the same overrides>` does that.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any, Iterator, Optional
from unittest import mock

from omegaconf import DictConfig, OmegaConf

from .config import MULTIRUN_FLAGS, rewrite_overrides
from .errors import QllmConfigError

# hydra.job.name of `python -m qllm.run` (the task function's module): the sbatch --job-name submitit gets
JOB_NAME = "run"


def normalize(overrides: list[str]) -> list[str]:
    """The command line as `qllm run -m` reads it: `-m` dropped (implied), `experiment=x` as `+experiment=x`,
    `launch.<stage>=` as qllm's own rewrite."""
    out = []
    for ov in overrides:
        if ov in MULTIRUN_FLAGS:
            continue
        out.append("+" + ov if ov.startswith("experiment=") else ov)
    return rewrite_overrides(out)


def compose(overrides: list[str]) -> DictConfig:
    """The sweep's own config (with Hydra's node), as the launching process of `qllm run -m` sees it."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    from .config import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        # multirun mode, as `-m` composes it: comma lists are sweeps (left to the sweeper), not errors
        cfg = GlobalHydra.instance().hydra.compose_config(  # type: ignore[union-attr]
            "config", overrides=[f"hydra.job.name={JOB_NAME}", *overrides], run_mode=RunMode.MULTIRUN)
    return cfg


def expand(cfg: DictConfig, max_batch_size: Optional[int] = None) -> list[list[list[str]]]:
    """The sweep's batches of jobs, each job its override list, as BasicSweeper.sweep makes them: the preset's
    hydra.sweeper.params first, then the command line's task overrides (the same key: the command line wins)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = OmegaConf.to_container(cfg.hydra.sweeper.get("params") or {}, resolve=True)
    assert isinstance(params, dict)
    arguments = [f"{k}={v}" for k, v in params.items()] + list(cfg.hydra.overrides.task)
    overrides = OverridesParser.create().parse_overrides(arguments)
    if max_batch_size is None:
        max_batch_size = cfg.hydra.sweeper.get("max_batch_size")
    return BasicSweeper.split_arguments(overrides, max_batch_size)


@contextlib.contextmanager
def _without_srun() -> Iterator[None]:
    """submitit's SlurmExecutor refuses to exist where `srun` is not on PATH (a laptop, CI): let it, to render."""
    from submitit.slurm.slurm import SlurmExecutor

    with mock.patch.object(SlurmExecutor, "affinity", classmethod(lambda cls: 2)):
        yield


def executor(launcher: dict[str, Any]) -> Any:
    """submitit's SlurmExecutor with the parameters hydra-submitit's SlurmLauncher.launch gives it (the mapping of
    hydra_plugins/hydra_submitit_launcher/submitit_launcher.py, 1.2.0): submitit_folder and max_num_timeout at
    construction, the BaseQueueConf keys as AutoExecutor's generic names, the rest prefixed `slurm_`."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    params = {k: v for k, v in launcher.items() if k != "_target_"}
    init_keys = {"max_num_timeout"}
    init = {"folder": params["submitit_folder"], **{f"slurm_{k}": v for k, v in params.items() if k in init_keys}}
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    update = {k if k in base else f"slurm_{k}": v for k, v in params.items()
              if k not in init_keys | {"submitit_folder"}}
    with _without_srun():
        ex = submitit.AutoExecutor(cluster="slurm", **init)
        ex.update_parameters(**update)
    return ex._executor


def sbatch_script(slurm_executor: Any, n_jobs: int) -> str:
    """The file submitit hands to `sbatch` for n_jobs jobs: one job's script, or (n_jobs > 1) the job array's,
    as SlurmExecutor._internal_process_submissions builds it (map_count set on a copy of the parameters)."""
    from submitit.slurm.slurm import _make_sbatch_string

    params = dict(slurm_executor.parameters)
    if n_jobs > 1:
        params["map_count"] = n_jobs
    return _make_sbatch_string(command=slurm_executor._submitit_command_str, folder=slurm_executor.folder, **params)


def render(overrides: list[str], validate: bool = True) -> str:
    cfg = compose(overrides)
    launcher_cfg = cfg.hydra.launcher
    target = str(launcher_cfg.get("_target_", ""))
    if not target.endswith("SlurmLauncher"):
        raise QllmConfigError(f"hydra.launcher is {target or 'the basic launcher'}, not SLURM: add "
                              "hydra/launcher=slurm (or an experiment preset, +experiment=paper_...)")
    launcher = OmegaConf.to_container(launcher_cfg, resolve=True)
    assert isinstance(launcher, dict)
    batches = expand(cfg)
    n = sum(len(b) for b in batches)
    lines = ["[qllm sbatch] dry run: nothing is submitted (sbatch is never called)",
             f"sweep dir: {cfg.hydra.sweep.dir}",
             f"jobs: {n} in {len(batches)} SLURM job array(s) (hydra.launcher: {target.rsplit('.', 1)[-1]}, "
             f"at most {launcher.get('array_parallelism')} at once)"]
    idx = 0
    for batch in batches:
        for job in batch:
            lines.append(f"  #{idx}: {' '.join(job)}")
            idx += 1
    if validate:  # what BasicSweeper.validate_batch_is_legal does before it launches: every job composes
        for batch in batches:
            for job in batch:
                compose(job)
    slurm_executor = executor(launcher)
    first = 0
    for i, batch in enumerate(batches):
        what = (f"job array of {len(batch)} jobs: array task i runs job #{first}+i" if len(batch) > 1
                else f"job #{first}")
        lines += ["", f"# ---- sbatch script {i + 1}/{len(batches)} ({what}) ----",
                  sbatch_script(slurm_executor, len(batch)).rstrip("\n")]
        first += len(batch)
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="qllm sbatch", description="Print the jobs and the sbatch script of a SLURM sweep without submitting "
        "it (the overrides of `python -m qllm.run -m ...`; -m implied).")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. +experiment=paper_llama31_8b")
    parser.add_argument("--no-validate", action="store_true", help="do not compose every job's config")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        sys.stdout.write(render(normalize(args.overrides), validate=not args.no_validate))
    except (QllmConfigError, HydraException, OmegaConfBaseException, ValueError) as e:
        print(f"[qllm sbatch] {str(e).strip()}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
