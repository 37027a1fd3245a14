"""Evaluate stage: a checkpoint (quantized or baseline) + the cell's tasks -> lm-eval results, the speed benchmark
when asked, and KL against the baseline (qllm.stages.kl_measure).

Runs in its own process (`python -m qllm.stages.evaluate --cell cell.json --model PATH --out DIR`, under the
stage's launcher). The cell's evaluation backend (qllm.stages.backends) loads the model once as an lm-eval LM; each
task is evaluated with its own shots and limit, since lm-eval takes one of each per call. Every finished task, the
speed benchmark and the KL result are cached as soon as they finish, so an interrupted cell resumes with what is
missing.
With several ranks (data parallel: lm-eval splits the requests; DeepSpeed AutoTP: every rank runs every request on
its shard of one model) the main rank alone writes results, per-sample files and cache entries; every rank writes
its own memory profile (the main rank's in the profile dir, rank r's in `<profile dir>/rank<r>/`).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Optional

from ..cell import Cell
from ..measure import profiling
from ..records import CachedEval, EvalResult, TaskResult
from ..store import cache
from ..tasks import results
from . import backends, kl_measure, process
from .backends import EvalBackend


# files a finished task keeps in its cache entry (as <name>_<task>.jsonl in the stage's output): per-sample
# correctness, lm-eval's full samples (log_samples), a dialogue task's answers
CACHED_FILES = ("per_sample.jsonl", "samples.jsonl", "answers.jsonl")


class _Weights:
    """What the evaluated weights were (taken once, from the first task or the benchmark, or from the cache)."""

    def __init__(self, model_path: Optional[str]):
        self.model_path = model_path
        self.fingerprint: Optional[dict] = None
        self.in_memory: Optional[dict] = None

    def take(self, hit: CachedEval) -> None:
        self.fingerprint = self.fingerprint or hit.fingerprint
        self.in_memory = self.in_memory or hit.weights_in_memory
        self.model_path = self.model_path or hit.model_path  # the baseline's dir, when nothing is left to load

    def measure(self, backend: EvalBackend, lm: Any, group_size: Optional[int]) -> None:
        """After a forward pass: transformers decompresses compressed weights lazily."""
        self.fingerprint = backend.fingerprint(lm, group_size)
        self.in_memory = backend.weights_in_memory(lm)


def _save(cell: Cell, entry: Path, weights: _Weights, files: dict[str, Path], **result: Any) -> None:
    if not process.is_main():
        return
    record = CachedEval(**result, fingerprint=weights.fingerprint, weights_in_memory=weights.in_memory,
                        key=entry.name.rsplit("-", 1)[1], cell=cell.name, model=cell.model["name"],
                        method=cell.method, bits=cell.bits, quant_key=cell.quant_key, model_path=weights.model_path,
                        finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    cache.save_eval(entry, record.to_dict(), files)


# ---- reuse ----


def _cached_tasks(cell: Cell, force: bool) -> dict[str, CachedEval]:
    """Tasks of this cell already evaluated (same task key) by an earlier or interrupted run."""
    if force:
        return {}
    found = {}
    for key in cell.tasks:
        hit = cache.load_eval(cache.eval_dir(cell, key), need_samples=bool(cell.eval["log_samples"]))
        if hit is not None:
            found[key] = CachedEval.from_dict(hit)
    return found


def _cached_speed(cell: Cell, force: bool) -> Optional[CachedEval]:
    """The speed benchmark measured earlier with the same settings, if any."""
    if force or not cell.speed_key:
        return None
    for entry in cache.speed_dirs(cell):
        hit = cache.load_eval(entry, need_samples=False)
        if hit is not None:
            print(f"[qllm] evaluate: speed: reusing the benchmark finished {hit['finished']} (key {cell.speed_key}; "
                  "force=true measures again)", flush=True)
            return CachedEval.from_dict(hit)
    return None


def _cached_kl(cell: Cell, force: bool) -> Optional[CachedEval]:
    """The quantized cell's KL measured earlier with the same settings (its KL key), if any."""
    if force or not cell.quantized or not cell.kl_key:
        return None
    hit = cache.load_eval(cache.kl_dir(cell), need_samples=False)
    if hit is None or not hit.get("kl"):
        return None
    print(f"[qllm] evaluate: kl: reusing the measurement finished {hit['finished']} (key {cell.kl_key}; force=true "
          "measures again)", flush=True)
    return CachedEval.from_dict(hit)


