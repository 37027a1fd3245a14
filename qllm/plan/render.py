"""Plans as one rich table: cell × stage × estimated peak per device × devices × launch × fits/refused."""

from __future__ import annotations

from typing import Any, Sequence, Union

from .cells import CellPlan

Invalid = tuple[str, str]  # (cell name or overrides, why planning refused it)


def table(plans: Sequence[Union[CellPlan, Invalid]]) -> Any:
    from rich.table import Table

    clusters = {p.cluster.describe() for p in plans if isinstance(p, CellPlan)}
    title = "memory plan" + (f" · {clusters.pop()}" if len(clusters) == 1 else "")
    t = Table(title=title, title_justify="left", show_lines=True)
    for col in ("cell", "stage", "peak / device (GB)", "devices", "launch", "plan", "breakdown / why"):
        t.add_column(col, justify="right" if col in ("peak / device (GB)", "devices") else "left",
                     overflow="fold")
    for p in plans:
        if not isinstance(p, CellPlan):
            name, why = p
            t.add_row(name, "—", "", "", "", "[red]invalid[/red]", why)
            continue
        for i, s in enumerate(p.stages):
            peak = f"{s.peak_gb:,.1f}"
            if s.reserved_gb is not None:
                peak += f" (reserves {s.reserved_gb:,.0f})"
            devices = f"{s.devices} × {s.device}"
            launch = s.launch + (f"\n[dim]{' '.join(s.needs)}[/dim]" if s.needs else "")
            if not s.fits and s.stage == "evaluate":
                launch = f"none fits\n[dim]closest: {s.launch}[/dim]"
            verdict = "[green]fits[/green]" if s.fits else "[red]refused[/red]"
            detail = s.per_device.describe()
            if s.host is not None:
                detail += f"\nhost RAM {s.host.total:,.1f} of {s.host_capacity_gb:,.0f} GB: {s.host.describe(3)}"
            if s.note:
                detail += f"\n[dim]{s.note}[/dim]"
            if s.refusal:
                detail = f"{s.refusal}\n[dim]{detail}[/dim]"
            elif i == len(p.stages) - 1 and p.assumptions:
                detail += f"\n[dim]{p.assumptions}[/dim]"
            t.add_row(p.name if i == 0 else "", s.stage, peak, devices, launch, verdict, detail)
    return t


def render(plans: Sequence[Union[CellPlan, Invalid]], width: int = 160) -> str:
    """The table as text (what `qllm plan` prints)."""
    from rich.console import Console

    console = Console(width=width, record=True, file=_Null())
    console.print(table(plans))
    return console.export_text()


class _Null:
    def write(self, _: str) -> int:
        return 0

    def flush(self) -> None:
        pass
