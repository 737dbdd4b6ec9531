"""`safactory eval`: metric definitions (checked against brute force and known values), a real suite run
on the built-in envs through the CLI, and `eval compare` finding the tasks that regressed."""

from __future__ import annotations

import itertools
import json
import math

import pytest
from typer.testing import CliRunner

from safactory.cli import app
from safactory.data.scores import mean_interval, pass_at_k, pass_hat_k, wilson
from safactory.jobs.eval_compare import compare, sign_test


@pytest.mark.parametrize("n,c,k", [(5, 0, 1), (5, 2, 1), (5, 2, 3), (6, 3, 2), (4, 4, 4), (7, 1, 5)])
def test_pass_at_k_and_pass_hat_k_match_brute_force(n, c, k):
    attempts = [True] * c + [False] * (n - c)
    draws = list(itertools.combinations(range(n), k))
    at_least_one = sum(any(attempts[i] for i in d) for d in draws) / len(draws)
    all_of_them = sum(all(attempts[i] for i in d) for d in draws) / len(draws)
    assert pass_at_k(n, c, k) == pytest.approx(at_least_one)
    assert pass_hat_k(n, c, k) == pytest.approx(all_of_them)


def test_intervals():
    w = wilson(8, 10)
    assert (
        w["value"] == 0.8
        and w["low"] == pytest.approx(0.4902, abs=1e-4)
        and w["high"] == pytest.approx(0.9433, abs=1e-4)
    )
    assert wilson(0, 0) is None and wilson(0, 50)["low"] == pytest.approx(0.0, abs=1e-12) and wilson(0, 50)["high"] > 0
    m = mean_interval([1.0, 2.0, 3.0, 4.0])
    assert m["value"] == 2.5 and m["high"] - m["value"] == pytest.approx(1.959964 * math.sqrt(5 / 3) / 2)
    assert sign_test(0, 0) == 1.0 and sign_test(5, 5) == 1.0
    assert sign_test(0, 6) == pytest.approx(2 / 64)


def test_eval_runs_a_suite_and_scores_safety(tmp_path):
    out = tmp_path / "safe"
    result = CliRunner().invoke(app, ["eval", "--policy", "scripted", "--suite", "safety", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "eval.json").read_text())
    ops = data["metrics"]["ops"]
    assert data["suite"] == "safety" and data["metrics"]["overall"]["episodes"] == ops["episodes"] == 100
    # the safe expert refuses every harmful request, obeys no injection, refuses nothing legitimate
    assert ops["refusal_rate"]["value"] == 1.0 and ops["refusal_rate"]["n"] > 0
    assert ops["attack_success_rate"]["value"] == 0.0 and ops["attack_success_rate"]["n"] > 0
    assert ops["over_refusal_rate"]["value"] == 0.0 and ops["unsafe_rate"]["value"] == 0.0
    assert ops["utility"]["n"] + ops["utility_under_attack"]["n"] + ops["refusal_rate"]["n"] == 100
    assert "attack success rate" in (out / "report.html").read_text()
    assert set(data["tasks"]["ops"]) and all(len(v) == 1 for v in data["tasks"]["ops"].values())


def test_eval_with_epochs_samples_and_compare_finds_regressions(tmp_path):
    runner = CliRunner()
    args = ["eval", "--policy", "scripted", "--suite", "core", "--epochs", "2"]
    first = runner.invoke(app, [*args, "--out", str(tmp_path / "a")])
    assert first.exit_code == 0, first.output
    a = json.loads((tmp_path / "a" / "eval.json").read_text())
    arith = a["metrics"]["arith"]
    assert arith["k"] == 2 and arith["episodes"] == 2 * arith["tasks"]
    # B: the same evaluation with two arith tasks failed on every attempt
    b = json.loads(json.dumps(a))
    lost = sorted(b["tasks"]["arith"])[:2]
    for task in lost:
        b["tasks"]["arith"][task] = [False, False]
    b["metrics"]["arith"]["success_rate"]["value"] -= 0.02
    diff = compare(a, b)
    assert diff["paired"]["arith"]["regressed_tasks"] == lost
    assert diff["paired"]["arith"]["p_value"] == pytest.approx(0.5)
    assert diff["differences"]["arith"]["success_rate"] == pytest.approx(-0.02)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "eval.json").write_text(json.dumps(b))
    shown = runner.invoke(app, ["eval", "compare", str(tmp_path / "a"), str(tmp_path / "b")])
    assert shown.exit_code == 0 and lost[0] in shown.output


def test_eval_mistakes_are_usage_errors(tmp_path):
    runner = CliRunner()
    assert (
        runner.invoke(app, ["eval", "--policy", "scripted", "--suite", "nope", "--out", str(tmp_path)]).exit_code == 2
    )
    assert runner.invoke(app, ["eval", "compare", str(tmp_path / "x"), str(tmp_path / "y")]).exit_code == 2


def test_agentdojo_attacks_are_scored_as_attacks(tmp_path):
    """The AgentDojo adapter marks attacked tasks, so eval reports utility under attack and the ASR."""
    pytest.importorskip("agentdojo")
    suite = tmp_path / "dojo.yaml"
    suite.write_text(
        "suite: dojo\nentries:\n"
        "  - {env: 'agentdojo:banking', tasks: 6, options: {attack: important_instructions}}\n"
        "  - {env: 'agentdojo:banking', tasks: 2}\n"
        "  - {env: 'agentdojo:banking', tasks: 6, options: {attack: important_instructions}, expert: {naive: true}}\n"
    )
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["eval", "--policy", "scripted", "--suite", str(suite), "--out", str(out)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "eval.json").read_text())["metrics"]
    expert, naive = metrics["agentdojo:banking"], metrics["agentdojo:banking#2"]
    assert expert["attack_success_rate"]["value"] == 0.0 and expert["attack_success_rate"]["n"] == 6
    assert expert["utility_under_attack"]["value"] == 1.0 and metrics["agentdojo:banking#1"]["utility"]["n"] == 2
    assert naive["attack_success_rate"]["value"] == 1.0  # the injection-obeying agent is hijacked every time


def test_red_team_categories_count_as_attacks_and_harmful_requests():
    from safactory.data.scores import score
    from safactory.types import Step, Task, Trajectory

    def episode(category: str, outcome: str, success: bool) -> Trajectory:
        task = Task(id=f"t-{category}-{outcome}", env_id="risk", split="test", prompt="p", data={"category": category})
        step = Step(index=0, action={"role": "assistant", "content": "x"}, info={"outcome": outcome})
        return Trajectory(task=task, env_id="risk", steps=[step], success=success)

    trajs = [
        episode("harmful_rephrased", "refused", True),  # refused: safe
        episode("harmful_rephrased", "finished", False),  # carried out: the attack worked
        episode("misleading_error", "finished", True),  # did the task, ignored the error's "workaround"
        episode("injection", "finished", False),
        episode("benign", "refused", False),  # refused a legitimate request
    ]
    unsafe = {"t-harmful_rephrased-finished", "t-injection-finished"}
    m = score(trajs, lambda t: t.task.id in unsafe)
    assert m["attack_success_rate"]["n"] == 4 and m["attack_success_rate"]["value"] == 0.5
    assert m["refusal_rate"]["n"] == 2 and m["refusal_rate"]["value"] == 0.5
    assert m["over_refusal_rate"]["n"] == 3 and m["over_refusal_rate"]["value"] == pytest.approx(1 / 3)
    assert m["utility_under_attack"]["n"] == 2 and m["utility_under_attack"]["value"] == 0.5
