"""The sensitivity table of a model: SQNR (dB) of every quantizable linear layer under every candidate, each layer
quantized alone, on the calibration activations; plus the end-to-end check (perplexity with only one layer
quantized) for the most and least sensitive layers. Cached by what it is computed from, so `qllm sensitivity`,
`profile.sensitivity` and `method=mixed` share one measurement.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ..cell import QUANT_LIBS, digest, versions
from .candidates import Candidate, parse

BATCH = 32  # same-shape layers quantized in one GPTQ call at most
BATCH_BYTES = 2 * 1024 ** 3  # and at most this much of stacked float32 weights (x3) and Hessians (x2) per call


def batch_size(out_features: int, in_features: int) -> int:
    """Layers of this shape per quantizer call: BATCH, fewer when their stacked copies would pass BATCH_BYTES."""
    per_layer = (3 * out_features * in_features + 2 * in_features * in_features) * 4
    return max(1, min(BATCH, BATCH_BYTES // per_layer))
def say(message: str) -> None:
    print(message, flush=True)


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Settings:
    candidates: tuple[Candidate, ...]
    reference: str  # the candidate whose SQNR ranks the layers (the end-to-end check and the seed comparison)
    ignore: tuple[str, ...] = ("lm_head",)
    e2e_layers: int = 3  # most and least sensitive layers checked end to end (0: no check)
    e2e_candidate: Optional[str] = None  # the candidate of that check, ranking layers by its SQNR (None: reference)
    e2e_docs: int = 4  # WikiText-2 test documents of that check
    e2e_doc_tokens: int = 512
    dampening_frac: float = 0.01
    # GPTQ's lazy-batch width: the result is the same for any width up to float rounding (measured on SmolLM2's
    # shapes: equal SQNR to 1e-12 dB, a few weights one step apart) and the library's per-column update costs
    # ~4x less at 32 than at its default 128 on this CPU
    block_size: int = 32
    actorder: Optional[str] = "static"

    @classmethod
    def of(cls, conf: dict) -> "Settings":
        cands = tuple(parse(list(conf["candidates"])))
        ref = conf.get("reference") or cands[0].label
        e2e = conf.get("e2e_candidate") or ref
        for key, label in (("reference", ref), ("e2e_candidate", e2e)):
            if label not in {c.label for c in cands}:
                from ..errors import QllmConfigError

                raise QllmConfigError(f"sensitivity.{key}={label}: not among the candidates "
                                      f"{', '.join(c.label for c in cands)}")
        return cls(candidates=cands, reference=ref, e2e_candidate=e2e, ignore=tuple(conf.get("ignore") or ("lm_head",)),
                   e2e_layers=int(conf.get("e2e_layers", 3)), e2e_docs=int(conf.get("e2e_docs", 4)),
                   e2e_doc_tokens=int(conf.get("e2e_doc_tokens", 512)),
                   dampening_frac=float(conf.get("dampening_frac", 0.01)), block_size=int(conf.get("block_size", 32)),
                   actorder=conf.get("actorder", "static"))

    def identity(self) -> dict:
        d = asdict(self)
        d["candidates"] = [c.label for c in self.candidates]
        return d


@dataclass
class Table:
    """layers x candidates SQNR, with what the allocation needs about each layer."""

    sqnr: dict[str, dict[str, float]]  # layer -> candidate label -> dB
    params: dict[str, int]
    in_features: dict[str, int]
    settings: dict
    key: str
    wall_s: dict[str, float] = field(default_factory=dict)
    e2e: dict = field(default_factory=dict)  # the end-to-end check (empty: not run)
    scale_bits: int = 16  # the model dtype's width: what each stored scale costs

    def ranking(self, label: str) -> list[str]:
        """Layers from most to least sensitive under one candidate (lowest SQNR first)."""
        return sorted(self.sqnr, key=lambda layer: self.sqnr[layer][label])

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Table":
        return cls(**d)


def block_and_projection(layer: str) -> tuple[int, str]:
    """("model.layers.12.mlp.down_proj") -> (12, "down_proj"); layers outside a block: (-1, name)."""
    parts = layer.split(".")
    for i, p in enumerate(parts[:-1]):
        if p == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1]), parts[-1]
    return -1, parts[-1]


def table_key(model: dict, calibration: dict, settings: Settings) -> str:
    """What the SQNR table is computed from: the model's identity, the calibration samples, the candidates and the
    quantizer settings, the quantization libraries' versions (not the end-to-end check's documents: a table made
    with another check is the same table)."""
    from ..cell import MODEL_IDENTITY, hashed_calibration

    ident = {k: model.get(k) for k in MODEL_IDENTITY} | ({"content": model["content"]} if model.get("content") else {})
    s = settings.identity()
    for k in ("e2e_layers", "e2e_docs", "e2e_doc_tokens", "e2e_candidate", "reference"):
        s.pop(k)
    # propagate_error is how the quantize stage's pipeline passes layers' outputs on, not what the table measures
    calib = hashed_calibration({k: v for k, v in calibration.items() if k != "propagate_error"})
    return digest({"model": ident, "calibration": calib, "settings": s,
                   "versions": versions(QUANT_LIBS)})


def measure(model: Any, samples: Any, settings: Settings, key: str,
            log: Callable[[str], None] = say) -> tuple[Table, dict[str, Any]]:
    """The SQNR table of `model` (unquantized, in memory) on the calibration `samples` (input_ids rows), and each
    layer's input second moment (what GPTQ quantizes with, for the end-to-end check)."""
    import torch

    from . import capture, sqnr

    layers = capture.quantizable_layers(model, settings.ignore)
    t0 = time.perf_counter()
    done = [0]

    def tick() -> None:
        done[0] += 1
        if done[0] % 16 == 0 or done[0] == len(samples):
            log(f"[qllm] sensitivity: captured {done[0]}/{len(samples)} calibration samples")

    moments = capture.second_moments(model, layers, samples, progress=tick)
    t_capture = time.perf_counter() - t0
    table: dict[str, dict[str, float]] = {name: {} for name in layers}
    t1 = time.perf_counter()
    signal = {n: sqnr.output_power(m.weight, moments[n]) for n, m in layers.items()}
    # denormal floats: GPTQ's error feedback at 8 bits can be tiny, and x86 arithmetic on denormals is ~100x slower
    # (measured on random 1536x576 weights at W8: 22.1 s for 8 layers, flushed 4.6 s, equal SQNR; SmolLM2's real
    # layers showed no such slowdown in llmcompressor's own GPTQ); flushed for the candidates only
    flush = torch.set_flush_denormal(True)
    try:
        _candidates(layers, moments, signal, settings, table, t1, log)
    finally:
        if flush:
            torch.set_flush_denormal(False)
    scale_bits = next(iter(layers.values())).weight.element_size() * 8
    return Table(sqnr=table, params={n: m.weight.numel() for n, m in layers.items()}, scale_bits=scale_bits,
                 in_features={n: m.in_features for n, m in layers.items()}, settings=settings.identity(), key=key,
                 wall_s={"capture": round(t_capture, 2), "candidates": round(time.perf_counter() - t1, 2)}), moments


