"""Quantize stage: model + recipe + calibration -> a compressed-tensors checkpoint in the content-addressed cache.

Runs in its own process (`python -m qllm.stages.quantize --cell cell.json --out quantize.json`, under the stage's
launcher). The checkpoint is written to a temp dir beside its final place and renamed into place when complete, with
a manifest (config, versions, wall time, sizes, checksums): a killed job never leaves a directory that looks done.
With several ranks (launch.quantize=torchrun), every rank joins the process group, calibrates on its share of the
samples and runs llmcompressor's collectives; the main rank alone saves and reports. On GPUs the model is loaded
through compressed-tensors' `load_offloaded_model` (rank 0 reads the weights, the others share them), the library's
documented distributed recipe; on CPU each rank holds its own copy.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from ..cell import Cell
from ..measure import profiling
from ..records import Manifest, QuantizeResult
from ..store import cache
from . import process


def quantize(cell: Cell, force: bool = False, profile_dir: Path | None = None) -> QuantizeResult:
    """Quantize once. A cached checkpoint is reused when it passes its integrity check (unless forced); parallel jobs
    needing the same checkpoint wait for the one making it. With several ranks the main rank decides (`_reuse`)."""
    out = cache.checkpoint_dir(cell)
    if process.world_size() > 1:
        _join_group()  # before deciding: the main rank's decision is broadcast to the others
    with cache.locked(out) if process.is_main() else contextlib.nullcontext():
        if _reuse(out, force):
            return QuantizeResult(str(out), Manifest.from_dict(cache.read_manifest(out) or {}), reused=True)
        with profiling.for_stage(cell, "quantize", profile_dir, rank=process.rank()) as prof:
            return QuantizeResult(str(out), _quantize(cell, out, force, prof), reused=False)


def _reuse(out: Path, force: bool) -> bool:
    """Whether to reuse the cached checkpoint `out`. The main rank decides, under the lock it alone holds, and with
    several ranks broadcasts the decision: ranks checking on their own could disagree (another job may publish the
    checkpoint between their checks) and then wait forever in collectives the others never join."""
    reuse = _verified_cache(out, force) if process.is_main() else False
    return _from_main(reuse) if process.world_size() > 1 else reuse


def _verified_cache(out: Path, force: bool) -> bool:
    """The cached checkpoint passes its integrity check (then it is reused); a broken one is moved aside."""
    if force or not out.exists():
        return False
    problem = cache.verify(out)
    if problem is None:
        print(f"[qllm] quantize: reusing cached checkpoint {out} (integrity verified)", flush=True)
        cache.touch(out)
        return True
    moved = cache.quarantine(out)
    print(f"[qllm] quantize: cached checkpoint {out.name} failed its integrity check ({problem}); "
          f"moved aside to {moved.name}, quantizing again", flush=True)
    return False


def _from_main(value: bool) -> bool:
    """The main rank's `value`, on every rank of the (joined) process group."""
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])


def _join_group() -> None:
    from . import compat

    print(f"[qllm] quantize: rank {process.rank()} of {process.world_size()} joined the process group "
          f"({compat.init_distributed()})", flush=True)


def _load(cell: Cell) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _prepared_source(cell)
    trust = bool(cell.model.get("trust_remote_code"))
    rev = cell.model["revision"] if cell.model["source"] == "hub" else None
    tokenizer = AutoTokenizer.from_pretrained(source, revision=rev, trust_remote_code=trust)
    kwargs: dict = dict(revision=rev, dtype=getattr(torch, cell.model["dtype"]), trust_remote_code=trust)
    if process.world_size() > 1 and torch.accelerator.is_available():
        from compressed_tensors.offload import load_offloaded_model

        with load_offloaded_model():
            return AutoModelForCausalLM.from_pretrained(source, device_map="auto_offload", **kwargs), tokenizer
    return AutoModelForCausalLM.from_pretrained(source, **kwargs), tokenizer


def _prepared_source(cell: Cell) -> str:
    """The model's local dir, made once: with several ranks the main rank converts/creates it (a GGUF or a random
    model), the others wait at a barrier and then read it."""
    from ..sources import models

    if process.world_size() == 1:
        return models.prepare(cell.model, cell.data_dir, cell.cache_dir)
    import torch.distributed as dist

    if process.is_main():
        source = models.prepare(cell.model, cell.data_dir, cell.cache_dir)
    dist.barrier()
    if not process.is_main():
        source = models.prepare(cell.model, cell.data_dir, cell.cache_dir)
    return source


