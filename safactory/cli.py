"""The `safactory` command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Safactory: simulate, store, train, redeploy.")


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="YAML run file, e.g. examples/arith.yaml")],
    out: Annotated[Path, typer.Option("--out", help="Run directory (store, metrics, summary)")] = Path("runs/latest"),
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a config field: key.path=value")] = None,
) -> None:
    """Run the closed loop: evaluate, warm-start, reinforce, redeploy; results land in OUT."""
    from safactory.config import load_config
    from safactory.loop import Factory

    try:
        cfg = load_config(config, set_ or [])
    except Exception as exc:
        raise typer.BadParameter(str(exc)) from exc
    Factory(cfg, out).run()


@app.command()
def envs() -> None:
    """List the registered environments with their version, tools and splits."""
    from safactory.sim.env import default_registry

    registry = default_registry()
    table = Table(title="environments")
    for col in ("id", "version", "tools", "splits", "max turns"):
        table.add_column(col)
    for env_id in registry.ids():
        spec = registry.get(env_id).spec
        if spec is None:
            table.add_row(env_id, "?", "", "", "")
            continue
        tools = ", ".join(t.name for t in spec.tools)
        table.add_row(spec.id, spec.version, tools, ", ".join(spec.splits), str(spec.max_turns))
    Console().print(table)


def main() -> None:
    app()
