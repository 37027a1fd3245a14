"""Evaluate stage: a checkpoint (quantized or baseline) + the cell's tasks -> lm-eval results.

Runs in its own process (`python -m qllm.evaluate --cell cell.json --model PATH --out DIR`). The model is loaded once
(lm-eval HF backend) and each task is evaluated with its own shots and limit, since lm-eval takes one of each per call.
A compressed-tensors checkpoint is decompressed to dense weights by transformers on load: scores are those of the
quantized weights; speed on this backend is dense speed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

from . import cache, profiling, results, sizes
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


def eval_dir(cell: Cell, task: str) -> Path:
    """Cache entry of one finished task (`task` = a task key of the cell, or "speed" for the speed benchmark)."""
    bits = f"w{cell.bits}" if cell.bits else cell.model["dtype"]
    key = cell.speed_key if task == SPEED else cell.task_keys[task]
    return Path(cell.cache_dir) / "evals" / f"{cell.model['name']}-{cell.method}-{bits}-{task}-{key}"


SPEED = "speed"


def _reusable(cell: Cell, force: bool) -> dict[str, dict]:
    """Tasks of this cell already evaluated (same task key) by an earlier or interrupted run, and the speed
    benchmark when it was measured with the same settings."""
    if force:
        return {}
    found = {}
    for key in [*cell.tasks, *([SPEED] if cell.speed_key else [])]:
        hit = cache.load_eval(eval_dir(cell, key), need_samples=bool(cell.eval["log_samples"]) and key != SPEED)
        if hit is not None:
            found[key] = hit
    return found


def evaluate(cell: Cell, model_path: str | None, out_dir: Path, force: bool = False,
             profile_dir: Path | None = None) -> dict:
    """Evaluate the cell's tasks that have no finished result in the cache; each task's result is cached as soon
    as it finishes, so an interrupted cell resumes with the missing tasks only. Then the speed benchmark, if asked.
    The model is loaded only if something is left to run."""
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    reused = _reusable(cell, force)
    per_task: dict[str, Any] = {}
    fingerprint: dict | None = None
    in_memory: dict | None = None
    for key, hit in reused.items():
        print(f"[qllm] evaluate: {key}: reusing the result finished {hit['finished']} (key "
              f"{eval_dir(cell, key).name.rsplit('-', 1)[1]}; force=true evaluates again)", flush=True)
        fingerprint, in_memory = fingerprint or hit["fingerprint"], in_memory or hit.get("weights_in_memory")
        model_path = model_path or hit.get("model_path")  # the baseline's dir, when nothing is left to load
        if key == SPEED:
            continue
        per_task[key] = {**hit["summary"], "reused": True}
        for name in ("per_sample.jsonl", "samples.jsonl"):
            if (eval_dir(cell, key) / name).is_file() and (name != "samples.jsonl" or cell.eval["log_samples"]):
                shutil.copyfile(eval_dir(cell, key) / name, out_dir / f"{name[:-6]}_{key}.jsonl")

    todo = [k for k in cell.tasks if k not in reused]
    measure_speed = bool(cell.speed_key) and SPEED not in reused
    speed = reused[SPEED]["speed"] if SPEED in reused else None
    load_s = 0.0
    with profiling.for_stage(cell, "evaluate", profile_dir) as prof:
        if todo or measure_speed:
            with prof.phase("load"):
                lm, load_s, model_path = _load(cell, model_path)

        def save(key: str, result: dict, files: dict) -> None:
            cache.save_eval(eval_dir(cell, key), {
                **result, "fingerprint": fingerprint, "weights_in_memory": in_memory, "task": key,
                "key": eval_dir(cell, key).name.rsplit("-", 1)[1], "cell": cell.name, "model": cell.model["name"],
                "method": cell.method, "bits": cell.bits, "quant_key": cell.quant_key, "model_path": model_path,
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }, files)

        if todo:
            with prof.phase("evaluate"):
                for key in todo:
                    per_task[key] = _evaluate_task(cell, lm, key, out_dir)
                    if key == todo[0]:  # after a forward pass: transformers decompresses compressed weights lazily
                        fingerprint = weight_fingerprint(lm.model, cell.group_size)
                        in_memory = sizes.weights_in_memory(lm.model)  # as evaluated: dense on the hf backend
                    files = {"per_sample.jsonl": out_dir / f"per_sample_{key}.jsonl"}
                    if cell.eval["log_samples"]:
                        files["samples.jsonl"] = out_dir / f"samples_{key}.jsonl"
                    save(key, {"summary": per_task[key]}, files)
        if measure_speed:
            from . import speed as speed_bench

            p = cell.profile
            print(f"[qllm] benchmark: speed at batch sizes {p['speed_batch_sizes']}, prompt {p['speed_prompt_len']} "
                  f"+ {p['speed_output_len']} tokens ...", flush=True)
            with prof.phase("benchmark"):
                speed = speed_bench.benchmark(
                    lm.model, lm.tokenizer, batch_sizes=tuple(p["speed_batch_sizes"]), prompt_len=p["speed_prompt_len"],
                    output_len=p["speed_output_len"], warmup=p["speed_warmup"], repeats=p["speed_repeats"],
                    seed=cell.seed)
            if not todo:  # the benchmark's warm-up ran the first forward pass
                fingerprint = weight_fingerprint(lm.model, cell.group_size)
                in_memory = sizes.weights_in_memory(lm.model)
            save(SPEED, {"speed": speed}, {})

    per_task = {k: per_task[k] for k in cell.tasks}  # the suite's order
    result = {
        "tasks": per_task,
        "suite": results.suite_score(per_task),
        "reused_tasks": sorted(k for k in reused if k != SPEED),
        "evaluated_tasks": todo,
        "speed": speed,
        "speed_reused": SPEED in reused,
        "weights_in_memory": in_memory,
        "model_path": model_path,
        "fingerprint": fingerprint,
        "device": _device(cell.eval["device"]) if (todo or measure_speed) else None,
        "speed_note": "hf backend: compressed-tensors weights are decompressed to dense; speed is dense speed",
        "wall_s": {"load": round(load_s, 2), "total": round(time.perf_counter() - t0, 2)},
    }
    (out_dir / "results.json").write_text(json.dumps(result, indent=2, default=str))
    return result


def _load(cell: Cell, model_path: str | None) -> tuple[Any, float, str]:
    import torch
    from lm_eval.models.huggingface import HFLM

    t0 = time.perf_counter()
    if model_path is None:
        from .models import prepare

        model_path = prepare(cell.model, cell.data_dir, cell.cache_dir)
    torch.manual_seed(cell.seed)
    ev = cell.eval
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
    return lm, time.perf_counter() - t0, model_path


def _evaluate_task(cell: Cell, lm: Any, key: str, out_dir: Path) -> dict:
    from lm_eval import simple_evaluate

    from . import tasks

    ev, entry = cell.eval, cell.tasks[key]
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
    with open(out_dir / f"per_sample_{key}.jsonl", "w") as f:
        f.writelines(json.dumps(r, default=str) + "\n" for r in records)
    if ev["log_samples"]:
        with open(out_dir / f"samples_{key}.jsonl", "w") as f:
            for leaf_samples in res["samples"].values():
                f.writelines(json.dumps(x, default=str) + "\n" for x in leaf_samples)
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description="qllm evaluate stage")
    p.add_argument("--cell", required=True, type=Path)
    p.add_argument("--model", default=None, help="checkpoint dir to evaluate (default: the cell's base model)")
    p.add_argument("--out", required=True, type=Path, help="output dir (results.json, samples)")
    p.add_argument("--force", action="store_true", help="evaluate every task again, even those finished earlier")
    p.add_argument("--profile-dir", type=Path, default=None, help="where to write the memory profile")
    a = p.parse_args()
    cell = Cell.from_json(a.cell.read_text())
    evaluate(cell, a.model, a.out, a.force, a.profile_dir)


if __name__ == "__main__":
    main()