def _oneshot(cell: Cell, model: Any, tokenizer: Any, manifest: Manifest) -> tuple[int, int, list[str]]:
    """Calibration data + llmcompressor's oneshot; (calibration tokens, samples, the workarounds used). A mixed
    recipe is resolved first from the sensitivity table (recorded in the manifest with the allocation)."""
    from llmcompressor import oneshot

    from . import compat
    from .calibration import calibration_dataset

    kwargs: dict = {}
    n_tokens = n_samples = 0
    workarounds = []
    recipe = cell.recipe
    if cell.calibration:
        ds = calibration_dataset(cell.calibration, tokenizer, cell.data_dir)
        n_tokens, n_samples = sum(len(r) for r in ds["input_ids"]), len(ds)  # all ranks' samples together
        recipe = _sensitivity(cell, model, tokenizer, ds, manifest)
        if process.world_size() > 1:
            ds = compat.calibration_shard(ds, process.rank(), process.world_size())
            workarounds.append("calibration samples split across ranks by qllm (llmcompressor's own split "
                               "feeds every rank the same samples)")
        kwargs = dict(dataset=ds, num_calibration_samples=len(ds), max_seq_length=cell.calibration["max_seq_len"],
                      batch_size=cell.calibration.get("batch_size", 1),
                      propagate_error=cell.calibration.get("propagate_error", True))
    if "AWQModifier" in cell.recipe["quant_stage"]["quant_modifiers"]:
        if compat.awq_cpu_pin_memory():
            workarounds.append("llmcompressor AWQ pin_memory on CPU skipped")
        if compat.awq_sdpa_grid_search(model):
            workarounds.append("llmcompressor AWQ grid search runs attention as SDPA (calibration forces eager)")
        if compat.awq_linear_loss_by_gram():
            workarounds.append("llmcompressor AWQ grid search scores Linear parents by the inputs' Gram matrix")
    if process.world_size() > 1 and compat.gptq_broadcast_unshared_cpu_modules():
        workarounds.append("llmcompressor broadcasts CPU modules' quantized weights across ranks")
    with _autocast(cell.calibration):
        oneshot(model=model, tokenizer=tokenizer, recipe=yaml.safe_dump(recipe, sort_keys=False), **kwargs)
    return n_tokens, n_samples, workarounds


def _sensitivity(cell: Cell, model: Any, tokenizer: Any, ds: Any, manifest: Manifest) -> dict:
    """The recipe to run: a mixed recipe resolved by its allocation over the sensitivity table (measured on the
    unquantized model, or taken from the cache); with profile.sensitivity the cell's table is measured too."""
    from ..sensitivity import analysis, mixed
    from ..sensitivity.allocate import allocate, fused_units

    spec = mixed.spec(cell.recipe)
    if cell.profile.get("sensitivity") and cell.sensitivity:
        settings = analysis.Settings.of({**cell.sensitivity, "ignore": _ignore(cell.recipe)})
        table = analysis.load_or_measure(model, tokenizer, cell.model, cell.calibration or {}, cell.data_dir,
                                         cell.cache_dir, settings, ds)
        manifest.sensitivity = _table_record(cell, table)
    if spec is None:
        return cell.recipe
    cands = mixed.candidates(spec)
    labels = [c.label for c in cands]
    settings = analysis.Settings(candidates=tuple(cands), reference="gptq-w4g64" if "gptq-w4g64" in labels
                                 else labels[0], ignore=tuple(_ignore(cell.recipe)), e2e_layers=0,
                                 actorder=spec.get("actorder"),
                                 dampening_frac=cell.recipe["quant_stage"]["quant_modifiers"]["GPTQModifier"]
                                 .get("dampening_frac", 0.01))
    table = analysis.load_or_measure(model, tokenizer, cell.model, cell.calibration or {}, cell.data_dir,
                                     cell.cache_dir, settings, ds)
    alloc = allocate(table.sqnr, table.params, table.in_features, cands, spec["target_bits"], table.scale_bits,
                     units=fused_units(list(table.sqnr)) if spec.get("tie_fused") else None)
    print(f"[qllm] quantize: mixed precision: {alloc.counts} layers, {alloc.avg_bits:.3f} bits per weight "
          f"(budget {alloc.target_bits:g})", flush=True)
    recipe = mixed.resolve(cell.recipe, alloc)
    manifest.allocation, manifest.applied_recipe = alloc.to_dict(), recipe
    manifest.sensitivity = manifest.sensitivity or _table_record(cell, table)
    return recipe


