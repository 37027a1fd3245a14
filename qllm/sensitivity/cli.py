"""`qllm sensitivity <hydra overrides> [--seeds 0,1] [--out DIR] [--force]`: the per-layer sensitivity table of a
model (its calibration: `calibration=`, candidates: `sensitivity.candidates=`), the end-to-end check, the ranking's
stability across calibration seeds, a heatmap, all written to --out and logged to MLflow as one run (kind
sensitivity). The table is cached: `method=mixed` and `profile.sensitivity` cells with the same inputs reuse it."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import QllmConfigError


def _args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="qllm sensitivity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0", help="calibration seeds, comma-separated: with two or more, the "
                   "Spearman rho of the reference candidate's layer ranking between the first and each other")
    p.add_argument("--out", type=Path, default=None, help="output dir (default outputs/sensitivity/<model>-<key>)")
    p.add_argument("--force", action="store_true", help="measure again even when the table is cached")
    p.add_argument("--no-log", action="store_true", help="do not log to MLflow")
    return p.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    a, overrides = _args(sys.argv[1:] if argv is None else argv)
    try:
        seeds = [int(s) for s in a.seeds.split(",")]
        return run(overrides, seeds, a.out, a.force, log_mlflow=not a.no_log)
    except (QllmConfigError, ValueError) as e:
        print(f"[qllm] sensitivity: {e}", file=sys.stderr)
        return 2


def _plan(overrides: list[str]) -> tuple[Any, Any, dict]:
    """(cfg, cell, calibration) of the overrides; the calibration of the config even when the cell's method has
    none (the table is measured on calibration activations whatever the cell's method)."""
    from omegaconf import OmegaConf

    from ..planning import compose_config, plan_cell

    cfg = compose_config(overrides)
    cell = plan_cell(cfg)
    calibration = cell.calibration or OmegaConf.to_container(cfg.calibration, resolve=True)
    return cfg, cell, calibration


def run(overrides: list[str], seeds: list[int], out: Path | None, force: bool, log_mlflow: bool = True) -> int:
    import torch
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..report.stats import spearman
    from ..sources.models import prepare
    from ..stages.calibration import calibration_dataset
    from ..stages.quantize import _ignore
    from . import analysis, artifacts

    cfg, cell, calibration = _plan(overrides)
    conf = OmegaConf.to_container(cfg.sensitivity, resolve=True)
    settings = analysis.Settings.of({**conf, "ignore": _ignore(cell.recipe) if cell.recipe else ["lm_head"]})
    t0 = time.perf_counter()
    source = prepare(cell.model, cell.data_dir, cell.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, cell.model["dtype"]))
    model.eval()
    torch.manual_seed(cell.seed)
    tables = []
    for i, seed in enumerate(seeds):
        calib = {**calibration, "seed": seed}
        ds = calibration_dataset(calib, tokenizer, cell.data_dir)
        s = settings if i == 0 else analysis.Settings(**{**settings.__dict__, "e2e_layers": 0})
        print(f"[qllm] sensitivity: {cell.model['name']}, calibration seed {seed}: {len(ds)} x "
              f"{calib['max_seq_len']} tokens, {len(s.candidates)} candidates", flush=True)
        tables.append(analysis.load_or_measure(model, tokenizer, cell.model, calib, cell.data_dir, cell.cache_dir,
                                               s, ds, force=force))
    wall = time.perf_counter() - t0
    main_table = tables[0]
    ref = settings.reference
    layers = list(main_table.sqnr)
    stability = {f"seed{seeds[0]}_vs_seed{seed}": spearman([main_table.sqnr[ly][ref] for ly in layers],
                                                           [t.sqnr[ly][ref] for ly in layers])[0]
                 for seed, t in zip(seeds[1:], tables[1:])}
    out = out or Path("outputs") / "sensitivity" / f"{cell.model['name']}-{main_table.key}"
    out.mkdir(parents=True, exist_ok=True)
    artifacts.write(main_table, out, cell.model["name"], stability, wall)
    print(artifacts.summary(main_table, stability, wall), flush=True)
    print(f"[qllm] sensitivity: written to {out}", flush=True)
    if log_mlflow:
        _log(cfg, cell, main_table, stability, out, wall)
    return 0


def _log(cfg: Any, cell: Any, table: Any, stability: dict, out: Path, wall: float) -> None:
    import mlflow

    from ..names import Kind, Tag
    from ..store import tracking

    tracking.configure(cfg.tracking)
    with mlflow.start_run(run_name=f"sensitivity · {cell.model['name']}",
                          tags={Tag.KIND: Kind.SENSITIVITY.value, "qllm.sensitivity.key": table.key}):
        mlflow.log_params({"model": cell.model["name"], "candidates": ",".join(table.settings["candidates"]),
                           "reference": table.settings["reference"], "calibration": cell.calibration and
                           cell.calibration.get("name") or "wikitext2"})
        metrics = {"sensitivity/wall_s": wall, "sensitivity/layers": len(table.sqnr)}
        if table.e2e and table.e2e.get("spearman_rho") is not None:
            metrics["sensitivity/e2e_spearman"] = table.e2e["spearman_rho"]
        for k, v in stability.items():
            if v is not None:
                metrics[f"sensitivity/seed_spearman"] = v
        mlflow.log_metrics(metrics)
        mlflow.log_artifacts(str(out), "sensitivity")
