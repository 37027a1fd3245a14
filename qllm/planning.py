"""Planning: the pure step from a composed config to one validated, hashed Cell.

Everything that can be wrong with a cell is found here, before any weights load: bits the method does not support,
a group size that does not divide a layer, settings out of range (negative sample counts or limits, a batch size of
0, an unknown device or dtype), a missing data file, an unreachable model, a launcher that cannot start. Each error
names the key and what is valid.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Optional

from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue

from . import cell as cells
from .cell import Cell
from .config import CONF_DIR, STAGES
from .errors import QllmConfigError
from .methods import Recipe, Scheme
from .judge import planning as judges
from .sources import models
from .stages import backends, launchers
from .tasks import spec as tasks

DTYPES = ("float32", "bfloat16", "float16")  # what a model is loaded and evaluated in


def plan_cell(cfg: DictConfig, check_sources: bool = True) -> Cell:
    """Validate the composed config and describe one cell. Pure apart from reading files' existence (and, for a
    model given by path, its config.json). `check_sources=False` (`qllm plan`: sizing cells for another machine,
    offline) skips only what depends on this machine: the model's availability (hub, local cache), data files, hub
    datasets, the evaluation backend's environment and the judge's; the cell and its keys are the same (a judge
    that cannot be used here aside)."""
    try:
        c = OmegaConf.to_container(cfg, resolve=True)
    except (MissingMandatoryValue, InterpolationToMissingValueError) as e:
        key = getattr(e, "full_key", "")
        hint = " (model=hf needs model.path=<hub id or local HF dir>)" if "model.path" in str(e) else ""
        raise QllmConfigError(f"a required setting has no value: {str(e).splitlines()[0]}{hint}"
                              + (f" (while resolving {key})" if key else "")) from None
    assert isinstance(c, dict)
    data_dir, cache_dir = c["data_dir"], c["cache_dir"]
    model = models.resolve(c["model"])  # model=hf: hub id or local dir, name and dtype from config.json
    _check_model(model)
    method = c["method"]
    bits = _effective_bits(method, c["bits"])
    recipe = _build_recipe(method, bits, model)
    if check_sources:
        models.check_available(model, data_dir)
    if recipe.group_size:
        check_group_size(recipe, model, models.hf_config(model, data_dir, cache_dir))

    calibration = c["calibration"] if method.get("calibrate") else None
    if calibration:
        _check_calibration(calibration, data_dir, check_sources)
        _check_autocast(calibration.get("autocast"), recipe.as_llmcompressor() if bits else {})
    task_entries = _plan_tasks(c["task"], data_dir, calibration, check_sources)
    ev = c["eval"]
    backend = backends.get(ev["backend"])
    _check_eval(ev)
    if check_sources:
        for scheme in recipe.schemes if bits else [Scheme()]:  # a mixed recipe: every candidate needs a kernel
            backend.validate(ev, model, scheme, functools.partial(_model_config, model, data_dir, cache_dir))
    if bits and backend.fuses_projections and not recipe.tied_fused:
        raise QllmConfigError(f"eval={ev['backend']} fuses each block's q/k/v and gate/up projections into one layer "
                              "that takes one scheme, but method=mixed chooses per layer: set "
                              "method.settings.tie_fused=true (one choice per fused group), or evaluate with eval=hf")
    judge = _plan_judge(c["judge"], task_entries, data_dir, check_sources) if cells.has_dialogue(task_entries) \
        else None
    profile = c["profile"]
    _check_profile(profile)
    if profile.get("sensitivity"):
        _check_sensitivity(c["sensitivity"])
    for stage in STAGES:
        _check_launch(stage, c["launch"][stage], c)

    keys = cells.Keys.of(model=model, method=method["name"], bits=bits,
                         recipe=recipe.as_llmcompressor() if bits else {}, calibration=calibration, seed=c["seed"],
                         tasks=task_entries, eval_settings=backends.key_settings(ev),
                         eval_versions=backend.versions(ev), speed=cells.speed_settings(profile), judge=judge)
    return Cell(
        model=model, method=method["name"], bits=bits, scheme=recipe.scheme if bits else model["dtype"],
        group_size=recipe.group_size, recipe=recipe.as_llmcompressor() if bits else {}, calibration=calibration,
        tasks=task_entries, eval=ev, seed=c["seed"], data_dir=data_dir, cache_dir=cache_dir,
        quant_versions=keys.quant_versions, eval_versions=keys.eval_versions, quant_key=keys.quant,
        key=keys.cell, task_keys=keys.tasks, profile=profile, speed_key=keys.speed, judge=judge,
        # measured beside a checkpoint made with calibration data (a sweep's baseline and RTN cells have none: the
        # setting does nothing there; `qllm sensitivity` measures any model)
        sensitivity=c["sensitivity"] if profile.get("sensitivity") and calibration else None,
    )


def _check_sensitivity(conf: dict) -> None:
    """profile.sensitivity: valid candidates, checked before any cell of a sweep starts."""
    from .sensitivity.analysis import Settings

    Settings.of(conf)


def _plan_judge(judge: dict, task_entries: dict, data_dir: str, check_sources: bool) -> dict:
    """The resolved judge; without source checks a judge this machine cannot use (no API key, no server) is kept as
    configured (its identity, hence the cell key, may then differ from the machine that runs it)."""
    try:
        return judges.plan(judge, task_entries, data_dir)
    except QllmConfigError:
        if check_sources:
            raise
        return dict(judge)


# ---- model and method ----


def _check_model(model: dict) -> None:
    if model["dtype"] not in DTYPES:
        raise QllmConfigError(f"model.dtype={model['dtype']!r} is not a dtype qllm loads models in; valid: "
                              f"{', '.join(DTYPES)}" + (", auto (model=hf: the checkpoint's own)"
                                                        if model["source"] == "auto" else ""))
    if model.get("group_size") is not None and model["group_size"] <= 0:
        raise QllmConfigError(f"model.group_size must be a positive integer or null (per-channel); got "
                              f"{model['group_size']}")


def _model_config(model: dict, data_dir: str, cache_dir: str) -> Optional[dict]:
    """The model's config.json when it can be read without loading weights (None when it cannot)."""
    try:
        return models.hf_config(model, data_dir, cache_dir)
    except QllmConfigError:
        return None


