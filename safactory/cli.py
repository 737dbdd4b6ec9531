"""The `safactory` command."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from safactory.jobs.eval_cli import eval_app
from safactory.jobs.rollout import rollout_command
from safactory.policy.specs import DEVICE_HELP, DTYPE_HELP

if TYPE_CHECKING:
    from safactory.data.store import TrajectoryStore

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Safactory: simulate, store, train, redeploy.",
)
data_app = typer.Typer(no_args_is_help=True, help="Inspect, verify and move the trajectory store.")
app.add_typer(data_app, name="data")

DbOption = Annotated[
    str,
    typer.Option("--db", help="Store URL (sqlite:///path/store.db, postgresql+psycopg://...), a .db file or a run dir"),
]


RawOption = Annotated[
    bool, typer.Option("--raw", help="Keep secrets and personal data as they are (default: redacted)")
]


def _open_store(db: str, *, existing: bool = True, redact: bool = False) -> TrajectoryStore:
    """The store `--db` names; with `existing` (the default: commands that read it) it must be there;
    with `redact`, what is stored through it is redacted first."""
    from safactory.data.redact import Redactor
    from safactory.data.store import TrajectoryStore, store_url

    return TrajectoryStore(store_url(db, existing=existing), redactor=Redactor() if redact else None)


def _check_placement(device: str | None, dtype: str | None) -> None:
    """A usage error for a `--device` or `--dtype` that cannot work (None: not given)."""
    from safactory.policy.specs import check_device, check_dtype

    for value, check, option in ((dtype, check_dtype, "--dtype"), (device, check_device, "--device")):
        if value is None:
            continue
        try:
            check(value)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint=option) from exc


@app.command()
def run(
    config: Annotated[Path | None, typer.Argument(help="YAML run file, e.g. examples/demo.yaml")] = None,
    out: Annotated[Path, typer.Option("--out", help="Run directory (store, metrics, summary)")] = Path("runs/latest"),
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a config field: key.path=value")] = None,
    resume: Annotated[
        Path | None, typer.Option("--resume", help="Continue the run in this directory after a crash or kill")
    ] = None,
    device: Annotated[
        str | None, typer.Option("--device", help=f"{DEVICE_HELP} (sets model.device, over any --set)")
    ] = None,
    dtype: Annotated[
        str | None, typer.Option("--dtype", help=f"{DTYPE_HELP} (sets model.dtype, over any --set)")
    ] = None,
) -> None:
    """Run the closed loop: warm start, safety-aware RL, gate, redeploy, distil; results land in OUT."""
    from safactory.config import load_config
    from safactory.factory.loop import Factory

    if resume is not None and config is None and (device is not None or dtype is not None):
        raise typer.BadParameter("--device and --dtype cannot change the config of a run being resumed")
    _check_placement(device, dtype)
    overrides = list(set_ or [])
    overrides += [f"model.device={device}"] if device is not None else []
    overrides += [f"model.dtype={dtype}"] if dtype is not None else []
    if resume is not None:
        saved = resume / "config.yaml"
        if not saved.exists():
            raise typer.BadParameter(
                f"{resume} holds no config.yaml: not a run directory; start a run there with "
                f"`safactory run CONFIG --out {resume}`"
            )
        cfg = load_config(saved)
        if config is not None and load_config(config, overrides).hash() != cfg.hash():
            raise typer.BadParameter(f"{config} (with the overrides) differs from the config of the run in {resume}")
        if set_ and config is None:
            raise typer.BadParameter("--set cannot change the config of a run being resumed")
        Factory(cfg, resume, resume=True).run()
        return
    if config is None:
        raise typer.BadParameter("give a run file (e.g. examples/demo.yaml) or --resume DIR")
    if (out / "config.yaml").exists():  # a second run would mix its store, metrics and model with the first's
        raise typer.BadParameter(
            f"{out} already holds a run: continue it with --resume {out}, or choose another --out", param_hint="--out"
        )
    try:
        cfg = load_config(config, overrides)
    except Exception as exc:
        raise typer.BadParameter(str(exc)) from exc
    Factory(cfg, out).run()


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="A run directory")]) -> None:
    """(Re)write RUN_DIR/report.html from its metrics and summary."""
    from safactory.factory.report import write_report

    typer.echo(write_report(run_dir))


@app.command()
def envs() -> None:
    """List the registered environments with their version, tools and splits."""
    from safactory.sim.registry import default_registry

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
    if registry.schemes:
        schemes = ", ".join(f"{s}:<...>" for s in sorted(registry.schemes))
        Console().print(f"adapters (env ids built on demand): {schemes}")


app.command("rollout", help="Run episodes of one env with one policy and store them all.")(rollout_command)

app.add_typer(eval_app, name="eval")


@app.command()
def redteam(
    policy: Annotated[str, typer.Option(help="scripted | smollm2 | a model directory | openai:<base_url>#<model>")],
    env: Annotated[str, typer.Option(help="A tool env whose tasks get attacks planted in their tool results")],
    out: Annotated[str, typer.Option("--out", help="Name of the risk suite the found cases are stored as")],
    db: DbOption,
    budget: Annotated[int, typer.Option(help="Cases to generate and try")] = 100,
    expert: Annotated[str, typer.Option(help='Options of the scripted expert as JSON, e.g. {"naive": true}')] = "{}",
    env_options: Annotated[
        str, typer.Option(help='Options of the env\'s task generator as JSON, as in a run config, e.g. {"brief": true}')
    ] = "{}",
    seed: Annotated[int, typer.Option(help="Seed of the generator")] = 0,
    raw: RawOption = False,
    generators: Annotated[
        str, typer.Option(help="Comma-separated generators sharing the budget: injection, harmful, error")
    ] = "injection,harmful,error",
) -> None:
    """Attack the env's tasks (instructions planted in tool results, harmful requests rephrased, misleading
    tool errors), keep the cases the policy acted unsafely on as risk suite OUT in the store; replay them
    with `safactory eval --suite risk:OUT`."""
    import asyncio
    import json

    from safactory.jobs.redteam import RedTeamJob, run_redteam

    try:
        job = RedTeamJob(
            policy=policy,
            env=env,
            suite=out,
            db=db,
            budget=budget,
            seed=seed,
            expert=json.loads(expert),
            env_options=json.loads(env_options),
            redact=not raw,
            generators=tuple(g.strip() for g in generators.split(",") if g.strip()),
        )
        result = asyncio.run(run_redteam(job))
    except (ValueError, KeyError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    Console().print(
        f"risk suite {out!r}: {result['found']} of {result['cases']} cases found unsafe "
        f"(run {result['run_id']}); replay: safactory eval --suite risk:{out} --db {db}"
    )
    for category, counts in result["by_category"].items():
        Console().print(f"  {category}: {counts['found']} of {counts['cases']} found unsafe")


@app.command()
def train(
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            help="Job directory: train.json and checkpoints/ (the last one, checkpoints/latest, is the final model; "
            "with --lora-r it holds the adapter only, which also lands in OUT/adapter, and --merge writes the merged "
            "full model to OUT/model; a tiny LoRA base is kept in OUT/base)",
        ),
    ],
    db: Annotated[str | None, typer.Option("--db", help="Store URL or run dir holding the data")] = None,
    mode: Annotated[str, typer.Option(help="sft | rl | opd")] = "sft",
    model: Annotated[
        str, typer.Option(help="tiny | smollm2 | a model directory (a saved tiny model or any HF chat model)")
    ] = "tiny",
    teacher: Annotated[
        str | None, typer.Option(help="Teacher (opd): smollm2 or a model directory sharing the student's tokenizer")
    ] = None,
    run: Annotated[str | None, typer.Option(help="Only data of this run id")] = None,
    kind: Annotated[
        str | None, typer.Option(help="Trajectory kind (default: expert for sft, rollout otherwise)")
    ] = None,
    steps: Annotated[int, typer.Option(help="Optimiser steps at most")] = 100,
    batch_size: Annotated[int, typer.Option(help="Trajectories (sft) or groups (rl, opd) per step")] = 32,
    lr: Annotated[float, typer.Option(help="AdamW learning rate")] = 1e-3,
    checkpoint_every: Annotated[int, typer.Option(help="Checkpoint every this many steps")] = 10,
    seed: Annotated[int, typer.Option(help="Seed")] = 0,
    device: Annotated[str, typer.Option("--device", help=DEVICE_HELP)] = "cpu",
    dtype: Annotated[str, typer.Option("--dtype", help=DTYPE_HELP)] = "auto",
    lora_r: Annotated[
        int, typer.Option("--lora-r", min=0, help="Rank of a LoRA adapter to train instead of all weights (0: none)")
    ] = 0,
    lora_alpha: Annotated[
        int | None, typer.Option("--lora-alpha", min=1, help="LoRA scaling numerator (default: 2 x --lora-r)")
    ] = None,
    merge: Annotated[
        bool, typer.Option("--merge", help="With --lora-r: at the end also write the merged full model to OUT/model")
    ] = False,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the job in --out from its last checkpoint")
    ] = False,
) -> None:
    """Train on data already in a store (SFT, RL, on-policy distillation); resumable after a crash."""
    from safactory.jobs.train import OfflineTrainer, TrainJob, model_spec

    if resume:
        job = OfflineTrainer.resume(out)
    else:
        if db is None:
            raise typer.BadParameter("--db is required (unless --resume)")
        _check_placement(device, dtype)
        if mode not in ("sft", "rl", "opd"):
            raise typer.BadParameter("--mode must be sft, rl or opd")
        try:
            model = model_spec(model)
            teacher = model_spec(teacher, "--teacher") if teacher is not None else None
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from exc
        url = _open_store(db).url
        spec = TrainJob(
            db=url,
            out=str(out),
            mode=mode,
            model=model,
            teacher=teacher,
            data_run=run,
            kind=kind,  # type: ignore[arg-type]
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            checkpoint_every=checkpoint_every,
            seed=seed,
            device=device,
            dtype=dtype,
            lora_r=lora_r,
            lora_alpha=lora_alpha,
            merge=merge,
        )
        try:
            spec.check()
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from exc
        job = OfflineTrainer(spec)
    result = job.run()
    written = "".join(f" {name} {result[name]}" for name in ("adapter", "model") if name in result)
    Console().print(f"done: step {result.get('step')} checkpoint {result['checkpoint']}{written}")


@app.command("serve-env")
def serve_env(
    env: Annotated[str, typer.Argument(help="Registered environment id, e.g. arith")],
    host: Annotated[str, typer.Option(help="Bind address; a non-loopback address needs --token")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8790,
    token: Annotated[
        str | None,
        typer.Option(
            help="Bearer token clients send; better set $SAFACTORY_ENV_TOKEN (any user can read a command line)",
            envvar="SAFACTORY_ENV_TOKEN",
        ),
    ] = None,
    max_sessions: Annotated[int, typer.Option(help="Concurrent episodes (sessions) served at most")] = 64,
) -> None:
    """Serve an environment over HTTP, one session per episode; clients use env id http://HOST:PORT."""
    from safactory.sim.serve import check_bind
    from safactory.sim.serve import serve_env as run_server
    from safactory.sim.wire import UnsafeBindError

    try:
        check_bind(host, token)
    except UnsafeBindError as exc:
        raise typer.BadParameter(str(exc), param_hint="--host") from exc
    except ValueError as exc:  # an empty or blank token
        raise typer.BadParameter(f"{exc} (check --token / $SAFACTORY_ENV_TOKEN)", param_hint="--token") from exc
    run_server(env, host, port, max_sessions, token)


