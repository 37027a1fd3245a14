"""Cell planning: keys, method × bits, group sizes, data and model checks — all before any weights are loaded."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from qllm.config import CONF_DIR
from qllm.planning import compose_cell, compose_config
from qllm.errors import QllmConfigError


def plan(*overrides: str, data_dir: Path | str, cache_dir: Path | str = "/nonexistent-cache"):
    return compose_cell([f"data_dir={data_dir}", f"cache_dir={cache_dir}", *overrides])


def test_default_cell(data_dir):
    cell = plan(data_dir=data_dir)
    assert (cell.model["name"], cell.method, cell.bits, cell.group_size) == ("smollm2-135m-instruct", "gptq", 4, 64)
    assert cell.scheme == "W4A16 int g64 sym"
    assert set(cell.tasks) == {"arc_easy_offline", "wikitext_offline"}
    assert cell.calibration is not None and cell.calibration["num_samples"] > 0
    assert "Q4_1" in cell.model["note"]


def test_baseline_ignores_bits(data_dir):
    a, b = plan("method=none", "bits=4", data_dir=data_dir), plan("method=none", "bits=8", data_dir=data_dir)
    assert a.key == b.key and a.quant_key == b.quant_key and a.bits is None and a.calibration is None


def test_keys_separate_quantization_from_evaluation(data_dir):
    w4, w8 = plan("method=rtn", "bits=4", data_dir=data_dir), plan("method=rtn", "bits=8", data_dir=data_dir)
    assert w4.quant_key != w8.quant_key
    more = plan("method=rtn", "bits=4", "task.tasks.arc_easy_offline.limit=7", data_dir=data_dir)
    assert more.quant_key == w4.quant_key and more.key != w4.key
    assert plan("method=rtn", "bits=4", data_dir=data_dir).key == w4.key  # stable


def test_suite_limit_overrides_every_task(data_dir):
    cell = plan("task.limit=5", data_dir=data_dir)
    assert {e["limit"] for e in cell.tasks.values()} == {5}


@pytest.mark.parametrize("method,bits,valid", [("smoothquant", 4, "8"), ("fp8", 4, "8"), ("gptq", 5, "2, 3, 4, 8"),
                                               ("rtn", 16, "2, 3, 4, 8")])
def test_bits_not_supported(data_dir, method, bits, valid):
    with pytest.raises(QllmConfigError, match=f"'{method}' does not support bits={bits}; valid bits: {valid}"):
        plan(f"method={method}", f"bits={bits}", data_dir=data_dir)


def test_group_size_must_divide_model_widths(data_dir):
    with pytest.raises(QllmConfigError, match=r"group_size 128 does not divide .* = 576.*Valid group sizes .*: 32, 64"):
        plan("method=gptq", "method.settings.group_size=128", data_dir=data_dir)
    assert plan("method=gptq", "method.settings.group_size=32", data_dir=data_dir).group_size == 32


def test_unknown_method_setting(data_dir):
    with pytest.raises(QllmConfigError, match=r"unknown setting\(s\) grup_size; valid: group_size, symmetric"):
        plan("method=rtn", "+method.settings.grup_size=32", data_dir=data_dir)


def test_missing_data_file(tmp_path):
    with pytest.raises(QllmConfigError, match=r"data file\(s\) not found .*arc_easy/test.llmfoundry.jsonl.*QLLM_DATA_DIR"):
        plan("method=rtn", data_dir=tmp_path)


def test_perplexity_must_not_overlap_calibration(data_dir):
    with pytest.raises(QllmConfigError, match="would evaluate perplexity on calibration text"):
        plan("method=gptq", "task=wikitext_offline", data_dir=data_dir)  # alone: all 62 documents
    assert plan("method=rtn", "task=wikitext_offline", data_dir=data_dir).calibration is None  # RTN needs no calibration


def test_unreachable_hub_model_fails_fast(data_dir, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(QllmConfigError, match=r"meta-llama/Llama-3.1-8B-Instruct@main.* not in the local Hugging "
                                              r"Face cache and the hub is not reachable"):
        plan("model=llama-3.1-8b-instruct", data_dir=data_dir)


def test_paper_models_plan_their_group_sizes():
    """Every hub model config carries the widths needed to validate its default group size without the hub."""
    from omegaconf import OmegaConf

    from qllm.planning import check_group_size as _check_group_size
    from qllm.methods import rtn

    for f in sorted((CONF_DIR / "model").glob("*.yaml")):
        model = OmegaConf.to_container(OmegaConf.load(f))
        if model["source"] != "hub":
            continue
        _check_group_size(rtn(4, [], model["group_size"]), model, model["arch"])  # raises if it does not divide


@pytest.mark.parametrize("task,dataset,hint", [
    ("arc_challenge", "allenai/ai2_arc", "Offline, use task=arc_challenge_offline"),
    ("mmlu", "cais/mmlu", "Offline, use task=mmlu_offline"),
    ("leaderboard_bbh", "SaylorTwift/bbh", "It has no offline twin"),
])
def test_hub_task_offline_names_its_twin(data_dir, monkeypatch, task, dataset, hint):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(QllmConfigError, match=f"reads {dataset} from the Hugging Face hub.*{hint}"):
        plan("method=rtn", f"task={task}", data_dir=data_dir)


def tasks_of(option: str) -> dict:
    return compose_config([f"task={option}"]).task.tasks


def test_paper13_suite_has_the_papers_benchmarks_and_shots():
    shots = {k: e.num_fewshot for k, e in tasks_of("paper13").items()}
    assert shots == {"arc_challenge": 25, "hellaswag": 10, "winogrande": 5, "truthfulqa_mc2": 0, "gsm8k": 5,
                     "leaderboard_math_hard": 4, "mmlu": 5, "leaderboard_mmlu_pro": 5, "leaderboard_bbh": 3,
                     "leaderboard_gpqa": 0, "leaderboard_musr": 0, "leaderboard_ifeval": 0, "mt_bench": 0}
    types = {e.type for e in tasks_of("paper13").values()}
    assert types == {"commonsense", "hallucination", "math", "knowledge", "instruction_following", "dialogue"}


def test_suites_and_twins_are_consistent():
    assert set(tasks_of("openllm_v1")) == {"arc_challenge", "hellaswag", "mmlu", "truthfulqa_mc2", "winogrande",
                                           "gsm8k"}
    assert set(tasks_of("openllm_v2")) == {"leaderboard_ifeval", "leaderboard_bbh", "leaderboard_math_hard",
                                           "leaderboard_gpqa", "leaderboard_musr", "leaderboard_mmlu_pro"}
    offline = tasks_of("offline")
    assert len(offline) == 10 and all(e.data_files for e in offline.values())
    assert all(e.hub_dataset is None for e in offline.values())
    options = {f.stem for f in (CONF_DIR / "task").glob("*.yaml")}
    for f in (CONF_DIR / "task").glob("*.yaml"):
        for key, e in tasks_of(f.stem).items():
            assert e.type in ("commonsense", "knowledge", "instruction_following", "hallucination", "math",
                              "dialogue", "perplexity"), (f.stem, key)
            if e.offline_twin:
                assert e.offline_twin in options and e.offline_twin in offline, (key, e.offline_twin)


@pytest.mark.parametrize("override, message", [
    ("calibration.num_samples=-3", "calibration.num_samples must be a positive integer; got -3"),
    ("calibration.max_seq_len=0", "calibration.max_seq_len must be a positive integer; got 0"),
    ("calibration.batch_size=0", "calibration.batch_size must be a positive integer; got 0"),
    ("calibration.batch_size=65", "calibration.batch_size=65 exceeds calibration.num_samples=64"),
    ("calibration.autocast=int8", "calibration.autocast='int8'; valid: bfloat16, float16 or null"),
    ("task.limit=-1", "task.limit must be a positive integer or null (no cap); got -1"),
    ("task.max_gen_toks=0", "task.max_gen_toks must be a positive integer or null (no cap); got 0"),
    ("task.tasks.wikitext_offline.max_doc_tokens=-5",
     "task.tasks.wikitext_offline.max_doc_tokens must be a positive integer or null (no cap); got -5"),
    ("eval.batch_size=0", "eval.batch_size must be a positive integer; got 0"),
    ("eval.device=tpu", "eval.device='tpu' is not a device the hf backend knows; valid: auto, cpu, cuda, "
                        "cuda:<index>, mps"),
    ("eval.device=cuda:x", "eval.device='cuda:x' is not a device"),
    ("model.dtype=float13", "model.dtype='float13' is not a dtype qllm loads models in; valid: float32, bfloat16, "
                            "float16"),
    ("model.group_size=0", "model.group_size must be a positive integer or null (per-channel); got 0"),
    ("method.settings.group_size=-64", "method.settings.group_size must be a positive integer or null"),
    ("launch.evaluate.timeout_s=0", "launch.evaluate.timeout_s must be > 0 seconds or null (no limit); got 0"),
    ("launch.quantize.nproc=0", "launch nproc must be >= 1; got 0"),
])
def test_bad_values_fail_at_planning_naming_the_key(data_dir, override, message):
    """Each of these used to surface only after minutes of work (or as a traceback): now planning refuses it."""
    with pytest.raises(QllmConfigError) as e:
        plan("method=gptq", override, data_dir=data_dir)
    assert message in str(e.value)


def test_autocast_is_refused_for_gptq_and_kept_for_awq(data_dir):
    """GPTQ's Hessian would be accumulated by bf16 matmuls under autocast: refused with the reason."""
    with pytest.raises(QllmConfigError, match="cannot be used with GPTQModifier: GPTQ's Hessian"):
        plan("method=gptq", "calibration.autocast=bfloat16", data_dir=data_dir)
    assert plan("method=awq", "calibration.autocast=bfloat16", data_dir=data_dir).calibration["autocast"] == "bfloat16"


@pytest.mark.parametrize("overrides, message", [
    (["profile.speed=true", "profile.speed_output_len=1"], "profile.speed_output_len must be >= 2; got 1"),
    (["profile.speed=true", "profile.speed_batch_sizes=[1,0]"], "profile.speed_batch_sizes must be positive"),
])
def test_speed_settings_are_checked_when_speed_is_on(data_dir, overrides, message):
    with pytest.raises(QllmConfigError, match=re.escape(message)):
        plan("method=rtn", *overrides, data_dir=data_dir)
    assert plan("method=rtn", overrides[1], data_dir=data_dir)  # off: not measured, not checked


def test_eval_backend_versions_enter_the_key_only_for_its_own_libraries(data_dir):
    from qllm.stages import backends

    cell = plan("method=rtn", data_dir=data_dir)
    assert set(cell.eval_versions) == set(backends.get("hf").libraries)
    assert "vllm" not in cell.eval_versions and "llmcompressor" not in cell.eval_versions
    assert set(cell.quant_versions) == {"torch", "transformers", "llmcompressor", "compressed-tensors"}
