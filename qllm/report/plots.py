"""The report's figures (matplotlib, one style): colour-blind-safe Okabe-Ito colours per method, one marker per
model, labelled axes with units. Each function returns a list of (file name, caption) written under `out`, or a
note saying why the figure was skipped."""

from __future__ import annotations

import math
from pathlib import Path
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ..names import method_color  # noqa: E402  (fixed per method: the same in every report)
from . import stats  # noqa: E402
from .tables import Analysis, size_gb  # noqa: E402

MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
STYLE = {"figure.dpi": 100, "savefig.dpi": 150, "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9,
         "legend.fontsize": 8, "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False,
         "axes.spines.right": False, "savefig.bbox": "tight", "font.family": "DejaVu Sans"}
LOST, GAINED = "#D55E00", "#009E73"

# figure captions, as the report prints them under each figure
CAPTIONS = {
    "accuracy_vs_bits": "Accuracy vs bits: one line per model and method, one panel per task type (mean over the "
                        "type's tasks); dashed line: the same model's unquantized baseline.",
    "iso_memory": "Iso-memory: each cell's score vs its size in GB (size/disk_gb; hollow = estimated), all models and "
                  "methods; ringed points joined by the dotted step line form the Pareto front (no smaller model "
                  "scores higher).",
    "ppl_vs_accuracy": "Perplexity vs accuracy: one point per cell; ρ is Spearman's rank correlation across the cells "
                       "(negative: lower perplexity goes with higher accuracy).",
    "flips": "Flips: share of items whose correctness changes vs the same model's baseline; left: lost (right → "
             "wrong), right: gained (wrong → right). A small net delta can hide many flips.",
    "cost": "Accuracy vs cost: {ylabel} against decode speed and peak memory where measured (hf backend: dense "
            "speed).",
    "difficulty": "{model}: quantization cost per difficulty bucket = baseline − quantized score on the primary "
                  "metric (points; above 0: the quantized model does worse).",
}

Result = tuple[list[tuple[str, str]], list[str]]  # ([(png name, caption)], [notes on what was skipped])


class Markers:
    def __init__(self, models):
        self.of = {m: MARKERS[i % len(MARKERS)] for i, m in enumerate(sorted(set(models)))}

    def __call__(self, model: str) -> str:
        return self.of.get(model, "o")


def _grid(n: int, ncols: int = 3, w: float = 4.2, h: float = 3.4):
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(w * ncols, h * nrows), squeeze=False, layout="constrained")
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _save(fig, out: Path, name: str) -> str:
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / name)
    plt.close(fig)
    return name


def _finish(fig, handles: dict, title: str, out: Path, figure: str, file: str = "",
            **fmt: str) -> list[tuple[str, str]]:
    """The legend below the panels, the title, the PNG written (`<figure>.png` unless `file`): [(its file name, its
    caption CAPTIONS[figure] filled with `fmt`)]."""
    _legend_below(fig, handles)
    fig.suptitle(title)
    return [(_save(fig, out, file or f"{figure}.png"), CAPTIONS[figure].format(**fmt))]


def _ylabel(unit: str, higher: bool) -> str:
    if unit.startswith("rating"):
        return "judge's rating (1-10, higher is better)"
    return "score (0-100, higher is better)" if unit.startswith("score") else f"{unit} (lower is better)"


def _legend_below(fig, handles: dict) -> None:
    if handles:
        fig.legend(list(handles.values()), list(handles.keys()), loc="outside lower center",
                   ncol=min(len(handles), 4), frameon=False)


def _plain_log_ticks(axis) -> None:
    """A log axis labelled 0.6, 1, 2 rather than 6×10⁻¹."""
    fmt = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    axis.set_major_formatter(fmt)
    axis.set_minor_formatter(fmt)


def _who(model: str, method: str) -> str:
    return f"{model} · {'baseline' if method == 'none' else method}"


