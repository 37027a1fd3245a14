"""The report's MT-Bench section: every judged cell's single-answer score (1-10) per turn and category, its delta vs
the baseline (paired over (question, turn) ratings, bootstrap CI), the pairwise verdict against the baseline (win /
tie / loss, adjusted win rate with CI, position bias), parse failures; a per-category plot; and how many quantized
cells each instrument tells apart from their baseline (the study's finding 4, measured on the cells at hand)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import pandas as pd

from ..names import Tag
from .render import fmt
from .select import CellRun
from .tables import Analysis

CAPTION = ("MT-Bench per category: each judged cell's mean single-answer rating (1-10, both turns pooled, unparsed "
           "verdicts left out), by the cell's judge.")


def dialogue_tasks(an: Analysis) -> list[str]:
    keys = {k for c in an.evaluated for k, s in c.tasks.items() if s.type == "dialogue"}
    return sorted(k for k in keys if any(f"{k}/n_judgments" in c.metrics for c in an.evaluated))


def _m(c: CellRun, key: str, name: str) -> Optional[float]:
    v = c.metrics.get(f"{key}/{name}")
    return None if v is None or pd.isna(v) else float(v)


def judge_label(c: CellRun) -> str:
    """Who judged: the model (a local dir's last component), its kind, and "constrained" when its verdicts were
    decoded under the format's regex."""
    try:
        ident = json.loads(c.tags.get(Tag.JUDGE_IDENTITY) or "{}") or {}
    except ValueError:
        ident = {}
    model = str(ident.get("model") or c.params.get("judge.model", "?")).rstrip("/").rsplit("/", 1)[-1]
    extra = ", constrained verdicts" if ident.get("constrain_verdict") else ""
    return f"{model} ({ident.get('kind') or c.params.get('judge.kind', '?')}{extra})"


def _ci(lo: Optional[float], hi: Optional[float]) -> str:
    return "" if lo is None or hi is None or pd.isna(lo) else f"[{fmt(lo)}, {fmt(hi)}]"


def rows(an: Analysis, key: str) -> pd.DataFrame:
    """One row per judged cell: the numbers, raw (for the separation count and the CSV)."""
    t = an.tasks[an.tasks["task"] == key].set_index("run_id") if len(an.tasks) else pd.DataFrame()
    out = []
    for c in an.evaluated:
        if _m(c, key, "n_judgments") is None:  # not judged (judge=none): answers only
            continue
        score = _m(c, key, "score")  # None when no verdict could be parsed
        r = t.loc[c.run_id] if c.run_id in t.index else None
        judged = _m(c, key, "n_judgments") or 0.0
        row = {"model": c.model, "cell": c.label, "method": c.method, "run_id": c.run_id, "judge": judge_label(c),
               "score": score, "se": _m(c, key, "score_stderr"), "turn1": _m(c, key, "turn1"),
               "turn2": _m(c, key, "turn2"), "unparsed": _m(c, key, "parse_failures"), "n_judgments": judged}
        if r is not None and c.method != "none":
            row |= {"delta": r.get("paired_delta"), "delta_lo": r.get("paired_lo"), "delta_hi": r.get("paired_hi")}
        for name in ("win", "tie", "loss", "win_rate_adjusted", "win_rate_adjusted_ci_lo", "win_rate_adjusted_ci_hi",
                     "position_bias", "first_shown_wins", "errors", "n_matches"):
            row[f"pw_{name}"] = _m(c, key, f"pairwise/{name}")
        out.append(row)
    return pd.DataFrame(out)


def view(df: pd.DataFrame) -> pd.DataFrame:
    def num(col: str) -> list:
        return [fmt(v) if v is not None and not pd.isna(v) else "" for v in df.get(col, [None] * len(df))]

    return pd.DataFrame({
        "model": df["model"], "cell": df["cell"], "judge": df["judge"],
        "score (1-10)": [fmt(v) if v is not None and not pd.isna(v) else "none parsed" for v in df["score"]],
        "95% CI": [_ci(s - 1.96 * e, s + 1.96 * e) if e is not None and not pd.isna(e) else ""
                   for s, e in zip(df["score"], df["se"])],
        "turn 1": num("turn1"), "turn 2": num("turn2"),
        "Δ vs baseline [95% CI]": [f"{fmt(d)} {_ci(a, b)}" if d is not None and not pd.isna(d) else ""
                                   for d, a, b in zip(df.get("delta", [None] * len(df)),
                                                      df.get("delta_lo", [None] * len(df)),
                                                      df.get("delta_hi", [None] * len(df)))],
        "unparsed": [f"{int(u)}/{int(n)}" for u, n in zip(df["unparsed"].fillna(0), df["n_judgments"])],
        "win / tie / loss": ["" if pd.isna(w) else f"{fmt(w)} / {fmt(t)} / {fmt(lo)}"
                             for w, t, lo in zip(df["pw_win"], df["pw_tie"], df["pw_loss"])],
        "adj. win rate [95% CI]": ["" if pd.isna(w) else f"{fmt(w)} {_ci(a, b)}" for w, a, b in
                                   zip(df["pw_win_rate_adjusted"], df["pw_win_rate_adjusted_ci_lo"],
                                       df["pw_win_rate_adjusted_ci_hi"])],
        "position bias": num("pw_position_bias"), "first shown wins": num("pw_first_shown_wins"),
        "pairwise unparsed": ["" if pd.isna(e) else f"{int(e)}/{int(e + n)}"
                              for e, n in zip(df["pw_errors"], df["pw_n_matches"].fillna(0))],
    })


def separation(df: pd.DataFrame) -> str:
    """How many quantized cells each instrument tells apart from their baseline at 95%: the single score when the
    paired delta's CI excludes 0, the pairwise verdict when the adjusted win rate's CI excludes 0.5."""
    q = df[df["method"] != "none"]
    single = q.dropna(subset=["delta_lo"]) if "delta_lo" in q else q.iloc[0:0]
    pair = q.dropna(subset=["pw_win_rate_adjusted_ci_lo"])
    n_single = int(((single["delta_lo"] > 0) | (single["delta_hi"] < 0)).sum()) if len(single) else 0
    n_pair = int(((pair["pw_win_rate_adjusted_ci_lo"] > 0.5) | (pair["pw_win_rate_adjusted_ci_hi"] < 0.5)).sum())
    return (f"Told apart from their baseline at 95%: the single score separates {n_single} of {len(single)} "
            f"quantized cell(s) (paired Δ CI excludes 0); the pairwise verdict {n_pair} of {len(pair)} (adjusted "
            "win rate CI excludes 0.5). With few questions both CIs are wide: a weak or small run separates little.")


def categories_plot(an: Analysis, key: str, out: Path) -> list[tuple[str, str]]:
    import matplotlib.pyplot as plt
    import numpy as np

    from ..names import method_color
    from .plots import STYLE, _save

    cells = [c for c in an.evaluated if _m(c, key, "score") is not None]
    if not cells:
        return []
    cats = sorted({name.split("/")[1] for c in cells for name in c.metrics
                   if name.startswith(f"{key}/") and name.endswith("/score") and name.count("/") == 2})
    if not cats:
        return []
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(cats) + 2), 3.6), layout="constrained")
        width = 0.8 / len(cells)
        x = np.arange(len(cats))
        for i, c in enumerate(cells):
            values = [c.metrics.get(f"{key}/{cat}/score", np.nan) for cat in cats]
            ax.bar(x + (i - (len(cells) - 1) / 2) * width, values, width, label=c.full_label,
                   color=method_color(c.method), alpha=0.55 + 0.45 * (i % 2), edgecolor="black", linewidth=0.4)
        ax.set(xticks=x, xticklabels=cats, ylim=(0, 10.5), ylabel="mean rating (1-10)",
               title=f"{key}: single-answer rating per category")
        ax.legend(loc="upper right", fontsize=7)
        return [(_save(fig, out, f"{key}_categories.png"), CAPTION)]


def section(an: Analysis, out: Path) -> list[tuple[str, pd.DataFrame, str, list[tuple[str, str]]]]:
    """[(task, table, separation note, [(png, caption)])] for every judged dialogue task of the selection."""
    res = []
    for key in dialogue_tasks(an):
        df = rows(an, key)
        if len(df):
            df.to_csv(out.parent / f"{key}.csv", index=False)
            res.append((key, view(df), separation(df), categories_plot(an, key, out)))
    return res
