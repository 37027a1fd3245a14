"""Typed records that cross a process boundary or live on disk: the checkpoint manifest, the stage results, one
task's result.

Each is a dataclass with `to_dict()` (the JSON written: the same keys as before these types existed, so caches and
stores written earlier stay readable) and `from_dict()` (tolerant: a key the file lacks takes its default, a key the
type does not know is kept in `extra` and written back). Fields marked `transient` are set by the reader (the
orchestrator's own timing, where it put the files) and never written. Pure: no torch, no MLflow.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, TypeVar

T = TypeVar("T", bound="Record")


def transient(default: Any) -> Any:
    """A field the reader fills in; not part of the written record."""
    return field(default=default, metadata={"transient": True})


@dataclass
class Record:
    """Base: dict round trip by field name; unknown keys survive in `extra`."""

    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False, kw_only=True)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "extra" or f.metadata.get("transient"):
                continue
            value = getattr(self, f.name)
            out[f.name] = _plain(value)
        return {**self.extra, **out}

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: _typed(hints[k], v) for k, v in data.items() if k in names}
        return cls(**kwargs, extra={k: v for k, v in data.items() if k not in names})


def _plain(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _typed(hint: Any, value: Any) -> Any:
    """A nested record (or a dict of records) from its dict; anything else as it is."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:  # Optional[X]
        inner = [a for a in args if a is not type(None)]
        return None if value is None else _typed(inner[0], value)
    if isinstance(hint, type) and issubclass(hint, Record) and isinstance(value, dict):
        return hint.from_dict(value)
    if origin is dict and len(args) == 2 and isinstance(args[1], type) and issubclass(args[1], Record):
        return {k: args[1].from_dict(v) for k, v in value.items()}
    return value


# ---- quantize stage ----


@dataclass
class Manifest(Record):
    """`qllm_manifest.json` beside a quantized checkpoint: what it is, how it was made, what it cost, its files."""

    cell_quant_key: str = ""
    model: dict = field(default_factory=dict)
    method: str = ""
    bits: Optional[int] = None
    scheme: str = ""
    recipe: dict = field(default_factory=dict)
    calibration: Optional[dict] = None
    calibration_tokens: int = 0
    calibration_samples: int = 0
    versions: dict = field(default_factory=dict)
    python: str = ""
    device: str = ""
    workarounds: list = field(default_factory=list)
    ranks: int = 1  # processes that made it (launch.quantize=torchrun: llmcompressor's distributed calibration)
    wall_s: dict = field(default_factory=dict)  # load, quantize, total
    profile: dict = field(default_factory=dict)  # memory peaks per phase of making it
    checkpoint_bytes: int = 0
    files: dict = field(default_factory=dict)  # relative path -> {bytes, sha256}
    created: str = ""
    applied_recipe: Optional[dict] = None  # method=mixed: the recipe oneshot ran (the per-layer config groups)
    allocation: Optional[dict] = None  # method=mixed: each layer's candidate, the budget and the bits spent
    sensitivity: Optional[dict] = None  # the sensitivity table used or logged: its cache entry and timings


@dataclass
class QuantizeResult(Record):
    """What the quantize stage hands back (`quantize.json` in the stage dir)."""

    checkpoint: str = ""
    manifest: Manifest = field(default_factory=Manifest)
    reused: bool = False  # taken from the cache (integrity verified), not made by this run
    wall_s: float = transient(0.0)  # the stage process, as the orchestrator timed it


# ---- evaluate stage ----


@dataclass
class TaskResult(Record):
    """One task (or group) of a cell, as evaluated or taken from the cache."""

    lm_eval_task: str = ""
    metrics: dict = field(default_factory=dict)  # lm-eval's keys ("acc,none", "acc_stderr,none", ...)
    subtasks: dict = field(default_factory=dict)
    n_samples: dict = field(default_factory=dict)  # {effective, original}
    num_fewshot: int = 0
    primary: dict = field(default_factory=dict)  # {metric, value}
    score: Optional[float] = None  # 0-100, None for perplexities
    by_difficulty: dict = field(default_factory=dict)
    wall_s: float = 0.0
    reused: bool = False

    @property
    def value(self) -> Any:
        return self.primary.get("value")


@dataclass
class MeasuredOn(Record):
    """Which weights a result was measured on: the evaluated model's fingerprint, its bytes in memory, its dir."""

    fingerprint: Optional[dict] = None
    weights_in_memory: Optional[dict] = None
    model_path: Optional[str] = None


@dataclass
class EvalResult(MeasuredOn):
    """What the evaluate stage hands back (`eval/results.json`)."""

    tasks: dict[str, TaskResult] = field(default_factory=dict)
    suite: dict = field(default_factory=dict)  # score_macro, n_tasks_scored
    reused_tasks: list = field(default_factory=list)
    evaluated_tasks: list = field(default_factory=list)
    speed: Optional[dict] = None
    speed_reused: bool = False
    kl: Optional[dict] = None  # KL against the baseline (qllm.measure.kl): quantized cells on the hf backend only
    kl_reused: bool = False
    device: Optional[str] = None
    backend: str = ""
    speed_note: str = ""
    wall_s: dict = field(default_factory=dict)
    out_dir: str = transient("")  # where the stage wrote it (per-sample files beside it)
    stage_wall_s: float = transient(0.0)  # the stage process, as the orchestrator timed it


@dataclass
class CachedEval(MeasuredOn):
    """One finished task (`summary`), speed benchmark (`speed`) or KL measurement (`kl`) in the cache (`result.json`
    of its entry), with what identifies the weights it was measured on."""

    summary: Optional[TaskResult] = None
    speed: Optional[dict] = None
    kl: Optional[dict] = None
    task: str = ""
    key: str = ""
    cell: str = ""
    model: str = ""
    method: str = ""
    bits: Optional[int] = None
    quant_key: str = ""
    finished: str = ""
