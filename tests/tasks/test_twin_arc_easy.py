"""ARC-Easy offline twin renders lm-eval's arc_easy prompt, choices and target for the same documents."""

from __future__ import annotations

import json

from twins import assert_same_prompts, reference_task, twin_task


def test_arc_easy_offline_matches_lm_eval(data_dir):
    rows = [json.loads(line) for line in open(data_dir / "arc_easy" / "test.llmfoundry.jsonl")][:8]
    # the hub schema (allenai/ai2_arc), rebuilt independently from the llm-foundry rows
    hf = [{"id": str(i), "question": r["query"].removeprefix("Question: "),
           "choices": {"text": r["choices"], "label": list("ABCDE"[: len(r["choices"])])},
           "answerKey": "ABCDE"[r["gold"]]} for i, r in enumerate(rows)]
    assert_same_prompts(twin_task("arc_easy_offline", "arc_easy_offline", data_dir), reference_task("arc_easy", hf), n=8)
