"""KL against the baseline as the evaluate stage measures it (the measure itself: qllm.measure.kl).

- A baseline cell (method=none) makes its model's reference from the LM its tasks ran on, when the cache lacks it
  (`cache_dir/kl_reference/<kl_reference_key>/`). It logs nothing: its KL against itself is 0 by construction.
- A quantized cell whose reference is missing makes it first from the dense base model, loaded with transformers in
  the model's dtype and freed again before the quantized checkpoint is loaded (one model in memory at a time). After
  its tasks it measures the divergence of the LM the tasks ran on; the evaluate stage caches that result under the
  cell's KL key (`cache_dir/kl/<cell>-<kl_key>/`), as it does the speed benchmark.

Only on the hf backend and in a single process: data parallel ranks would each measure the same thing, and under
AutoTP a rank holds a shard only. KL is measured besides the tasks: nothing here may fail a cell (each step catches,
says why in one line and gives nothing back, so nothing is logged for KL).
"""

from __future__ import annotations

import gc
import json
import shutil
import time
from typing import Any, Callable, Optional

from ..cell import KL_REFERENCE_LIBS, Cell, kl_settings, model_identity, versions
from ..measure import kl
from ..store import cache
from . import process
from .backends import EvalBackend


def say(text: str) -> None:
    print(f"[qllm] evaluate: kl: {text}", flush=True)


def failed(step: str, e: BaseException) -> None:
    say(f"{step} failed ({type(e).__name__}: {e}); no KL is logged for this cell, which goes on")


def wanted(cell: Cell, backend: str) -> bool:
    """Whether this stage measures KL: profile.kl on, the hf backend, a single process (says why not otherwise)."""
    if not kl_settings(cell.profile):
        return False
    why = ("KL is measured on the HF backend only" if backend != "hf" else
           f"{process.world_size()} ranks: KL is measured by a single-process evaluate stage only"
           if process.world_size() > 1 else None)
    if why and process.is_main():
        say(f"skipped ({why})")
    return why is None


def has_reference(cell: Cell) -> bool:
    entry = cache.kl_reference_dir(cell)
    return (entry / cache.KL_REFERENCE).is_file() and (entry / cache.KL_REFERENCE_INFO).is_file()


def _load(cell: Cell) -> Optional[dict]:
    """The stored reference, or None (absent or unreadable: made again)."""
    import torch

    entry = cache.kl_reference_dir(cell)
    if not has_reference(cell):
        return None
    try:
        ref = torch.load(entry / cache.KL_REFERENCE, weights_only=True)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: make it again
        say(f"the stored reference {entry.name} is unreadable ({type(e).__name__}); making it again")
        return None
    cache.touch(entry)
    return ref


