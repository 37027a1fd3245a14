"""The Cell (one job: model × method × bits × tasks, frozen and validated) and its keys.

Keys are a contract with users' stores: the cell key finds a finished cell in MLflow, the quant key a quantized
checkpoint in the cache, a task key one finished task. They hash everything that changes a result and nothing
else, and must not change when qllm's code is reorganised (tests/test_cell_keys.py holds keys computed before the
reorganisation of issue 10):

    quant_key = H(model identity, method, effective bits, recipe, calibration, seed, quantization library versions)
    key       = H(quant_key, tasks, evaluation settings, evaluation library versions [, speed settings]
                  [, the judge's identity: cells with a dialogue task only])
    task key  = H(quant_key, that task, evaluation settings but log_samples, evaluation library versions)
    speed key = H(quant_key, speed settings, evaluation settings, evaluation library versions)

The evaluation library versions are those of the cell's backend only (EvalBackend.libraries). The KL measurement
(`profile.kl*`) enters none of these: like the memory profile it is measured besides, so a finished cell keeps its
key; its cache entries have their own keys:

    KL reference key = H(base model identity, KL settings, torch and transformers versions)
    KL key           = H(quant_key, KL settings, evaluation library versions)
"""

from __future__ import annotations

import dataclasses
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
# Task-entry fields added after keys were first defined (issue 12: tasks lm-eval does not run), with their defaults:
# hashed only when set, so every earlier task keeps its key.
ADDED_FIELDS = {"runner": None, "settings": {}}
# Calibration fields added after keys were first defined (issue 13: oneshot's batch_size and propagate_error,
# autocast), hashed only when set, so every earlier checkpoint keeps its quant key.
CALIBRATION_ADDED = {"batch_size": 1, "autocast": None, "propagate_error": True}
# What makes a judge's verdicts differ (JudgeConfig): in the cell key of dialogue cells and in judgment keys.
JUDGE_IDENTITY = ("kind", "base_url", "model", "temperature", "max_tokens", "server", "server_version", "dtype",
                  "pairwise", "constrain_verdict")
# The KL measurement's settings (ProfileConfig), hashed only into its own cache entries' keys (see the module doc)
KL_SETTINGS = ("kl_docs", "kl_doc_tokens", "kl_top_k")
KL_REFERENCE_LIBS = ("torch", "transformers")  # what changes the baseline's forward pass, hence the reference


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


def hashed_calibration(calibration: Optional[dict]) -> Optional[dict]:
    if calibration is None:
        return None
    return {k: v for k, v in calibration.items() if not (k in CALIBRATION_ADDED and v == CALIBRATION_ADDED[k])}


def hashed_entry(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if not (k in ADDED_FIELDS and v == ADDED_FIELDS[k])}


def has_dialogue(tasks: dict) -> bool:
    return any(e.get("type") == "dialogue" for e in tasks.values())


def judge_identity(judge: Optional[dict]) -> Optional[dict]:
    """The judge settings that change verdicts (None: no judge). A remote judge's model is its served name, a local
    one's its dir's `content` fingerprint as well (qllm.planning adds it)."""
    if not judge or judge.get("kind") == "none":
        return None
    ident = {k: judge.get(k) for k in JUDGE_IDENTITY}
    if judge.get("kind") == "remote":
        ident = {k: v for k, v in ident.items() if k not in ("server", "server_version", "dtype",
                                                              "constrain_verdict")}
    if judge.get("content"):
        ident["content"] = judge["content"]
    return ident


def model_identity(model: dict) -> dict:
    """What identifies a model's weights, as hashed (MODEL_IDENTITY, plus a local dir's `content`)."""
    ident = {k: model.get(k) for k in MODEL_IDENTITY}
    if model.get("content"):
        ident["content"] = model["content"]
    return ident


def kl_settings(profile: dict) -> Optional[dict]:
    """The KL measurement's settings when it runs (profile.kl, true by default), else None. Never in the cell, quant
    or task keys."""
    return {k: profile[k] for k in KL_SETTINGS} if profile.get("kl") else None


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
           speed: Optional[dict], judge: Optional[dict] = None) -> "Keys":
        model_id = model_identity(model)
        quant_versions = versions(QUANT_LIBS) if bits else {}
        quant = digest({"model": model_id, "method": method, "bits": bits,
                        "recipe": hashed_recipe(recipe) if bits else {}, "calibration": hashed_calibration(calibration),
                        "seed": seed if bits else None, "versions": quant_versions})
        hashed_tasks = as_hashed({k: hashed_entry(e) for k, e in tasks.items()})
        judged = judge_identity(judge) if has_dialogue(tasks) else None
        cell = digest({"quant_key": quant, "tasks": hashed_tasks, "eval": eval_settings, "versions": eval_versions}
                      | ({"speed": speed} if speed else {}) | ({"judge": judged} if judged else {}))
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
    judge: Optional[dict] = None  # the judge of its dialogue tasks (None: it has none)
    sensitivity: Optional[dict] = None  # the `sensitivity:` settings (profile.sensitivity; in no key)

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

    @property
    def dialogue_tasks(self) -> list[str]:
        """Its tasks answered by the model and graded by a judge (MT-Bench)."""
        return [k for k, e in self.tasks.items() if e.get("type") == "dialogue"]

    def baseline(self) -> "Cell":
        """The same model's `method=none` cell for its dialogue tasks: whose answers a quantized cell's are compared
        with (its task keys are those of a `method=none` run of the same tasks and evaluation settings)."""
        from .stages.backends import key_settings

        tasks = {k: self.tasks[k] for k in self.dialogue_tasks}
        keys = Keys.of(model=self.model, method="none", bits=None, recipe={}, calibration=None, seed=self.seed,
                       tasks=tasks, eval_settings=key_settings(self.eval), eval_versions=self.eval_versions,
                       speed=None, judge=self.judge)
        return dataclasses.replace(self, method="none", bits=None, scheme=self.model["dtype"], group_size=None,
                                   recipe={}, calibration=None, tasks=tasks, quant_versions=keys.quant_versions,
                                   quant_key=keys.quant, key=keys.cell, task_keys=keys.tasks,
                                   profile={**self.profile, "speed": False}, speed_key=None)

    @property
    def kl_reference_key(self) -> Optional[str]:
        """The key of the base model's KL reference (qllm.measure.kl) in the cache; None when KL is off. Versions as
        this process imports them: the stage that makes or reads the reference asks."""
        settings = kl_settings(self.profile)
        return digest({"model": model_identity(self.model), "kl": settings, "versions": versions(KL_REFERENCE_LIBS)}) \
            if settings else None

    @property
    def kl_key(self) -> Optional[str]:
        """The key of this cell's KL result in the cache; None when KL is off."""
        settings = kl_settings(self.profile)
        return digest({"quant_key": self.quant_key, "kl": settings, "versions": self.eval_versions}) \
            if settings else None

    def to_json(self) -> str:
        # not sort_keys: a recipe's modifiers are applied in their order (the stage reads the recipe from here)
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "Cell":
        return cls(**json.loads(text))