def _reuse_tasks(cell: Cell, hits: dict[str, CachedEval], weights: _Weights, out_dir: Path) -> dict[str, TaskResult]:
    """The cached tasks' results, with their per-sample files copied into this run's output."""
    per_task = {}
    for key, hit in hits.items():
        entry = cache.eval_dir(cell, key)
        print(f"[qllm] evaluate: {key}: reusing the result finished {hit.finished} (key {cell.task_keys[key]}; "
              "force=true evaluates again)", flush=True)
        weights.take(hit)
        assert hit.summary is not None
        hit.summary.reused = True
        per_task[key] = hit.summary
        for name in CACHED_FILES if process.is_main() else ():  # into the main rank's output only
            if (entry / name).is_file() and (name != "samples.jsonl" or cell.eval["log_samples"]):
                shutil.copyfile(entry / name, out_dir / f"{name[:-6]}_{key}.jsonl")
    return per_task


# ---- running ----


def _run_tasks(cell: Cell, backend: EvalBackend, lm: Any, todo: list[str], out_dir: Path,
               weights: _Weights) -> dict[str, TaskResult]:
    per_task = {}
    for key in todo:
        per_task[key] = _evaluate_task(cell, backend, lm, key, out_dir)
        if key == todo[0]:  # on every rank: under AutoTP the layer's forward is a collective (only the main writes it)
            weights.measure(backend, lm, cell.group_size)
        files = {name: out_dir / f"{name[:-6]}_{key}.jsonl" for name in CACHED_FILES
                 if (out_dir / f"{name[:-6]}_{key}.jsonl").is_file()}
        if not cell.eval["log_samples"]:
            files.pop("samples.jsonl", None)
        _save(cell, cache.eval_dir(cell, key), weights, files, summary=per_task[key], task=key)
    return per_task


def _run_speed(cell: Cell, backend: EvalBackend, lm: Any, weights: _Weights, first_pass: bool) -> dict:
    p = cell.profile
    print(f"[qllm] benchmark: speed at batch sizes {p['speed_batch_sizes']}, prompt {p['speed_prompt_len']} "
          f"+ {p['speed_output_len']} tokens ({backend.speed_kind} speed, {backend.name} backend) ...", flush=True)
    speed = backend.benchmark(lm, p, cell.seed)
    if first_pass:  # the benchmark's warm-up ran the first forward pass
        weights.measure(backend, lm, cell.group_size)
    _save(cell, cache.speed_dirs(cell)[0], weights, {}, speed=speed, task="speed")
    return speed


def _run_kl(cell: Cell, backend: EvalBackend, lm: Any, ref: Optional[dict], weights: _Weights,
            force: bool) -> Optional[dict]:
    """A baseline stores its reference (None back); a quantized cell measures its KL against `ref` and caches it."""
    if not cell.quantized:
        kl_measure.reference_for_baseline(cell, backend, lm, remake=force)
        return None
    assert ref is not None
    try:
        result = kl_measure.measure(cell, backend, lm, ref)
        if weights.fingerprint is None:  # nothing else ran: this was the first forward pass
            weights.measure(backend, lm, cell.group_size)
        _save(cell, cache.kl_dir(cell), weights, {}, kl=result, task="kl")
        return result
    except Exception as e:  # noqa: BLE001 - KL is measured besides the tasks: it never fails a cell
        kl_measure.failed("the measurement", e)
        return None


