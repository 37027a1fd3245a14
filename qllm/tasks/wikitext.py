"""WikiText-2 from the local raw file: lm-eval's `wikitext` documents and metrics, plus token perplexity.

Referenced from conf/task/wikitext_offline.yaml (`py:qllm.tasks.wikitext.*`) and used by the calibration data
(`split_wikitext_documents`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

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
