"""The sensitivity table as a figure: one panel per candidate, transformer blocks down, projection types across,
colour = SQNR in dB (darker = more damage when that layer alone is quantized). Every panel shares one colour scale,
so candidates compare by eye; a layer outside the blocks (lm_head, when quantized) has its own row at the bottom."""

from __future__ import annotations

import math
from pathlib import Path

from .analysis import PROJECTIONS, Table, block_and_projection


def grid(table: Table, label: str) -> tuple[list[str], list[str], list[list[float]]]:
    """(row names, column names, SQNR dB per cell, NaN where a block lacks that projection) of one candidate."""
    cells = {block_and_projection(layer): v[label] for layer, v in table.sqnr.items()}
    blocks = sorted({b for b, _ in cells if b >= 0})
    extra = sorted({p for b, p in cells if b < 0})
    cols = [p for p in PROJECTIONS if any(q == p for _, q in cells)] + \
        sorted({p for b, p in cells if b >= 0 and p not in PROJECTIONS})
    rows = [str(b) for b in blocks] + extra
    values = [[cells.get((b, p), math.nan) for p in cols] for b in blocks]
    values += [[cells.get((-1, name), math.nan) if p == cols[0] else math.nan for p in cols] for name in extra]
    return rows, cols, values


def render(table: Table, out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = list(next(iter(table.sqnr.values())))
    ncols = min(3, len(labels))
    nrows = math.ceil(len(labels) / ncols)
    finite = [v for row in table.sqnr.values() for v in row.values() if math.isfinite(v)]
    vmin, vmax = min(finite), max(finite)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 0.16 * len(grid(table, labels[0])[0]) * nrows + 2),
                             squeeze=False, layout="constrained")
    image = None
    for ax, label in zip(axes.flat, labels):
        rows, cols, values = grid(table, label)
        image = ax.imshow(np.array(values, dtype=float), aspect="auto", cmap="magma", vmin=vmin, vmax=vmax)
        ax.set_title(label, fontsize=9)
        ax.set_xticks(range(len(cols)), [c.replace("_proj", "") for c in cols], fontsize=7, rotation=45)
        ax.set_yticks(range(len(rows)), rows, fontsize=6)
        ax.set_ylabel("block", fontsize=8)
    for ax in list(axes.flat)[len(labels):]:
        ax.set_visible(False)
    fig.colorbar(image, ax=axes, label="SQNR of the layer's output, dB (lower: more sensitive)", shrink=0.6)
    fig.suptitle(title, fontsize=10)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