def _effective_bits(method: dict, bits: int) -> Optional[int]:
    """The bits a method quantizes to; None for the baseline, which ignores `bits`."""
    allowed = method.get("bits_allowed") or []
    if allowed and bits not in allowed:
        raise QllmConfigError(
            f"method '{method['name']}' does not support bits={bits}; valid bits: {', '.join(map(str, allowed))}")
    return bits if allowed else None


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
    elif settings.get("group_size") is not None and settings["group_size"] <= 0:
        raise QllmConfigError(f"method.settings.group_size must be a positive integer or null (the model's default, "
                              f"model.group_size); got {settings['group_size']}")
    return fn(bits=bits, ignore=list(model.get("ignore") or []), **settings)


def check_group_size(recipe: Recipe, model: dict, config: dict) -> None:
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


# ---- ranges: each bad value named with its key and what is valid ----


def _at_least(key: str, value: Any, low: int = 1, optional: bool = False, what: str = "") -> None:
    if value is None and optional:
        return
    if value is None or value < low:
        bound = "a positive integer" if low == 1 else f">= {low}"
        raise QllmConfigError(f"{key} must be {bound}{' or null' + what if optional else ''}; got {value}")


def _check_calibration(calibration: dict, data_dir: str, check_sources: bool = True) -> None:
    _at_least("calibration.num_samples", calibration["num_samples"])
    _at_least("calibration.max_seq_len", calibration["max_seq_len"])
    _at_least("calibration.batch_size", calibration.get("batch_size", 1))
    if calibration.get("batch_size", 1) > calibration["num_samples"]:
        raise QllmConfigError(f"calibration.batch_size={calibration['batch_size']} exceeds calibration.num_samples="
                              f"{calibration['num_samples']}: a batch cannot hold more samples than there are")
    if calibration["source"] not in ("local_text", "hub"):
        raise QllmConfigError(f"calibration.source={calibration['source']!r}; valid: local_text, hub")
    if calibration["source"] == "local_text" and check_sources:
        tasks.check_data_files(f"calibration '{calibration['name']}'", [calibration["path"]], data_dir)


AUTOCAST_DTYPES = ("bfloat16", "float16")
# modifiers whose statistics would be computed in the autocast dtype (GPTQ accumulates its Hessian with matmuls)
AUTOCAST_REFUSED = {"GPTQModifier": "GPTQ's Hessian (X Xᵀ) and its updates are matmuls that autocast would run in "
                                    "the low dtype"}


def _check_autocast(autocast: Optional[str], recipe: dict) -> None:
    if autocast is None:
        return
    if autocast not in AUTOCAST_DTYPES:
        raise QllmConfigError(f"calibration.autocast={autocast!r}; valid: {', '.join(AUTOCAST_DTYPES)} or null")
    stages = recipe.get("quant_stage", {}).values() if recipe else []
    for name in [m for stage in stages for m in stage]:
        if name in AUTOCAST_REFUSED:
            raise QllmConfigError(f"calibration.autocast={autocast} cannot be used with {name}: "
                                  f"{AUTOCAST_REFUSED[name]}; use it with AWQ or another method without GPTQ (qllm's smoothquant ends with GPTQ), or set it to null")


