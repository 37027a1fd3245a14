"""`qllm cache` (or `python -m qllm.cache`): list, verify and prune the cache of converted models, quantized
checkpoints, finished task evaluations, speed benchmarks, KL references and results and sensitivity tables (the
cache itself: qllm.store.cache).

    qllm cache ls                     entries with sizes, status and last use
    qllm cache verify [--quarantine]  every quantized checkpoint against its manifest (sha256)
    qllm cache rm NAME... | --model M --method M --bits B [--kind K] [--dry-run]
    qllm cache gc [--older-than DAYS] [--max-gb GB] [--dry-run]   leftovers of killed jobs, incomplete entries
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .store.cache import (KINDS, KL_REFERENCE, KL_REFERENCE_INFO, LEFTOVER_MARKS, SENSITIVITY_TABLE, default_cache_dir,
                          is_locked, load_eval, lock_path, quarantine, read_manifest, verify)


@dataclass
class Entry:
    kind: str  # quantized | models | evals | speed | judgments | kl_reference | kl | sensitivity
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
        if self.kind == "judgments" and i:
            return f"{i['verdicts']} verdicts of one judge"
        if self.kind == "evals" and i:
            return f"{i.get('task', '?')} on {i.get('cell', '?')}"
        if self.kind == "speed" and i:
            return f"speed benchmark of {i.get('cell', '?')}"
        if self.kind == "kl" and i:
            return f"KL vs baseline of {i.get('cell', '?')}"
        if self.kind == "sensitivity" and i:
            return f"sensitivity table: {i['layers']} layers x {i['candidates']} candidates"
        if self.kind == "kl_reference" and i:
            return f"KL reference of {i.get('model', '?')} ({i.get('n_tokens', '?')} tokens)"
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


def _read(kind: str, p: Path) -> dict:
    """What an entry holds ({} when it is incomplete)."""
    if kind == "quantized":
        return read_manifest(p) or {}
    if kind in ("evals", "speed", "kl"):
        return load_eval(p, need_samples=False) or {}
    if kind == "kl_reference":  # complete when both files are there (written together, renamed into place)
        with contextlib.suppress(OSError, ValueError):
            if (p / KL_REFERENCE).is_file():
                return json.loads((p / KL_REFERENCE_INFO).read_text())
        return {}
    if kind == "sensitivity":
        with contextlib.suppress(OSError, ValueError, KeyError):
            t = json.loads((p / SENSITIVITY_TABLE).read_text())
            return {"layers": len(t["sqnr"]), "candidates": len(t["settings"]["candidates"])}
        return {}
    if kind == "judgments":  # one judge's verdicts, each its own whole file
        n = sum(1 for _ in p.glob("*/*.json"))
        return {"verdicts": n} if n else {}
    return {"model": p.name.rsplit("-", 1)[0]} if (p / "config.json").is_file() else {}


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
                status, info = ("in use" if is_locked(owner) else "leftover"), {}
            else:
                info = _read(kind, p)
                status = "ok" if info else ("in use" if is_locked(p) else "incomplete")
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
                lock_path(e.path).unlink()
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


def _ls(rows: list[Entry], cache_dir: Path) -> int:
    if not rows:
        print(f"cache {cache_dir} is empty")
        return 0
    _print_table(rows, f"qllm cache {cache_dir}")
    by_kind = {k: sum(e.bytes for e in rows if e.kind == k) for k in KINDS}
    print("total " + _human(sum(by_kind.values())) + " (" + ", ".join(f"{k} {_human(b)}" for k, b in by_kind.items())
          + ")")
    return 0


def _verify(rows: list[Entry], move_aside: bool) -> int:
    bad = 0
    for e in (e for e in rows if e.kind == "quantized" and e.status == "ok"):
        problem = verify(e.path, full=True)
        print(f"{'OK     ' if problem is None else 'CORRUPT'} {e.path.name}" + (f": {problem}" if problem else ""))
        if problem:
            bad += 1
            if move_aside:
                print(f"        moved aside to {quarantine(e.path).name}")
    return 1 if bad else 0


def _gc(rows: list[Entry], a: argparse.Namespace) -> int:
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


def parser() -> argparse.ArgumentParser:
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
    return p


def main(argv: Optional[list[str]] = None) -> int:
    p = parser()
    a = p.parse_args(argv)
    cache_dir = a.cache_dir or default_cache_dir()
    rows = entries(cache_dir)
    if a.cmd == "ls":
        return _ls(rows, cache_dir)
    if a.cmd == "verify":
        return _verify(rows, a.quarantine)
    if a.cmd == "rm":
        if not (a.names or a.model or a.method or a.bits):
            p.error("rm needs entry names or a filter (--model/--method/--bits); `ls` lists the entries")
        chosen = _select([e for e in rows if a.kind in ("all", e.kind) and e.status != "in use"], a)
        if not chosen:
            print("nothing matches; `qllm cache ls` lists the entries", file=sys.stderr)
            return 1
        _remove(chosen, a.dry_run, "selected")
        return 0
    return _gc(rows, a)


if __name__ == "__main__":
    raise SystemExit(main())
