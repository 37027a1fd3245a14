"""Model sources at planning, without weights: a model by path (`model=hf`), its fingerprint and config."""

from __future__ import annotations

import json
import os

import pytest

from qllm.errors import QllmConfigError
from qllm.planning import compose_cell
from qllm.sources import models

QWEN2 = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
         "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 1000,
         "dtype": "float32"}


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "tiny-qwen2"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(QWEN2))
    (d / "model.safetensors").write_bytes(len(b"{}").to_bytes(8, "little") + b"{}")
    return d


def _hf(path) -> dict:
    return {"name": "x", "source": "auto", "path": str(path), "revision": "main", "dtype": "auto"}


def test_a_local_dir_is_fingerprinted(model_dir):
    m = models.resolve(_hf(model_dir))
    assert m["source"] == "local" and m["path"] == str(model_dir.resolve()) and m["dtype"] == "float32"
    assert models.resolve(_hf(model_dir))["content"] == m["content"]  # stable
    (model_dir / "config.json").write_text(json.dumps({**QWEN2, "rope_theta": 1.0}))
    assert models.resolve(_hf(model_dir))["content"] != m["content"]  # a changed config: a new model
    st = (model_dir / "model.safetensors").stat()
    os.utime(model_dir / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed = models.resolve(_hf(model_dir))["content"]
    assert changed != m["content"]  # rewritten weights


def test_a_hub_id_and_a_bad_path():
    hub = models.resolve(_hf("Qwen/Qwen2.5-0.5B-Instruct"))
    assert hub["source"] == "hub" and "content" not in hub
    with pytest.raises(QllmConfigError, match="no such directory, and not a hub id"):
        models.resolve(_hf("./not/here"))
    assert models.resolve({**_hf("./not/here"), "source": "local"})["source"] == "local"  # others: as they are


def test_model_by_path_plans_a_cell_with_its_own_widths(model_dir, data_dir):
    base = [f"data_dir={data_dir}", "model=hf", f"model.path={model_dir}", "method=rtn", "task=arc_easy_offline"]
    with pytest.raises(QllmConfigError, match="group_size 128 does not divide .* Valid group sizes for this model: 32, 64"):
        compose_cell(base)
    cell = compose_cell([*base, "model.group_size=32"])
    assert cell.model["name"] == "tiny-qwen2" and cell.model["source"] == "local" and cell.model["dtype"] == "float32"
    assert cell.group_size == 32 and cell.model["content"]
    (model_dir / "config.json").write_text(json.dumps({**QWEN2, "rope_theta": 5.0}))
    assert compose_cell([*base, "model.group_size=32"]).quant_key != cell.quant_key


def test_model_by_path_without_a_path_says_so(data_dir):
    from qllm.errors import QllmConfigError as E

    with pytest.raises(E, match="model.path"):
        compose_cell([f"data_dir={data_dir}", "model=hf", "method=none"])
