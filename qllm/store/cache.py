"""The content-addressed cache under `cache_dir`: what a sweep must never make twice.

    models/<name>-<hash>/               converted base models (GGUF, llama2.c, random init)
    quantized/<cell>-<quant_key>/       quantized checkpoints + qllm_manifest.json (sizes and sha256 of every file)
    evals/<cell>-<task>-<task_key>/     one finished task evaluation (summary + per-sample records)
    speed/<cell>-<speed_key>/           one finished speed benchmark
    kl_reference/<kl_reference_key>/    a base model's next-token distributions on the KL token set (top-k; made once)
    kl/<cell>-<kl_key>/                 one quantized cell's KL against that reference
    sensitivity/<model>-<table_key>/    a model's per-layer SQNR table (qllm.sensitivity; table.json)
    judgments/<judge_key>/              a judge's verdicts, one file per question asked (qllm.judge.grading)

(`<cell>` is `<model>-<method>-<w{bits} or the baseline's dtype>`.) Entry names are a contract with users' caches:
a key names exactly one result. Every entry is written into a temp dir beside its final place and renamed into place
when complete, under a file lock, so a killed job never leaves a directory that looks complete and parallel jobs
needing the same entry make it once. A checkpoint is verified against its manifest before reuse; a corrupt one is
moved aside and made again. `qllm cache ls | verify | rm | gc` (qllm/cache.py) inspects and prunes the cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

from filelock import FileLock, Timeout

if TYPE_CHECKING:
    from ..cell import Cell

MANIFEST = "qllm_manifest.json"
EVAL_RESULT = "result.json"
KINDS = ("quantized", "models", "evals", "speed", "judgments", "kl_reference", "kl", "sensitivity")
SENSITIVITY_TABLE = "table.json"  # in a sensitivity entry
KL_REFERENCE, KL_REFERENCE_INFO = "reference.pt", "reference.json"  # a kl_reference entry: tensors, settings
LEFTOVER_MARKS = (".tmp-", ".old-", ".corrupt-")  # hidden dirs of killed writes, replaced or quarantined entries
# full: sha256 of every file before reuse (default; ~1 GB/s); size: sizes only, for checkpoints of hundreds of GB
VERIFY_ENV = "QLLM_CACHE_VERIFY"


def default_cache_dir() -> Path:
    return Path(os.environ.get("QLLM_CACHE_DIR", Path.cwd() / ".cache" / "qllm"))


# ---- where each result of a cell lives ----


def checkpoint_dir(cell: Cell) -> Path:
    return Path(cell.cache_dir) / "quantized" / f"{cell.model['name']}-{cell.method}-w{cell.bits}-{cell.quant_key}"


def eval_dir(cell: Cell, task: str) -> Path:
    """One finished task of the cell (`task` = one of its task keys)."""
    return Path(cell.cache_dir) / "evals" / f"{cell.model['name']}-{cell.method}-{cell.bits_label}-{task}-" \
                                            f"{cell.task_keys[task]}"


def speed_dirs(cell: Cell) -> list[Path]:
    """The cell's speed benchmark: where it is written, then where qllm before issue 10 kept it (an `evals/` entry
    named like a task called "speed"), read as well so earlier benchmarks stay reusable."""
    name = f"{cell.model['name']}-{cell.method}-{cell.bits_label}"
    return [Path(cell.cache_dir) / "speed" / f"{name}-{cell.speed_key}",
            Path(cell.cache_dir) / "evals" / f"{name}-speed-{cell.speed_key}"]


def kl_reference_dir(cell: Cell) -> Path:
    """The base model's KL reference: shared by the baseline and every quantized cell of that model (same settings)."""
    return Path(cell.cache_dir) / "kl_reference" / str(cell.kl_reference_key)


def kl_dir(cell: Cell) -> Path:
    """The cell's KL against its baseline."""
    return Path(cell.cache_dir) / "kl" / f"{cell.model['name']}-{cell.method}-{cell.bits_label}-{cell.kl_key}"


def sensitivity_dir(cache_dir: str, model_name: str, table_key: str) -> Path:
    """A model's sensitivity table (its key: qllm.sensitivity.analysis.table_key)."""
    return Path(cache_dir) / "sensitivity" / f"{model_name}-{table_key}"


