"""Typed records read what earlier qllm versions wrote (the JSON of a cache made before these types existed) and
write the same keys back."""

from __future__ import annotations

import json

from qllm.records import CachedEval, EvalResult, Manifest, QuantizeResult, TaskResult

# a manifest and a finished-task entry as qllm wrote them before issue 10 (trimmed: same keys, shorter values)
OLD_MANIFEST = {
    "cell_quant_key": "6d0914c160474100", "model": {"name": "tiny-random-llama"}, "method": "rtn", "bits": 4,
    "scheme": "W4A16 int g32 sym", "recipe": {"quant_stage": {}}, "calibration": None, "calibration_tokens": 0,
    "calibration_samples": 0, "versions": {"torch": "2.13.0+cpu"}, "python": "3.11.7", "device": "cpu",
    "workarounds": [], "wall_s": {"load": 1.0, "quantize": 2.0, "total": 3.5},
    "profile": {"quantize": {"wall_s": 2.0, "peak_rss_gb": 0.7}}, "checkpoint_bytes": 16162280,
    "files": {"model.safetensors": {"bytes": 16000000, "sha256": "ab"}}, "created": "2026-12-01T17:09:16+0000"}
OLD_TASK = {
    "summary": {"lm_eval_task": "arc_easy_offline", "metrics": {"acc,none": 0.4, "alias": "arc_easy_offline"},
                "subtasks": {}, "n_samples": {"effective": 5, "original": 2376}, "num_fewshot": 0,
                "primary": {"metric": "acc_norm", "value": 0.2}, "score": 20.0,
                "by_difficulty": {"easy": {"mean": 0.2, "n": 5.0}}, "wall_s": 6.92},
    "fingerprint": {"max_distinct_per_group": 16}, "weights_in_memory": {"bytes": 1}, "task": "arc_easy_offline",
    "key": "a933718edbf0437b", "cell": "tiny-random-llama · gptq · w4", "model": "tiny-random-llama", "method": "gptq",
    "bits": 4, "quant_key": "2e95", "model_path": None, "finished": "2026-12-01T17:10:19+0000"}


def test_old_manifest_round_trips():
    m = Manifest.from_dict(OLD_MANIFEST)
    assert m.wall_s["total"] == 3.5 and m.files["model.safetensors"]["bytes"] == 16000000 and m.extra == {}
    # fields added later are written with their defaults
    assert m.to_dict() == {**OLD_MANIFEST, "ranks": 1, "applied_recipe": None, "allocation": None, "sensitivity": None}


def test_old_task_entry_round_trips_with_a_typed_summary():
    e = CachedEval.from_dict(OLD_TASK)
    assert isinstance(e.summary, TaskResult) and e.summary.score == 20.0 and e.summary.value == 0.2
    assert e.speed is None and e.summary.reused is False
    written = e.to_dict()
    assert {k: v for k, v in written["summary"].items() if k != "reused"} == OLD_TASK["summary"]
    assert written["kl"] is None  # added later: written with its default
    assert {k: v for k, v in written.items() if k not in ("summary", "speed", "kl")} == {
        k: v for k, v in OLD_TASK.items() if k != "summary"}


def test_unknown_keys_survive_and_transient_fields_are_not_written():
    q = QuantizeResult.from_dict({"checkpoint": "/c", "manifest": {**OLD_MANIFEST, "from_the_future": 1},
                                  "reused": True, "also_new": [1]})
    assert q.manifest.extra == {"from_the_future": 1} and q.extra == {"also_new": [1]}
    q.wall_s = 12.0
    d = q.to_dict()
    assert d["manifest"]["from_the_future"] == 1 and d["also_new"] == [1] and "wall_s" not in d
    r = EvalResult.from_dict({"tasks": {"t": OLD_TASK["summary"]}, "suite": {"score_macro": 20.0}})
    assert isinstance(r.tasks["t"], TaskResult) and r.tasks["t"].n_samples["effective"] == 5
    r.out_dir, r.stage_wall_s = "/x", 3.0
    assert "out_dir" not in r.to_dict() and "stage_wall_s" not in r.to_dict()
    assert json.loads(json.dumps(r.to_dict()))["tasks"]["t"]["score"] == 20.0
