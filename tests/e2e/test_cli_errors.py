"""Bad input at the command line: a clear, specific error and a non-zero exit, before any weights are loaded."""

from __future__ import annotations

import pytest

from conftest import run_qllm


@pytest.mark.parametrize(
    "args,expected",
    [
        (["model=nope"], ["Could not find 'model/nope'", "smollm2-135m-instruct", "tiny-random-llama"]),
        (["method=gptqq"], ["Could not find 'method/gptqq'", "awq", "smoothquant"]),
        (["task=nope"], ["Could not find 'task/nope'", "arc_easy_offline", "wikitext_offline"]),
        (["bitz=4"], ["unknown config key 'bitz'", "valid keys there: model, method, task", "bits, seed"]),
        (["model.revison=abc"], ["unknown config key 'model.revison'", "no 'revison' at 'model'", "revision"]),
        (["bits=four"], ["Value 'four' of type 'str' could not be converted to Integer", "bits"]),
        (["method=smoothquant", "bits=4"], ["does not support bits=4; valid bits: 8"]),
        (["method=rtn", "bits=5"], ["does not support bits=5; valid bits: 2, 3, 4, 8"]),
        (["model=llama-2-7b-chat"], ["meta-llama/Llama-2-7b-chat-hf", "hub is not reachable"]),
        (["data_dir=/nonexistent"], ["calibration 'wikitext2'", "wiki.test.nonempty_lines.txt", "QLLM_DATA_DIR"]),
        (["method=rtn", "data_dir=/nonexistent"], ["task 'arc_easy_offline'", "arc_easy/test.llmfoundry.jsonl"]),
        (["task=gsm8k"], ["reads openai/gsm8k from the Hugging Face hub", "use task=gsm8k_offline"]),
        # values that used to fail only after minutes of quantization (or as a traceback)
        (["calibration.num_samples=-3"], ["calibration.num_samples must be a positive integer; got -3"]),
        (["task.limit=-1"], ["task.limit must be a positive integer or null (no cap); got -1"]),
        (["eval.batch_size=0"], ["eval.batch_size must be a positive integer; got 0"]),
        (["eval.device=tpu"], ["eval.device='tpu' is not a device the hf backend knows", "auto, cpu, cuda"]),
        (["model.dtype=float13"], ["model.dtype='float13' is not a dtype", "float32, bfloat16, float16"]),
        (["eval.devic=cpu"], ["unknown config key 'eval.devic'", "valid keys there: backend, batch_size"]),
        (["model=hf"], ["model.path", "model=hf needs model.path"]),
    ],
    ids=["model", "method", "task", "key", "nested-key", "bits-type", "smoothquant-w4", "bits-5", "hub", "calib-data",
         "task-data", "hub-task", "calib-samples", "task-limit", "batch-size", "device", "dtype", "eval-key",
         "hf-no-path"],
)
def test_bad_input_fails_before_loading_weights(tmp_path, cache_dir, data_dir, args, expected):
    cache = tmp_path / "cache"
    proc = run_qllm(args, tmp_path, cache, data_dir, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    for text in expected:
        assert text in out, f"{text!r} not in output:\n{out[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not (cache / "models").exists() and not (cache / "quantized").exists()  # nothing was converted/loaded