def judgments_dir(cache_dir: str, judge_key: str) -> Path:
    """Every verdict of one judge (its identity: qllm.stages.judge.judge_key), each file named by what was asked."""
    return Path(cache_dir) / "judgments" / judge_key


def lock_path(entry: Path) -> Path:
    return entry.with_name(f".{entry.name}.lock")


@contextlib.contextmanager
def locked(entry: Path) -> Iterator[None]:
    """Exclusive lock for making `entry`. Parallel jobs on one machine (joblib, submitit_local) wait here instead of
    making the same entry twice. On network file systems locks may not hold; the atomic rename still keeps entries
    whole (two jobs would then both do the work)."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path(entry)))
    try:
        lock.acquire(timeout=1)
    except Timeout:
        print(f"[qllm] waiting for another job making {entry.name} ...", flush=True)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def is_locked(entry: Path) -> bool:
    lock = FileLock(str(lock_path(entry)))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return True
    lock.release()
    return False


def temp_dir(entry: Path) -> Path:
    entry.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-", dir=entry.parent))


def publish(tmp: Path, entry: Path, replace: bool = False) -> None:
    """Move a complete temp dir into place atomically. With `replace`, the old entry is first moved aside (a
    half-deleted dir must never look complete); otherwise an entry another job published first wins."""
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared with the MLflow UI and other users
    if replace and entry.exists():
        old = entry.with_name(f".{entry.name}.old-{os.getpid()}")
        os.rename(entry, old)
        shutil.rmtree(old)
    try:
        os.rename(tmp, entry)
    except OSError:
        if not entry.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def quarantine(entry: Path) -> Path:
    """Move a bad entry aside (kept for inspection until `gc`)."""
    dest = entry.with_name(f".{entry.name}.corrupt-{time.strftime('%Y%m%d%H%M%S')}")
    os.rename(entry, dest)
    return dest


def touch(entry: Path) -> None:
    """Record a use: the entry dir's mtime is its last use (`ls`, `gc --older-than`, `gc --max-gb`)."""
    with contextlib.suppress(OSError):
        os.utime(entry)


# ---- checkpoints: manifest and integrity ----


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_digests(root: Path) -> dict[str, dict]:
    return {
        str(f.relative_to(root)): {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
        for f in sorted(root.rglob("*")) if f.is_file() and f.name != MANIFEST
    }


def read_manifest(entry: Path) -> Optional[dict]:
    """The manifest of a complete checkpoint, or None (absent, partial or unreadable)."""
    try:
        return json.loads((entry / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def verify(entry: Path, full: Optional[bool] = None) -> Optional[str]:
    """None when the checkpoint matches its manifest, else what is wrong. `full` hashes every file (default unless
    QLLM_CACHE_VERIFY=size)."""
    if full is None:
        full = os.environ.get(VERIFY_ENV, "full") != "size"
    manifest = read_manifest(entry)
    if manifest is None:
        return f"no readable {MANIFEST} (incomplete write)"
    for rel, want in manifest.get("files", {}).items():
        f = entry / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != want["bytes"]:
            return f"{rel} has {f.stat().st_size} bytes, the manifest says {want['bytes']}"
        if full and sha256_file(f) != want["sha256"]:
            return f"{rel} does not match its sha256 in the manifest"
    return None


# ---- finished task evaluations ----


def load_eval(entry: Path, need_samples: bool) -> Optional[dict]:
    """A finished task evaluation: {"summary", "fingerprint", "files"}; None if absent or lacking full samples."""
    try:
        result = json.loads((entry / EVAL_RESULT).read_text())
    except (OSError, ValueError):
        return None
    if need_samples and not (entry / "samples.jsonl").is_file():
        return None
    return result


def save_eval(entry: Path, result: dict, files: dict[str, Path]) -> None:
    """Store one finished task evaluation (atomic): result.json + the given files copied under their names."""
    with locked(entry):
        tmp = temp_dir(entry)
        try:
            for name, src in files.items():
                shutil.copyfile(src, tmp / name)
            (tmp / EVAL_RESULT).write_text(json.dumps(result, indent=2, default=str))
            publish(tmp, entry, replace=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


