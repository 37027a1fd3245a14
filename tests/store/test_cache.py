"""The content-addressed cache and `qllm cache`, in-process on a temp dir: atomic publication, integrity checks,
where each result of a cell lives (names are a contract with users' caches), and the CLI's ls/verify/rm/gc."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qllm import cache as cli
from qllm.planning import compose_cell
from qllm.store import cache


def _checkpoint(root: Path, name: str = "m-rtn-w4-abc", bits: int = 4) -> Path:
    tmp = cache.temp_dir(root / "quantized" / name)
    (tmp / "model.safetensors").write_bytes(b"x" * 100)
    manifest = {"model": {"name": "m"}, "method": "rtn", "bits": bits, "scheme": f"W{bits}A16", "files": cache.file_digests(tmp)}
    (tmp / cache.MANIFEST).write_text(json.dumps(manifest))
    cache.publish(tmp, root / "quantized" / name)
    return root / "quantized" / name


def test_publish_is_atomic_and_verify_catches_a_flipped_byte(tmp_path):
    entry = _checkpoint(tmp_path)
    assert cache.verify(entry) is None and cache.read_manifest(entry)["method"] == "rtn"
    data = bytearray((entry / "model.safetensors").read_bytes())
    data[5] ^= 1
    (entry / "model.safetensors").write_bytes(bytes(data))
    assert cache.verify(entry, full=False) is None  # same size: only the checksum tells
    assert "does not match its sha256" in cache.verify(entry)
    moved = cache.quarantine(entry)
    assert not entry.exists() and ".corrupt-" in moved.name


def test_entry_names_of_a_cell(data_dir):
    cell = compose_cell([f"data_dir={data_dir}", "cache_dir=/c", "model=tiny-random-llama", "method=rtn", "bits=4",
                         "task=arc_easy_offline", "profile.speed=true"])
    assert cache.checkpoint_dir(cell) == Path(f"/c/quantized/tiny-random-llama-rtn-w4-{cell.quant_key}")
    key = cell.task_keys["arc_easy_offline"]
    assert cache.eval_dir(cell, "arc_easy_offline") == Path(f"/c/evals/tiny-random-llama-rtn-w4-arc_easy_offline-{key}")
    # the speed benchmark has an entry of its own; where qllm kept it before (a pseudo-task) is still read
    assert cache.speed_dirs(cell) == [Path(f"/c/speed/tiny-random-llama-rtn-w4-{cell.speed_key}"),
                                      Path(f"/c/evals/tiny-random-llama-rtn-w4-speed-{cell.speed_key}")]


def test_eval_entries_need_their_samples_when_asked(tmp_path):
    f = tmp_path / "per_sample.jsonl"
    f.write_text("{}\n")
    entry = tmp_path / "evals" / "m-none-float32-t-k"
    cache.save_eval(entry, {"summary": {"score": 1.0}, "finished": "now"}, {"per_sample.jsonl": f})
    assert cache.load_eval(entry, need_samples=False)["summary"] == {"score": 1.0}
    assert cache.load_eval(entry, need_samples=True) is None  # no samples.jsonl: log_samples needs a new run
    assert cache.load_eval(tmp_path / "evals" / "absent", need_samples=False) is None


def test_cli_ls_verify_rm_gc(tmp_path, capsys):
    good = _checkpoint(tmp_path, "m-rtn-w4-good")
    bad = _checkpoint(tmp_path, "m-rtn-w8-bad", bits=8)
    (bad / "model.safetensors").write_bytes(b"y" * 100)
    leftover = tmp_path / "quantized" / ".m-gptq-w4-zzz.tmp-123"
    leftover.mkdir()
    speed = tmp_path / "speed" / "m-rtn-w4-s1"
    cache.save_eval(speed, {"speed": {}, "cell": "m · rtn · w4", "finished": "now"}, {})
    base = ["--cache-dir", str(tmp_path)]

    assert cli.main([*base, "ls"]) == 0
    out = capsys.readouterr().out
    assert "m-rtn-w4-good" in out and "leftover" in out and "speed benchmark of m · rtn · w4" in out
    assert cli.main([*base, "verify"]) == 1
    out = capsys.readouterr().out
    assert "OK      m-rtn-w4-good" in out and "CORRUPT m-rtn-w8-bad" in out
    assert cli.main([*base, "rm", "--bits", "8", "--dry-run"]) == 0 and bad.exists()
    assert cli.main([*base, "rm", "m-rtn-w8"]) == 0 and not bad.exists() and good.exists()
    assert cli.main([*base, "gc"]) == 0 and not leftover.exists() and good.exists() and speed.exists()
    assert cli.main([*base, "rm", "nothing-like-this"]) == 1
    with pytest.raises(SystemExit):
        cli.main([*base, "rm"])  # needs names or a filter
