"""Task entries of conf/task/: checking them at planning, and turning one into what lm-eval's simple_evaluate takes.

In a task's `lm_eval:` dict, a string "py:module.function" names a Python function; a function that takes a
`tokenizer` keyword gets the evaluated model's tokenizer, one that takes `max_doc_tokens` gets the entry's value.
Module paths renamed since a task YAML was written still resolve (qllm.cell.HASHED_AS lists them).
"""

from __future__ import annotations

import functools
import importlib
import inspect
from pathlib import Path
from typing import Any, Callable

from ..cell import HASHED_AS
from ..errors import QllmConfigError

TASK_TYPES = ("commonsense", "knowledge", "instruction_following", "hallucination", "math", "dialogue", "perplexity")
_PY = "py:"


def check_entry(key: str, entry: dict, data_dir: str) -> None:
    """Validate one task entry at plan time: its type and that every local data file exists."""
    if entry["type"] not in TASK_TYPES:
        raise QllmConfigError(f"task '{key}': unknown type '{entry['type']}'; valid: {', '.join(TASK_TYPES)}")
    check_data_files(f"task '{key}'", entry.get("data_files", []), data_dir)
    if entry.get("runner"):
        try:
            _import(entry["runner"])
        except (ImportError, AttributeError) as e:
            raise QllmConfigError(f"task '{key}': runner {entry['runner']!r} cannot be imported ({e})") from None
    elif entry["type"] == "dialogue":
        raise QllmConfigError(f"task '{key}': a dialogue task needs a runner (\"py:module.function\"), as "
                              "conf/task/mt_bench.yaml has")
    if entry.get("lm_eval_builder"):  # families (MMLU's 57 subjects) check their own files when built
        lm_eval_config(entry)
    if entry.get("hub_dataset"):
        from ..sources import hub

        ds = entry["hub_dataset"]
        why = None if hub.cached(ds, "dataset", "README.md") else hub.unreachable(ds, "dataset")
        if why:
            twin = entry.get("offline_twin")
            raise QllmConfigError(
                f"task '{key}' reads {ds} from the Hugging Face hub, and {why}. "
                + (f"Offline, use task={twin} (the same benchmark from data_dir)." if twin else
                   "It has no offline twin; run it on a machine with hub access.")
            )


def check_data_files(what: str, files: list[str], data_dir: str) -> None:
    missing = [f for f in files if not (Path(data_dir) / f).is_file()]
    if missing:
        raise QllmConfigError(
            f"{what}: data file(s) not found under data_dir={data_dir}: {', '.join(missing)}. "
            "Set QLLM_DATA_DIR (or data_dir=...) to the benchmark data folder (../shared/data layout)."
        )


def _import(ref: str) -> Callable:
    module, _, name = ref[len(_PY):].rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        for current, earlier in HASHED_AS:  # a task YAML written before a module moved
            if ref.startswith(earlier):
                moved = current + ref[len(earlier):]
                module, _, name = moved[len(_PY):].rpartition(".")
                try:
                    return getattr(importlib.import_module(module), name)
                except (ImportError, AttributeError):
                    continue
        raise


def _resolve_function(ref: str, bindings: dict[str, Any]) -> Callable:
    fn = _import(ref)
    params = inspect.signature(fn).parameters
    bound = {k: v for k, v in bindings.items() if k in params}
    return functools.partial(fn, **bound) if bound else fn


def runner_of(entry: dict) -> Callable:
    """The function that runs a task lm-eval does not run (`runner:`)."""
    return _import(entry["runner"])


def lm_eval_config(entry: dict, tokenizer: Any = None) -> dict:
    """The lm-eval task config of an entry, with "py:" references replaced by (bound) functions."""
    bindings = {"tokenizer": tokenizer, "max_doc_tokens": entry.get("max_doc_tokens")}

    def resolve(value: Any) -> Any:
        if isinstance(value, str) and value.startswith(_PY):
            return _resolve_function(value, bindings)
        if isinstance(value, dict):
            return {k: resolve(v) for k, v in value.items()}
        if isinstance(value, list):
            return [resolve(v) for v in value]
        return value

    raw = dict(entry["lm_eval"])
    # The data loader first: it may prepare what the task's other functions need at import (IFEval's nltk data).
    cfg = {k: resolve(raw[k]) for k in sorted(raw, key=lambda k: k != "custom_dataset")}
    if entry.get("lm_eval_builder"):
        cfg = _resolve_function(entry["lm_eval_builder"], bindings)(**cfg)
    if "group" not in cfg:
        cfg["num_fewshot"] = entry.get("num_fewshot", 0)
    return cfg


def lm_eval_spec(entry: dict, tokenizer: Any = None) -> tuple[str | dict, str]:
    """What simple_evaluate gets for an entry, and the result name of the task or group it produces.
    `lm_eval: {task: <registered name>}` alone is a registered (hub) task, passed by name."""
    if set(entry["lm_eval"]) == {"task"} and not entry.get("lm_eval_builder"):
        return entry["lm_eval"]["task"], entry["lm_eval"]["task"]
    cfg = lm_eval_config(entry, tokenizer)
    if "group" in cfg:
        return inline_group(cfg), cfg["group"]
    return cfg, cfg["task"]


def inline_group(cfg: dict) -> Any:
    """lm-eval's Group for an inline group dict. lm-eval 0.4.13's TaskManager.load([group_dict]) passes the group's
    own keys (aggregate_metric_list, ...) down to its inline members, which then fail to build; its TaskFactory
    builds the same group without that leak (a private API: lm-eval is pinned)."""
    from lm_eval.tasks._factory import TaskFactory

    return TaskFactory()._build_group(cfg["group"], dict(cfg), None, {})


def gen_kwargs(entry: dict) -> dict | None:
    """Generation overrides for simple_evaluate: the entry's gen_kwargs plus its max_gen_toks cap."""
    kw = dict(entry.get("gen_kwargs") or {})
    if entry.get("max_gen_toks"):
        kw["max_gen_toks"] = entry["max_gen_toks"]
    return kw or None


def difficulty_of(entry: dict) -> Callable[[dict], Any] | str | None:
    """The entry's difficulty: a constant label, a function of the document, or None."""
    d = entry.get("difficulty")
    return _resolve_function(d, {}) if isinstance(d, str) and d.startswith(_PY) else d
