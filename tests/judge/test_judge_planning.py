"""The judge at planning: refused before anything runs, naming the key; the judge's identity in the cell key of
dialogue cells only."""

from __future__ import annotations

import pytest

from qllm.errors import QllmConfigError
from qllm.planning import compose_cell

TINY = ["model=tiny-random-llama", "method=none", "task=mt_bench", "task.limit=2"]


def _cell(data_dir, tmp_path, *overrides):
    return compose_cell([*TINY, f"data_dir={data_dir}", f"cache_dir={tmp_path}", *overrides])


def test_missing_key_variable_is_a_planning_error(data_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(QllmConfigError, match=r"judge.api_key_env=OPENAI_API_KEY: that environment variable is not "
                                              r"set .*\(judge=local .*\(judge=none\)"):
        _cell(data_dir, tmp_path)  # the default judge: openai
    monkeypatch.setenv("OPENAI_API_KEY", "sk-x")
    cell = _cell(data_dir, tmp_path)
    assert cell.judge["model"] == "gpt-4" and "sk-x" not in cell.to_json()


@pytest.mark.parametrize("overrides, message", [
    (["judge=local"], "judge.model is not set (judge=local): the judge model's dir or hub id"),
    (["judge=local", "judge.model=/no/such/dir"], "no such directory, and not a hub id"),
    (["judge=none", "judge.kind=cloud"], "judge.kind='cloud'; valid: remote, local, none"),
    (["judge=openai", "judge.api_key_env=null", "judge.base_url=ftp://x"], "must be an http"),
    (["judge=openai", "judge.api_key_env=null", "judge.concurrency=0"], "judge.concurrency must be >= 1; got 0"),
    (["judge=openai", "judge.api_key_env=null", "judge.constrain_verdict=true"],
     "judge.constrain_verdict=true needs a local vLLM server"),
    (["judge=none", "task.max_new_tokens=64", "task.max_gen_toks=32"], "are the same cap; set one of them"),
])
def test_bad_judge_settings_name_the_key(data_dir, tmp_path, overrides, message):
    with pytest.raises(QllmConfigError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        _cell(data_dir, tmp_path, *overrides)


def test_judge_enters_the_key_of_dialogue_cells_only(data_dir, tmp_path):
    a = _cell(data_dir, tmp_path, "judge=openai", "judge.api_key_env=null")
    b = _cell(data_dir, tmp_path, "judge=openai", "judge.api_key_env=null", "judge.model=gpt-4o")
    c = _cell(data_dir, tmp_path, "judge=openai", "judge.api_key_env=null", "judge.concurrency=2")
    assert a.key != b.key and a.key == c.key  # who judges counts; how many requests in flight does not
    assert a.task_keys == b.task_keys  # the answers do not depend on the judge
    quick = ["model=tiny-random-llama", "method=none", f"data_dir={data_dir}", f"cache_dir={tmp_path}",
             "task=arc_easy_offline", "judge.api_key_env=null"]
    assert compose_cell([*quick, "judge.model=x"]).key == compose_cell([*quick, "judge.model=y"]).key
    assert compose_cell(quick).judge is None
    capped = _cell(data_dir, tmp_path, "judge=none", "task.max_new_tokens=64")
    assert capped.tasks["mt_bench"]["max_gen_toks"] == 64


def test_baseline_cell_keys_match_a_method_none_plan(data_dir, tmp_path):
    args = ["model=tiny-random-llama", "task=mt_bench", "task.limit=2", "judge=none", f"data_dir={data_dir}",
            f"cache_dir={tmp_path}"]
    quantized = compose_cell([*args, "method=rtn"])
    baseline = compose_cell([*args, "method=none"])
    derived = quantized.baseline()
    assert derived.task_keys == baseline.task_keys and derived.quant_key == baseline.quant_key
    assert derived.method == "none" and derived.bits is None
