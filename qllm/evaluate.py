"""Evaluate stage: a checkpoint (quantized or baseline) + the cell's tasks -> lm-eval results.

Runs in its own process (`python -m qllm.evaluate --cell cell.json --model PATH --out DIR`). The model is loaded once
(lm-eval HF backend) and each task is evaluated with its own shots and limit, since lm-eval takes one of each per call.
A compressed-tensors checkpoint is decompressed to dense weights by transformers on load: scores are those of the
quantized weights; speed on this backend is dense speed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from .cell import Cell


def _device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def weight_fingerprint(model: Any, group_size: int | None) -> dict:
    """Evidence of what was evaluated, taken from the first decoder MLP down-projection as lm-eval ran it:
    - the most distinct weight values in any quantization group (or row): a b-bit integer grid allows at most 2**b,
      dense weights have about as many as the group is wide;
    - the relative change of the layer's output vs a plain matmul with those weights on a random input: non-zero
      only when activations are quantized on the fly (W8A8 schemes)."""
    import torch

    name, lin = next((n, m) for n, m in model.named_modules() if n.endswith("mlp.down_proj"))
    w = lin.weight.detach()
    groups = w.float().cpu().reshape(-1, group_size) if group_size else w.float().cpu()
    levels = max(len(torch.unique(g)) for g in groups[:256])
    x = torch.randn(4, w.shape[1], generator=torch.Generator().manual_seed(0)).to(w.device, w.dtype)
    with torch.no_grad():
        dense = torch.nn.functional.linear(x, w, getattr(lin, "bias", None))
        act_err = ((lin(x) - dense).float().norm() / dense.float().norm()).item()
    return {
        "layer": name,
        "group_size": group_size,
        "group_width": groups.shape[1],
        "max_distinct_per_group": levels,
        "activation_quant_rel_error": act_err,
    }


def evaluate(cell: Cell, model_path: str, out_dir: Path) -> dict:
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from . import results, tasks

    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cell.seed)
    ev = cell.eval
    t0 = time.perf_counter()
    rev = cell.model["revision"] if (cell.model["source"] == "hub" and not cell.quantized) else None
    lm = HFLM(
        pretrained=model_path,
        revision=rev or "main",
        dtype=cell.model["dtype"],
        device=_device(ev["device"]),
        batch_size=ev["batch_size"],
        max_length=ev.get("max_length"),
        trust_remote_code=bool(cell.model.get("trust_remote_code")),
    )
    load_s = time.perf_counter() - t0

    per_task: dict[str, Any] = {}
    for key, entry in cell.tasks.items():
        print(f"[qllm] evaluate: {key} ({entry['num_fewshot']}-shot, limit {entry['limit']}) ...", flush=True)
        t = time.perf_counter()
        spec, top = tasks.lm_eval_spec(entry, lm.tokenizer)
        res = simple_evaluate(
            model=lm,
            tasks=[spec],
            num_fewshot=entry["num_fewshot"] if isinstance(spec, str) else None,  # inline configs carry their own
            gen_kwargs=tasks.gen_kwargs(entry),
            limit=entry["limit"],
            apply_chat_template=bool(ev.get("apply_chat_template")),
            fewshot_as_multiturn=bool(ev.get("apply_chat_template")),
            log_samples=True,  # per-sample correctness is always kept (difficulty, flips); full logs only on request
            bootstrap_iters=ev["bootstrap_iters"],
            random_seed=ev["seed"],
            numpy_random_seed=ev["seed"],
            torch_random_seed=ev["seed"],
            fewshot_random_seed=ev["seed"],
        )
        summary = results.summarize_task(res, top, entry)
        records = results.per_sample_records(res, tasks.difficulty_of(entry))
        summary["by_difficulty"] = results.by_difficulty(records, entry["metric"])
        summary["wall_s"] = round(time.perf_counter() - t, 2)
        per_task[key] = summary
        with open(out_dir / f"per_sample_{key}.jsonl", "w") as f:
            f.writelines(json.dumps(r, default=str) + "\n" for r in records)
        if ev["log_samples"]:
            with open(out_dir / f"samples_{key}.jsonl", "w") as f:
                for leaf_samples in res["samples"].values():
                    f.writelines(json.dumps(x, default=str) + "\n" for x in leaf_samples)

    # after the forward passes: transformers decompresses compressed-tensors weights lazily, on the first forward
    fingerprint = weight_fingerprint(lm.model, cell.group_size)
    result = {
        "tasks": per_task,
        "suite": results.suite_score(per_task),
        "model_path": model_path,
        "fingerprint": fingerprint,
        "device": _device(ev["device"]),
        "speed_note": "hf backend: compressed-tensors weights are decompressed to dense; speed is dense speed",
        "wall_s": {"load": round(load_s, 2), "total": round(time.perf_counter() - t0, 2)},
    }
    (out_dir / "results.json").write_text(json.dumps(result, indent=2, default=str))
    return result


def main() -> None:
    p = argparse.ArgumentParser(description="qllm evaluate stage")
    p.add_argument("--cell", required=True, type=Path)
    p.add_argument("--model", default=None, help="checkpoint dir to evaluate (default: the cell's base model)")
    p.add_argument("--out", required=True, type=Path, help="output dir (results.json, samples)")
    a = p.parse_args()
    cell = Cell.from_json(a.cell.read_text())
    if a.model is None:
        from .models import prepare

        a.model = prepare(cell.model, cell.data_dir, cell.cache_dir)
    evaluate(cell, a.model, a.out)


if __name__ == "__main__":
    main()