def _check_eval(ev: dict) -> None:
    _at_least("eval.batch_size", ev["batch_size"])
    _at_least("eval.max_length", ev.get("max_length"), optional=True, what=" (the model's own context)")
    _at_least("eval.bootstrap_iters", ev["bootstrap_iters"], low=0)


def _check_profile(profile: dict) -> None:
    if profile.get("kl"):
        for key in ("kl_docs", "kl_doc_tokens", "kl_top_k"):
            _at_least(f"profile.{key}", profile[key])
    if not profile["speed"]:
        return
    sizes = profile["speed_batch_sizes"]
    if not sizes or min(sizes) < 1:
        raise QllmConfigError(f"profile.speed_batch_sizes must be positive integers; got {sizes}")
    _at_least("profile.speed_prompt_len", profile["speed_prompt_len"])
    _at_least("profile.speed_output_len", profile["speed_output_len"], low=2)  # one prefill token + one decode step
    _at_least("profile.speed_repeats", profile["speed_repeats"])
    _at_least("profile.speed_warmup", profile["speed_warmup"], low=0)


def _check_launch(stage: str, launch: dict, cfg: dict) -> None:
    if launch.get("timeout_s") is not None and launch["timeout_s"] <= 0:
        raise QllmConfigError(f"launch.{stage}.timeout_s must be > 0 seconds or null (no limit); got "
                              f"{launch['timeout_s']}")
    launchers.get(launch["name"]).validate(launch, stage, cfg)


# ---- tasks ----


def _plan_tasks(task_cfg: dict, data_dir: str, calibration: Optional[dict], check_sources: bool = True) -> dict:
    if not task_cfg.get("tasks"):
        raise QllmConfigError(f"task '{task_cfg.get('name')}' lists no tasks")
    for cap in ("limit", "max_gen_toks", "max_new_tokens"):  # suite-wide caps
        _at_least(f"task.{cap}", task_cfg.get(cap), optional=True, what=" (no cap)")
    if task_cfg.get("max_new_tokens") is not None:  # FastChat's name for the same cap
        if task_cfg.get("max_gen_toks") not in (None, task_cfg["max_new_tokens"]):
            raise QllmConfigError(f"task.max_new_tokens={task_cfg['max_new_tokens']} and task.max_gen_toks="
                                  f"{task_cfg['max_gen_toks']} are the same cap; set one of them")
        task_cfg = {**task_cfg, "max_gen_toks": task_cfg["max_new_tokens"]}
    entries = {}
    for key, entry in task_cfg["tasks"].items():
        entry = dict(entry)
        for k in ("limit", "max_gen_toks"):
            if task_cfg.get(k) is not None:
                entry[k] = task_cfg[k]
        for cap in ("limit", "max_gen_toks", "max_doc_tokens"):
            _at_least(f"task.tasks.{key}.{cap}", entry.get(cap), optional=True, what=" (no cap)")
        _at_least(f"task.tasks.{key}.num_fewshot", entry["num_fewshot"], low=0)
        if check_sources:
            tasks.check_entry(key, entry, data_dir)
        elif entry["type"] not in tasks.TASK_TYPES:
            raise QllmConfigError(f"task '{key}': unknown type '{entry['type']}'; valid: "
                                  f"{', '.join(tasks.TASK_TYPES)}")
        _check_no_calibration_overlap(key, entry, calibration)
        entries[key] = entry
    return entries


def _check_no_calibration_overlap(key: str, entry: dict, calibration: Optional[dict]) -> None:
    """Calibration documents come from the end of the WikiText file: perplexity must stop before them."""
    if not (calibration and entry["type"] == "perplexity" and calibration.get("source") == "local_text"):
        return
    overlap_from = calibration.get("skip_docs_from_start", 0)
    if calibration["path"] in entry.get("data_files", []) and (entry["limit"] or 10**9) > overlap_from:
        raise QllmConfigError(
            f"task '{key}' would evaluate perplexity on calibration text: its limit ({entry['limit']}) must "
            f"be <= calibration.skip_docs_from_start ({overlap_from})"
        )


# ---- composing without a Hydra app (tests, bench scripts) ----


def compose_config(overrides: list[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir

    from . import config

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=config.rewrite_overrides(overrides))


def compose_cell(overrides: list[str]) -> Cell:
    return plan_cell(compose_config(overrides))
