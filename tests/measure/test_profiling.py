"""Where each rank's memory profile goes: the stage hands `for_stage` its rank (qllm.measure imports nothing from
qllm.stages); the main rank's profile is in the profile dir with its timeline, rank r's in `rank<r>/`, peaks only."""

from __future__ import annotations

from types import SimpleNamespace

from qllm.measure import profiling

PROFILE = {"enabled": True, "memory_timeline": True, "sample_interval_s": 0.5, "memory_snapshot": True}


def test_for_stage_places_each_ranks_profile(tmp_path):
    cell = SimpleNamespace(profile=PROFILE)
    main = profiling.for_stage(cell, "evaluate", tmp_path, rank=0)
    assert (main.out_dir, main.enabled, main.timeline, main.snapshot) == (tmp_path, True, True, True)
    other = profiling.for_stage(cell, "evaluate", tmp_path, rank=3)
    assert (other.out_dir, other.enabled, other.timeline, other.snapshot) == (tmp_path / "rank3", True, False, False)
    assert not profiling.for_stage(cell, "evaluate", None, rank=0).enabled  # no out dir: nothing written