def _reference(cell: Cell, make: Callable[[], tuple[dict, str]], remake: bool) -> tuple[dict, bool]:
    """(the reference, whether it was made now). Made under the entry's lock, so parallel cells of one model make it
    once; written into a temp dir and renamed into place."""
    import torch

    entry = cache.kl_reference_dir(cell)
    ref = None if remake else _load(cell)
    if ref is not None:
        return ref, False
    with cache.locked(entry):
        ref = None if remake else _load(cell)  # made by another job while this one waited
        if ref is not None:
            return ref, False
        t = time.perf_counter()
        ref, device = make()
        settings = kl_settings(cell.profile)
        # model/method/bits as the cache's other entries have them (`qllm cache rm --model`)
        info = {"key": cell.kl_reference_key, "model": cell.model["name"], "method": "none", "bits": None,
                "identity": model_identity(cell.model), "settings": settings,
                "file": kl.WIKITEXT_TEST, "versions": versions(KL_REFERENCE_LIBS),
                "n_tokens": int(ref["argmax"].numel()), "n_docs": len(ref["doc_lengths"]), "top_k": ref["top_k"],
                "vocab": ref["vocab"], "device": device,
                "tail_mass_mean": float(ref["tail_logp"].double().exp().mean()), "made_by": cell.name,
                "wall_s": round(time.perf_counter() - t, 2), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        tmp = cache.temp_dir(entry)
        try:
            torch.save(ref, tmp / cache.KL_REFERENCE)
            (tmp / cache.KL_REFERENCE_INFO).write_text(json.dumps(info, indent=2))
            cache.publish(tmp, entry, replace=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    say(f"stored the reference of {cell.model['name']} ({info['n_tokens']} tokens, top {info['top_k']}, "
        f"mean tail mass {info['tail_mass_mean']:.3f}) in {entry}")
    return ref, True


def _tokens(cell: Cell, tokenizer: Any) -> list[list[int]]:
    p = cell.profile
    return kl.token_set(cell.data_dir, tokenizer, p["kl_docs"], p["kl_doc_tokens"])


def reference_for_baseline(cell: Cell, backend: EvalBackend, lm: Any, remake: bool) -> None:
    """Baseline cell: its model's reference from the LM its tasks ran on, unless stored (`remake`: force=true)."""
    try:
        def make() -> tuple[dict, str]:
            say(f"the reference of {cell.model['name']} ({cell.profile['kl_docs']} WikiText-2 documents x "
                f"{cell.profile['kl_doc_tokens']} tokens, top {cell.profile['kl_top_k']}) ...")
            return (kl.reference(lm.model, _tokens(cell, backend.tokenizer(lm)), cell.profile["kl_top_k"]),
                    str(lm.model.device))

        _reference(cell, make, remake)
    except Exception as e:  # noqa: BLE001 - KL never fails a cell
        failed("the reference", e)


def reference_for_quantized(cell: Cell, device: str) -> Optional[dict]:
    """Quantized cell, before its checkpoint is loaded: the reference, made from the dense base model when it is not
    stored; None when it cannot be had (said)."""
    try:
        return _reference(cell, lambda: _from_base_model(cell, device), remake=False)[0]
    except Exception as e:  # noqa: BLE001 - KL never fails a cell
        failed("the reference", e)
        return None


def _from_base_model(cell: Cell, device: str) -> tuple[dict, str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..sources.models import prepare

    m = cell.model
    path = prepare(m, cell.data_dir, cell.cache_dir)
    say(f"no reference of {m['name']} stored: loading the base model ({m['dtype']}, {device}) to make it ...")
    kwargs = {"revision": m["revision"] if m["source"] == "hub" else "main",
              "trust_remote_code": bool(m.get("trust_remote_code"))}
    dtype = getattr(torch, m["dtype"]) if m["dtype"] != "auto" else "auto"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs).to(device).eval()
    try:
        tokens = _tokens(cell, AutoTokenizer.from_pretrained(path, **kwargs))
        return kl.reference(model, tokens, cell.profile["kl_top_k"]), device
    finally:  # before the quantized checkpoint is loaded
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def measure(cell: Cell, backend: EvalBackend, lm: Any, ref: dict) -> dict:
    """The quantized LM's KL against the reference: the figures, the settings, and what the approximation means."""
    t = time.perf_counter()
    say(f"KL(baseline || quantized) on {len(ref['doc_lengths'])} documents, {int(ref['argmax'].numel())} tokens ...")
    result = kl.divergence(ref, lm.model, _tokens(cell, backend.tokenizer(lm)))
    say(f"mean {result['mean']:.4g} nats, p99 {result['p99']:.4g}, top-1 agreement {result['top1_agreement']:.3f} "
        f"({result['n_tokens']} tokens)")
    return {**result, "unit": "nats", "settings": kl_settings(cell.profile), "file": kl.WIKITEXT_TEST,
            "top_k": ref["top_k"], "vocab": ref["vocab"], "approximation": kl.BOUND, "key": cell.kl_key,
            "reference": {"key": cell.kl_reference_key, "path": str(cache.kl_reference_dir(cell))},
            "device": str(lm.model.device), "wall_s": round(time.perf_counter() - t, 2)}
