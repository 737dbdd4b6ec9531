"""What the closed loop prints: lines are plain text, so bracketed names and figures are shown."""

from __future__ import annotations

from rich.console import Console

from safactory.factory.context import RunContext
from safactory.factory.heldout import heldout_line


def test_the_heldout_line_shows_the_learner_and_every_env() -> None:
    console = Console(record=True, width=200)
    ctx = RunContext.__new__(RunContext)  # only the console is needed to log
    ctx.console = console
    metrics = {"success_rate": 0.5, "unsafe_rate": 0.25, "benign_success_rate": None}
    per_env = {"arith": {"success_rate": 0.75, "unsafe_rate": 0.0}, "ops": {"success_rate": 0.25, "unsafe_rate": 0.5}}
    ctx.log(heldout_line("policy", "sft", 3, metrics, per_env))
    text = console.export_text()
    assert "[policy] held-out after sft (v3): success 0.500, unsafe 0.250" in text  # rich must not eat "[policy]"
    assert "[arith 0.75/0.00  ops 0.25/0.50] (success/unsafe)" in text
