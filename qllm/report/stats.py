"""The report's statistics: pure functions over numbers (no MLflow, no plotting).

    recovery %      higher is better (accuracy, 0-100 score):   100 × score_quantized / score_baseline
                    lower is better (perplexity):               100 × ppl_baseline / ppl_quantized
    delta           quantized − baseline (score points, or perplexity units)
    95% CI          value ± 1.96 × stderr; delta ± 1.96 × sqrt(se_q² + se_b²) (as if independent: conservative for
                    the same items); not significant when the delta's CI contains 0
    McNemar         exact two-sided binomial test on the discordant pairs of 0/1 per-item correctness:
                    p = min(1, 2 × P(X ≤ min(b, c))), X ~ Binomial(b + c, 1/2)
    paired bootstrap percentile CI of the mean per-item difference (quantized − baseline), items resampled
    flips           lost = share of items correct at baseline and wrong quantized; gained = the reverse
    Spearman ρ      Pearson correlation of the ranks (ties get their average rank)
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

Z95 = 1.959963984540054


def _finite(x: Optional[float]) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def recovery(value: Optional[float], baseline: Optional[float], higher_is_better: bool = True) -> Optional[float]:
    """Recovery % vs the baseline (see the module docstring); None when undefined (a missing or zero value)."""
    if not (_finite(value) and _finite(baseline)):
        return None
    if higher_is_better:
        return 100.0 * value / baseline if baseline else None
    return 100.0 * baseline / value if value else None


def ci95(value: Optional[float], se: Optional[float]) -> tuple[Optional[float], Optional[float]]:
    if not (_finite(value) and _finite(se)):
        return None, None
    return value - Z95 * se, value + Z95 * se


def delta_ci(value: Optional[float], se: Optional[float], baseline: Optional[float],
             se_baseline: Optional[float]) -> dict:
    """delta, its standard error and 95% CI, and whether the CI excludes 0 (None when a stderr is missing)."""
    out = {"delta": None, "delta_se": None, "delta_lo": None, "delta_hi": None, "significant": None}
    if not (_finite(value) and _finite(baseline)):
        return out
    out["delta"] = value - baseline
    if _finite(se) and _finite(se_baseline):
        s = math.sqrt(se ** 2 + se_baseline ** 2)
        lo, hi = out["delta"] - Z95 * s, out["delta"] + Z95 * s
        out.update(delta_se=s, delta_lo=lo, delta_hi=hi, significant=not (lo <= 0.0 <= hi))
    return out


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts b (1→0) and c (0→1)."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n
    return min(1.0, 2.0 * tail)


def flips(base: Sequence[float], quant: Sequence[float]) -> dict:
    """Counts and shares of paired 0/1 items: lost (1→0), gained (0→1), both correct, both wrong."""
    b = np.asarray(base, dtype=float) > 0.5
    q = np.asarray(quant, dtype=float) > 0.5
    n = int(b.size)
    lost, gained = int(np.sum(b & ~q)), int(np.sum(~b & q))
    return {"n_pairs": n, "lost": lost, "gained": gained, "both_right": int(np.sum(b & q)),
            "both_wrong": int(np.sum(~b & ~q)),
            "lost_pct": 100.0 * lost / n if n else None, "gained_pct": 100.0 * gained / n if n else None,
            "flips_pct": 100.0 * (lost + gained) / n if n else None}


def paired_bootstrap(base: Sequence[float], quant: Sequence[float], n_boot: int = 2000, seed: int = 0,
                     chunk: int = 250) -> tuple[float, float, float]:
    """Mean of (quant − base) per item and its 95% percentile bootstrap CI (items resampled with replacement)."""
    d = np.asarray(quant, dtype=float) - np.asarray(base, dtype=float)
    n = d.size
    if n == 0:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = []
    for start in range(0, n_boot, chunk):
        m = min(chunk, n_boot - start)
        means.append(d[rng.integers(0, n, size=(m, n))].mean(axis=1))
    lo, hi = np.percentile(np.concatenate(means), [2.5, 97.5])
    return float(d.mean()), float(lo), float(hi)


def is_binary(values: Sequence[float]) -> bool:
    a = np.asarray(values, dtype=float)
    return a.size > 0 and bool(np.all((a == 0.0) | (a == 1.0)))


def ranks(values: Sequence[float]) -> np.ndarray:
    """1-based ranks, ties getting their average rank."""
    a = np.asarray(values, dtype=float)
    order = np.argsort(a, kind="mergesort")
    r = np.empty(a.size, dtype=float)
    i = 0
    while i < a.size:
        j = i
        while j + 1 < a.size and a[order[j + 1]] == a[order[i]]:
            j += 1
        r[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return r


def spearman(x: Sequence[float], y: Sequence[float]) -> tuple[Optional[float], Optional[float]]:
    """Spearman's ρ and its two-sided p-value (t approximation, n − 2 degrees of freedom); (None, None) when
    fewer than 3 pairs or a constant series."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.size < 3 or x.size != y.size:
        return None, None
    rx, ry = ranks(x), ranks(y)
    if np.std(rx) == 0 or np.std(ry) == 0:
        return None, None
    rho = float(np.corrcoef(rx, ry)[0, 1])
    n = x.size
    if abs(rho) >= 1.0:
        return rho, 0.0
    t = rho * math.sqrt((n - 2) / (1.0 - rho ** 2))
    try:
        from scipy.stats import t as t_dist

        p = float(2 * t_dist.sf(abs(t), n - 2))
    except ImportError:  # pragma: no cover - scipy comes with mlflow
        p = None
    return rho, p


def pareto_front(sizes: Sequence[float], scores: Sequence[float], higher_is_better: bool = True) -> list[int]:
    """Indices of the points no other point beats: no smaller-or-equal size with a better-or-equal score (one of
    them strictly), sorted by size."""
    pts = [(s, v if higher_is_better else -v, i) for i, (s, v) in enumerate(zip(sizes, scores))
           if _finite(s) and _finite(v)]
    front = []
    for s, v, i in pts:
        dominated = any((s2 <= s and v2 >= v) and (s2 < s or v2 > v) for s2, v2, _ in pts)
        if not dominated:
            front.append((s, i))
    return [i for _, i in sorted(front)]
