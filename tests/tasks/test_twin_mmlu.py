"""MMLU offline twin: each subject renders lm-eval's `mmlu_<subject>` prompt, choices, target and 5-shot context for
the same documents, and the group has lm-eval's 57 subjects, categories and size-weighted aggregation."""

from __future__ import annotations

import csv
import importlib
import shutil

import datasets
import pytest
from twins import assert_same_prompts, lm_eval_task_config, reference_task

from qllm.planning import compose_cell
from qllm.errors import QllmConfigError
from qllm.tasks.spec import lm_eval_config
from qllm.tasks.spec import inline_group
from qllm.tasks.twins.mmlu import group_config

N = 6  # test documents compared per subject


@pytest.fixture(scope="module")
def twin_group(data_dir):
    """The twin as the evaluate stage builds it: the entry's lm-eval config, then lm-eval's Group of it."""
    cell = compose_cell(["task=mmlu_offline", "method=none", f"data_dir={data_dir}", "cache_dir=/nonexistent"])
    cfg = lm_eval_config(cell.tasks["mmlu_offline"])
    return cfg, inline_group(cfg)


def _hub_rows(data_dir, subject: str, split: str) -> list[dict]:
    """cais/mmlu's schema, rebuilt from the raw CSV (header; answer is the 0-based index)."""
    with open(data_dir / "mmlu" / split / f"{subject}_{split}.csv", newline="", encoding="utf-8") as f:
        return [{"question": r["question"], "subject": subject,
                 "choices": [r["choice0"], r["choice1"], r["choice2"], r["choice3"]], "answer": int(r["answer"])}
                for r in csv.DictReader(f)]


@pytest.mark.parametrize("subject", ["abstract_algebra", "high_school_physics"])
def test_mmlu_offline_subject_matches_lm_eval(data_dir, twin_group, subject):
    test, dev = _hub_rows(data_dir, subject, "test"), _hub_rows(data_dir, subject, "dev")
    splits = datasets.DatasetDict({"test": datasets.Dataset.from_list(test), "dev": datasets.Dataset.from_list(dev)})
    reference = reference_task(f"mmlu_{subject}", test, overrides={"custom_dataset": lambda **_: splits})
    (twin,) = [t for t in twin_group[1].get_all_tasks() if t.config.task.endswith(f"::mmlu_offline_{subject}")]

    assert_same_prompts(twin, reference, n=N)
    assert len(twin.test_docs()) == len(test) and len(twin.fewshot_docs()) == len(dev) == 5
    assert twin.config.num_fewshot == 5 and twin.config.task_alias == reference.config.task_alias
    # the 5-shot context: description + the first five dev questions with answers + the question (first_n sampler)
    for a, b in zip(list(twin.test_docs())[:N], list(reference.test_docs())[:N]):
        ctx = twin.fewshot_context(a, num_fewshot=5)
        assert ctx == reference.fewshot_context(b, num_fewshot=5)
        assert ctx.count("\nAnswer:") == 6 and dev[4]["question"].strip() in ctx


def test_mmlu_offline_group_mirrors_lm_eval(twin_group):
    cfg, group = twin_group
    # subjects and categories from lm-eval's own generator script, an independent source from the YAML tags
    subjects = importlib.import_module("lm_eval.tasks.mmlu._generate_configs").SUBJECTS
    leaves = group.get_all_tasks()
    assert len(leaves) == len(subjects) == 57
    twin_categories = {t.config.task.split("::")[2].removeprefix("mmlu_offline_"):
                       t.config.task.split("::")[1].removeprefix("mmlu_offline_") for t in leaves}
    assert twin_categories == subjects

    # aggregation: lm-eval's `mmlu` and its category groups, size-weighted
    assert cfg["aggregate_metric_list"] == lm_eval_task_config("mmlu")["aggregate_metric_list"]
    assert cfg["aggregate_metric_list"] == [{"metric": "acc", "weight_by_size": True}]
    for sub in cfg["task"]:
        ref = lm_eval_task_config(sub["group"].replace("mmlu_offline_", "mmlu_"))
        assert sub["aggregate_metric_list"] == ref["aggregate_metric_list"]
        assert sub["group_alias"] == ref["group_alias"]
    assert all(g.aggregate_metric_list[0].weight_by_size for g in [group, *group.get_all_groups()])

    # every subject task carries lm-eval's fields unchanged, only the data source differs
    for t in cfg["task"]:
        for task in t["task"]:
            ref = lm_eval_task_config(task["task"].replace("mmlu_offline_", "mmlu_"))
            for k in ("dataset_path", "dataset_name", "tag", "task"):
                ref.pop(k)
            assert {k: v for k, v in task.items() if k not in ("task", "custom_dataset", "dataset_kwargs",
                                                                "num_fewshot")} == ref


def test_mmlu_offline_names_missing_subject_files(data_dir, tmp_path):
    shutil.copytree(data_dir / "mmlu", tmp_path / "mmlu")
    (tmp_path / "mmlu" / "test" / "virology_test.csv").unlink()
    (tmp_path / "mmlu" / "dev" / "anatomy_dev.csv").unlink()
    with pytest.raises(QllmConfigError, match=r"2 subject file\(s\) missing.*anatomy_dev\.csv.*virology_test\.csv"):
        group_config(str(tmp_path / "mmlu"))
