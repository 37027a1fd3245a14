"""Quantize stage: model + recipe + calibration -> a compressed-tensors checkpoint in the content-addressed cache.

Runs in its own process (`python -m qllm.quantize --cell cell.json --out result.json`, or under a launch prefix).
The checkpoint is written to a temp dir beside its final place and renamed into place when complete, with a
manifest (config, versions, wall time, sizes, checksums): a killed job never leaves a directory that looks done.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import yaml

from .cell import Cell

MANIFEST = "qllm_manifest.json"


def checkpoint_dir(cell: Cell) -> Path:
    return Path(cell.cache_dir) / "quantized" / f"{cell.model['name']}-{cell.method}-w{cell.bits}-{cell.quant_key}"


def read_manifest(path: Path) -> dict | None:
    """The manifest of a complete checkpoint, or None (absent, partial or unreadable)."""
    try:
        return json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _file_digests(root: Path) -> dict[str, dict]:
    out = {}
    for f in sorted(root.rglob("*")):
        if f.is_file() and f.name != MANIFEST:
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            out[str(f.relative_to(root))] = {"bytes": f.stat().st_size, "sha256": h.hexdigest()}
    return out


def quantize(cell: Cell, force: bool = False) -> dict:
    """Quantize once; return the manifest (reused when the checkpoint is already in the cache, unless forced)."""
    out = checkpoint_dir(cell)
    manifest = read_manifest(out)
    if manifest is not None and not force:
        print(f"[qllm] quantize: reusing cached checkpoint {out}", flush=True)
        return {**manifest, "reused": True}

    import torch
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import compat, models
    from .calibration import calibration_dataset

    torch.manual_seed(cell.seed)
    t0 = time.perf_counter()
    source = models.prepare(cell.model, cell.data_dir, cell.cache_dir)
    trust = bool(cell.model.get("trust_remote_code"))
    rev = cell.model["revision"] if cell.model["source"] == "hub" else None
    tokenizer = AutoTokenizer.from_pretrained(source, revision=rev, trust_remote_code=trust)
    model = AutoModelForCausalLM.from_pretrained(
        source, revision=rev, dtype=getattr(torch, cell.model["dtype"]), trust_remote_code=trust
    )
    t_load = time.perf_counter() - t0

    kwargs: dict = {}
    n_tokens = 0
    if cell.calibration:
        ds = calibration_dataset(cell.calibration, tokenizer, cell.data_dir)
        n_tokens = sum(len(r) for r in ds["input_ids"])
        kwargs = dict(dataset=ds, num_calibration_samples=len(ds), max_seq_length=cell.calibration["max_seq_len"])
    patched = "AWQModifier" in cell.recipe["quant_stage"]["quant_modifiers"] and compat.awq_cpu_pin_memory()

    print(f"[qllm] quantize: {cell.name} ({cell.scheme}) ...", flush=True)
    t1 = time.perf_counter()
    oneshot(model=model, tokenizer=tokenizer, recipe=yaml.safe_dump(cell.recipe, sort_keys=False), **kwargs)
    t_quant = time.perf_counter() - t1

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp, save_compressed=True)
        tokenizer.save_pretrained(tmp)
        files = _file_digests(tmp)
        manifest = {
            "cell_quant_key": cell.quant_key,
            "model": cell.model,
            "method": cell.method,
            "bits": cell.bits,
            "scheme": cell.scheme,
            "recipe": cell.recipe,
            "calibration": cell.calibration,
            "calibration_tokens": n_tokens,
            "versions": cell.quant_versions,
            "python": platform.python_version(),
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "workarounds": ["llmcompressor AWQ pin_memory on CPU skipped"] if patched else [],
            "wall_s": {"load": round(t_load, 2), "quantize": round(t_quant, 2),
                       "total": round(time.perf_counter() - t0, 2)},
            "checkpoint_bytes": sum(f["bytes"] for f in files.values()),
            "files": files,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared with the MLflow UI and other users
        if force and out.exists():  # move the old one aside first: a half-deleted dir must never look complete
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, old)
            shutil.rmtree(old)
        try:
            os.rename(tmp, out)  # atomic; fails if another job finished the same checkpoint first
        except OSError:
            if read_manifest(out) is None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {**manifest, "reused": False}


def main() -> None:
    p = argparse.ArgumentParser(description="qllm quantize stage")
    p.add_argument("--cell", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path, help="where to write the stage result (JSON)")
    p.add_argument("--force", action="store_true", help="quantize again even if the checkpoint is cached")
    a = p.parse_args()
    cell = Cell.from_json(a.cell.read_text())
    manifest = quantize(cell, a.force)
    a.out.write_text(json.dumps({"checkpoint": str(checkpoint_dir(cell)), "manifest": manifest}, indent=2))


if __name__ == "__main__":
    main()
