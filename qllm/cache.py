"""The content-addressed cache under `cache_dir`: what a sweep must never make twice.

    models/<name>-<hash>/         converted base models (GGUF, llama2.c, random init)
    quantized/<cell>-<quant_key>/ quantized checkpoints + qllm_manifest.json (sizes and sha256 of every file)
    evals/<cell>-<task_key>/      one finished task evaluation (summary + per-sample records)

Every entry is written into a temp dir beside its final place and renamed into place when complete, under a file
lock, so a killed job never leaves a directory that looks complete and parallel jobs needing the same entry make it
once. A checkpoint is verified against its manifest before reuse; a corrupt one is moved aside and made again.
`python -m qllm.cache ls | verify | rm | gc` (or `qllm cache ...`) inspects and prunes the cache.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from filelock import FileLock, Timeout

MANIFEST = "qllm_manifest.json"
EVAL_RESULT = "result.json"
KINDS = ("quantized", "models", "evals")
LEFTOVER_MARKS = (".tmp-", ".old-", ".corrupt-")  # hidden dirs of killed writes, replaced or quarantined entries
# full: sha256 of every file before reuse (default; ~1 GB/s); size: sizes only, for checkpoints of hundreds of GB
VERIFY_ENV = "QLLM_CACHE_VERIFY"


def default_cache_dir() -> Path:
    return Path(os.environ.get("QLLM_CACHE_DIR", Path.cwd() / ".cache" / "qllm"))


def _lock_path(entry: Path) -> Path:
    return entry.with_name(f".{entry.name}.lock")


@contextlib.contextmanager
def locked(entry: Path) -> Iterator[None]:
    """Exclusive lock for making `entry`. Parallel jobs on one machine (joblib, submitit_local) wait here instead of
    making the same entry twice. On network file systems locks may not hold; the atomic rename still keeps entries
    whole (two jobs would then both do the work)."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(_lock_path(entry)))
    try:
        lock.acquire(timeout=1)
    except Timeout:
        print(f"[qllm] waiting for another job making {entry.name} ...", flush=True)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _is_locked(entry: Path) -> bool:
    lock = FileLock(str(_lock_path(entry)))
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


# ---- inspecting and pruning (the CLI) ----


@dataclass
class Entry:
    kind: str  # quantized | models | evals
    path: Path
    bytes: int
    status: str  # ok | incomplete | leftover | corrupt (verify) | in use (being written now)
    last_used: float
    info: dict

    @property
    def label(self) -> str:
        i = self.info
        if self.kind == "quantized" and i:
            return f"{i['model']['name']} {i['method']} w{i['bits']} ({i['scheme']})"
        if self.kind == "evals" and i:
            return f"{i.get('task', '?')} on {i.get('cell', '?')}"
        return f"base model {i['model']}" if self.kind == "models" and i else ""


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def _leftover_owner(path: Path) -> Optional[Path]:
    """For `.NAME.tmp-XXXX` (and .old-/.corrupt-): the entry NAME it belonged to."""
    for mark in LEFTOVER_MARKS:
        if mark in path.name:
            return path.with_name(path.name[1:].split(mark)[0])
    return None


def entries(cache_dir: Path, kinds: tuple[str, ...] = KINDS) -> list[Entry]:
    out = []
    for kind in kinds:
        root = cache_dir / kind
        if not root.is_dir():
            continue
        for p in sorted(root.iterdir()):
            if p.name.endswith(".lock"):
                continue
            owner = _leftover_owner(p)
            if owner is not None:
                status, info = ("in use" if _is_locked(owner) else "leftover"), {}
            elif kind == "quantized":
                info = read_manifest(p) or {}
                status = "ok" if info else ("in use" if _is_locked(p) else "incomplete")
            elif kind == "evals":
                info = load_eval(p, need_samples=False) or {}
                status = "ok" if info else ("in use" if _is_locked(p) else "incomplete")
            else:
                info = {"model": p.name.rsplit("-", 1)[0]}
                status = "ok" if (p / "config.json").is_file() else ("in use" if _is_locked(p) else "incomplete")
            out.append(Entry(kind, p, _size(p), status, p.stat().st_mtime, info))
    return out


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _print_table(rows: list[Entry], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col in ("kind", "entry", "what", "size", "status", "last used"):
        table.add_column(col, justify="right" if col == "size" else "left")
    for e in rows:
        table.add_row(e.kind, e.path.name, e.label, _human(e.bytes), e.status,
                      time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used)))
    Console(width=200).print(table)