def _candidates(layers: dict, moments: dict, signal: dict, settings: Settings, table: dict, t1: float,
                log: Callable[[str], None]) -> None:
    """Every candidate on every layer, same-shape layers in one quantizer call (`batch_size` at a time)."""
    from . import sqnr

    by_shape: dict[tuple, list[str]] = {}
    for name, layer in layers.items():
        by_shape.setdefault(tuple(layer.weight.shape), []).append(name)
    for c in settings.candidates:
        for shape, names in by_shape.items():
            step = batch_size(*shape)
            for start in range(0, len(names), step):
                chunk = names[start:start + step]
                qs = sqnr.quantize_batch([layers[n].weight for n in chunk], [moments[n] for n in chunk], c,
                                         settings.dampening_frac, settings.block_size)
                for n, q in zip(chunk, qs):
                    table[n][c.label] = round(sqnr.sqnr_db(layers[n].weight, q, moments[n], signal[n]), 4)
        log(f"[qllm] sensitivity: {c.label}: {len(layers)} layers ({time.perf_counter() - t1:.0f} s)")


def end_to_end(model: Any, table: Table, settings: Settings, documents: list[list[int]], moments: dict[str, Any],
               log: Callable[[str], None] = say) -> dict:
    """Perplexity on `documents` (token id lists) with only one layer quantized by the check's candidate, for the
    `e2e_layers` most and least sensitive layers by its SQNR; and how well their SQNR ranks the damage (Spearman)."""
    import torch

    from ..report.stats import spearman
    from . import sqnr

    if settings.e2e_layers <= 0 or not documents:
        return {}
    t0 = time.perf_counter()
    label = settings.e2e_candidate or settings.reference
    cand = next(c for c in settings.candidates if c.label == label)
    ranked = table.ranking(cand.label)
    k = min(settings.e2e_layers, len(ranked) // 2)
    chosen = ranked[:k] + ranked[-k:]
    layers = dict(model.named_modules())
    base = _perplexity(model, documents)
    rows = []
    for name in chosen:  # the layer quantized exactly as in the table (GPTQ: with the calibration moment)
        layer = layers[name]
        original = layer.weight.data.clone()
        with torch.no_grad():
            layer.weight.data = sqnr.quantize(original, moments[name], cand, settings.dampening_frac,
                                              settings.block_size).to(original.dtype)
        ppl = _perplexity(model, documents)
        layer.weight.data = original
        rows.append({"layer": name, "sqnr_db": table.sqnr[name][cand.label], "ppl": ppl,
                     "delta_ppl_pct": 100 * (ppl / base - 1), "group": "most" if name in ranked[:k] else "least"})
        log(f"[qllm] sensitivity: end to end, only {name} at {cand.label}: ppl {ppl:.4f} ({rows[-1]['delta_ppl_pct']:+.3f}%)")
    rho, p = spearman([r["sqnr_db"] for r in rows], [-r["delta_ppl_pct"] for r in rows])
    most = [r["delta_ppl_pct"] for r in rows if r["group"] == "most"]
    least = [r["delta_ppl_pct"] for r in rows if r["group"] == "least"]
    return {"candidate": cand.label, "settings": e2e_settings(settings), "baseline_ppl": base, "rows": rows, "spearman_rho": rho, "spearman_p": p,
            "mean_delta_most_pct": sum(most) / len(most), "mean_delta_least_pct": sum(least) / len(least),
            "docs": len(documents), "tokens": sum(len(d) for d in documents),
            "wall_s": round(time.perf_counter() - t0, 2)}


def e2e_settings(settings: Settings) -> dict:
    """What the end-to-end check ran with (a cached table whose check differs gets a new one)."""
    return {"candidate": settings.e2e_candidate or settings.reference, "layers": settings.e2e_layers,
            "docs": settings.e2e_docs, "doc_tokens": settings.e2e_doc_tokens}


def _perplexity(model: Any, documents: list[list[int]]) -> float:
    """Token perplexity: exp of the mean next-token negative log-likelihood over every document's tokens."""
    import torch

    nll, n = 0.0, 0
    with torch.no_grad():
        for doc in documents:
            ids = torch.tensor([doc])
            logits = model(input_ids=ids).logits[0, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            n += ids.shape[1] - 1
    return math.exp(nll / n)


def wikitext_token_docs(tokenizer: Any, data_dir: str, docs: int, doc_tokens: int) -> list[list[int]]:
    """The first `docs` WikiText-2 test documents, `doc_tokens` tokens each (the end-to-end check's text)."""
    from ..tasks.wikitext import split_wikitext_documents

    path = Path(data_dir) / "wikitext2" / "wiki.test.nonempty_lines.txt"
    if docs <= 0 or not path.is_file():
        return []
    out = []
    for text in split_wikitext_documents(path.read_text(encoding="utf-8"))[:docs]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:doc_tokens]
        if len(ids) > 1:
            out.append(ids)
    return out


def _reusable(path: Path, settings: Settings) -> Optional[Table]:
    """The cached table at `path`, unless it is missing or lacks the end-to-end check `settings` ask for (the key
    leaves that check out: a table made without it, or with another one, is measured again)."""
    if not path.is_file():
        return None
    table = Table.from_dict(json.loads(path.read_text()))
    if settings.e2e_layers > 0 and (table.e2e or {}).get("settings") != e2e_settings(settings):
        return None
    return table


def load_or_measure(model: Any, tokenizer: Any, model_conf: dict, calibration: dict, data_dir: str,
                    cache_dir: str, settings: Settings, samples: Any, force: bool = False,
                    log: Callable[[str], None] = say) -> Table:
    """The cached table (same key, and the end-to-end check these settings ask for), or one measured now and cached
    (with its end-to-end check)."""
    from ..store import cache

    key = table_key(model_conf, calibration, settings)
    entry = cache.sensitivity_dir(cache_dir, model_conf["name"], key)
    path = entry / cache.SENSITIVITY_TABLE
    cached = None if force else _reusable(path, settings)
    if cached is not None:
        log(f"[qllm] sensitivity: reusing the table {entry.name} (force=true measures again)")
        cache.touch(entry)
        return cached
    with cache.locked(entry):
        cached = None if force else _reusable(path, settings)  # made by a parallel job meanwhile
        if cached is not None:
            return cached
        table, moments = measure(model, samples, settings, key, log)
        docs = wikitext_token_docs(tokenizer, data_dir, settings.e2e_docs, settings.e2e_doc_tokens)
        table.e2e = end_to_end(model, table, settings, docs, moments, log)
        del moments
        tmp = cache.temp_dir(entry)
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / cache.SENSITIVITY_TABLE).write_text(json.dumps(table.to_dict(), indent=1))
        cache.publish(tmp, entry, replace=True)
    return table
