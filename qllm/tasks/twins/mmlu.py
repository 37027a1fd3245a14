"""Offline twin of lm-eval's `mmlu` group (the default MMLU: 57 subjects, 5-shot, `acc`), reading local CSV files.

Mirrors lm-eval 0.4.13's `lm_eval/tasks/mmlu/default/`: the group `mmlu` (`_mmlu.yaml`) made of the four category
groups stem / other / social_sciences / humanities (`_mmlu_<category>.yaml`), each the `mmlu_<category>_tasks` tag
of the per-subject tasks `mmlu_<subject>.yaml` (+ `_default_template_yaml`). Nothing of it is retyped here: the
builder reads those installed YAML files and keeps every field (description, doc_to_text/choice/target,
fewshot_split `dev`, fewshot_config sampler `first_n`, metric_list, task_alias, group_alias, aggregate_metric_list
with weight_by_size, metadata), replacing only the data source (`dataset_path: cais/mmlu` + `dataset_name`) with a
`custom_dataset` that reads `<path>/{test,dev}/<subject>_{test,dev}.csv`. Prompts are therefore lm-eval's own.

What differs from the hub task, and why:
- Data: the CSVs of `mmlu/SOURCE.md` (hendrycks/test copied from a mirror, header `question,choice0..3,answer`,
  `answer` a 0-based index) instead of `cais/mmlu` from the hub (no internet). They are converted to the hub schema
  (`question`, `subject`, `choices` list of 4 strings, `answer` int 0-3), read with the csv module so every field
  stays the exact string (no pandas type guessing; whitespace kept, as in the hub, which the template `.strip()`s).
  Splits: `test` (14,042 rows) and `dev` (285 rows, 5 per subject); the hub's `validation` and `auxiliary_train`
  are absent, and lm-eval's default MMLU uses neither.
- Few-shot examples: no difference. lm-eval takes the 5 shots from the subject's `dev` split with the `first_n`
  sampler (the first five dev rows, in order); the local data has the same dev split, so the shots are the same.
  (lm-eval 0.4.13's FirstNSampler removes the current doc from the pool, `rm_eval_doc`, but a test doc is never in
  the dev pool anyway.)
- Names: the group is `mmlu_offline`, its category groups `mmlu_offline_<category>` and the subject tasks
  `mmlu_offline_<subject>`; lm-eval namespaces inline members under their parent, so results are keyed e.g.
  `mmlu_offline::mmlu_offline_stem::mmlu_offline_abstract_algebra`. Aliases (`abstract_algebra`, `stem`) are lm-eval's.
- `num_fewshot` is set on every subject task (the qllm entry's value, 5 for MMLU) because lm-eval does not pass a
  group's shots down to its members and qllm's evaluate stage sets `num_fewshot` only for single tasks.

Scores: the top-level `acc` is weighted by subject size at both levels (lm-eval's weight_by_size), so it equals the
mean over all evaluated questions; `limit` applies per subject.

lm-eval 0.4.13 cannot take this inline group as a dict: `TaskManager.load([group_dict])` passes the whole dict as
overrides to every member (`TaskFactory.build(entry, overrides=spec)` -> `_build_group(..., overrides)`), so each
inline subject task gets `group`/`aggregate_metric_list` keys and `TaskConfig(**cfg)` raises TypeError ("unexpected
keyword argument 'aggregate_metric_list'"; the same for any inline group with an aggregate). `qllm.tasks.spec.inline_group`
builds the lm-eval `Group` object from the dict without those overrides; simple_evaluate accepts Group objects.
"""

from __future__ import annotations

import copy
import csv
import functools
from pathlib import Path
from typing import Any

HEADER = ["question", "choice0", "choice1", "choice2", "choice3", "answer"]
SPLITS = {"test": "test", "dev": "dev"}  # hub split -> local folder / file suffix


def lm_eval_mmlu_dir() -> Path:
    """The installed lm-eval's default MMLU task folder (tasks/mmlu/default)."""
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).resolve().parent / "mmlu" / "default"


