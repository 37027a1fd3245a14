"""Tensor-parallel HF evaluation through DeepSpeed's inference engine (AutoTP), for models whose dense weights exceed
one GPU: `launch.evaluate=deepspeed launch.evaluate.autotp=true` with `eval=hf`.

The `deepspeed` launcher starts N ranks (one per GPU); each rank loads the model on the CPU, `deepspeed.init_inference`
splits every linear layer across the N GPUs (AutoTP: no model-specific policy, `replace_with_kernel_inject=False`)
and moves its shard to its GPU. Every rank then runs *all* of lm-eval's requests on the one logical model (tensor
parallelism, not data parallelism): the lm-eval LM is made to see itself as rank 0 of 1, so lm-eval splits nothing,
and only the main process (RANK 0, qllm.stages.process.is_main) writes results.

Host memory: every rank holds the model's dense weights in RAM until its shard is on its GPU (N copies at load
time on a node); give the job enough memory (`hydra.launcher.mem_gb`) or fewer ranks per node.

Only the evaluate stage imports this module (it imports torch and deepspeed inside its functions).
"""

from __future__ import annotations

from typing import Any, Optional

DTYPES = ("bfloat16", "float16", "float32")


def _torch_dtype(dtype: str) -> Any:
    import torch

    if dtype in ("auto", None):
        return torch.bfloat16
    if dtype not in DTYPES:
        raise ValueError(f"AutoTP dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    return getattr(torch, dtype)


def wrap_model(model: Any, tp_size: int, dtype: str) -> Any:
    """`model` (a transformers PreTrainedModel on the CPU or the meta device) split across `tp_size` GPUs by
    DeepSpeed AutoTP; returns the sharded module (on this rank's GPU). Every rank must call it (a collective)."""
    import deepspeed

    engine = deepspeed.init_inference(model, tensor_parallel={"tp_size": int(tp_size)}, dtype=_torch_dtype(dtype),
                                      replace_with_kernel_inject=False)
    return engine.module


def load_autotp(model_path: str, *, tp_size: int, dtype: str, revision: Optional[str] = None,
                trust_remote_code: bool = False, batch_size: int = 8, max_length: Optional[int] = None,
                **hflm_kwargs: Any) -> Any:
    """An lm-eval HFLM over `model_path` sharded by AutoTP across `tp_size` GPUs (every rank calls it).

    Loads the model on the CPU (HFLM's own loader would put a full copy on each rank's GPU, which is what AutoTP is
    for avoiding), shards it, and hands the sharded module to HFLM as an initialized model (lm-eval then treats it as
    one process: rank 0 of 1, no request splitting)."""
    import torch
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = _torch_dtype(dtype)
    model = AutoModelForCausalLM.from_pretrained(model_path, revision=revision or "main", dtype=torch_dtype,
                                                 low_cpu_mem_usage=True, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(model_path, revision=revision or "main",
                                              trust_remote_code=trust_remote_code)
    module = wrap_model(model, tp_size, dtype)
    module.eval()
    lm = HFLM(pretrained=module, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length, **hflm_kwargs)
    lm._rank, lm._world_size = 0, 1
    return lm

