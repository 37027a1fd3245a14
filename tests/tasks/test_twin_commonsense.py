"""ARC-Challenge, HellaSwag and WinoGrande offline twins render lm-eval's prompts, choices, targets and few-shot
contexts for the same documents, and never show a document its own answer as a shot.

The reference side is lm-eval's registered task (its YAML and utils.py) fed with this file's own conversion of the
raw local rows to the hub schema. Its splits are overridden to the twin's (the evaluated rows as `test_split`, shots
from the same split) because the hub's `train` split, where lm-eval takes shots from, is not available offline; the
prompt fields stay lm-eval's. Few-shot contexts are compared with the same pool (all rows, same order) and the same
sampler seed on both sides.
"""

from __future__ import annotations

import json
import re

import pytest
from twins import assert_same_prompts, reference_task, twin_task

N = 6  # documents compared per task


def _jsonl(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def _arc_hf(data_dir) -> list[dict]:
    # allenai/ai2_arc schema, rebuilt from llm-foundry's rows (see data_dir/arc_challenge/SOURCE.md)
    rows = _jsonl(data_dir / "arc_challenge" / "test.llmfoundry.jsonl")
    return [{"id": str(i), "question": r["query"].removeprefix("Question: "),
             "choices": {"text": r["choices"], "label": list("ABCDE"[: len(r["choices"])])},
             "answerKey": "ABCDE"[r["gold"]]} for i, r in enumerate(rows)]


def _hellaswag_hf(data_dir) -> list[dict]:
    # already Rowan/hellaswag's schema; the hub's label is a string
    return [{**r, "label": str(r["label"])} for r in _jsonl(data_dir / "hellaswag" / "hellaswag_val_subset1000.jsonl")]


def _winogrande_hf(data_dir) -> list[dict]:
    # allenai/winogrande schema from llm-foundry's {context_options, continuation, gold}: the sentence start is the
    # options' common whole-word prefix (word tokens, whitespace kept), the blank goes where the options differ
    out = []
    for r in _jsonl(data_dir / "winogrande" / "dev.llmfoundry.jsonl"):
        a, b = (re.split(r"(\s+)", s) for s in r["context_options"])
        k = 0
        while k < min(len(a), len(b)) and a[k] == b[k]:
            k += 1
        if k and not a[k - 1].isspace():  # a shared word that is part of one option ("house" / "house keeper")
            k -= 1
        prefix = "".join(a[:k])
        cont = r["continuation"]
        out.append({"sentence": prefix + "_" + ("" if cont[0] in ".,'" else " ") + cont,
                    "option1": "".join(a[k:]), "option2": "".join(b[k:]), "answer": str(r["gold"] + 1)})
    return out


CASES = {  # option: (lm-eval task, hub rows builder, the evaluated split, shots)
    "arc_challenge_offline": ("arc_challenge", _arc_hf, "test", 25),
    "hellaswag_offline": ("hellaswag", _hellaswag_hf, "validation", 10),
    "winogrande_offline": ("winogrande", _winogrande_hf, "validation", 5),
}


def _pair(option: str, data_dir):
    name, build, split, _ = CASES[option]
    twin = twin_task(option, option, data_dir)
    ref = reference_task(name, build(data_dir), overrides={"test_split": split, "fewshot_split": split})
    return twin, ref


def _shot(task, doc) -> str:
    """How `doc` reads as a few-shot example (question/context, target delimiter, correct answer)."""
    text, choices, target = task.doc_to_text(doc), task.doc_to_choice(doc), task.doc_to_target(doc)
    if task.multiple_input:  # winogrande: the text is the index of the correct context, the target the continuation
        return choices[text] + task.config.target_delimiter + target
    return text + task.config.target_delimiter + choices[target]


@pytest.mark.parametrize("option", list(CASES))
def test_twin_matches_lm_eval(option, data_dir):
    twin, ref = _pair(option, data_dir)
    assert len(twin.test_docs()) == len(ref.test_docs())
    assert_same_prompts(twin, ref, n=N)
    shots = CASES[option][3]
    assert twin.config.num_fewshot == shots
    for i, (a, b) in enumerate(zip(list(twin.test_docs())[:N], list(ref.test_docs())[:N])):
        twin.sampler.set_rnd(1000 + i)
        ref.sampler.set_rnd(1000 + i)
        assert twin.fewshot_context(a, shots) == ref.fewshot_context(b, shots), f"document {i}: few-shot context differs"


@pytest.mark.parametrize("option", list(CASES))
def test_twin_shots_exclude_the_current_document(option, data_dir):
    twin = twin_task(option, option, data_dir)
    shots = CASES[option][3]
    # lm-eval 0.4.13 removes the evaluated document from its shots only when the shots come from the test split
    assert twin.config.fewshot_config.split == twin.config.test_split
    pool = list(twin.test_docs())[: shots + 1]  # with a pool of shots + 1 documents, every other one must be drawn
    twin.sampler.replace_df(pool)
    for i, doc in enumerate(pool):
        ctx = twin.fewshot_context(doc, shots)
        ctx = ctx[0] if isinstance(ctx, list) else ctx
        assert _shot(twin, doc) not in ctx, f"document {i} is shown its own answer"
        assert all(_shot(twin, d) in ctx for j, d in enumerate(pool) if j != i)


def test_winogrande_rows_in_hub_schema(data_dir):
    from qllm.tasks.twins.commonsense import winogrande_rows

    rows = winogrande_rows(data_dir / "winogrande" / "dev.llmfoundry.jsonl")
    assert rows == _winogrande_hf(data_dir)
    labels = (data_dir / "winogrande" / "dev-labels.lst").read_text().split()
    assert [r["answer"] for r in rows] == labels  # the official dev labels, in order
    # the hub's first rows (allenai/winogrande, winogrande_xl, validation), as published on its dataset card
    assert rows[:4] == [
        {"sentence": "Sarah was a much better surgeon than Maria so _ always got the easier cases.",
         "option1": "Sarah", "option2": "Maria", "answer": "2"},
        {"sentence": "Sarah was a much better surgeon than Maria so _ always got the harder cases.",
         "option1": "Sarah", "option2": "Maria", "answer": "1"},
        {"sentence": "They were worried the wine would ruin the bed and the blanket, but the _ was't ruined.",
         "option1": "blanket", "option2": "bed", "answer": "2"},
        {"sentence": "Terry tried to bake the eggplant in the toaster oven but the _ was too big.",
         "option1": "eggplant", "option2": "toaster", "answer": "1"},
    ]
