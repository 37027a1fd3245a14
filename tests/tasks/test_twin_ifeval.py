"""IFEval offline twin: renders lm-eval's ifeval prompts and scores like it for the same documents, and lm-eval's
IFEval checkers work from the Punkt model that qllm.twins.ifeval.ensure_punkt provides, with every download blocked."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import nltk
import pytest
from twins import assert_same_prompts, reference_task, twin_task

REPO = Path(__file__).resolve().parent.parent
# the fields of the `kwargs` struct column of the hub's google/IFEval (train split)
HUB_KWARGS = (
    "num_highlights", "relation", "num_words", "num_placeholders", "prompt_to_repeat", "num_paragraphs",
    "nth_paragraph", "first_word", "postscript_marker", "num_bullets", "section_spliter", "num_sections",
    "capital_relation", "capital_frequency", "keywords", "language", "let_relation", "letter", "let_frequency",
    "end_phrase", "forbidden_words", "keyword", "frequency", "num_sentences",
)


def _fn(f):
    """A function by its source (lm-eval's YAML loader imports utils.py a second time, as another module object)."""
    return (f.__code__.co_filename, f.__qualname__) if callable(f) else f


def _no_network(*_a, **_k):
    raise AssertionError("network access attempted")


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No downloads, no sockets, nltk sees only the NLTK data root that ensure_punkt writes (under tmp_path)."""
    monkeypatch.setenv("QLLM_NLTK_DATA", str(tmp_path / "nltk_data"))
    monkeypatch.setattr(nltk, "download", _no_network)
    monkeypatch.setattr(nltk.downloader.Downloader, "download", _no_network)
    monkeypatch.setattr(socket.socket, "connect", _no_network)
    monkeypatch.setattr(socket, "getaddrinfo", _no_network)
    monkeypatch.setattr(nltk.data, "path", [])
    monkeypatch.delenv("NLTK_DATA", raising=False)
    nltk.tokenize._get_punkt_tokenizer.cache_clear()
    from qllm.tasks.twins import ifeval  # noqa: F401  (imports lm-eval's checkers the offline way)
    from lm_eval.tasks.ifeval import instructions_util

    instructions_util._get_sentence_tokenizer.cache_clear()
    yield tmp_path / "nltk_data"
    nltk.tokenize._get_punkt_tokenizer.cache_clear()
    instructions_util._get_sentence_tokenizer.cache_clear()


def test_ifeval_offline_matches_lm_eval(data_dir, offline):
    rows = [json.loads(line) for line in open(data_dir / "ifeval" / "input_data.jsonl", encoding="utf-8")]
    # the hub schema: same fields; every kwargs dict carries every struct field, None where unused
    hf = [{**r, "kwargs": [{k: kw.get(k) for k in HUB_KWARGS} for kw in r["kwargs"]]} for r in rows]
    assert all(set(kw) <= set(HUB_KWARGS) for r in rows for kw in r["kwargs"])

    twin = twin_task("ifeval_offline", "ifeval_offline", data_dir)
    ref = reference_task("ifeval", hf)
    assert (offline / "tokenizers" / "punkt_tab" / "english" / "ortho_context.tab").is_file()  # the loader ran

    assert twin.config.test_split == ref.config.test_split == "train"
    assert twin.config.num_fewshot == ref.config.num_fewshot == 0
    assert twin.OUTPUT_TYPE == ref.OUTPUT_TYPE == "generate_until"
    assert twin.config.generation_kwargs == ref.config.generation_kwargs
    assert [{k: _fn(v) for k, v in m.items()} for m in twin.config.metric_list] == \
        [{k: _fn(v) for k, v in m.items()} for m in ref.config.metric_list]
    assert _fn(twin.config.process_results) == _fn(ref.config.process_results)
    assert {k: _fn(v) for k, v in twin.aggregation().items()} == {k: _fn(v) for k, v in ref.aggregation().items()}
    assert twin.higher_is_better() == ref.higher_is_better()
    assert len(twin.eval_docs) == 541 and sum(len(d["instruction_id_list"]) for d in twin.eval_docs) == 834
    assert [dict(d) for d in twin.eval_docs] == [dict(d) for d in ref.eval_docs]
    assert_same_prompts(twin, ref, n=8)

    # scoring: same per-instruction verdicts for the same responses
    responses = ["Hello, world.", "THIS IS ALL CAPS. NO COMMAS HERE", "*Title*\n\nfirst paragraph\n\n***\n\nP.S. bye"]
    for a, b in zip(list(twin.eval_docs)[:12], list(ref.eval_docs)[:12]):
        for resp in responses:
            assert twin.process_results(a, [resp]) == ref.process_results(b, [resp])


def _doc(instructions: dict[str, dict]) -> dict:
    """A document in the hub's form (unused kwargs None, as lm-eval gets them from google/IFEval)."""
    return {"key": 1, "prompt": "a prompt", "instruction_id_list": list(instructions),
            "kwargs": [{k: args.get(k) for k in HUB_KWARGS} for args in instructions.values()]}


def test_ifeval_checkers_score_offline(offline):
    from qllm.tasks.twins.ifeval import ensure_punkt

    root = ensure_punkt()
    assert root == offline.resolve() and nltk.data.path[0] == str(root)
    assert ensure_punkt() == root  # idempotent
    from lm_eval.tasks.ifeval.utils import process_results

    doc = _doc({
        "length_constraints:number_sentences": {"relation": "less than", "num_sentences": 3},  # Punkt sentences
        "change_case:capital_word_frequency": {"capital_relation": "at least", "capital_frequency": 2},  # word_tokenize
        "punctuation:no_comma": {},
    })
    # "Dr." is one of Punkt's English abbreviations: 2 sentences, not 3
    good = process_results(doc, ["I called Dr. Smith about the NASA launch. He said it went WELL."])
    assert good == {"prompt_level_strict_acc": True, "inst_level_strict_acc": [True, True, True],
                    "prompt_level_loose_acc": True, "inst_level_loose_acc": [True, True, True]}
    bad = process_results(doc, ["I called Smith. He said, calmly, it went well. Then he left. Bye."])
    assert bad == {"prompt_level_strict_acc": False, "inst_level_strict_acc": [False, False, False],
                   "prompt_level_loose_acc": False, "inst_level_loose_acc": [False, False, False]}
    mixed = process_results(doc, ["One sentence with a comma, and CAPS WORDS."])
    assert mixed["inst_level_strict_acc"] == [True, True, False] and mixed["prompt_level_strict_acc"] is False


def test_evaluate_stage_order_never_downloads(tmp_path, data_dir):
    """In a fresh process, building the task as the evaluate stage does (qllm resolves the YAML's "py:" references,
    importing lm-eval's ifeval modules, then lm-eval calls the loader) never calls nltk.download, and leaves
    punkt_tab in <cache_dir>/nltk_data for the checks."""
    script = textwrap.dedent(f"""
        import socket, sys, nltk, nltk.downloader
        def no_network(*a, **k): raise AssertionError("network access attempted")
        nltk.download = nltk.downloader.download = nltk.downloader.Downloader.download = no_network
        socket.socket.connect = socket.getaddrinfo = no_network
        nltk.data.path[:] = []
        from lm_eval.api.task import ConfigurableTask
        from qllm.planning import compose_cell
        from qllm.tasks.spec import lm_eval_config
        cell = compose_cell(["task=ifeval_offline", "method=none", "data_dir={data_dir}", "cache_dir={tmp_path}"])
        task = ConfigurableTask(config=lm_eval_config(cell.tasks["ifeval_offline"]))
        from lm_eval.tasks.ifeval import instructions_util
        assert nltk.data.path[0] == "{tmp_path / 'nltk_data'}", nltk.data.path
        assert instructions_util.count_sentences("Mr. Smith left. He came back.") == 2
        print("OK", len(task.eval_docs))
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("NLTK_DATA", "QLLM_NLTK_DATA")}
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "OK 541" in proc.stdout, proc.stdout + proc.stderr
    assert (tmp_path / "nltk_data" / "tokenizers" / "punkt_tab" / "english" / "abbrev_types.txt").is_file()
