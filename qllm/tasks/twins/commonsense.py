"""Offline twins of lm-eval's commonsense tasks `arc_challenge` (25-shot, acc_norm), `hellaswag` (10-shot, acc_norm)
and `winogrande` (5-shot, acc).

Each loader below turns a local file under data_dir into the hub dataset's schema, so that
conf/task/{arc_challenge,hellaswag,winogrande}_offline.yaml can reuse lm-eval 0.4.13's prompts, choices, targets,
`process_docs` and metrics unchanged (copied verbatim from its YAMLs, functions referenced as
"py:lm_eval.tasks.<dir>...").

What differs from the hub tasks, and why:
- Few-shot examples. The hub tasks draw them from the `train` split, which is not available offline. The twins draw
  them from the evaluated split itself (`fewshot_split` = `test_split`). lm-eval 0.4.13 then leaves the current
  document out: `ConfigurableTask.fewshot_context` passes `eval_doc=doc` to the sampler exactly when
  `fewshot_config.split == config.test_split`, and `ContextSampler.sample` draws n+1 documents and drops the ones equal
  to `eval_doc` (`rm_eval_doc`, dict equality; no two rows of these files are equal, so only the item itself is
  dropped). This is why the evaluated rows are declared as `test_split` even where the hub task calls them
  `validation` (HellaSwag, WinoGrande): with `validation_split` alone, lm-eval would NOT exclude the current item.
  The shots are therefore other benchmark items rather than training items, so scores are close to but not the same
  as the hub task's; the prompt format is identical.
- ARC-Challenge: all 1,172 test questions, from llm-foundry's re-formatted copy. The original ids and the numeric
  answer labels of a few rows ("1".."4") are lost: `id` is the row index and labels are A, B, C, ... . Neither is
  rendered (lm-eval scores `choices.text`, target = index of `answerKey`), so prompts are unaffected.
- HellaSwag: a 1,000-item subset of the 10,042 validation items (the full file in the original schema is not
  available, see data_dir/hellaswag/SOURCE.md); rows are in the subset file's (shuffled) order. Only the type of
  `label` is changed (int -> str, as in the hub's `Rowan/hellaswag`); lm-eval's `process_docs` does the rest.
- WinoGrande: all 1,267 dev (= hub `validation`) items, from llm-foundry's partial-scoring form
  {context_options, continuation, gold}; `winogrande_rows` rebuilds {sentence, option1, option2, answer}. The split
  of the sentence start from the options is a reconstruction (see there): it cannot change what lm-eval renders,
  because lm-eval's `doc_to_choice` re-joins exactly `sentence[:blank] + option` (= the file's context_options) and
  `doc_to_target` is the stripped text after the blank (= the file's continuation).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

ARC_SPLIT = "test"  # ARC: the hub's test split (what lm-eval's arc_* tasks evaluate)
VALIDATION_SPLIT = "validation"  # HellaSwag / WinoGrande: the hub's validation split (what lm-eval evaluates)


def _jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ---- ARC-Challenge (allenai/ai2_arc, ARC-Challenge) ----

def arc_rows(path: str | Path) -> list[dict]:
    """llm-foundry ARC rows {query: "Question: <stem>", choices, gold} in the hub's ai2_arc schema."""
    out = []
    for i, r in enumerate(_jsonl(path)):
        if not r["query"].startswith("Question: "):
            raise ValueError(f"{path}: row {i}: query does not start with 'Question: '")
        labels = [chr(ord("A") + k) for k in range(len(r["choices"]))]
        out.append({"id": str(i), "question": r["query"][len("Question: "):],
                    "choices": {"text": list(r["choices"]), "label": labels}, "answerKey": labels[r["gold"]]})
    return out


