"""The `safactory eval` commands: run a suite, compare two evaluations, export one to inspect."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

RawOption = Annotated[
    bool, typer.Option("--raw", help="Keep secrets and personal data as they are (default: redacted)")
]
# where the episodes run (`--executor ray`: Ray rollout-worker actors; see docs/scaling.md)
ExecutorOption = Annotated[
    str, typer.Option("--executor", help="local (this process) | ray (rollout-worker actors play and store)")
]
RayAddressOption = Annotated[
    str | None, typer.Option("--ray-address", help="executor ray: the cluster (HOST:PORT; default: Ray started here)")
]
WorkersOption = Annotated[int, typer.Option("--workers-per-node", min=1, help="executor ray: workers per node")]
CpusOption = Annotated[float, typer.Option("--cpus-per-worker", min=0.0, help="executor ray: CPUs per worker")]

eval_app = typer.Typer(
    help="Evaluate a policy on a suite (metrics with 95% intervals), or compare two evaluations. "
    "With --executor ray the episodes run on Ray rollout-worker actors (docs/scaling.md)."
)


@eval_app.callback(invoke_without_command=True)
def eval_suite(
    ctx: typer.Context,
    policy: Annotated[
        str | None, typer.Option(help="scripted | smollm2 | a saved model directory | openai:<base_url>#<model>")
    ] = None,
    suite: Annotated[str, typer.Option(help="core | safety | risk:NAME | a suite YAML file")] = "core",
    out: Annotated[Path | None, typer.Option("--out", help="Where eval.json and report.html go")] = None,
    db: Annotated[str | None, typer.Option("--db", help="Store URL or file (default: OUT/store.db)")] = None,
    epochs: Annotated[int, typer.Option(help="Attempts per task (K of pass@K); 1 is greedy")] = 1,
    temperature: Annotated[float, typer.Option(help="Sampling temperature when epochs > 1")] = 0.7,
    max_tokens: Annotated[int, typer.Option(help="Generated-token limit per turn")] = 64,
    seed: Annotated[int, typer.Option(help="Seed")] = 0,
    device: Annotated[str, typer.Option(help="Where a model policy runs: cpu, cuda, auto")] = "cpu",
    dtype: Annotated[str, typer.Option(help="Weights dtype of a model policy: auto, float32, bfloat16")] = "auto",
    raw: RawOption = False,
    inspect: Annotated[
        bool, typer.Option("--inspect", help="Also write an inspect_ai log (OUT/inspect/*.eval) for `inspect view`")
    ] = False,
    executor: ExecutorOption = "local",
    ray_address: RayAddressOption = None,
    workers_per_node: WorkersOption = 1,
    cpus_per_worker: CpusOption = 1.0,
) -> None:
    """safactory eval --policy P --suite S --out DIR: run the suite, store the episodes, write the metrics.

    With --executor ray (and --ray-address) the episodes are played and stored by Ray rollout workers,
    then read back and scored here as with the local executor; give a --db every node reaches (PostgreSQL).
    """
    if ctx.invoked_subcommand is not None:
        return
    if policy is None or out is None:
        raise typer.BadParameter("give --policy and --out (or: safactory eval compare A B)")
    import asyncio
    import importlib.util

    from safactory.jobs.eval import EvalJob, run_eval

    if inspect and importlib.util.find_spec("inspect_ai") is None:
        from safactory.jobs.eval_inspect import INSTALL_HINT

        raise typer.BadParameter(INSTALL_HINT, param_hint="--inspect")

    try:
        job = EvalJob(
            policy=policy,
            suite=suite,
            out=str(out),
            db=db,
            epochs=epochs,
            temperature=temperature,
            max_tokens=max_tokens,
            seed=seed,
            redact=not raw,
            device=device,
            dtype=dtype,
            executor=executor,
            ray_address=ray_address,
            workers_per_node=workers_per_node,
            cpus_per_worker=cpus_per_worker,
        )
        result = asyncio.run(run_eval(job))
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    table = Table(title=f"eval {result['suite']}: {policy}")
    for col in ("env", "episodes", "success", "unsafe", f"pass@{epochs}", "mean reward"):
        table.add_column(col)
    for env, m in result["metrics"].items():
        table.add_row(
            env,
            str(m["episodes"]),
            *(_interval(m.get(k)) for k in ("success_rate", "unsafe_rate", "pass_at_k", "mean_reward")),
        )
    Console().print(table)
    Console().print(f"wrote {out / 'eval.json'} and {out / 'report.html'}")
    if inspect:
        from safactory.jobs.eval_inspect import write_inspect_log

        Console().print(f"wrote {write_inspect_log(out)} (open with: inspect view --log-dir {out / 'inspect'})")


def _interval(metric: dict[str, Any] | None) -> str:
    return "n/a" if metric is None else f"{metric['value']:.3f} [{metric['low']:.2f}, {metric['high']:.2f}]"


@eval_app.command("inspect")
def eval_inspect(
    directory: Annotated[Path, typer.Argument(help="An evaluation's directory (where eval.json is)")],
    out: Annotated[
        Path | None, typer.Option("--out", help="The log file (.eval or .json; default DIR/inspect/<name>.eval)")
    ] = None,
) -> None:
    """Write an evaluation as an inspect_ai log, to browse with `inspect view`."""
    from safactory.jobs.eval_inspect import write_inspect_log

    try:
        path = write_inspect_log(directory, out)
    except (ValueError, RuntimeError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    Console().print(f"wrote {path} (open with: inspect view --log-dir {path.parent})")


@eval_app.command("compare")
def eval_compare(
    a: Annotated[Path, typer.Argument(help="The first evaluation's directory (or eval.json)")],
    b: Annotated[Path, typer.Argument(help="The second one")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the comparison as JSON")] = False,
) -> None:
    """Per-metric differences (B - A), a paired sign test on the shared tasks, and the tasks that regressed."""
    import json

    from safactory.jobs.eval_compare import compare, load_eval

    try:
        result = compare(load_eval(a), load_eval(b))
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    table = Table(title=f"B - A  ({b} vs {a})")
    for col in ("env", "success", "unsafe", "mean reward", "improved/regressed tasks", "p (sign test)"):
        table.add_column(col)
    for env, diff in result["differences"].items():
        paired = result["paired"].get(env, {})
        table.add_row(
            env,
            *(f"{diff[k]:+.3f}" if k in diff else "n/a" for k in ("success_rate", "unsafe_rate", "mean_reward")),
            f"{paired.get('improved', '-')}/{paired.get('regressed', '-')}" if paired else "-",
            f"{paired['p_value']:.3g}" if paired else "-",
        )
    Console().print(table)
    for env, paired in result["paired"].items():
        if paired["regressed_tasks"]:
            Console().print(f"{env}: regressed tasks {', '.join(paired['regressed_tasks'][:20])}")
