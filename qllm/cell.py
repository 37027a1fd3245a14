"""The Cell (one job: model × method × bits × tasks, frozen and validated) and its keys.

Keys are a contract with users' stores: the cell key finds a finished cell in MLflow, the quant key a quantized
checkpoint in the cache, a task key one finished task. They hash everything that changes a result and nothing
else, and must not change when qllm's code is reorganised (tests/test_cell_keys.py holds keys computed before the
reorganisation of issue 10):

    quant_key = H(model identity, method, effective bits, recipe, calibration, seed, quantization library versions)
    key       = H(quant_key, tasks, evaluation settings, evaluation library versions [, speed settings])
    task key  = H(quant_key, that task, evaluation settings but log_samples, evaluation library versions)
    speed key = H(quant_key, speed settings, evaluation settings, evaluation library versions)

The evaluation library versions are those of the cell's backend only (EvalBackend.libraries).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from dataclasses import asdict, dataclass
from typing import Any, Optional

from .names import backend_label

# Libraries whose version changes a quantized artifact.
QUANT_LIBS = ("torch", "transformers", "llmcompressor", "compressed-tensors")
# What identifies a model's weights (a model given by a local dir adds `content`, its files' fingerprint).
MODEL_IDENTITY = ("name", "source", "path", "revision", "file", "sha256", "dtype", "arch")
# `py:` references in task configs are hashed under the module paths they had when cell keys were first defined:
# modules moved since (issue 10: qllm.twins -> qllm.tasks.twins, the WikiText functions of qllm.tasks ->
# qllm.tasks.wikitext) keep every key. (current prefix, prefix as hashed)
HASHED_AS = (("py:qllm.tasks.twins.", "py:qllm.twins."), ("py:qllm.tasks.wikitext.", "py:qllm.tasks."))


def versions(names: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for n in names:
        try:
            out[n] = importlib.metadata.version(n)
        except importlib.metadata.PackageNotFoundError:
            out[n] = "absent"
    return out


def hashed_recipe(recipe: dict) -> dict:
    """The recipe as it enters the quant key. Keys are hashed sorted, so a recipe whose modifiers do not run in
    sorted order also hashes that order. Before issue 11, cell.json sorted the recipe too and the stage
    applied the modifiers alphabetically: SmoothQuant + GPTQ ran GPTQ first and smoothed the quantized weights
    afterwards (a broken checkpoint); such recipes get new keys, so those checkpoints are never reused. Recipes whose
    order is alphabetical anyway (AWQ then QuantizationModifier, single modifiers) keep their keys."""
    out = dict(recipe)
    for name, stage in recipe.items():
        order = list((stage.get("quant_modifiers") or {}) if isinstance(stage, dict) else [])
        if order != sorted(order):
            out[name] = {**stage, "modifier_order": order}
    return out


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def as_hashed(obj: Any) -> Any:
    """`obj` with every `py:` reference under the name it is hashed as (HASHED_AS)."""
    if isinstance(obj, str):
        for current, hashed in HASHED_AS:
            if obj.startswith(current):
                return hashed + obj[len(current):]
        return obj
    if isinstance(obj, dict):
        return {k: as_hashed(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [as_hashed(v) for v in obj]
    return obj


def speed_settings(profile: dict) -> Optional[dict]:
    """The speed benchmark's settings when it runs (they enter the keys), else None."""
    return {k: v for k, v in profile.items() if k.startswith("speed_")} if profile["speed"] else None


@dataclass(frozen=True)
class Keys:
    quant: str
    cell: str
    tasks: dict
    speed: Optional[str]
    quant_versions: dict
    eval_versions: dict

    @classmethod
    def of(cls, *, model: dict, method: str, bits: Optional[int], recipe: dict, calibration: Optional[dict],
           seed: int, tasks: dict, eval_settings: dict, eval_versions: dict[str, str],
           speed: Optional[dict]) -> "Keys":
        model_id = {k: model.get(k) for k in MODEL_IDENTITY}
        if model.get("content"):
            model_id["content"] = model["content"]
        quant_versions = versions(QUANT_LIBS) if bits else {}
        quant = digest({"model": model_id, "method": method, "bits": bits,
                        "recipe": hashed_recipe(recipe) if bits else {}, "calibration": calibration,
                        "seed": seed if bits else None, "versions": quant_versions})
        hashed_tasks = as_hashed(tasks)
        cell = digest({"quant_key": quant, "tasks": hashed_tasks, "eval": eval_settings, "versions": eval_versions}
                      | ({"speed": speed} if speed else {}))
        results = {k: v for k, v in eval_settings.items() if k != "log_samples"}  # what to keep, not what is computed
        task_keys = {t: digest({"quant_key": quant, "task": e, "eval": results, "versions": eval_versions})
                     for t, e in hashed_tasks.items()}
        speed_key = digest({"quant_key": quant, "speed": speed, "eval": eval_settings, "versions": eval_versions}) \
            if speed else None
        return cls(quant, cell, task_keys, speed_key, quant_versions, eval_versions)


@dataclass(frozen=True)
class Cell:
    model: dict
    method: str
    bits: Optional[int]  # effective bits; None for the baseline (method=none ignores `bits`)
    scheme: str
    group_size: Optional[int]
    recipe: dict  # llmcompressor recipe (empty for the baseline)
    calibration: Optional[dict]  # None when the method needs no calibration data
    tasks: dict  # task key -> entry (limits resolved)
    eval: dict  # the backend's settings (eval.backend names it)
    seed: int
    data_dir: str
    cache_dir: str
    quant_versions: dict
    eval_versions: dict
    quant_key: str
    key: str  # the cell key: evaluation settings + quant_key
    # per task: quant_key + that task's entry + evaluation settings (a finished task is reused by any cell with the
    # same task key, e.g. across suites, or when an interrupted cell resumes)
    task_keys: dict
    profile: dict  # what to measure besides accuracy (memory, sizes, speed)
    speed_key: Optional[str]  # the speed benchmark's cache key (None: speed not measured)

    @property
    def name(self) -> str:
        bits = f"w{self.bits}" if self.bits else self.model["dtype"]
        return f"{self.model['name']} · {self.method} · {bits}{self.backend_label}"

    @property
    def backend_label(self) -> str:
        return backend_label(self.eval.get("backend", "hf"), bool(self.eval.get("cpu_int4_w4a8")))

    @property
    def bits_label(self) -> str:
        """"w4", or the baseline's dtype: how cache entries and runs name the cell's weights."""
        return f"w{self.bits}" if self.bits else self.model["dtype"]

    @property
    def quantized(self) -> bool:
        return self.method != "none"

    def to_json(self) -> str:
        # not sort_keys: a recipe's modifiers are applied in their order (the stage reads the recipe from here)
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "Cell":
        return cls(**json.loads(text))
