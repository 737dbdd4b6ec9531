"""Redaction is on by default wherever our commands store or export data: `rollout`, `run`,
`data import`, `data export`; `--raw` / `redact: false` keep raw data and say so in the provenance."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from rich.console import Console
from typer.testing import CliRunner

from safactory.cli import app
from safactory.config import load_config
from safactory.data.store import TrajectoryStore
from safactory.factory.context import open_context
from safactory.sim.envs.ops import OpsTasks

EPISODES = 12


def ops_secrets() -> set[str]:
    """Every secret the first test tasks of ops declare (what `rollout --split test` runs)."""
    secrets: set[str] = set()
    for task in OpsTasks().tasks("test", EPISODES):
        declared = task.data["secrets"]
        secrets.update(declared.values() if isinstance(declared, dict) else declared)
    return {s for s in secrets if len(s) >= 4}


def raw_text(db: Path) -> str:
    """Every value of every table of a SQLite file, as text (blobs decoded leniently)."""
    conn = sqlite3.connect(db)
    parts: list[str] = []
    for (table,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'"):
        for row in conn.execute(f'SELECT * FROM "{table}"'):
            parts.extend(v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in row)
    conn.close()
    return "\n".join(parts)


def rollout(db: Path, *extra: str) -> None:
    args = ["rollout", "--env", "ops", "--policy", "scripted", "--episodes", str(EPISODES), "--db", str(db), *extra]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output


def test_rollout_stores_no_secret_unless_raw(tmp_path: Path) -> None:
    secrets = ops_secrets()
    assert secrets
    rollout(tmp_path / "red.db")
    text = raw_text(tmp_path / "red.db")
    assert [s for s in secrets if s in text] == []  # tasks table and trajectories alike
    assert "[REDACTED:secret]" in text
    rollout(tmp_path / "raw.db", "--raw")
    assert [s for s in secrets if s in raw_text(tmp_path / "raw.db")]
    for name, redacted in (("red.db", True), ("raw.db", False)):
        store = TrajectoryStore(f"sqlite:///{tmp_path / name}")
        assert {t.provenance["redacted"] for t in store.iter()} == {redacted}
        store.close()


def test_export_redacts_a_raw_store_and_the_export_still_imports(tmp_path: Path) -> None:
    secrets = ops_secrets()
    rollout(tmp_path / "raw.db", "--raw")
    runner = CliRunner()
    for extra, name in (([], "red.jsonl"), (["--raw"], "raw.jsonl")):
        args = ["data", "export", "--db", str(tmp_path / "raw.db"), "--out", str(tmp_path / name), *extra]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
    exported = (tmp_path / "red.jsonl").read_text()
    assert [s for s in secrets if s in exported] == []
    assert len(exported.splitlines()) == EPISODES
    assert [s for s in secrets if s in (tmp_path / "raw.jsonl").read_text()]
    result = runner.invoke(app, ["data", "import", "--db", str(tmp_path / "back.db"), str(tmp_path / "red.jsonl")])
    assert result.exit_code == 0, result.output
    assert f"imported {EPISODES} new" in result.output


def test_import_redacts_unless_raw(tmp_path: Path) -> None:
    secrets = ops_secrets()
    rollout(tmp_path / "raw.db", "--raw")
    runner = CliRunner()
    args = ["data", "export", "--raw", "--db", str(tmp_path / "raw.db"), "--out", str(tmp_path / "raw.jsonl")]
    assert runner.invoke(app, args).exit_code == 0
    for extra, name in (([], "red.db"), (["--raw"], "kept.db")):
        result = runner.invoke(
            app, ["data", "import", *extra, "--db", str(tmp_path / name), str(tmp_path / "raw.jsonl")]
        )
        assert result.exit_code == 0, result.output
    assert [s for s in secrets if s in raw_text(tmp_path / "red.db")] == []
    assert [s for s in secrets if s in raw_text(tmp_path / "kept.db")]


def test_the_loop_store_redacts_by_default(tmp_path: Path) -> None:
    for overrides, redacting in (([], True), (["redact=false"], False)):
        out = tmp_path / json.dumps(redacting)
        ctx = open_context(load_config("examples/arith.yaml", overrides), out, Console(quiet=True), resume=False)
        try:
            assert (ctx.store.redactor is not None) is redacting
        finally:
            ctx.close()