def accuracy_vs_bits(an: Analysis, out: Path) -> Result:
    t = an.tasks
    if not len(t) or not (t["method"] != "none").any() or t["value"].isna().all():
        return [], ["accuracy vs bits: no quantized cell with a score"]
    bits_of = {c.run_id: (c.baseline_bits if c.is_baseline else c.bits_value) for c in an.evaluated}
    t = t[t["value"].notna()]
    types = sorted(t["type"].unique(), key=lambda s: (s == "perplexity", s))
    with plt.rc_context(STYLE):
        fig, axes = _grid(len(types))
        mk, handles = Markers(t["model"]), {}
        for ax, typ in zip(axes, types):
            tt = t[t["type"] == typ]
            # a cell's score on this type: the mean over the type's tasks that every cell in the panel has
            common = set.intersection(*[set(g["task"]) for _, g in tt.groupby("run_id")])
            tt = tt[tt["task"].isin(common)]
            per_cell = tt.groupby("run_id").agg(value=("value", "mean"), model=("model", "first"),
                                                method=("method", "first"), unit=("unit", "first"))
            per_cell["bits"] = [bits_of.get(r) for r in per_cell.index]
            xs = set()
            for (model, method), g in per_cell.groupby(["model", "method"]):
                g = g.dropna(subset=["bits"]).sort_values("bits")
                xs |= set(g["bits"])
                if method == "none":
                    for _, r in g.iterrows():
                        ax.axhline(r["value"], color=method_color("none"), ls="--", lw=1, alpha=0.7)
                        h, = ax.plot([r["bits"]], [r["value"]], marker=mk(model), color=method_color("none"), ls="none",
                                     ms=7)
                        ax.annotate("base", (r["bits"], r["value"]), textcoords="offset points", xytext=(4, 4),
                                    fontsize=7)
                        handles[f"{model} · baseline"] = h
                    continue
                h, = ax.plot(g["bits"], g["value"], marker=mk(model), color=method_color(method), lw=1.5, ms=6)
                handles[f"{model} · {method}"] = h
            unit = per_cell["unit"].iloc[0] if len(per_cell) else "score"
            ax.set_xscale("log", base=2)
            ax.set(xticks=sorted(xs), xticklabels=[f"{x:g}" for x in sorted(xs)], ylabel=_ylabel(unit, True),
                   xlabel="weight bits (baseline at its dtype's bits)",
                   title=f"{typ}: {', '.join(sorted(common))}" if len(common) < 4 else f"{typ} ({len(common)} tasks)")
        return _finish(fig, handles, "Accuracy vs weight bits, per task type", out, "accuracy_vs_bits"), []


def iso_memory(an: Analysis, out: Path) -> Result:
    t = an.tasks
    if not len(t):
        return [], ["iso-memory: no evaluated task"]
    size = {c.run_id: size_gb(c) for c in an.evaluated}
    t = t.assign(size_gb=[size.get(r, (None, ""))[0] for r in t["run_id"]],
                 estimated=[size.get(r, (None, ""))[1] != "size/disk_gb" for r in t["run_id"]])
    t = t.dropna(subset=["size_gb", "value"])
    tasks = [k for k, g in t.groupby("task") if len(g) >= 2]
    if not tasks:
        return [], ["iso-memory: fewer than two cells with a size and a score"]
    notes = ["iso-memory: sizes estimated from model.params_b where size/disk_gb is missing (hollow markers)"] \
        if t["estimated"].any() else []
    with plt.rc_context(STYLE):
        fig, axes = _grid(len(tasks))
        mk, handles = Markers(t["model"]), {}
        for ax, task in zip(axes, tasks):
            g = t[t["task"] == task].reset_index(drop=True)
            higher = bool(g["higher_is_better"].iloc[0])
            for _, r in g.iterrows():
                c = method_color(r["method"])
                h = ax.scatter(r["size_gb"], r["value"], marker=mk(r["model"]), s=40, zorder=3,
                               facecolors="none" if r["estimated"] else c, edgecolors=c, linewidths=1.2)
                handles.setdefault(_who(r["model"], r["method"]), h)
                ax.annotate(_point_label(r), (r["size_gb"], r["value"]),
                            textcoords="offset points", xytext=(4, 3), fontsize=7)
            front = stats.pareto_front(g["size_gb"].tolist(), g["value"].tolist(), higher)
            if front:
                f = g.loc[front]
                ax.step(f["size_gb"], f["value"], where="post", color="#555555", ls=":", lw=1.2, zorder=2)
                h = ax.scatter(f["size_gb"], f["value"], s=140, facecolors="none", edgecolors="#555555", lw=1,
                               zorder=2)
                handles["Pareto front"] = h
            notes += _mixed_vs_front(g, task, higher)
            ax.set_xscale("log")
            _plain_log_ticks(ax.xaxis)
            ax.set_xlabel("model size (GB, log scale)")
            ax.set_ylabel(_ylabel(g["unit"].iloc[0], higher))
            ax.set_title(task)
        return _finish(fig, handles, "Iso-memory: score vs model size", out, "iso_memory"), notes