@functools.lru_cache(maxsize=2)
def _task_manager(registered: bool) -> Any:
    """One lm-eval TaskManager per stage process, shared by its tasks, with the same metadata simple_evaluate would
    give it (the LM is an object, so no model_args: {}); simple_evaluate builds a new one per call unless given one.
    Indexing every task YAML lm-eval ships (~14,000 files parsed: 9-12 s on 2 cores) is only needed for a task
    passed by its registered name: an inline config (the offline twins, any task with its own `lm_eval:` fields)
    is built from the dict alone (lm-eval 0.4.13 `TaskManager._load_spec`: a dict never consults the index)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(metadata={}, include_defaults=registered)


def _evaluate_task(cell: Cell, backend: EvalBackend, lm: Any, key: str, out_dir: Path) -> TaskResult:
    from lm_eval import simple_evaluate

    from ..tasks import spec

    ev, entry = cell.eval, cell.tasks[key]
    if entry.get("runner"):  # a task lm-eval does not run (MT-Bench): its own function, through the same LM
        print(f"[qllm] evaluate: {key} (limit {entry['limit']}) ...", flush=True)
        with _rank_out_dir(out_dir) as rank_out:
            return spec.runner_of(entry)(lm, entry, data_dir=cell.data_dir, seed=ev["seed"], model_id=cell.name,
                                         out_dir=rank_out, key=key)
    print(f"[qllm] evaluate: {key} ({entry['num_fewshot']}-shot, limit {entry['limit']}) ...", flush=True)
    t = time.perf_counter()
    task, top = spec.lm_eval_spec(entry, backend.tokenizer(lm))
    res = simple_evaluate(
        model=lm,
        tasks=[task],
        task_manager=_task_manager(isinstance(task, str)),
        num_fewshot=entry["num_fewshot"] if isinstance(task, str) else None,  # inline configs carry their own
        gen_kwargs=spec.gen_kwargs(entry),
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
    if res is None:  # lm-eval gathers every rank's requests on the main rank and returns None elsewhere
        return TaskResult(lm_eval_task=top)
    summary = results.summarize_task(res, top, entry)
    records = results.per_sample_records(res, spec.difficulty_of(entry))
    summary.by_difficulty = results.by_difficulty(records, entry["metric"])
    summary.wall_s = round(time.perf_counter() - t, 2)
    _write_samples(out_dir, key, records, res["samples"] if ev["log_samples"] else None)
    return summary


def _write_samples(out_dir: Path, key: str, records: list[dict], samples: Optional[dict]) -> None:
    """A task's per-sample records (and lm-eval's full samples), from the main rank only: under AutoTP every rank
    has the results (each ran every request) and would write the same files."""
    if not process.is_main():
        return
    with open(out_dir / f"per_sample_{key}.jsonl", "w") as f:
        f.writelines(json.dumps(r, default=str) + "\n" for r in records)
    if samples is not None:
        with open(out_dir / f"samples_{key}.jsonl", "w") as f:
            for leaf_samples in samples.values():
                f.writelines(json.dumps(x, default=str) + "\n" for x in leaf_samples)


@contextlib.contextmanager
def _rank_out_dir(out_dir: Path) -> Iterator[Path]:
    """Where a task runner writes its files: `out_dir` on the main rank, a scratch dir (removed after) on the others,
    which run the task too (under AutoTP every rank runs every request) and must not write the same files."""
    if process.is_main():
        yield out_dir
        return
    with tempfile.TemporaryDirectory(prefix="qllm-rank-eval-") as scratch:
        yield Path(scratch)


def evaluate(cell: Cell, model_path: Optional[str], out_dir: Path, force: bool = False,
             profile_dir: Optional[Path] = None) -> EvalResult:
    """Evaluate the cell's tasks that have no finished result in the cache, then the speed benchmark if asked and
    not cached, then KL (a baseline: its reference, if not stored; a quantized cell: its KL, if not cached). The
    model is loaded only if something is left to run."""
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    backend = backends.get(cell.eval["backend"])
    weights = _Weights(model_path)
    hits = _cached_tasks(cell, force)
    speed_hit = _cached_speed(cell, force)
    if speed_hit:
        weights.take(speed_hit)
    per_task = _reuse_tasks(cell, hits, weights, out_dir)
    todo = [k for k in cell.tasks if k not in hits]
    measure_speed = bool(cell.speed_key) and speed_hit is None
    speed = speed_hit.speed if speed_hit else None
    kl_on = kl_measure.wanted(cell, backend.name)
    kl_hit = _cached_kl(cell, force) if kl_on else None
    if kl_hit:
        weights.take(kl_hit)
    # the KL work left: a baseline's reference when not stored, a quantized cell's KL when not cached
    measure_kl = kl_on and (kl_hit is None if cell.quantized else force or not kl_measure.has_reference(cell))
    kl_ref, kl_result = None, kl_hit.kl if kl_hit else None
    load_s = 0.0
    with profiling.for_stage(cell, "evaluate", profile_dir, rank=process.rank()) as prof:
        if measure_kl and cell.quantized:  # before the checkpoint is loaded: the base model may have to be, first
            with prof.phase("kl_reference"):
                kl_ref = kl_measure.reference_for_quantized(cell, backend.device(cell.eval))
            measure_kl = kl_ref is not None
        if todo or measure_speed or measure_kl:
            with prof.phase("load"):
                t_load = time.perf_counter()
                if weights.model_path is None:
                    from ..sources.models import prepare

                    weights.model_path = prepare(cell.model, cell.data_dir, cell.cache_dir)
                lm = backend.load(cell.eval, cell.model, weights.model_path, cell.quantized, cell.seed)
                load_s = time.perf_counter() - t_load
        if todo:
            with prof.phase("evaluate"):
                per_task |= _run_tasks(cell, backend, lm, todo, out_dir, weights)
        if measure_speed:
            with prof.phase("benchmark"):
                speed = _run_speed(cell, backend, lm, weights, first_pass=not todo)
        if measure_kl:
            with prof.phase("kl"):
                kl_result = _run_kl(cell, backend, lm, kl_ref, weights, force)

    per_task = {k: per_task[k] for k in cell.tasks}  # the suite's order
    result = EvalResult(
        tasks=per_task, suite=results.suite_score(per_task), reused_tasks=sorted(hits), evaluated_tasks=todo,
        speed=speed, speed_reused=speed_hit is not None, kl=kl_result, kl_reused=kl_hit is not None,
        weights_in_memory=weights.in_memory, model_path=weights.model_path, fingerprint=weights.fingerprint,
        device=backend.device(cell.eval) if (todo or measure_speed or measure_kl) else None, backend=backend.name,
        speed_note=backend.speed_note, wall_s={"load": round(load_s, 2), "total": round(time.perf_counter() - t0, 2)},
    )
    if process.is_main():
        (out_dir / "results.json").write_text(json.dumps(result.to_dict(), indent=2, default=str))
    return result


def main() -> None:
    p = argparse.ArgumentParser(description="qllm evaluate stage")
    p.add_argument("--cell", required=True, type=Path)
    p.add_argument("--model", default=None, help="checkpoint dir to evaluate (default: the cell's base model)")
    p.add_argument("--out", required=True, type=Path, help="output dir (results.json, samples)")
    p.add_argument("--force", action="store_true", help="evaluate every task again, even those finished earlier")
    p.add_argument("--profile-dir", type=Path, default=None, help="where to write the memory profile")
    a = p.parse_args()
    process.start("evaluate")
    evaluate(Cell.from_json(a.cell.read_text()), a.model, a.out, a.force, a.profile_dir)


if __name__ == "__main__":
    main()
