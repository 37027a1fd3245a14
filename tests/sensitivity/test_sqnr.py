"""SQNR of one layer under one candidate: the trace identity, the cap, the ordering by bits, GPTQ vs RTN."""

from __future__ import annotations

import math

import pytest
import torch

from qllm.sensitivity import sqnr
from qllm.sensitivity.candidates import Candidate


@pytest.fixture(scope="module")
def layer() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A weight [96, 128] and correlated inputs X [2048, 128] (outlier channels, as LLM activations have)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 128, generator=g) * 0.05
    mix = torch.randn(128, 128, generator=g) / 128 ** 0.5 + torch.eye(128)
    x = torch.randn(2048, 128, generator=g) @ mix
    x[:, :4] *= 8  # a few large channels
    h = x.T @ x / x.shape[0]
    return w, x, h


def test_sqnr_from_second_moment_equals_output_sqnr(layer) -> None:
    w, x, h = layer
    q = sqnr.quantize(w, h, Candidate("rtn", 4, 64))
    y, e = x @ w.T, x @ (w - q).T
    direct = 10 * math.log10(float((y.double() ** 2).sum() / (e.double() ** 2).sum()))
    assert sqnr.sqnr_db(w, q, h) == pytest.approx(direct, abs=1e-3)


def test_unquantized_layer_reads_as_the_cap(layer) -> None:
    w, _, h = layer
    assert sqnr.sqnr_db(w, w.clone(), h) == sqnr.SQNR_CAP_DB


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_sqnr_falls_with_fewer_bits(layer, method: str) -> None:
    w, _, h = layer
    values = [sqnr.sqnr_db(w, sqnr.quantize(w, h, Candidate(method, b, 64)), h) for b in (8, 6, 4, 3, 2)]
    assert values == sorted(values, reverse=True) and len(set(values)) == len(values), values
    assert 40 < values[0] < sqnr.SQNR_CAP_DB  # 8 bits: small but real noise


def test_gptq_beats_rtn_at_the_same_width(layer) -> None:
    """GPTQ minimises exactly this output error (through the same H): it must not lose to round-to-nearest."""
    w, _, h = layer
    for bits in (3, 4):
        rtn = sqnr.sqnr_db(w, sqnr.quantize(w, h, Candidate("rtn", bits, 64)), h)
        gptq = sqnr.sqnr_db(w, sqnr.quantize(w, h, Candidate("gptq", bits, 64)), h)
        assert gptq > rtn + 0.5, (bits, rtn, gptq)


def test_quantized_weights_take_at_most_2_to_the_bits_values_per_group(layer) -> None:
    w, _, h = layer
    q = sqnr.quantize(w, h, Candidate("rtn", 3, 64))
    for row in q[:4]:
        for group in row.split(64):
            assert len(torch.unique(group)) <= 8


def test_a_batch_of_layers_quantizes_as_each_alone(layer) -> None:
    w, x, h = layer
    g = torch.Generator().manual_seed(1)
    ws = [w, torch.randn(96, 128, generator=g) * 0.03, w * 2]
    hs = [h, h * 0.5 + torch.eye(128), h]
    c = Candidate("gptq", 4, 64)
    for q_batch, wi, hi in zip(sqnr.quantize_batch(ws, hs, c), ws, hs):
        assert torch.allclose(q_batch, sqnr.quantize(wi, hi, c), atol=1e-6)


def test_captured_moment_is_the_mean_of_x_xT_and_shared_by_layers_reading_one_input() -> None:
    from qllm.sensitivity import capture

    torch.manual_seed(0)

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(50, 16)
            self.q, self.k = torch.nn.Linear(16, 8), torch.nn.Linear(16, 8)
            self.out = torch.nn.Linear(8, 4)

        def forward(self, input_ids, attention_mask=None):
            h = self.embed(input_ids)
            return self.out(self.q(h) * self.k(h))

    m = Block()
    samples = [{"input_ids": list(range(i, i + 10))} for i in range(3)]
    layers = capture.quantizable_layers(m, ["out"])
    assert list(layers) == ["q", "k"]
    h = capture.second_moments(m, layers, samples)
    x = torch.cat([m.embed(torch.tensor(s["input_ids"])) for s in samples]).detach()
    assert torch.allclose(h["q"], x.T @ x / x.shape[0], atol=1e-5)
    assert h["k"] is h["q"]