def load_arc(path: str, **_: Any) -> Any:
    """lm-eval `custom_dataset`: an llm-foundry ARC file as the hub's DatasetDict (one `test` split, hub features)."""
    import datasets

    features = datasets.Features({
        "id": datasets.Value("string"), "question": datasets.Value("string"),
        "choices": {"text": datasets.Sequence(datasets.Value("string")), "label": datasets.Sequence(datasets.Value("string"))},
        "answerKey": datasets.Value("string"),
    })
    return datasets.DatasetDict({ARC_SPLIT: datasets.Dataset.from_list(arc_rows(path), features=features)})


# ---- HellaSwag (Rowan/hellaswag) ----

_HELLASWAG_FEATURES = {
    "ind": "int32", "activity_label": "string", "ctx_a": "string", "ctx_b": "string", "ctx": "string",
    "endings": ["string"], "source_id": "string", "split": "string", "split_type": "string", "label": "string",
}


def hellaswag_rows(path: str | Path) -> list[dict]:
    """Rows of a HellaSwag jsonl in the original schema, with `label` as a string like the hub's."""
    return [{**{k: r[k] for k in _HELLASWAG_FEATURES}, "label": str(r["label"])} for r in _jsonl(path)]


def load_hellaswag(path: str, **_: Any) -> Any:
    """lm-eval `custom_dataset`: a HellaSwag jsonl as the hub's DatasetDict (one `validation` split, hub features)."""
    import datasets

    features = datasets.Features({
        k: datasets.Sequence(datasets.Value(v[0])) if isinstance(v, list) else datasets.Value(v)
        for k, v in _HELLASWAG_FEATURES.items()
    })
    return datasets.DatasetDict({VALIDATION_SPLIT: datasets.Dataset.from_list(hellaswag_rows(path), features=features)})


# ---- WinoGrande (allenai/winogrande, winogrande_xl) ----

_NO_SPACE_BEFORE = (".", ",", "'", ";", ":", "!", "?")


def winogrande_row(context_options: list[str], continuation: str, gold: int) -> dict:
    """One llm-foundry WinoGrande row back in the hub schema {sentence, option1, option2, answer}.

    The file holds the sentence with the blank filled by each option, up to the blank, and the rest of the sentence.
    The sentence start is the options' common prefix cut back to a word boundary (after the last whitespace), so a
    shared first letter stays with the options (the hub's row 2: "...but the _ was't ruined.", options "blanket" /
    "bed", not "...the b_" / "lanket" / "ed"). The blank is followed by a space unless the rest starts with
    punctuation ("_'s face.", "_."), as in the hub's sentences. lm-eval renders sentence[:blank] + option (= the
    file's context_options) and the stripped text after the blank (= continuation), so this reconstruction does not
    affect prompts; it only shapes `sentence`/`option*` (decontamination query, sample logs).
    """
    a, b = context_options
    n = len(os.path.commonprefix([a, b]))
    while n > 0 and not a[n - 1].isspace():
        n -= 1
    prefix, option1, option2 = a[:n], a[n:], b[n:]
    if "_" in prefix or not option1 or not option2 or gold not in (0, 1):
        raise ValueError(f"cannot rebuild a WinoGrande row from {context_options!r}, gold={gold!r}")
    sep = "" if continuation.startswith(_NO_SPACE_BEFORE) else " "
    return {"sentence": prefix + "_" + sep + continuation, "option1": option1, "option2": option2,
            "answer": str(gold + 1)}


def winogrande_rows(path: str | Path) -> list[dict]:
    return [winogrande_row(r["context_options"], r["continuation"], r["gold"]) for r in _jsonl(path)]


def load_winogrande(path: str, **_: Any) -> Any:
    """lm-eval `custom_dataset`: llm-foundry's WinoGrande dev file as the hub's DatasetDict (one `validation` split)."""
    import datasets

    features = datasets.Features({k: datasets.Value("string") for k in ("sentence", "option1", "option2", "answer")})
    return datasets.DatasetDict({VALIDATION_SPLIT: datasets.Dataset.from_list(winogrande_rows(path), features=features)})