def _remove(rows: list[Entry], dry_run: bool, why: str) -> int:
    freed = 0
    for e in rows:
        print(f"{'would remove' if dry_run else 'removing'} {e.kind}/{e.path.name} ({_human(e.bytes)}): {why}")
        if not dry_run:
            shutil.rmtree(e.path, ignore_errors=True)
            with contextlib.suppress(OSError):
                _lock_path(e.path).unlink()
        freed += e.bytes
    print(f"{'would free' if dry_run else 'freed'} {_human(freed)} in {len(rows)} entr{'y' if len(rows) == 1 else 'ies'}")
    return freed


def _select(rows: list[Entry], a: argparse.Namespace) -> list[Entry]:
    def match(e: Entry) -> bool:
        i = e.info
        model = (i.get("model") or {}).get("name") if e.kind == "quantized" else i.get("model")
        if a.names and not any(e.path.name.startswith(n) or n in e.path.name for n in a.names):
            return False
        if a.model and model != a.model and not (e.kind == "models" and e.path.name.startswith(a.model + "-")):
            return False
        if a.method and i.get("method") != a.method:
            return False
        return not (a.bits and i.get("bits") != a.bits)

    return [e for e in rows if match(e)]


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="qllm cache", description=__doc__.split("\n\n")[0])
    p.add_argument("--cache-dir", type=Path, default=None, help="default: $QLLM_CACHE_DIR or ./.cache/qllm")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("ls", help="list entries with sizes, status and last use")
    v = sub.add_parser("verify", help="check every quantized checkpoint against its manifest (sha256)")
    v.add_argument("--quarantine", action="store_true", help="move corrupt checkpoints aside (gc removes them)")
    rm = sub.add_parser("rm", help="remove entries by name/key and/or filters")
    rm.add_argument("names", nargs="*", help="entry names, name prefixes or keys (see `ls`)")
    rm.add_argument("--model"), rm.add_argument("--method"), rm.add_argument("--bits", type=int)
    rm.add_argument("--kind", choices=(*KINDS, "all"), default="all")
    rm.add_argument("--dry-run", action="store_true")
    gc = sub.add_parser("gc", help="remove leftovers of killed jobs and incomplete entries; optionally old ones")
    gc.add_argument("--older-than", type=float, metavar="DAYS", help="also remove entries unused for DAYS days")
    gc.add_argument("--max-gb", type=float, help="also evict least recently used checkpoints until under this size")
    gc.add_argument("--dry-run", action="store_true")
    a = p.parse_args(argv)
    cache_dir = a.cache_dir or default_cache_dir()
    rows = entries(cache_dir)

    if a.cmd == "ls":
        if not rows:
            print(f"cache {cache_dir} is empty")
            return 0
        _print_table(rows, f"qllm cache {cache_dir}")
        by_kind = {k: sum(e.bytes for e in rows if e.kind == k) for k in KINDS}
        print("total " + _human(sum(by_kind.values())) + " (" + ", ".join(f"{k} {_human(b)}" for k, b in by_kind.items()) + ")")
        return 0
    if a.cmd == "verify":
        bad = 0
        for e in (e for e in rows if e.kind == "quantized" and e.status == "ok"):
            problem = verify(e.path, full=True)
            print(f"{'OK     ' if problem is None else 'CORRUPT'} {e.path.name}" + (f": {problem}" if problem else ""))
            if problem:
                bad += 1
                if a.quarantine:
                    print(f"        moved aside to {quarantine(e.path).name}")
        return 1 if bad else 0
    if a.cmd == "rm":
        if not (a.names or a.model or a.method or a.bits):
            p.error("rm needs entry names or a filter (--model/--method/--bits); `ls` lists the entries")
        chosen = _select([e for e in rows if a.kind in ("all", e.kind) and e.status != "in use"], a)
        if not chosen:
            print("nothing matches; `python -m qllm.cache ls` lists the entries", file=sys.stderr)
            return 1
        _remove(chosen, a.dry_run, "selected")
        return 0
    # gc
    _remove([e for e in rows if e.status == "leftover"], a.dry_run, "leftover of a killed, replaced or corrupt write")
    _remove([e for e in rows if e.status == "incomplete"], a.dry_run, "incomplete (no manifest/result)")
    live = [e for e in rows if e.status == "ok"]
    if a.older_than is not None:
        cutoff = time.time() - a.older_than * 86400
        old = [e for e in live if e.last_used < cutoff]
        _remove(old, a.dry_run, f"unused for more than {a.older_than:g} days")
        live = [e for e in live if e not in old]
    if a.max_gb is not None:
        ckpts = sorted((e for e in live if e.kind == "quantized"), key=lambda e: e.last_used)
        total, evict = sum(e.bytes for e in live), []
        while ckpts and total > a.max_gb * 2**30:
            e = ckpts.pop(0)
            evict.append(e)
            total -= e.bytes
        _remove(evict, a.dry_run, f"least recently used, cache over {a.max_gb:g} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
