"""KL divergence of a model's next-token distributions from a reference model's, on a fixed WikiText-2 token set.

Per position t, P = the baseline's next-token distribution, Q = the quantized model's (float32 log_softmax of the
logits, one document per forward pass). What is reported, over every position of every document:

    kl/mean             mean over positions of KL(P || Q), in nats
    kl/p99              its 99th percentile (numpy's linear interpolation)
    kl/top1_agreement   share of positions where argmax Q == argmax P

The reference is stored once (qllm.stages.kl_measure), so P is kept as its top-k only: the k most likely token ids,
their log-probabilities and the log of the remaining mass p_tail = 1 - sum_{i in top-k(P)} p_i (its log computed as
the logsumexp of the other log-probabilities: no cancellation when the top-k holds almost all the mass). Then

    KL_approx = sum_{i in top-k(P)} p_i (log p_i - log q_i) + p_tail (log p_tail - log q_tail),
    q_tail = 1 - sum_{i in top-k(P)} q_i (clamped to the smallest positive float32),

the exact KL between P and Q lumped into k + 1 bins (P's top-k and the rest). By the log-sum inequality lumping never
increases KL, so the approximation is a lower bound and its error is the tail's own KL contribution:

    0 <= KL_exact - KL_approx = p_tail * KL(P_tail || Q_tail) <= p_tail * max_{i in tail} log(P_tail(i) / Q_tail(i)),

with P_tail, Q_tail the two distributions renormalised over the tokens outside top-k(P). It is small where P's tail
holds little mass; `tail_mass_mean` (the mean p_tail) is reported with the result so that this can be judged.
Measured against `exact_kl` (full vocabulary) with top 64: 8.6% low on a tiny model whose tail holds 7.6% of the mass
(tests/measure/test_kl.py; 7.7-8.7% from 8 to 2 bits); on SmolLM2-135M at the default 4 x 512 tokens (tail 13.9%)
17.4% low at RTN-W4 and 20.2% at W8; on 128 tokens (tail 17.7%) 21.6% low at W4, 11.7% with top 256, 4.7% with
1024. So read the values as lower bounds and compare cells of one model; `profile.kl_top_k` trades a larger
reference (8 bytes per token and k) for a tighter bound.

torch is imported inside the functions that need a loaded model.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

# the WikiText-2 raw test file (as conf/task/wikitext_offline.yaml reads it), under data_dir
WIKITEXT_TEST = "wikitext2/wiki.test.nonempty_lines.txt"
LOG_FLOOR = math.log(np.finfo(np.float32).tiny)  # log of the smallest positive float32: the clamp of both tails
BOUND = ("top-k approximation: KL_approx = sum over P's top-k of p (log p - log q) + p_tail (log p_tail - log q_tail) "
         "is the KL of P and Q lumped into k+1 bins; by the log-sum inequality 0 <= KL_exact - KL_approx = "
         "p_tail * KL(P_tail || Q_tail) (P, Q renormalised over the tokens outside P's top-k): a lower bound whose "
         "error is the tail's own KL contribution, small when tail_mass_mean is small")


def token_set(data_dir: str, tokenizer: Any, docs: int, doc_tokens: int) -> list[list[int]]:
    """The first `docs` documents of the WikiText-2 raw test file, each tokenised with the model's tokenizer with its
    default special tokens (a BOS for tokenizers that add one, none for SmolLM2's), truncated to `doc_tokens`."""
    from ..tasks.wikitext import split_wikitext_documents

    text = (Path(data_dir) / WIKITEXT_TEST).read_text(encoding="utf-8")
    out = []
    for doc in split_wikitext_documents(text)[:docs]:
        ids = tokenizer(doc, truncation=True, max_length=doc_tokens)["input_ids"]
        if ids:
            out.append(list(ids))
    if not out:
        raise ValueError(f"no tokens in the first {docs} documents of {WIKITEXT_TEST}")
    return out


def _device(model: Any) -> Any:
    return next(model.parameters()).device


def _log_probs(model: Any, ids: Sequence[int]) -> Any:
    """[len(ids), vocab] float32 log-probabilities of every position's next token (one document, no KV cache)."""
    import torch

    x = torch.tensor([list(ids)], dtype=torch.long, device=_device(model))
    return torch.log_softmax(model(input_ids=x, use_cache=False).logits[0].float(), dim=-1)


def _tail(logp: Any, top_ids: Any) -> Any:
    """log of the mass outside `top_ids`, per position (-inf when there is none: the caller clamps)."""
    return logp.scatter(-1, top_ids, float("-inf")).logsumexp(-1)


def reference(model: Any, token_ids_batches: Sequence[Sequence[int]], top_k: int) -> dict:
    """The reference distributions P: per position the top-k ids (int32, most likely first) and log-probs (float32),
    the log tail mass, the argmax (int32; taken as argmax of all logits, as for Q, so ties resolve alike), and the
    token ids and document lengths they were computed on. All tensors are on the CPU."""
    import torch

    parts: dict[str, list] = {"top_ids": [], "top_logp": [], "tail_logp": [], "argmax": []}
    with torch.inference_mode():
        for ids in token_ids_batches:
            logp = _log_probs(model, ids)
            top_logp, top_ids = logp.topk(min(top_k, logp.shape[-1]), dim=-1)
            parts["top_ids"].append(top_ids.to(torch.int32).cpu())
            parts["top_logp"].append(top_logp.cpu())
            parts["tail_logp"].append(_tail(logp, top_ids).cpu())
            parts["argmax"].append(logp.argmax(-1).to(torch.int32).cpu())
    out: dict = {k: torch.cat(v) for k, v in parts.items()}
    out["token_ids"] = torch.tensor([t for ids in token_ids_batches for t in ids], dtype=torch.int32)
    out["doc_lengths"] = [len(ids) for ids in token_ids_batches]
    out["top_k"], out["vocab"] = int(out["top_ids"].shape[1]), int(logp.shape[-1])
    return out


def _check_tokens(ref: dict, token_ids_batches: Sequence[Sequence[int]]) -> None:
    flat = [t for ids in token_ids_batches for t in ids]
    if [len(ids) for ids in token_ids_batches] != list(ref["doc_lengths"]) or flat != ref["token_ids"].tolist():
        raise ValueError("the token ids differ from those the reference was computed on (another tokenizer or "
                         "another WikiText file): the KL would compare different texts")


def summary(kl: np.ndarray, agree: np.ndarray | None = None) -> dict:
    out = {"mean": float(kl.mean()), "p99": float(np.percentile(kl, 99)), "n_tokens": int(kl.size)}
    if agree is not None:
        out["top1_agreement"] = float(agree.mean())
    return out


def divergence(ref: dict, model: Any, token_ids_batches: Sequence[Sequence[int]], per_token: bool = False) -> dict:
    """KL_approx(P || Q) of `model` (Q) against the reference P, and top-1 agreement, over every position: mean, p99,
    top1_agreement, n_tokens and tail_mass_mean (with `per_token`, also the per-position KL as a numpy array)."""
    import torch

    _check_tokens(ref, token_ids_batches)
    kls, agree, start = [], [], 0
    with torch.inference_mode():
        for ids in token_ids_batches:
            end = start + len(ids)
            logq = _log_probs(model, ids)
            top_ids = ref["top_ids"][start:end].to(logq.device, torch.long)
            lp = ref["top_logp"][start:end].to(logq.device, torch.float32)
            lp_tail = ref["tail_logp"][start:end].to(logq.device, torch.float32).clamp_min(LOG_FLOOR)
            lq_tail = _tail(logq, top_ids).clamp_min(LOG_FLOOR)
            kl = (lp.exp() * (lp - logq.gather(-1, top_ids))).sum(-1) + lp_tail.exp() * (lp_tail - lq_tail)
            kls.append(kl.double().cpu().numpy())
            agree.append((logq.argmax(-1).cpu() == ref["argmax"][start:end].long()).numpy())
            start = end
    kl_all = np.concatenate(kls)
    out = summary(kl_all, np.concatenate(agree))
    out["tail_mass_mean"] = float(ref["tail_logp"].double().exp().mean())
    if per_token:
        out["per_token"] = kl_all
    return out


def exact_kl(p_model: Any, q_model: Any, token_ids_batches: Sequence[Sequence[int]], per_token: bool = False) -> dict:
    """KL(P || Q) over the full vocabulary (both models run): what `divergence` approximates; for tests."""
    import torch

    kls = []
    with torch.inference_mode():
        for ids in token_ids_batches:
            lp, lq = _log_probs(p_model, ids), _log_probs(q_model, ids)
            kls.append((lp.exp() * (lp - lq)).sum(-1).double().cpu().numpy())
    kl_all = np.concatenate(kls)
    out = summary(kl_all)
    if per_token:
        out["per_token"] = kl_all
    return out
