"""The vLLM backend as planning sees it (no engine started): what runs where, the settings it refuses, the versions
that enter the key (read from the vLLM environment, not this one), the stage's interpreter and environment."""

from __future__ import annotations

import pytest

from qllm.errors import QllmConfigError
from qllm.methods import Scheme
from qllm.planning import compose_cell
from qllm.stages import backends
from qllm.stages.backends import vllm


def _has_vllm_env() -> bool:
    try:
        vllm.environment({"python": None})
        return True
    except QllmConfigError:
        return False


needs_env = pytest.mark.skipif(not _has_vllm_env(), reason="no vLLM environment (make setup builds .venv-vllm)")
SMOL = ["model=smollm2-135m-instruct", "eval=vllm", "task=arc_easy_offline"]


def test_support_table_covers_every_scheme_qllm_makes():
    from qllm import methods

    recipes = [methods.rtn(b, [], 64, s) for b in (2, 3, 4, 8) for s in (True, False)]
    recipes += [methods.gptq(4, [], 64), methods.awq(4, [], 64), methods.smoothquant(8, []), methods.fp8(8, [])]
    families = {r.quant.family for r in recipes} | {"dense"}
    assert families <= set(vllm.SUPPORT["cpu"])  # every scheme qllm makes has a measured CPU row, none a fallback
    for f in families:
        assert vllm.supported("cpu", Scheme(*_scheme_fields(f))) == vllm.SUPPORT["cpu"][f]
    assert vllm.supported("cpu", methods.gptq(4, [], 64).quant)[0]
    assert vllm.supported("cpu", methods.smoothquant(8, []).quant)[0]
    assert not vllm.supported("cpu", methods.rtn(8, [], 64).quant)[0]  # W8A16: no CPU kernel
    assert not vllm.supported("cpu", methods.fp8(8, []).quant)[0]
    assert not vllm.supported("cpu", methods.rtn(3, [], 64).quant)[0]


def _scheme_fields(family: str) -> tuple:
    if family == "dense":
        return ("dense",)
    bits = int(family[1])
    if "A8" in family:
        return ("int" if "int8" in family else "float", bits, True, None, family.split()[-1])
    return ("int", bits, family.endswith("sym") and not family.endswith("asym"), 64, None)


@needs_env
@pytest.mark.parametrize("overrides, match", [
    (["method=rtn", "bits=8"], r"cannot run this cell's W8A16 sym checkpoint on cpu: vLLM-CPU has no 8-bit "
                               r"weight-only kernel.*eval=hf evaluates every scheme.*W4A16 sym, W4A16 asym, W8A8 int8"),
    (["method=fp8", "bits=8"], r"W8A8 fp8 checkpoint on cpu: vLLM-CPU runs FP8 through a plain-torch fallback"),
    (["method=rtn", "bits=3"], r"W3A16 sym checkpoint on cpu: vLLM-CPU's CPUWNA16 kernel takes 4-bit weights only"),
    (["method=none", "eval.device=cuda"], r"eval.device=cuda, but the vLLM environment .* is the cpu build"),
    (["method=none", "eval.dtype=float13"], r"eval.dtype='float13'; valid: bfloat16, float16, float32"),
    (["method=gptq", "bits=4", "eval.dtype=float32"], r"int4 kernel \(cpu_gemm_wna16\) has no float32 path"),
    (["method=none", "eval.tensor_parallel_size=0"], r"eval.tensor_parallel_size must be a positive integer"),
    (["method=none", "eval.data_parallel_size=2"], r"data parallelism through ray, which the vLLM environment lacks"),
    (["method=smoothquant", "bits=8", "eval.cpu_int4_w4a8=true"], r"eval.cpu_int4_w4a8=true cannot apply"),
    # method=mixed: every candidate needs a kernel (W8A16 has none on CPU), and fused projections one scheme
    (["method=mixed"], r"W8A16 sym checkpoint on cpu: vLLM-CPU has no 8-bit"),
    (["method=mixed", "method.settings.candidates=[gptq-w4ch,gptq-w4g64]"],
     r"fuses each block's q/k/v and gate/up .* set method.settings.tie_fused=true"),
])
def test_a_cell_vllm_cannot_run_is_refused_at_planning(overrides, match, data_dir):
    with pytest.raises(QllmConfigError, match=match):
        compose_cell([*SMOL, *overrides])


