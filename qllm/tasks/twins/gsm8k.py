"""Offline twin of lm-eval's `gsm8k` (5-shot, generate_until, exact_match under the `strict-match` and
`flexible-extract` filters).

Data: `gsm8k/test.jsonl` under data_dir, the official `openai/grade-school-math` test file (1,319 problems), which
has the same content and schema {question, answer} as the hub's `openai/gsm8k` config `main`, split `test`; `load`
returns it as a DatasetDict with that one split. The prompt ("Question: ...\\nAnswer:"), target (the whole worked
solution), generation_kwargs, filter_list and metric_list are lm-eval's own, copied verbatim in
conf/task/gsm8k_offline.yaml.

What differs from the hub task, and why:
- Few-shot examples. lm-eval's gsm8k draws its 5 examples at random from the `train` split, which is not available
  offline. The twin sets `fewshot_split: test`, so they are drawn (same default sampler, same seed) from the test
  split, never the evaluated problem itself: in lm-eval 0.4.13 `ConfigurableTask.fewshot_context` passes
  `eval_doc=doc` to the sampler whenever `fewshot_config.split == config.test_split`, and `ContextSampler.sample`
  then draws n + 1 documents and removes every one equal to the evaluated document (and re-draws from a pool
  without it should duplicates leave fewer than n). tests/test_twin_gsm8k.py checks this exclusion directly. The
  examples are still unseen solved problems of the same distribution, but they are other test problems than the
  hub task's, so scores are comparable in protocol, not bit-identical to the hub task's.
- `training_split` is left out (there is no train split here).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SPLIT = "test"


def hub_rows(path: str | Path) -> list[dict]:
    """The rows of test.jsonl in the hub's `openai/gsm8k` schema (the file already is: question, answer)."""
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [{"question": r["question"], "answer": r["answer"]} for r in rows]


def load(path: str, **_: Any) -> Any:
    """lm-eval `custom_dataset`: the local test file as the hub's DatasetDict (one `test` split)."""
    import datasets

    features = datasets.Features({"question": datasets.Value("string"), "answer": datasets.Value("string")})
    return datasets.DatasetDict({SPLIT: datasets.Dataset.from_list(hub_rows(path), features=features)})


def reasoning_steps(doc: dict) -> int:
    """Difficulty label: the number of reasoning steps of the reference solution.

    A step is a non-empty line of `answer` before the final "#### <number>" line (GSM8K solutions write one
    calculation per line; two test solutions contain a blank line, which is not a step). On the 1,319 test problems
    this ranges from 2 to 11 (median 3)."""
    lines = doc["answer"].split("\n")
    end = next((i for i, line in enumerate(lines) if line.startswith("####")), len(lines))
    return sum(1 for line in lines[:end] if line.strip())
