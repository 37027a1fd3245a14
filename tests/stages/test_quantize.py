"""The quantize stage's reuse decision, without a model: one process decides alone (as it always did); with several
ranks the main rank decides, under the lock it alone holds, and every other rank follows its broadcast decision,
never its own look at the cache (another job may publish the checkpoint between two looks)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qllm.stages import quantize
from qllm.store import cache


def _checkpoint(root: Path, broken: bool = False) -> Path:
    out = root / "quantized" / "tiny-gptq-w4-0123abcd"
    out.mkdir(parents=True)
    (out / "model.safetensors").write_bytes(b"weights")
    (out / cache.MANIFEST).write_text(json.dumps({"files": cache.file_digests(out)}))
    if broken:
        (out / "model.safetensors").write_bytes(b"changed")  # same size, other bytes: its sha256 fails
    return out


def _ranks(monkeypatch, rank: int, world: int) -> None:
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))


def _never(*args):
    raise AssertionError("not called with one process / on a rank other than the main one")


def test_one_process_decides_alone(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(quantize, "_from_main", _never)  # nothing to broadcast to
    assert not quantize._reuse(tmp_path / "absent", force=False)
    out = _checkpoint(tmp_path)
    assert quantize._reuse(out, force=False)
    assert f"reusing cached checkpoint {out} (integrity verified)" in capsys.readouterr().out
    assert not quantize._reuse(out, force=True)
    broken = _checkpoint(tmp_path / "other", broken=True)
    assert not quantize._reuse(broken, force=False) and not broken.exists()  # moved aside, made again
    assert "failed its integrity check" in capsys.readouterr().out


def test_the_main_rank_decides_and_broadcasts(tmp_path, monkeypatch):
    _ranks(monkeypatch, 0, 2)
    sent = []
    monkeypatch.setattr(quantize, "_from_main", lambda value: sent.append(value) or value)
    assert quantize._reuse(_checkpoint(tmp_path), force=False) and sent == [True]
    assert not quantize._reuse(tmp_path / "absent", force=False) and sent == [True, False]


def test_other_ranks_follow_the_main_ranks_decision_not_the_cache(tmp_path, monkeypatch):
    _ranks(monkeypatch, 1, 2)
    monkeypatch.setattr(quantize.cache, "verify", _never)  # never looks itself
    monkeypatch.setattr(quantize.cache, "quarantine", _never)
    sent = []
    monkeypatch.setattr(quantize, "_from_main", lambda value: sent.append(value) or True)  # the main rank: reuse
    assert quantize._reuse(tmp_path / "absent", force=False) and sent == [False]
    out = _checkpoint(tmp_path)  # published by another job after the main rank looked: the main rank quantizes
    monkeypatch.setattr(quantize, "_from_main", lambda value: False)
    assert not quantize._reuse(out, force=False) and out.exists()


def test_from_main_broadcasts_over_the_process_group():
    pytest.importorskip("torch")
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert quantize._from_main(True) is True and quantize._from_main(False) is False
    finally:
        dist.destroy_process_group()


def test_autocast_sees_weights_rewritten_in_place():
    """AWQ's grid search rewrites weight.data between forwards; autocast's weight cache would score every grid point
    with the first weights (measured: best_error 0.000 on every mapping). qllm's autocast context has no cache."""
    import torch

    layer = torch.nn.Linear(8, 8)
    x = torch.randn(2, 8)
    with quantize._autocast({"autocast": "bfloat16"}):
        first = layer(x)
        assert first.dtype == torch.bfloat16
        layer.weight.data.mul_(2)
        second = layer(x)
    assert not torch.equal(first, second)
    with quantize._autocast({"autocast": None}):
        assert layer(x).dtype == torch.float32
