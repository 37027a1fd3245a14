"""Candidate labels, parsing and what each costs in stored bits per weight."""

from __future__ import annotations

import pytest

from qllm.errors import QllmConfigError
from qllm.sensitivity.candidates import Candidate, parse


def test_labels_round_trip() -> None:
    cands = parse(["gptq-w4g64", "rtn-w8ch", "rtn-w3g128a", {"method": "gptq", "bits": 2, "group_size": 32}])
    assert [c.label for c in cands] == ["gptq-w4g64", "rtn-w8ch", "rtn-w3g128a", "gptq-w2g32"]
    assert parse([c.label for c in cands]) == cands


def test_bits_per_weight_counts_scales_and_zero_points() -> None:
    assert Candidate("gptq", 4, 64).bits_per_weight(576) == pytest.approx(4 + 16 / 64)
    assert Candidate("rtn", 4, 128, symmetric=False).bits_per_weight(576) == pytest.approx(4 + (16 + 4) / 128)
    assert Candidate("rtn", 8, None).bits_per_weight(576) == pytest.approx(8 + 16 / 576)


@pytest.mark.parametrize("bad, match", [(["awq-w4g64"], "write method-w"), ([{"method": "awq", "bits": 4}], "unknown"),
                                        (["gptq-w9g64"], "bits=9"), (["gptq-w4g64", "gptq-w4g64"], "repeat"),
                                        ([], "at least one")])
def test_bad_candidates_say_what_is_valid(bad, match: str) -> None:
    with pytest.raises(QllmConfigError, match=match):
        parse(bad)