def _point_label(r) -> str:
    """A point's tag: "base", "w4", or a mixed cell's budget and candidates (the part of its label after the method)."""
    if r["method"] == "none":
        return "base"
    return r["cell"].split(" · ", 1)[1] if r["method"] == "mixed" else f"w{r['bits']}"


def _mixed_vs_front(g, task: str, higher: bool) -> list[str]:
    """Each method=mixed cell against the Pareto front of the same model's uniform cells: the best uniform score at
    a size no larger than the mixed cell's (the step the front draws), and by how much it is met or missed."""
    notes = []
    for _, r in g[g["method"] == "mixed"].iterrows():
        uniform = g[(g["method"] != "mixed") & (g["model"] == r["model"]) & (g["size_gb"] <= r["size_gb"])]
        if not len(uniform):
            notes.append(f"iso-memory {task}: {r['cell']} is smaller than every uniform cell of {r['model']} "
                         "(on the front by construction)")
            continue
        best = uniform["value"].max() if higher else uniform["value"].min()
        margin = (r["value"] - best) if higher else (best - r["value"])
        where = "on or above" if margin >= 0 else "below"
        notes.append(f"iso-memory {task}: {r['cell']} ({r['size_gb']:.4g} GB, {r['value']:.4g}) is {where} the "
                     f"uniform cells' Pareto front (best uniform at <= its size: {best:.4g}; margin {margin:+.4g}, "
                     f"{'higher' if higher else 'lower'} is better)")
    return notes


def ppl_vs_accuracy(an: Analysis, out: Path) -> Result:
    cor = an.correlations
    if not len(cor):
        return [], ["perplexity vs accuracy: no perplexity task or no scored task"]
    cor = cor[(cor["kind"] == "values") & (cor["n"] >= 2)]
    if not len(cor):
        return [], ["perplexity vs accuracy: fewer than two cells with both a perplexity and a score"]
    t = an.tasks
    with plt.rc_context(STYLE):
        fig, axes = _grid(len(cor))
        mk, handles = Markers(t["model"]), {}
        for ax, (_, row) in zip(axes, cor.iterrows()):
            p = t[t["task"] == row["perplexity_task"]].set_index("run_id")
            a = t[t["task"] == row["task"]].set_index("run_id")
            common = p.index.intersection(a.index)
            for rid in common:
                h = ax.scatter(p.loc[rid, "value"], a.loc[rid, "value"], color=method_color(a.loc[rid, "method"]),
                               marker=mk(a.loc[rid, "model"]), s=40, zorder=3)
                handles.setdefault(_who(a.loc[rid, "model"], a.loc[rid, "method"]), h)
            rho = "n/a" if row["spearman_rho"] is None or pd.isna(row["spearman_rho"]) else f"{row['spearman_rho']:.2f}"
            ax.set_title(f"{row['task']}  (Spearman ρ = {rho}, n = {row['n']})")
            ax.set_xscale("log")
            _plain_log_ticks(ax.xaxis)
            ax.set_xlabel(f"{row['perplexity_task']} {p['unit'].iloc[0]} (log scale, lower is better)")
            ax.set_ylabel(_ylabel(a["unit"].iloc[0], True))
        return _finish(fig, handles, "Perplexity vs accuracy across cells", out, "ppl_vs_accuracy"), []


