"""Benchmark tasks: turning a task entry of conf/task/ into an lm-eval task config, and the few Python functions
that offline tasks need (documents from local files, token perplexity).

In a task's `lm_eval:` dict, a string "py:module.function" names a Python function; a function that takes a
`tokenizer` keyword gets the evaluated model's tokenizer, one that takes `max_doc_tokens` gets the entry's value.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re
from pathlib import Path
from typing import Any, Callable, Optional

from .errors import QllmConfigError

TASK_TYPES = ("commonsense", "knowledge", "instruction_following", "hallucination", "math", "dialogue", "perplexity")
_PY = "py:"


def check_entry(key: str, entry: dict, data_dir: str) -> None:
    """Validate one task entry at plan time: its type and that every local data file exists."""
    if entry["type"] not in TASK_TYPES:
        raise QllmConfigError(f"task '{key}': unknown type '{entry['type']}'; valid: {', '.join(TASK_TYPES)}")
    check_data_files(f"task '{key}'", entry.get("data_files", []), data_dir)
    if entry.get("lm_eval_builder"):  # families (MMLU's 57 subjects) check their own files when built
        lm_eval_config(entry)
    if entry.get("hub_dataset"):
        from . import hub

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


def _resolve_function(ref: str, bindings: dict[str, Any]) -> Callable:
    module, _, name = ref[len(_PY):].rpartition(".")
    fn = getattr(importlib.import_module(module), name)
    params = inspect.signature(fn).parameters
    bound = {k: v for k, v in bindings.items() if k in params}
    return functools.partial(fn, **bound) if bound else fn


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


# ---- WikiText-2 from the local raw file ----

_TITLE = re.compile(r"^ = [^=].* = $")


def split_wikitext_documents(text: str) -> list[str]:
    """Split raw WikiText at level-1 headings (" = Title = "): the 62 test articles of lm-eval's `wikitext`."""
    docs: list[list[str]] = []
    for line in text.splitlines(keepends=True):
        if _TITLE.match(line.rstrip("\n")) or not docs:
            docs.append([])
        docs[-1].append(line)
    return ["".join(d) for d in docs]


def wikitext_documents(
    path: str, tokenizer: Any = None, max_doc_tokens: Optional[int] = None, skip: int = 0, **_: Any
) -> Any:
    """lm-eval `custom_dataset`: the documents as a DatasetDict with a `page` column (lm-eval's field name)."""
    import datasets

    docs = split_wikitext_documents(Path(path).read_text(encoding="utf-8"))[skip:]
    if max_doc_tokens:
        if tokenizer is None:
            raise ValueError("max_doc_tokens needs the model tokenizer")
        docs = [_truncate(d, tokenizer, max_doc_tokens) for d in docs]
    return datasets.DatasetDict({"test": datasets.Dataset.from_dict({"page": docs})})


def _truncate(text: str, tokenizer: Any, max_tokens: int) -> str:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return text
    cut = tokenizer.decode(ids[:max_tokens])
    return cut[: cut.rfind(" ")] if " " in cut else cut  # end on a word boundary so word counts stay honest


def perplexity_results(doc: dict, results: list, tokenizer: Any) -> dict:
    """lm-eval's wikitext metrics (words and bytes of the raw page) plus token perplexity of the scored text."""
    from lm_eval.tasks.wikitext.preprocess_wikitext import process_results, wikitext_detokenizer

    out = process_results(doc, results)
    (loglikelihood,) = results
    n_tokens = len(tokenizer(wikitext_detokenizer(doc), add_special_tokens=False)["input_ids"])
    out["token_perplexity"] = (loglikelihood, n_tokens)
    return out
