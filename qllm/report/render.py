"""One document, two renderings: Markdown (plots as files beside it) and a self-contained HTML page (plots embedded
as base64 PNG)."""

from __future__ import annotations

import base64
import html
import math
import re
from pathlib import Path
from typing import Any, Optional

import pandas as pd

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{border-bottom:2px solid #0072B2;padding-bottom:.2em} h2{margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.85em;display:block;overflow-x:auto}
th,td{border:1px solid #ddd;padding:.25em .5em;white-space:nowrap}
th{background:#f3f6f9;text-align:left} td.num{text-align:right} td.txt{text-align:left}
tr:nth-child(even) td{background:#fafafa}
figure{margin:1em 0} figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.85em;color:#555} code{background:#f3f3f3;padding:0 .2em}
.missing li{color:#8a3b00} .note{color:#555;font-size:.9em}
"""


def fmt(v: Any, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if abs(v) >= 1e5:
            return f"{v:,.0f}"
        if v != 0 and abs(v) < 10 ** -digits:
            return f"{v:.2e}"
        return f"{v:.{digits}f}"
    try:
        if pd.isna(v):
            return ""
    except (TypeError, ValueError):
        pass
    return str(v)


class Doc:
    def __init__(self, title: str):
        self.title = title
        self.blocks: list[tuple[str, Any]] = []

    def h(self, text: str, level: int = 2) -> None:
        self.blocks.append(("h", (level, text)))

    def p(self, text: str, cls: str = "") -> None:
        self.blocks.append(("p", (text, cls)))

    def ul(self, items: list[str], cls: str = "") -> None:
        if items:
            self.blocks.append(("ul", (items, cls)))

    def table(self, df: pd.DataFrame, caption: str = "") -> None:
        self.blocks.append(("table", (df, caption)))

    def img(self, path: Path, caption: str) -> None:
        self.blocks.append(("img", (path, caption)))

    # Markdown -----------------------------------------------------------------------------------------------------
    def markdown(self, base: Path) -> str:
        out = [f"# {self.title}", ""]
        for kind, b in self.blocks:
            if kind == "h":
                out += ["#" * b[0] + " " + b[1], ""]
            elif kind == "p":
                out += [b[0], ""]
            elif kind == "ul":
                out += [f"- {i}" for i in b[0]] + [""]
            elif kind == "table":
                df, caption = b
                if caption:
                    out += [f"*{caption}*", ""]
                out += [_md_table(df), ""]
            elif kind == "img":
                path, caption = b
                out += [f"![{caption}]({path.relative_to(base).as_posix()})", "", f"*{caption}*", ""]
        return "\n".join(out)

    # HTML ---------------------------------------------------------------------------------------------------------
    def html(self) -> str:
        e = html.escape
        out = ["<!doctype html>", "<html lang='en'><head><meta charset='utf-8'>",
               f"<title>{e(self.title)}</title><style>{CSS}</style></head><body>", f"<h1>{e(self.title)}</h1>"]
        for kind, b in self.blocks:
            if kind == "h":
                out.append(f"<h{b[0]}>{_inline(b[1])}</h{b[0]}>")
            elif kind == "p":
                out.append(f"<p class='{b[1]}'>{_inline(b[0])}</p>")
            elif kind == "ul":
                out.append(f"<ul class='{b[1]}'>" + "".join(f"<li>{_inline(i)}</li>" for i in b[0]) + "</ul>")
            elif kind == "table":
                df, caption = b
                out.append(_html_table(df, caption))
            elif kind == "img":
                path, caption = b
                data = base64.b64encode(Path(path).read_bytes()).decode()
                out.append(f"<figure><img src='data:image/png;base64,{data}' alt='{e(caption)}' "
                           f"data-name='{e(Path(path).name)}'><figcaption>{_inline(caption)}</figcaption></figure>")
        out.append("</body></html>")
        return "\n".join(out)


def _md_cell(v: Any) -> str:
    return fmt(v).replace("|", "\\|").replace("\n", " ")


def _md_table(df: pd.DataFrame) -> str:
    if not len(df):
        return "(none)"
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(_md_cell(v) for v in row) + " |")
    return "\n".join(lines)


def _inline(text: str) -> str:
    """Escape, then render `code` spans and **bold**, the only Markdown the report's prose uses."""
    s = html.escape(text)
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", s)


def _td(v: Any) -> str:
    """A cell: numbers (and CIs, percentages) right-aligned, text left-aligned."""
    text = fmt(v)
    numeric = isinstance(v, (int, float)) or bool(re.match(r"^[-+\[]?\d", text))
    return f"<td class='{'num' if numeric else 'txt'}'>{html.escape(text)}</td>"


def _html_table(df: pd.DataFrame, caption: Optional[str]) -> str:
    if not len(df):
        return "<p class='note'>(none)</p>"
    e = html.escape
    head = "".join(f"<th>{e(str(c))}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(_td(v) for v in row) + "</tr>" for row in df.itertuples(index=False))
    cap = f"<caption style='caption-side:top;text-align:left'>{_inline(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
