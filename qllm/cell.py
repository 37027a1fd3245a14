"""Cell planning: the pure step from a composed config to one validated, hashed job description.

Everything that can be wrong with a cell (bits the method does not support, a group size that does not divide a
layer, a missing data file, an unreachable model) is found here, before any weights are loaded.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf

from . import models, tasks
from .errors import QllmConfigError
from .methods import Recipe

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

# Libraries whose version changes a quantized artifact / an evaluation result.
QUANT_LIBS = ("torch", "transformers", "llmcompressor", "compressed-tensors")
EVAL_LIBS = ("torch", "transformers", "lm_eval", "compressed-tensors")


def _versions(names: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for n in names:
        try:
            out[n] = importlib.metadata.version(n)
        except importlib.metadata.PackageNotFoundError:
            out[n] = "absent"
    return out


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
    eval: dict
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
        return f"{self.model['name']} · {self.method} · {bits}"

    @property
    def quantized(self) -> bool:
        return self.method != "none"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Cell":
        return cls(**json.loads(text))


def _build_recipe(method: dict, bits: Optional[int], model: dict) -> Recipe:
    fn = get_method(method["recipe"])
    settings = dict(method.get("settings") or {})
    params = inspect.signature(fn).parameters
    valid = [p for p in params if p not in ("bits", "ignore")]
    unknown = sorted(set(settings) - set(valid))
    if unknown:
        raise QllmConfigError(
            f"method '{method['name']}': unknown setting(s) {', '.join(unknown)}; valid: {', '.join(valid) or 'none'}"
        )
    if "group_size" in params and settings.get("group_size") is None:
        settings["group_size"] = model.get("group_size")
    return fn(bits=bits, ignore=list(model.get("ignore") or []), **settings)


def _check_group_size(recipe: Recipe, model: dict, config: dict) -> None:
    g = recipe.group_size
    if not g:
        return
    if g <= 0:
        raise QllmConfigError(f"group_size must be a positive integer or null (per-channel); got {g}")
    widths_by_layer = models.linear_in_features(config)
    bad = {name: width for name, width in widths_by_layer.items() if width % g}
    if bad:
        widths = ", ".join(f"{n} = {w}" for n, w in bad.items())
        divisors = [d for d in (32, 64, 128, 256) if all(w % d == 0 for w in widths_by_layer.values())]
        raise QllmConfigError(
            f"group_size {g} does not divide the input width of model '{model['name']}' layers: {widths}. "
            f"Valid group sizes for this model: {', '.join(map(str, divisors)) or 'none of 32/64/128/256'} "
            "or null (per-channel)."
        )


def plan_cell(cfg: DictConfig) -> Cell:
    """Validate the composed config and describe one cell. Pure apart from reading files' existence."""
    c = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(c, dict)
    model, method, data_dir, cache_dir = c["model"], c["method"], c["data_dir"], c["cache_dir"]

    allowed = method.get("bits_allowed") or []
    bits: Optional[int] = c["bits"] if allowed else None
    if allowed and bits not in allowed:
        raise QllmConfigError(
            f"method '{method['name']}' does not support bits={c['bits']}; valid bits: {', '.join(map(str, allowed))}"
        )

    recipe = _build_recipe(method, bits, model)
    models.check_available(model, data_dir)
    if recipe.group_size:
        _check_group_size(recipe, model, models.hf_config(model, data_dir, cache_dir))

    calibration = c["calibration"] if method.get("calibrate") else None
    if calibration and calibration["source"] == "local_text":
        tasks.check_data_files(f"calibration '{calibration['name']}'", [calibration["path"]], data_dir)

    task_entries = _plan_tasks(c["task"], data_dir, calibration)

    model_id = {k: model.get(k) for k in ("name", "source", "path", "revision", "file", "sha256", "dtype", "arch")}
    quant_versions = _versions(QUANT_LIBS) if bits else {}
    quant_key = _digest(
        {"model": model_id, "method": method["name"], "bits": bits, "recipe": recipe.as_llmcompressor()
         if bits else {}, "calibration": calibration, "seed": c["seed"] if bits else None, "versions": quant_versions}
    )
    ev = c["eval"]
    eval_versions = _versions(EVAL_LIBS)
    profile = c["profile"]
    speed = {k: v for k, v in profile.items() if k.startswith("speed_")} if profile["speed"] else None
    speed_key = _digest({"quant_key": quant_key, "speed": speed, "eval": ev, "versions": eval_versions}) if speed else None
    key = _digest({"quant_key": quant_key, "tasks": task_entries, "eval": ev, "versions": eval_versions}
                  | ({"speed": speed} if speed else {}))
    ev_results = {k: v for k, v in ev.items() if k != "log_samples"}  # what to keep, not what is computed
    task_keys = {t: _digest({"quant_key": quant_key, "task": e, "eval": ev_results, "versions": eval_versions})
                 for t, e in task_entries.items()}
    return Cell(
        model=model, method=method["name"], bits=bits, scheme=recipe.scheme if bits else model["dtype"],
        group_size=recipe.group_size, recipe=recipe.as_llmcompressor() if bits else {}, calibration=calibration,
        tasks=task_entries, eval=ev, seed=c["seed"], data_dir=data_dir, cache_dir=cache_dir,
        quant_versions=quant_versions, eval_versions=eval_versions, quant_key=quant_key, key=key,
        task_keys=task_keys, profile=profile, speed_key=speed_key,
    )


def _plan_tasks(task_cfg: dict, data_dir: str, calibration: Optional[dict]) -> dict:
    if not task_cfg.get("tasks"):
        raise QllmConfigError(f"task '{task_cfg.get('name')}' lists no tasks")
    entries = {}
    for key, entry in task_cfg["tasks"].items():
        entry = dict(entry)
        for k in ("limit", "max_gen_toks"):  # suite-wide caps
            if task_cfg.get(k) is not None:
                entry[k] = task_cfg[k]
        tasks.check_entry(key, entry, data_dir)
        if calibration and entry["type"] == "perplexity" and calibration.get("source") == "local_text":
            # calibration documents come from the end of the same file: evaluation must stop before them
            overlap_from = calibration.get("skip_docs_from_start", 0)
            if calibration["path"] in entry.get("data_files", []) and (entry["limit"] or 10**9) > overlap_from:
                raise QllmConfigError(
                    f"task '{key}' would evaluate perplexity on calibration text: its limit ({entry['limit']}) must "
                    f"be <= calibration.skip_docs_from_start ({overlap_from})"
                )
        entries[key] = entry
    return entries


def compose_config(overrides: list[str]) -> DictConfig:
    """The composed config for command-line style overrides, without starting a Hydra app (tests, bench scripts)."""
    from hydra import compose, initialize_config_dir

    from . import config  # noqa: F401  (registers the schema)

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)


def compose_cell(overrides: list[str]) -> Cell:
    return plan_cell(compose_config(overrides))
