"""Candidate quantizers of one linear layer: (method, bits, group size, symmetric), their labels and their cost."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

from ..errors import QllmConfigError

METHODS = ("rtn", "gptq")  # the weight quantizers a layer can be measured with (one layer alone, no smoothing)
SCALE_BITS = 16  # compressed-tensors stores one scale per group in the model's dtype: 16 for bf16/fp16, 32 for fp32
SHAPE_BITS = 128  # and each packed layer's weight_shape (2 x int64), which size/bits_per_weight_quantized counts too


@dataclass(frozen=True)
class Candidate:
    method: str
    bits: int
    group_size: Optional[int]  # None: per output channel
    symmetric: bool = True

    @property
    def label(self) -> str:
        g = f"g{self.group_size}" if self.group_size else "ch"
        return f"{self.method}-w{self.bits}{g}{'' if self.symmetric else 'a'}"

    def bits_per_weight(self, in_features: int, scale_bits: int = SCALE_BITS) -> float:
        """Stored bits per weight as `size/bits_per_weight_quantized` counts them: the packed values, one scale per
        group (per row when per-channel) and, asymmetric, one zero point of `bits` bits per group (the layer's
        shape tensor apart: SHAPE_BITS per layer)."""
        import math

        group = self.group_size or in_features
        packed = math.ceil(in_features * self.bits / 32) * 32 / in_features  # each row packed densely into int32s
        return packed + (scale_bits + (0 if self.symmetric else self.bits)) / group

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse(entries: list[Any]) -> list[Candidate]:
    """Candidates from config entries: dicts {method, bits, group_size, symmetric} or "gptq-w4g64" labels."""
    out = []
    for e in entries:
        if isinstance(e, str):
            e = _from_label(e)
        try:
            c = Candidate(str(e["method"]), int(e["bits"]), e.get("group_size"), bool(e.get("symmetric", True)))
        except (KeyError, TypeError, ValueError) as err:
            raise QllmConfigError(f"sensitivity candidate {e!r}: needs method, bits[, group_size, symmetric] "
                                  f"({err})") from None
        if c.method not in METHODS:
            raise QllmConfigError(f"sensitivity candidate {c.label}: method '{c.method}' unknown; valid: "
                                  f"{', '.join(METHODS)}")
        if not 2 <= c.bits <= 8:
            raise QllmConfigError(f"sensitivity candidate {c.label}: bits={c.bits}; valid: 2..8")
        out.append(c)
    if len({c.label for c in out}) != len(out):
        raise QllmConfigError(f"sensitivity candidates repeat: {[c.label for c in out]}")
    if not out:
        raise QllmConfigError("sensitivity needs at least one candidate")
    return out


def _from_label(label: str) -> dict[str, Any]:
    import re

    m = re.fullmatch(r"(rtn|gptq)-w(\d)(?:g(\d+)|ch)(a?)", label)
    if not m:
        raise QllmConfigError(f"sensitivity candidate '{label}': write method-w<bits>g<group> or method-w<bits>ch "
                              "(a suffix 'a': asymmetric), e.g. gptq-w4g64")
    return {"method": m[1], "bits": int(m[2]), "group_size": int(m[3]) if m[3] else None, "symmetric": not m[4]}
