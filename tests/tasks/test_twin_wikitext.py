"""WikiText-2 offline twin: the same documents (level-1 articles) and the same rolling-loglikelihood target as
lm-eval's `wikitext` task, which scores `wikitext_detokenizer(doc)` of EleutherAI/wikitext_document_level pages."""

from __future__ import annotations

import re

from twins import assert_same_prompts, reference_task, twin_task


def test_wikitext_offline_matches_lm_eval(data_dir):
    text = (data_dir / "wikitext2" / "wiki.test.nonempty_lines.txt").read_text(encoding="utf-8")
    # independent split: an article starts at a line " = Title = " (one '=' on each side)
    starts = [m.start() for m in re.finditer(r"^ = [^=\n][^\n]* = $", text, flags=re.M)]
    pages = [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)])]
    assert len(pages) == 62  # SOURCE.md: the same 62 documents as lm-eval's wikitext test split
    twin = twin_task("wikitext_offline", "wikitext_offline", data_dir)
    assert [d["page"] for d in twin.test_docs()] == pages
    assert_same_prompts(twin, reference_task("wikitext", [{"page": p} for p in pages]), n=5)
