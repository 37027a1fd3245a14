"""Evaluation backends: how the evaluate stage turns a checkpoint into an lm-eval LM, and what else it measures
through that LM (which weights it evaluated, their bytes in memory, speed).

A backend is one module here plus one YAML in conf/eval/ (`eval=<name>`):

    qllm/stages/backends/<name>.py   a config dataclass (subclass of EvalBackendConfig: its own typed settings)
                                     and a class implementing EvalBackend, exported as `BACKEND`
    conf/eval/<name>.yaml            `defaults: [<name>_schema, _self_]` and the settings' defaults

The module is found by name (`qllm.stages.backends.<name>`) and its config registered with Hydra's ConfigStore as
`eval/<name>_schema` when qllm's schema is registered, so nothing else changes to add one.

Both sides use a backend: planning (orchestrator, no torch) calls `validate` (which schemes run where: a cell the
backend cannot run is refused there) and `versions`; the runner starts the evaluate stage under the backend's
`python()` (a backend with its own environment, such as vLLM's) with `env()` added; the evaluate stage calls `load`,
`fingerprint`, `weights_in_memory` and `benchmark`. A backend module therefore imports torch and its engine only
inside those methods.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional, Protocol, runtime_checkable

from omegaconf import MISSING

from ... import plugins
from ...methods import Scheme


@dataclass
class EvalBackendConfig:
    """Settings every backend has. Every field enters the cell key unless its metadata says `key: False`
    (how to run, not what is computed)."""

    backend: str = MISSING
    batch_size: int = 8
    max_length: Optional[int] = None  # model context used by lm-eval (null: the model's own)
    log_samples: bool = False
    # instruct models as chatted with: prompts (and few-shot turns) through the tokenizer's chat template
    apply_chat_template: bool = False
    bootstrap_iters: int = 1000  # stderr of non-mean metrics (perplexity); lm-eval's 100000 is minutes on CPU
    seed: int = 1234


@runtime_checkable
class EvalBackend(Protocol):
    name: ClassVar[str]
    config: ClassVar[type[EvalBackendConfig]]
    # what its speed figures measure: "dense" (weights decompressed) or "low-bit kernels"
    speed_kind: ClassVar[str]
    speed_note: ClassVar[str]  # the sentence saying so, logged with every speed figure (speed.json)
    speed_tag: ClassVar[str]  # the short form, tag qllm.eval_speed of every cell
    # distributions whose versions change its results: they enter the cell key (only this backend's)
    libraries: ClassVar[tuple[str, ...]]
    # whether it fuses projections (q/k/v, gate/up) into one layer, which then needs one scheme for all of them
    fuses_projections: ClassVar[bool]

    def validate(self, settings: dict, model: dict, scheme: Scheme,
                 config: Callable[[], Optional[dict]]) -> None:
        """Planning: refuse settings, or a checkpoint scheme, this backend cannot run (QllmConfigError naming the
        key or the scheme, why, and what is valid). `config()` reads the model's config.json (None when it
        cannot be read without loading weights)."""

    def versions(self, settings: dict) -> dict[str, str]:
        """Versions of `libraries` as the evaluate stage will import them (they enter the cell key)."""

    def python(self, settings: dict) -> Optional[str]:
        """The interpreter the evaluate stage runs under (None: the one running qllm)."""

    def env(self, settings: dict) -> dict[str, str]:
        """Environment variables the evaluate stage needs."""

    def load(self, settings: dict, model: dict, model_path: str, quantized: bool, seed: int) -> Any:
        """The lm-eval LM over the checkpoint dir (or hub id) `model_path`."""

    def device(self, settings: dict) -> str:
        """Where the model runs ("cpu", "cuda", ...)."""

    def tokenizer(self, lm: Any) -> Any:
        """The tokenizer the LM uses (task functions that count tokens get it)."""

    def fingerprint(self, lm: Any, group_size: Optional[int]) -> dict:
        """Evidence of which weights were evaluated (the quantization grid as the LM holds it)."""

    def weights_in_memory(self, lm: Any) -> Optional[dict]:
        """Bytes of the weights as the LM holds them (None when the engine does not say)."""

    def benchmark(self, lm: Any, speed: dict, seed: int) -> dict:
        """Prefill/decode speed with the cell's `profile.speed_*` settings (see qllm.measure.speed)."""


def names() -> list[str]:
    """The backends there are (`eval=<name>`)."""
    return plugins.names(sys.modules[__name__])


def get(name: str) -> EvalBackend:
    """The backend called `name` (eval.backend), or a QllmConfigError listing the ones there are."""
    return plugins.load(sys.modules[__name__], name, "BACKEND", "evaluation backend")


def key_settings(settings: dict) -> dict:
    """The evaluation settings that enter the cell key: all but those marked `key: False` in the backend config."""
    cls = get(settings["backend"]).config
    skip = {f.name for f in dataclasses.fields(cls) if f.metadata.get("key") is False}
    return {k: v for k, v in settings.items() if k not in skip}