def difficulty(an: Analysis, out: Path, max_buckets: int = 30) -> Result:
    d = an.difficulty
    if not len(d):
        return [], ["difficulty: no quantized cell with difficulty buckets and a baseline"]
    files, notes = [], []
    for model, dm in d.groupby("model"):
        # tasks with one bucket each (ARC-Easy `easy`, ARC-Challenge `challenge`) share a panel
        n_buckets = dm.groupby("task")["bucket"].nunique()
        single = dm[dm["task"].isin(n_buckets[n_buckets == 1].index)]
        panels = ([("tasks with one bucket", single.assign(x=single["task"] + ": " + single["bucket"]))]
                  if len(single) else [])
        for task in n_buckets[n_buckets > 1].index:
            g = dm[dm["task"] == task]
            order = g.groupby("bucket")["cost_points"].mean().sort_values(ascending=False)
            if len(order) > max_buckets:
                notes.append(f"difficulty: {model} {task}: the {max_buckets} costliest of {len(order)} buckets shown")
                g = g[g["bucket"].isin(order.index[:max_buckets])]
            panels.append((task, g.assign(x=g["bucket"])))
        with plt.rc_context(STYLE):
            fig, axes = _grid(len(panels), ncols=1, w=max(6.0, 0.5 * max(p[1]["x"].nunique() for p in panels) + 3),
                              h=3.2)
            handles = {}
            for ax, (title, g) in zip(axes, panels):
                xs = list(dict.fromkeys(g.sort_values("cost_points", ascending=False)["x"]))
                cells = list(dict.fromkeys(g.sort_values(["method", "bits"])["cell"]))
                width = 0.8 / max(1, len(cells))
                for i, cell in enumerate(cells):
                    gc = g[g["cell"] == cell].set_index("x")
                    method = gc["method"].iloc[0]
                    ys = [gc.loc[x, "cost_points"] if x in gc.index else np.nan for x in xs]
                    bits = str(gc["bits"].iloc[0])
                    h = ax.bar(np.arange(len(xs)) + (i - (len(cells) - 1) / 2) * width, ys, width,
                               color=method_color(method), hatch="//" if bits not in ("4", "3", "2") else None,
                               edgecolor="white", lw=0.5)
                    handles.setdefault(cell, h)
                ax.axhline(0, color="black", lw=0.8)
                ax.set_xticks(np.arange(len(xs)))
                ax.set_xticklabels(xs, rotation=30 if len(xs) > 4 else 0, ha="right" if len(xs) > 4 else "center")
                ax.set_ylabel("cost (points lost vs baseline)")
                ax.set_title(title)
            safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in model)
            files += _finish(fig, handles, f"{model}: quantization cost by difficulty bucket", out, "difficulty",
                             f"difficulty_{safe}.png", model=model)
    return files, notes


