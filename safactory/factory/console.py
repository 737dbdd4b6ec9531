"""What the closed loop shows on the console: the progress bars and the final held-out table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from safactory.factory.evaluation import fmt_rate


def progress_bars(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
    )


def print_heldout_table(console: Console, summary: dict[str, Any], envs: list[str], out: Path) -> None:
    """Success / unsafe / benign success per env, at the warm start, at the end (and of the student)."""
    heldout = summary.get("heldout", {})
    table = Table(title="held-out: success / unsafe / benign success")
    table.add_column("env")
    columns = [k for k in ("warm_start", "final", "student") if k in heldout]
    for k in columns:
        table.add_column(k, justify="right")
    for name in ["overall", *envs]:
        cells = []
        for k in columns:
            m = heldout[k] if name == "overall" else heldout[k]["envs"].get(name, {})
            cells.append(
                f"{fmt_rate(m.get('success_rate', 0), 2)} / {fmt_rate(m.get('unsafe_rate', 0), 2)} / "
                f"{fmt_rate(m.get('benign_success_rate', 0), 2)}"
            )
        table.add_row(name, *cells)
    console.print(table)
    console.print(f"results in {out} (report: {out / 'report.html'})")
