"""Harness for the twin-vs-lm-eval prompt-equality tests.

An offline twin reads local files; lm-eval's own task reads the hub dataset. For the same document both must render
the same prompt text, choices and target. The reference side is lm-eval's registered task config (its YAML and
`utils.py` functions, loaded from the installed lm-eval), fed with the test's own conversion of the local rows to
the hub dataset's schema, so no download is needed.
"""

from __future__ import annotations

from typing import Any

import datasets
from lm_eval.api.task import ConfigurableTask
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml

from qllm.planning import compose_cell
from qllm.tasks.spec import lm_eval_config

_TM: TaskManager | None = None


def lm_eval_task_config(name: str) -> dict:
    """lm-eval's own config of a registered task (includes resolved, functions imported)."""
    global _TM
    _TM = _TM or TaskManager()
    entry = _TM.task_index[name]
    return load_yaml(entry.yaml_path, resolve_func=True, recursive=True)


def reference_task(name: str, hf_docs: list[dict], overrides: dict | None = None) -> ConfigurableTask:
    """lm-eval's registered task `name`, with `hf_docs` (rows in the hub dataset's schema) as every split."""
    cfg = {k: v for k, v in lm_eval_task_config(name).items() if k not in ("tag", "group")}
    ds = datasets.Dataset.from_list(hf_docs)
    splits = {cfg.get(s) for s in ("training_split", "validation_split", "test_split", "fewshot_split")} - {None}
    cfg["custom_dataset"] = lambda **_: datasets.DatasetDict({s: ds for s in splits})
    cfg.update(overrides or {})
    return ConfigurableTask(config=cfg)


def twin_task(task_option: str, key: str, data_dir: Any, tokenizer: Any = None) -> ConfigurableTask:
    """The qllm task `key` of `conf/task/<task_option>.yaml`, built exactly as the evaluate stage builds it."""
    cell = compose_cell([f"task={task_option}", "method=none", f"data_dir={data_dir}", "cache_dir=/nonexistent"])
    return ConfigurableTask(config=lm_eval_config(cell.tasks[key], tokenizer))


def rendered(task: ConfigurableTask, doc: dict) -> dict:
    """What the model sees and is scored against for one document (zero-shot)."""
    out = {"text": task.doc_to_text(doc), "target": task.doc_to_target(doc)}
    if task.OUTPUT_TYPE == "multiple_choice":
        out["choices"] = task.doc_to_choice(doc)
    out["description"] = task.config.description
    out["target_delimiter"], out["fewshot_delimiter"] = task.config.target_delimiter, task.config.fewshot_delimiter
    return out


def assert_same_prompts(twin: ConfigurableTask, reference: ConfigurableTask, n: int = 5) -> None:
    twin_docs, ref_docs = list(twin.test_docs())[:n], list(reference.test_docs())[:n]
    assert len(twin_docs) == len(ref_docs) == n
    for i, (a, b) in enumerate(zip(twin_docs, ref_docs)):
        assert rendered(twin, a) == rendered(reference, b), f"document {i} renders differently"
