"""Offline twins of lm-eval's `truthfulqa_mc1` and `truthfulqa_mc2` (0-shot, metric `acc`).

Data: `truthfulqa/mc_task.json` under data_dir, the upstream TruthfulQA multiple-choice file (817 questions) from
which the hub dataset `truthful_qa` (config `multiple_choice`, split `validation`) is built. Each row is
{question, mc1_targets: {choice: 0/1}, mc2_targets: {choice: 0/1}}; `load` converts it to the hub schema exactly as
the hub's builder script does (`truthful_qa.py`, `_generate_examples`): choices = the dict's keys in file order,
labels = its values (int32). The correct answer(s) come first, which lm-eval's `doc_to_target: 0` relies on.

Everything else (the fixed 6-example QA prompt, choices, the MC2 probability-mass scoring
`lm_eval.tasks.truthfulqa.utils.process_results_mc2`, the `validation` split) is lm-eval's own, copied verbatim in
conf/task/truthfulqa_mc{1,2}_offline.yaml. Differences from the hub task:
- none in content or prompts, as far as can be checked offline. The hub builder pins upstream commit 013686a of
  mc_task.json; this copy comes from a vendored upstream snapshot (see data_dir/truthfulqa/SOURCE.md). Whether the two
  files are byte-identical (same row order, hence the same documents under `limit`) could not be verified offline;
  with `limit: null` all 817 questions are scored either way.
- no few-shot: the task is 0-shot (the QA examples are part of the prompt template), so no split is missing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SPLIT = "validation"  # the hub dataset's only split, and lm-eval's `validation_split`


def hub_rows(path: str | Path) -> list[dict]:
    """The rows of mc_task.json in the hub's `truthful_qa/multiple_choice` schema."""
    rows = json.loads(Path(path).read_text(encoding="utf-8"))

    def targets(d: dict) -> dict:
        return {"choices": list(d.keys()), "labels": [int(v) for v in d.values()]}

    return [
        {"question": r["question"], "mc1_targets": targets(r["mc1_targets"]), "mc2_targets": targets(r["mc2_targets"])}
        for r in rows
    ]


def load(path: str, **_: Any) -> Any:
    """lm-eval `custom_dataset`: mc_task.json as the hub's DatasetDict (one `validation` split, hub features)."""
    import datasets

    targets = {
        "choices": datasets.Sequence(datasets.Value("string")),
        "labels": datasets.Sequence(datasets.Value("int32")),
    }
    features = datasets.Features(
        {"question": datasets.Value("string"), "mc1_targets": targets, "mc2_targets": targets}
    )
    return datasets.DatasetDict({SPLIT: datasets.Dataset.from_list(hub_rows(path), features=features)})
