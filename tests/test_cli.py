"""The `safactory` command's handling of mistakes: clear one-line errors, no store created by a typo,
no second run mixed into an existing run directory."""

import io
import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from safactory.cli import app
from safactory.data.store import store_url

ROOT = Path(__file__).resolve().parents[1]


def safactory(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-c", "from safactory.cli import main; main()", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_a_mistyped_db_is_an_error_not_a_new_empty_store(tmp_path):
    missing = tmp_path / "typo.db"
    for command in (["data", "verify"], ["data", "stats"], ["data", "export", "--format", "jsonl", "--out", "x"]):
        result = CliRunner().invoke(app, [*command, "--db", str(missing)])
        assert result.exit_code != 0 and isinstance(result.exception, FileNotFoundError), command
    assert not missing.exists() and list(tmp_path.iterdir()) == []


def test_db_paths_without_a_suffix_are_run_directories(tmp_path):
    assert store_url(str(tmp_path / "runs" / "guess")) == f"sqlite:///{tmp_path / 'runs' / 'guess' / 'store.db'}"
    assert store_url(str(tmp_path / "s.db")) == f"sqlite:///{tmp_path / 's.db'}"
    assert store_url("postgresql+psycopg://u@h/db", existing=True) == "postgresql+psycopg://u@h/db"


def test_failures_are_one_line_errors_and_the_traceback_is_opt_in(tmp_path):
    result = safactory("data", "stats", "--db", str(tmp_path / "typo.db"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: no store at") and "SAFACTORY_DEBUG=1" in result.stderr


def test_run_refuses_an_out_directory_that_holds_a_run(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("seed: 0\n")
    result = CliRunner().invoke(app, ["run", "examples/arith.yaml", "--out", str(out)])
    said = " ".join(result.output.replace("│", " ").split())  # the message as typer boxes and wraps it
    assert result.exit_code == 2 and "already holds a run" in said and "--resume" in said


class Killed(BaseException):
    """Stands for a kill -9 at that point."""


def test_a_run_killed_as_it_began_can_be_resumed(tmp_path, monkeypatch):
    from rich.console import Console

    import safactory.factory.context as context
    from safactory.config import load_config
    from safactory.factory.context import open_context
    from safactory.factory.run_state import RunState

    config = load_config("examples/arith.yaml", ["env.train_tasks=4", "env.test_tasks=4"])

    def killed(*args: object, **kwargs: object) -> None:
        raise Killed

    out = tmp_path / "run"
    monkeypatch.setattr(context.TrajectoryStore, "in_dir", killed)  # the first slow thing a new run does
    try:
        open_context(config, out, Console(file=io.StringIO()), resume=False)
    except Killed:
        pass
    monkeypatch.undo()
    run_id = RunState.load(out).run_id  # the state is saved with the config, before anything slow
    ctx = open_context(config, out, Console(file=io.StringIO()), resume=True)
    assert ctx.resume and ctx.state.run_id == run_id
    ctx.close()


def test_resuming_a_directory_that_holds_only_its_config_starts_that_run(tmp_path):
    from safactory.config import load_config, save_config

    out = tmp_path / "run"  # as a kill between writing config.yaml and state.json would leave it
    overrides = ["env.train_tasks=4", "env.test_tasks=4", "sft.enabled=false", "rl.enabled=false"]
    overrides += ["logging.report=false", "logging.tensorboard=false"]
    save_config(load_config("examples/arith.yaml", overrides), out)
    result = CliRunner().invoke(app, ["run", "--resume", str(out)])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "starting it from the beginning" in said
    assert json.loads((out / "summary.json").read_text())["phases"]["init"]

    other = tmp_path / "other"  # a directory with more in it than a config: say what to do, change nothing
    save_config(load_config("examples/arith.yaml", overrides), other)
    (other / "store.db").write_bytes(b"")
    result = CliRunner().invoke(app, ["run", "--resume", str(other)])
    assert result.exit_code != 0 and "remove it" in str(result.exception)
    assert sorted(p.name for p in other.iterdir()) == ["config.sha256", "config.yaml", "store.db"]