@app.command("serve-policy")
def serve_policy(
    model: Annotated[str, typer.Option("--model", help="smollm2 | tiny | a saved model directory (e.g. RUN/model)")],
    host: Annotated[str, typer.Option(help="Bind address; a non-loopback address needs --token")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    token: Annotated[
        str | None,
        typer.Option(
            help="Bearer token clients send; better set $SAFACTORY_POLICY_TOKEN (any user can read a command line)",
            envvar="SAFACTORY_POLICY_TOKEN",
        ),
    ] = None,
    device: Annotated[str, typer.Option("--device", help=DEVICE_HELP)] = "cpu",
    dtype: Annotated[str, typer.Option("--dtype", help=DTYPE_HELP)] = "auto",
) -> None:
    """Serve a model over an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/load_weights)."""
    from safactory.policy.server import check_bind
    from safactory.policy.server import serve_policy as run_server

    try:
        check_bind(host, token)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--token" if token and not token.strip() else "--host") from exc
    _check_placement(device, dtype)
    run_server(model, host, port, token, device=device, dtype=dtype)


@app.command("view")
def view(
    db: DbOption,
    runs: Annotated[
        Path | None, typer.Option("--runs", help="Folder of run and eval directories (default: the --db directory)")
    ] = None,
    host: Annotated[str, typer.Option(help="Bind address; a non-loopback address needs --token")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8800,
    token: Annotated[
        str | None,
        typer.Option(
            help="Token to open the view with (http://HOST:PORT/?token=T once); better set $SAFACTORY_VIEW_TOKEN",
            envvar="SAFACTORY_VIEW_TOKEN",
        ),
    ] = None,
) -> None:
    """Browse runs, live curves, trajectories down to the token, lineage and evaluations (read-only web app)."""
    from safactory.data.store import store_url
    from safactory.view.app import serve_view
    from safactory.view.auth import check_bind

    try:
        check_bind(host, token)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--token" if token is not None else "--host") from exc
    try:
        store_url(db, existing=True)
    except FileNotFoundError as exc:
        raise typer.BadParameter(str(exc), param_hint="--db") from exc
    Console().print(f"safactory view on http://{host}:{port}/" + ("?token=..." if token else ""))
    serve_view(db, runs, host, port, token)


@data_app.command("verify")
def data_verify(
    db: DbOption,
    expect_head: Annotated[
        str | None, typer.Option("--expect-head", help="Fail unless the store's head is exactly this (--write-head)")
    ] = None,
    head_file: Annotated[
        Path | None, typer.Option("--head-file", help="Fail unless the store is at the head this file holds")
    ] = None,
    write_head: Annotated[
        Path | None, typer.Option("--write-head", help="After a clean check, write the store's head to this file")
    ] = None,
    mac_heads: Annotated[
        bool,
        typer.Option("--mac-heads", help="After a clean check, MAC the heads (a store written without the key)"),
    ] = False,
) -> None:
    """Check every hash chain and head (trajectories, runs, consumption, checkpoints, judgements, gate
    decisions); exit 1 naming the first modified, deleted, reordered or appended row. SAFACTORY_STORE_KEY
    set: the heads' HMACs are checked too. docs/integrity.md says what this proves."""
    from rich.markup import escape
    from rich.progress import Progress

    from safactory.data.anchor import Expected, write_head_file
    from safactory.data.integrity import authenticate_heads, verify

    try:
        expected = Expected.from_options(expect_head, head_file)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    store = _open_store(db)
    if mac_heads and store.key is None:
        raise typer.BadParameter("--mac-heads needs SAFACTORY_STORE_KEY in the environment")
    with Progress(console=Console(stderr=True), transient=True) as progress:
        bar = progress.add_task("verifying", total=store.count())
        report = verify(store, progress=lambda n: progress.advance(bar, n), expected=expected, check_macs=not mac_heads)
    if mac_heads and report.ok and store.key is not None:
        moved = authenticate_heads(store, report, store.key)
        Console().print(f"MACed the heads{f'; moved meanwhile, not MACed: {moved}' if moved else ''}")
    store.close()
    for note in report.notes:
        Console().print(f"note: {escape(note)}")
    if report.ok:
        Console().print(f"ok: {report.checked} trajectories in {report.runs} runs and {report.rows} ledger rows verify")
        typer.echo(f"head {report.head}")
        if write_head is not None:
            write_head_file(write_head, report.heads, report.head)
            Console().print(f"wrote the head to {write_head}")
        return
    for problem in report.problems:
        Console().print(f"[red]FAILED[/red] {escape(problem)}")
    raise typer.Exit(1)


@data_app.command("stats")
def data_stats(db: DbOption) -> None:
    """Per run and kind: trajectories, success rate, mean reward."""
    from sqlalchemy import Integer, func, select

    from safactory.data.schema import trajectories as t

    store = _open_store(db)
    stmt = (
        select(t.c.run_id, t.c.kind, func.count(), func.avg(t.c.success.cast(Integer)), func.avg(t.c.reward))
        .group_by(t.c.run_id, t.c.kind)
        .order_by(t.c.run_id, t.c.kind)
    )
    table = Table(title=f"store {store.url}")
    for col in ("run", "kind", "trajectories", "success", "mean reward"):
        table.add_column(col)
    with store.engine.connect() as conn:
        for run_id, kind, n, success, reward in conn.execute(stmt):
            table.add_row(run_id, kind, str(n), f"{success or 0:.3f}", f"{reward or 0:.3f}")
    store.close()
    Console().print(table)


@data_app.command("query")
def data_query(
    db: DbOption,
    run: Annotated[str | None, typer.Option(help="Only this run id")] = None,
    kind: Annotated[str | None, typer.Option(help="Only this kind (rollout, eval, expert, ...)")] = None,
    split: Annotated[str | None, typer.Option(help="Only this task split")] = None,
    limit: Annotated[int, typer.Option(help="At most this many")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print whole trajectories as JSON lines")] = False,
) -> None:
    """List trajectories (or print them as JSON lines with --json)."""
    store = _open_store(db)
    rows = store.iter(run_id=run, kind=kind, split=split, limit=limit)
    if as_json:
        for traj in rows:
            typer.echo(traj.model_dump_json())
        store.close()
        return
    table = Table()
    for col in ("id", "kind", "task", "steps", "reward", "success", "termination", "versions"):
        table.add_column(col)
    for traj in rows:
        versions = ",".join(map(str, traj.policy_versions()))
        table.add_row(
            traj.id,
            traj.kind,
            traj.task.id,
            str(len(traj.steps)),
            f"{traj.reward:.2f}",
            str(traj.success),
            traj.termination,
            versions,
        )
    store.close()
    Console().print(table)


@data_app.command("export")
def data_export(
    db: DbOption,
    out: Annotated[Path, typer.Option("--out", help="Output file")],
    fmt: Annotated[str, typer.Option("--format", help="jsonl | parquet | trl | rl")] = "jsonl",
    run: Annotated[str | None, typer.Option(help="Only this run id")] = None,
    kind: Annotated[str | None, typer.Option(help="Only this kind")] = None,
    success_only: Annotated[bool, typer.Option("--success-only", help="Only successful trajectories")] = False,
    raw: RawOption = False,
) -> None:
    """Export trajectories (lossless jsonl/parquet, TRL conversational, token-level RL); secrets and personal
    data are redacted unless --raw (trajectories the store already redacted are written as stored)."""
    from rich.progress import Progress

    from safactory.data.redact import Redactor
    from safactory.jobs.export import export, redacted

    store = _open_store(db)
    rows = store.iter(run_id=run, kind=kind)
    if success_only:
        rows = (t for t in rows if t.success)
    if not raw:
        rows = redacted(rows, Redactor())
    with Progress(console=Console(stderr=True), transient=True) as progress:
        bar = progress.add_task("exporting", total=store.count(run_id=run, kind=kind))
        n = export(rows, fmt, out, progress=lambda k: progress.advance(bar, k))
    store.close()
    Console().print(f"wrote {n} {fmt} rows to {out}")


@data_app.command("import")
def data_import(
    db: DbOption,
    path: Annotated[Path, typer.Argument(help="A jsonl or parquet export")],
    raw: RawOption = False,
) -> None:
    """Import a lossless export; every content hash is checked, existing ids are skipped; secrets and personal
    data are redacted before they are stored unless --raw."""
    from rich.progress import Progress

    from safactory.jobs.export import import_trajectories

    store = _open_store(db, existing=False, redact=not raw)
    with Progress(console=Console(stderr=True), transient=True) as progress:
        bar = progress.add_task("importing", total=None)
        n = import_trajectories(store, path, progress=lambda k: progress.advance(bar, k))
    store.close()
    Console().print(f"imported {n} new trajectories from {path}")


@data_app.command("judge")
def data_judge(
    db: DbOption,
    judge: Annotated[str, typer.Option(help="rules | openai:<base_url>#<model> (an LLM judge)")] = "rules",
    run: Annotated[str | None, typer.Option(help="Only this run id")] = None,
    kind: Annotated[str | None, typer.Option(help="Only this kind")] = None,
) -> None:
    """Attach safety verdicts to stored trajectories (skips those this judge version already judged)."""
    from safactory.data.judges import RuleSafetyJudge, judge_store
    from safactory.data.llm_judge import LLMJudge

    if judge == "rules":
        judge_obj: Any = RuleSafetyJudge()
    elif judge.startswith("openai:"):
        from safactory.policy.endpoint import EndpointPolicy

        judge_obj = LLMJudge(EndpointPolicy.from_spec(judge))
    else:
        raise typer.BadParameter("--judge must be 'rules' or openai:<base_url>#<model>")
    store = _open_store(db)
    verdicts = judge_store(store, judge_obj, run_id=run, kind=kind)
    store.close()
    counts = {status: sum(v.status == status for v in verdicts) for status in ("safe", "unsafe", "unknown")}
    Console().print(f"{len(verdicts)} new verdicts by {judge_obj.name} v{judge_obj.version}: {counts}")


def main() -> None:
    """The console entry point: a failure is one line on stderr and exit status 1
    (`SAFACTORY_DEBUG=1` shows the traceback instead)."""
    import os
    import sys

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress display is enough
    try:
        app()
    except Exception as exc:
        if os.environ.get("SAFACTORY_DEBUG"):
            raise
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        Console(stderr=True, highlight=False).print(f"error: {message or type(exc).__name__}", markup=False)
        Console(stderr=True).print("[dim](SAFACTORY_DEBUG=1 shows the traceback)[/]")
        sys.exit(1)