def _table_record(cell: Cell, table: Any) -> dict:
    """What the manifest says of the sensitivity table a cell used: its key, cache entry and measuring time."""
    from ..store.cache import sensitivity_dir

    return {"key": table.key, "entry": str(sensitivity_dir(cell.cache_dir, cell.model["name"], table.key)),
            "wall_s": table.wall_s}


def _ignore(recipe: dict) -> list[str]:
    """The layers the cell's recipe leaves unquantized (its quantizing modifier's `ignore`)."""
    for kwargs in (recipe.get("quant_stage", {}).get("quant_modifiers") or {}).values():
        if "ignore" in kwargs:
            return list(kwargs["ignore"])
    return ["lm_head"]


def _autocast(calibration: dict | None) -> contextlib.AbstractContextManager:
    """calibration.autocast: the calibration forwards' GEMMs in bf16/fp16 (weights stay in the model's dtype, so
    the saved checkpoint's dtype is unchanged); checked at planning (refused with GPTQ)."""
    import torch

    dtype = (calibration or {}).get("autocast")
    if not dtype:
        return contextlib.nullcontext()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # cache_enabled=False: autocast caches the low-dtype copy of each weight (leaf tensors needing grad) for the
    # whole context, and AWQ's grid search rewrites weight.data in place between forwards; with the cache every grid
    # point would be scored with the first weights (loss 0)
    return torch.autocast(device_type=device, dtype=getattr(torch, dtype), cache_enabled=False)


def _quantize(cell: Cell, out: Path, force: bool, prof: profiling.StageProfiler) -> Manifest:
    import torch

    torch.manual_seed(cell.seed)  # with several ranks the process group is joined already (quantize)
    t0 = time.perf_counter()
    with prof.phase("load"):
        model, tokenizer = _load(cell)
    t_load = time.perf_counter() - t0
    print(f"[qllm] quantize: {cell.name} ({cell.scheme}) ...", flush=True)
    manifest = Manifest(
        cell_quant_key=cell.quant_key, model=cell.model, method=cell.method, bits=cell.bits, scheme=cell.scheme,
        recipe=cell.recipe, calibration=cell.calibration, versions=cell.quant_versions,
        python=platform.python_version(), device="cuda" if torch.cuda.is_available() else "cpu",
        ranks=process.world_size(),
    )
    t1 = time.perf_counter()
    with prof.phase("quantize"):  # calibration data + oneshot: the cost of making this checkpoint
        n_tokens, n_samples, manifest.workarounds = _oneshot(cell, model, tokenizer, manifest)
    t_quant = time.perf_counter() - t1
    manifest.calibration_tokens, manifest.calibration_samples = n_tokens, n_samples
    if not process.is_main():
        # compressing for the save is collective in llmcompressor (compressed-tensors splits the modules across the
        # ranks); only the main rank writes files, the others take part and write nowhere that lasts
        import tempfile

        with tempfile.TemporaryDirectory(prefix="qllm-rank-save-") as scratch:
            model.save_pretrained(scratch, save_compressed=True)
        return manifest
    tmp = cache.temp_dir(out)
    try:
        with prof.phase("save"):
            model.save_pretrained(tmp, save_compressed=True)
            tokenizer.save_pretrained(tmp)
            manifest.files = cache.file_digests(tmp)
        manifest.wall_s = {"load": round(t_load, 2), "quantize": round(t_quant, 2),
                           "total": round(time.perf_counter() - t0, 2)}
        # memory of making it (peaks per phase, this process and its children), kept with the checkpoint so a cell
        # that reuses it still reports what it cost
        manifest.profile = dict(prof.phases)
        manifest.checkpoint_bytes = sum(f["bytes"] for f in manifest.files.values())
        manifest.created = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        (tmp / cache.MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=2))
        cache.publish(tmp, out, replace=force)  # atomic: a killed job leaves only a hidden temp dir
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def main() -> None:
    p = argparse.ArgumentParser(description="qllm quantize stage")
    p.add_argument("--cell", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path, help="where to write the stage result (JSON)")
    p.add_argument("--force", action="store_true", help="quantize again even if the checkpoint is cached")
    p.add_argument("--profile-dir", type=Path, default=None, help="where to write the memory profile")
    a = p.parse_args()
    process.start("quantize")
    result = quantize(Cell.from_json(a.cell.read_text()), a.force, a.profile_dir)
    if process.is_main():
        a.out.write_text(json.dumps(result.to_dict(), indent=2))


if __name__ == "__main__":
    main()
