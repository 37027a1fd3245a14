"""`model=hf model.path=<dir>`: any causal LM without writing a YAML. A tiny random Qwen2 made here (another
architecture than the Llamas of the other tests) goes through GPTQ and AWQ and is evaluated."""

from __future__ import annotations

import json

import pytest

from conftest import mlflow_runs, run_qllm


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory, cache_dir, data_dir):
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from qllm.planning import compose_cell
    from qllm.sources.models import prepare

    llama = compose_cell([f"data_dir={data_dir}", f"cache_dir={cache_dir}", "model=tiny-random-llama", "method=none"])
    tokenizer = AutoTokenizer.from_pretrained(prepare(llama.model, llama.data_dir, llama.cache_dir))  # SmolLM2's
    out = tmp_path_factory.mktemp("models") / "tiny-qwen2"
    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=2048,
                         tie_word_embeddings=True)
    Qwen2ForCausalLM(config).to(torch.float32).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_gptq_and_awq_on_a_model_given_by_its_path(qwen2_dir, tmp_path, cache_dir, data_dir):
    proc = run_qllm(["-m", "model=hf", f"model.path={qwen2_dir}", "model.group_size=32", "method=gptq,awq", "bits=4",
                     "calibration=wikitext2-small", "task=arc_easy_offline", "task.limit=3"],
                    tmp_path, cache_dir, data_dir)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    runs = mlflow_runs(tmp_path)
    cells = runs[runs["tags.qllm.kind"] == "cell"].set_index("params.method")
    assert sorted(cells.index) == ["awq", "gptq"] and (cells["tags.qllm.status"] == "finished").all()
    assert (cells["params.model"] == "tiny-qwen2").all() and (cells["params.model.source"] == "local").all()
    assert (cells["params.model.dtype"] == "float32").all()  # dtype=auto: the checkpoint's own
    assert cells["params.model.content"].str.fullmatch(r"[0-9a-f]{16}").all()  # the dir's fingerprint
    assert cells.loc["gptq", "params.scheme"] == "W4A16 int g32 sym"
    assert cells.loc["awq", "params.scheme"] == "W4A16 int g32 asym"
    assert (cells["metrics.arc_easy_offline/n_samples"] == 3).all()
    for method in ("gptq", "awq"):
        fp = json.loads(cells.loc[method, "tags.qllm.evaluated_weights"])
        assert fp["group_size"] == 32 and fp["max_distinct_per_group"] <= 16  # the 4-bit grid, as evaluated
        checkpoint = cache_dir / "quantized" / cells.loc[method, "tags.qllm.checkpoint_path"].rsplit("/", 1)[1]
        manifest = json.loads((checkpoint / "qllm_manifest.json").read_text())
        assert manifest["model"]["path"] == str(qwen2_dir) and manifest["model"]["content"]
        config = json.loads((checkpoint / "config.json").read_text())
        assert config["architectures"] == ["Qwen2ForCausalLM"] and config["quantization_config"]["format"] == \
            "pack-quantized"