@needs_env
def test_a_tied_4_bit_mixed_cell_plans_for_vllm(data_dir):
    cell = compose_cell([*SMOL, "method=mixed", "method.settings.candidates=[gptq-w4ch,gptq-w4g64]",
                         "method.settings.tie_fused=true"])
    untied = compose_cell(["model=smollm2-135m-instruct", "task=arc_easy_offline", "method=mixed",
                           "method.settings.candidates=[gptq-w4ch,gptq-w4g64]"])
    assert cell.recipe["quant_stage"]["quant_modifiers"]["QllmMixedPrecision"]["tie_fused"] is True
    assert "tie_fused" not in untied.recipe["quant_stage"]["quant_modifiers"]["QllmMixedPrecision"]
    assert cell.quant_key != untied.quant_key  # another allocation, another checkpoint


@needs_env
def test_w4a8_mode_is_refused_where_it_would_not_apply(data_dir):
    if "amx_tile" in vllm._cpu_flags():
        cell = compose_cell([*SMOL, "method=rtn", "bits=4", "eval.cpu_int4_w4a8=true"])
        assert cell.name.endswith("· vllm as W4A8")
    else:
        with pytest.raises(QllmConfigError, match=r"this CPU has no AMX \(amx_tile\), so vLLM-CPU would run true "
                                                  r"W4A16 anyway; valid here: false"):
            compose_cell([*SMOL, "method=rtn", "bits=4", "eval.cpu_int4_w4a8=true"])


@needs_env
def test_vllm_cell_keys_its_own_environment_versions_and_names_its_backend(data_dir):
    hf = compose_cell(["model=smollm2-135m-instruct", "task=arc_easy_offline", "method=rtn", "bits=4"])
    v = compose_cell([*SMOL, "method=rtn", "bits=4"])
    assert v.quant_key == hf.quant_key  # the same checkpoint
    assert v.key != hf.key and v.task_keys != hf.task_keys
    env = vllm.environment({"python": None})
    assert v.eval_versions["vllm"] == env["version:vllm"] and v.eval_versions["vllm"].endswith("+cpu")
    assert v.eval_versions["transformers"] == env["version:transformers"]  # vLLM's pin, not the quantize stack's
    assert set(v.eval_versions) == set(backends.get("vllm").libraries)
    assert "vllm" not in hf.eval_versions  # a backend a cell does not use stays out of its key
    assert v.name == "smollm2-135m-instruct · rtn · w4 · vllm" and hf.name == "smollm2-135m-instruct · rtn · w4"
    # engine settings are not in the key, what changes scores is
    same = compose_cell([*SMOL, "method=rtn", "bits=4", "eval.cpu_kv_cache_gb=2", "eval.enforce_eager=false"])
    other = compose_cell([*SMOL, "method=rtn", "bits=4", "eval.max_model_len=2048"])
    assert same.key == v.key and other.key != v.key


@needs_env
def test_the_evaluate_stage_runs_in_the_vllm_environment_with_its_settings():
    b = backends.get("vllm")
    s = {"python": None, "cpu_kv_cache_gb": 3, "cpu_threads_bind": "auto", "cpu_int4_w4a8": False}
    assert b.python(s) == vllm.environment(s)["python"] and "vllm" in b.python(s)
    env = b.env(s)
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "3" and env["VLLM_CPU_INT4_W4A8"] == "0"
    assert env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    assert backends.get("hf").python({}) is None


def test_a_missing_vllm_environment_says_how_to_build_it(tmp_path, monkeypatch):
    monkeypatch.setenv("QLLM_VLLM_PYTHON", str(tmp_path / "nope" / "python"))
    with pytest.raises(QllmConfigError, match=r"is not a file; it must be the python of an environment with vLLM "
                                              r"\(make setup builds .venv-vllm\)"):
        vllm.interpreter({"python": None})