def flips(an: Analysis, out: Path) -> Result:
    t = an.tasks
    if not len(t) or "flips_pct" not in t or t["flips_pct"].isna().all():
        return [], ["flips: no paired 0/1 per-sample results (per_sample files of a quantized cell and its baseline)"]
    t = t.dropna(subset=["flips_pct"])
    tasks = sorted(t["task"].unique())
    with plt.rc_context(STYLE):
        n_rows = max(len(g) for _, g in t.groupby("task"))
        fig, axes = _grid(len(tasks), ncols=2, w=5.5, h=max(2.4, 0.35 * n_rows + 1.2))
        for ax, task in zip(axes, tasks):
            g = t[t["task"] == task].sort_values(["model", "method", "bits"])
            labels = [f"{m} · {c}" for m, c in zip(g["model"], g["cell"])]
            y = np.arange(len(g))
            ax.barh(y, -g["lost_pct"], color=LOST, label="lost: right at baseline, wrong quantized")
            ax.barh(y, g["gained_pct"], color=GAINED, label="gained: wrong at baseline, right quantized")
            for yi, (lp, gp, fp) in enumerate(zip(g["lost_pct"], g["gained_pct"], g["flips_pct"])):
                ax.annotate(f"{fp:.1f}% flip", (max(gp, 0), yi), textcoords="offset points", xytext=(4, -3),
                            fontsize=7)
            ax.axvline(0, color="black", lw=0.8)
            ax.set(yticks=y, yticklabels=labels, title=task,
                   xlabel="items changing correctness vs baseline (% of items)")
            lim = max(1.0, float(np.nanmax(np.r_[g["lost_pct"], g["gained_pct"]])) * 1.4)
            ax.set_xlim(-lim, lim)
        legend = {"lost (right → wrong)": plt.Rectangle((0, 0), 1, 1, color=LOST),
                  "gained (wrong → right)": plt.Rectangle((0, 0), 1, 1, color=GAINED)}
        return _finish(fig, legend, "Flips vs baseline, per task", out, "flips"), []


def cost(an: Analysis, out: Path) -> Result:
    s = an.summary
    if not len(s):
        return [], ["cost vs speed/memory: no evaluated cell"]
    axes_spec = [(col, label) for col, label in (("decode_tok_s", "decode speed, batch 1 (tokens/s)"),
                                                 ("peak_rss_gb", "evaluate stage peak RSS (GB)"))
                 if s[col].notna().any()]
    if not axes_spec:
        return [], ["cost vs speed/memory: no speed/bs1/decode_tok_s or mem/evaluate/peak_rss_gb logged"]
    ycol = "mean_recovery_pct" if s["mean_recovery_pct"].notna().sum() >= 1 else "suite_score"
    if s[ycol].isna().all():
        return [], ["cost vs speed/memory: no score to plot"]
    ylabel = "mean recovery over scored tasks (%)" if ycol == "mean_recovery_pct" else "suite score (0-100)"
    with plt.rc_context(STYLE):
        fig, axes = _grid(len(axes_spec))
        mk, handles = Markers(s["model"]), {}
        for ax, (col, label) in zip(axes, axes_spec):
            g = s.dropna(subset=[col, ycol])
            for _, r in g.iterrows():
                h = ax.scatter(r[col], r[ycol], color=method_color(r["method"]), marker=mk(r["model"]), s=40)
                handles.setdefault(_who(r["model"], r["method"]), h)
                ax.annotate(_point_label(r), (r[col], r[ycol]),
                            textcoords="offset points", xytext=(4, 3), fontsize=7)
            ax.set_xlabel(label)
            ax.set_ylabel(ylabel)
        return _finish(fig, handles, "Accuracy vs cost", out, "cost", ylabel=ylabel), []


ALL = [("Accuracy vs bits", accuracy_vs_bits), ("Iso-memory", iso_memory), ("Perplexity vs accuracy", ppl_vs_accuracy),
       ("Difficulty", difficulty), ("Flips", flips), ("Cost vs speed and memory", cost)]


def make_all(an: Analysis, out: Path) -> list[tuple[str, list[tuple[str, str]], list[str]]]:
    """Every figure: [(section title, [(png, caption)], [notes])]. A figure that fails is reported, not fatal."""
    res = []
    for title, fn in ALL:
        try:
            files, notes = fn(an, out)
        except Exception as e:  # noqa: BLE001 - one broken plot must not lose the report
            plt.close("all")
            files, notes = [], [f"{title}: not drawn ({type(e).__name__}: {e})"]
        res.append((title, files, notes))
    return res
