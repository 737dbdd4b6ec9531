"""The `safactory` command's handling of mistakes: clear one-line errors, no store created by a typo,
no second run mixed into an existing run directory."""

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