@functools.lru_cache(maxsize=1)
def _lm_eval_configs() -> tuple[dict, dict[str, dict], dict[str, dict]]:
    """lm-eval's own configs: the top group, the category groups (by category) and the subject tasks (by subject).
    Cached: callers deep-copy what they hand out."""
    from lm_eval.tasks._yaml_loader import load_yaml

    folder = lm_eval_mmlu_dir()
    top = load_yaml(folder / "_mmlu.yaml", resolve_func=True, recursive=True)
    categories = {}
    for name in top["task"]:  # mmlu_stem, mmlu_other, ...
        cfg = load_yaml(folder / f"_{name}.yaml", resolve_func=True, recursive=True)
        assert cfg["group"] == name and cfg["task"] == [f"{name}_tasks"], cfg
        categories[name.removeprefix("mmlu_")] = cfg
    subjects = {}
    for path in sorted(folder.glob("mmlu_*.yaml")):
        cfg = load_yaml(path, resolve_func=True, recursive=True)
        subjects[cfg["dataset_name"]] = cfg
    return top, categories, subjects


def subject_categories() -> dict[str, str]:
    """subject -> category (stem / other / social_sciences / humanities), from the tags of lm-eval's subject YAMLs."""
    _, categories, subjects = _lm_eval_configs()
    out = {s: cfg["tag"].removeprefix("mmlu_").removesuffix("_tasks") for s, cfg in subjects.items()}
    assert set(out.values()) == set(categories), out
    return out


def read_csv(file: Path, subject: str) -> list[dict]:
    """Rows of one local MMLU CSV in the hub (cais/mmlu) schema."""
    with open(file, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0] != HEADER:
        raise ValueError(f"{file}: expected the header {','.join(HEADER)} (see mmlu/SOURCE.md)")
    return [{"question": r[0], "subject": subject, "choices": r[1:5], "answer": int(r[5])} for r in rows[1:]]


def subject_file(path: str | Path, subject: str, split: str) -> Path:
    return Path(path) / SPLITS[split] / f"{subject}_{SPLITS[split]}.csv"


def load(path: str, subject: str, **_: Any) -> Any:
    """lm-eval `custom_dataset`: one subject's test and dev splits as a DatasetDict (hub schema)."""
    import datasets

    features = datasets.Features({
        "question": datasets.Value("string"),
        "subject": datasets.Value("string"),
        "choices": datasets.Sequence(datasets.Value("string")),
        "answer": datasets.ClassLabel(names=["A", "B", "C", "D"]),  # as in cais/mmlu: an int 0-3
    })
    return datasets.DatasetDict({
        split: datasets.Dataset.from_list(read_csv(subject_file(path, subject, split), subject), features=features)
        for split in SPLITS
    })


def check_files(path: str | Path) -> None:
    """Raise naming every subject whose test or dev CSV is missing under `path`."""
    missing = [str(subject_file(path, s, split)) for s in subject_categories() for split in SPLITS
               if not subject_file(path, s, split).is_file()]
    if missing:
        from ...errors import QllmConfigError

        raise QllmConfigError(
            f"mmlu_offline: {len(missing)} subject file(s) missing under {path}: {', '.join(missing)}. "
            "Set QLLM_DATA_DIR (or data_dir=...) to the benchmark data folder (../shared/data layout, mmlu/SOURCE.md)."
        )


def subject_task(subject: str, path: str, num_fewshot: int, name: str = "mmlu_offline") -> dict:
    """lm-eval's `mmlu_<subject>` config with the local data as its dataset."""
    _, _, subjects = _lm_eval_configs()
    cfg = {k: copy.deepcopy(v) for k, v in subjects[subject].items()
           if k not in ("dataset_path", "dataset_name", "tag", "task")}
    return {
        "task": f"{name}_{subject}",
        **cfg,
        "custom_dataset": load,
        "dataset_kwargs": {"path": str(path), "subject": subject},
        "num_fewshot": num_fewshot,
    }


def group_config(path: str, num_fewshot: int = 5, name: str = "mmlu_offline", **_: Any) -> dict:
    """lm_eval_builder: lm-eval's `mmlu` group as an inline group `name` of the four category groups, each of its
    subjects' inline tasks, reading the CSVs under `path` (the data_dir's `mmlu` folder)."""
    check_files(path)
    top, categories, _ = _lm_eval_configs()
    by_category = subject_categories()
    members = []
    for category, cat_cfg in categories.items():
        members.append({
            **copy.deepcopy({k: v for k, v in cat_cfg.items() if k not in ("group", "task")}),  # alias, aggregate..
            "group": f"{name}_{category}",
            "task": [subject_task(s, path, num_fewshot, name) for s, c in by_category.items() if c == category],
        })
    return {
        **copy.deepcopy({k: v for k, v in top.items() if k not in ("group", "task")}),  # aggregate_metric_list..
        "group": name,
        "task": members,
    }
