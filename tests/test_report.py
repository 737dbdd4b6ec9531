"""report.html from a run directory: tables, one SVG per chart, and partial runs that must not crash it."""

import json
import re
from pathlib import Path

from safactory.evolve.gate import Gate
from safactory.factory.evaluation import env_metrics, flat, overall
from safactory.factory.report import write_report
from safactory.factory.report_charts import build_charts
from safactory.factory.report_rows import eval_rows, heldout_from_rows
from safactory.factory.report_tables import heldout_table
from safactory.types import Task, Trajectory

ENVS = ("arith", "maze")


def _rows() -> list[dict]:
    """Snapshot rows like MetricsLog writes them: stale values carried forward."""
    latest: dict = {
        "policy_version": None,
        "train/step": None,
        "train/loss": None,
        "rollout/episodes": None,
        "rollout/success_rate": None,
        "eval/success_rate": None,
    }
    rows = []
    t = 0.0

    def log(values: dict) -> None:
        nonlocal t
        t += 1.5
        latest.update(values)
        rows.append({"time_s": t, **latest})

    def evaluate(label: str, success: float, unsafe: float) -> None:
        values = {
            "eval/phase": label,
            "eval/success_rate": success,
            "eval/unsafe_rate": unsafe,
            "eval/benign_success_rate": success,
        }
        for k, env in enumerate(ENVS):
            values[f"eval/{env}/success_rate"] = success - 0.1 * k
            values[f"eval/{env}/unsafe_rate"] = unsafe + 0.05 * k
            values[f"eval/{env}/benign_success_rate"] = success
        log(values)

    for step in range(1, 4):
        log({"phase": "warm_start", "policy_version": step, "train/step": step, "train/loss": 2.0 / step})
    evaluate("warm_start", 0.25, 0.5)
    for step in range(4, 12):
        log(
            {
                "phase": "rl",
                "policy_version": step,
                "train/step": step,
                "train/loss": 0.5,
                "train/idle_fraction": 0.2,
                "rollout/idle_fraction": 0.1,
                "rollout/episodes": 16 * step,
                "rollout/episodes_per_s": 3.5,
                "rollout/success_rate": 0.1 * (step - 3),
                "rollout/unsafe_rate": 0.05,
                "rollout/mean_reward": 0.3,
                "rollout/version_gap_mean": 0.5,
                "rollout/version_gap_max": 2,
                "rollout/version_gap_hist": {"0": 8, "1": 4},
            }
        )
        if step == 7:
            evaluate("rl@40", 0.25, 0.5)  # the same score again: still a new evaluation
            log({"gate/accepted": True, "gate/candidate_version": 7})
    evaluate("final", 0.75, 0.125)
    return rows


def _summary() -> dict:
    def block(success: float, unsafe: float, version: int) -> dict:
        return {
            "success_rate": success,
            "unsafe_rate": unsafe,
            "benign_success_rate": success,
            "episodes": 40,
            "policy_version": version,
            "envs": {
                env: {"success_rate": success - 0.1 * k, "unsafe_rate": unsafe + 0.05 * k, "episodes": 20}
                for k, env in enumerate(ENVS)
            },
        }

    return {
        "run_id": "run-<xyz>",
        "heldout": {"warm_start": block(0.25, 0.5, 3), "final": block(0.75, 0.125, 11)},
        "evals": {"rl@40": block(0.25, 0.5, 7)},
        "gate": [
            {
                "step": 7,
                "candidate_version": 7,
                "baseline_version": 3,
                "accepted": True,
                "reasons": [],
                "metrics": {"unsafe_rate": 0.1},
            },
            {
                "step": 10,
                "candidate_version": 10,
                "baseline_version": 7,
                "accepted": False,
                "reasons": ["unsafe rate rose on maze & ops"],
                "metrics": {"unsafe_rate": 0.4},
            },
        ],
        "phases": {"warm_start": {"seconds": 4.5, "steps": 3}, "rl": {"seconds": 12.0, "steps": 8}},
        "rl": {"episodes": 176},
    }


def _write_run(run_dir: Path, rows: list[dict], summary: dict | None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if summary is not None:
        (run_dir / "summary.json").write_text(json.dumps(summary))
    (run_dir / "config.yaml").write_text("env:\n  id: arith  # <b>not bold</b>\nrl:\n  steps: 8\n")


def _figures(page: str) -> dict[str, str]:
    """Chart title -> the figure's HTML."""
    figures = re.findall(r'<figure class="figure"><figcaption>(.*?)</figcaption>(.*?)</figure>', page, re.S)
    return dict(figures)


def test_full_report(tmp_path):
    run_dir = tmp_path / "run"
    _write_run(run_dir, _rows(), _summary())
    out = write_report(run_dir)
    assert out == run_dir / "report.html"
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert "<script" not in page and "http://" not in page.replace("http://www.w3.org/2000/svg", "")

    figures = _figures(page)
    expected = {
        "Held-out success rate",
        "Held-out unsafe rate",
        "Held-out benign success rate",
        "Rollout success and unsafe rates",
        "Mean rollout reward",
        "Training loss",
        "Policy version",
        "Staleness (policy versions between generation and training)",
        "Throughput",
        "Idle fractions",
    }
    assert set(figures) == expected
    assert all(body.count("<svg") == 1 for body in figures.values())
    assert page.count("<svg") == len(expected)
    # per-env series in the held-out charts, one marker per evaluation (3 evals) for each of 3 series
    success = figures["Held-out success rate"]
    assert all(f">{env}</span>" in success for env in ENVS) and "all envs" in success
    assert success.count("<circle") == 3 * 3
    assert "(rl@40)" in success

    # before/after table: overall row and one per env, with deltas
    assert "warm-start benign success" in page
    table = page.split("Held-out results", 1)[1].split("</table>", 1)[0]
    assert "<td>all envs</td><td>0.250</td><td>0.750</td>" in table
    assert "+0.500" in table and "-0.375" in table
    assert "<td>maze</td><td>0.150</td><td>0.650</td>" in table
    assert "policy v3" in page and "policy v11" in page

    # gate decisions, escaped
    gate = page.split("Gate decisions", 1)[1].split("</table>", 1)[0]
    assert "accepted" in gate and "rejected" in gate
    assert "unsafe rate rose on maze &amp; ops" in gate
    assert "unsafe_rate = 0.400" in gate

    # phases, other summary fields, escaped run id and config at the bottom
    assert "run-&lt;xyz&gt;" in page and "run-<xyz>" not in page
    assert "Timeline from metrics.jsonl" in page
    config_at = page.index("Resolved configuration")
    assert config_at > page.index("Gate decisions")
    assert "# &lt;b&gt;not bold&lt;/b&gt;" in page[config_at:]
    assert "176" in page  # summary["rl"]["episodes"]
    assert "summary.json is missing" not in page


def test_eval_points_only_where_an_evaluation_happened():
    rows = _rows()
    labels = [rows[i]["eval/phase"] for i in eval_rows(rows)]
    assert labels == ["warm_start", "rl@40", "final"]


def test_student_evaluations_get_their_own_series():
    rows = _rows()
    t = rows[-1]["time_s"]
    rows.append({**rows[-1], "time_s": t + 1, "eval/phase": "student:warm_start", "eval/success_rate": 0.125})
    rows.append({**rows[-1], "time_s": t + 2, "eval/phase": "student:final", "eval/success_rate": 0.5})
    (success,) = [c for c in build_charts(rows) if c.title == "Held-out success rate"]
    by_name = {s.name: [p.y for p in s.points] for s in success.series}
    assert by_name["all envs"] == [0.25, 0.25, 0.75]
    assert by_name["student: all envs"] == [0.125, 0.5]


def test_charts_only_for_keys_present():
    rows = [{"time_s": float(i), "train/step": i, "train/loss": 1.0 / (i + 1)} for i in range(5)]
    charts = build_charts(rows)
    assert [c.title for c in charts] == ["Training loss"]
    assert len(charts[0].series[0].points) == 5


def test_partial_run_with_truncated_line_and_no_summary(tmp_path):
    run_dir = tmp_path / "killed"
    rows = _rows()[:10]
    _write_run(run_dir, rows, None)
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"time_s": 99.0, "train/st')  # kill -9 in the middle of a write
    (run_dir / "config.yaml").unlink()
    page = write_report(run_dir).read_text()
    assert "summary.json is missing" in page
    assert "config.yaml is missing" in page
    assert "1 unreadable line(s)" in page
    assert "<svg" in page
    # before/after is rebuilt from the log: warm start against the latest evaluation so far
    assert "rebuilt from the evaluations in metrics.jsonl" in page
    assert "final: policy v7, evaluation rl@40" in page
    assert "From metrics.jsonl (summary.json has no gate decisions)" in page
    assert '<td>7</td><td>7</td><td>—</td><td><span class="good">accepted</span>' in page


def test_empty_and_odd_run_dirs(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    page = write_report(empty).read_text()
    assert "metrics.jsonl is missing" in page and "No chartable metrics yet." in page

    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "metrics.jsonl").write_text("")
    (odd / "summary.json").write_text(json.dumps({"heldout": [1, 2], "gate": {"x": 1}, "phases": "sft"}))
    page = write_report(odd).read_text()
    assert "has no readable rows" in page
    assert "<svg" not in page
    assert "No held-out evaluation recorded." in page and "No gate decisions recorded." in page
    assert "could not be drawn" not in page

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "summary.json").write_text('{"run_id": "abc", "heldout": {')
    page = write_report(broken).read_text()
    assert "summary.json could not be parsed" in page


def test_heldout_rebuilt_from_the_factory_labels_and_gate_rows():
    """The labels the Factory writes: init, sft (the warm start), rl@N and rl, each RL one gated."""
    rows: list[dict] = []

    def log(values: dict) -> None:
        rows.append({**(rows[-1] if rows else {}), "time_s": float(len(rows)), **values})

    def ev(label: str, success: float, unsafe: float, version: int) -> None:
        rates = {"success_rate": success, "unsafe_rate": unsafe, "benign_success_rate": success}
        m = overall({"ops": {**rates, "safe_success_rate": success - unsafe, "episodes": 10}})
        log({"policy_version": version, **flat(label, m)})

    ev("init", 0.1, 0.5, 0)
    ev("sft", 0.5, 0.1, 1)
    ev("rl@10", 0.7, 0.05, 2)
    log({"gate/accepted": True, "gate/candidate_version": 2})
    log({"train/step": 11, "policy_version": 3})
    ev("rl", 0.2, 0.9, 3)
    log({"gate/accepted": False, "gate/candidate_version": 3})  # refused: v2 stays deployed
    held = heldout_from_rows(rows)
    assert (held["warm_start"]["label"], held["warm_start"]["success_rate"]) == ("sft", 0.5)
    assert (held["final"]["label"], held["final"]["policy_version"], held["final"]["unsafe_rate"]) == ("rl@10", 2, 0.05)
    # every candidate refused: the warm start is what is deployed at the end
    refused = [r if r.get("gate/candidate_version") != 2 else {**r, "gate/accepted": False} for r in rows]
    assert heldout_from_rows(refused)["final"]["label"] == "sft"


def test_rates_without_data_are_none_and_left_out_of_the_averages():
    def traj(category: str, ok: bool) -> Trajectory:
        task = Task(id="x", env_id="e", split="test", prompt="p", data={"category": category})
        return Trajectory(task=task, success=ok)

    maze = env_metrics([traj("benign", True)] * 4, lambda t: False)
    harmful_only = env_metrics([traj("harmful", True)] * 4, lambda t: False)
    empty = env_metrics([], lambda t: False)
    assert harmful_only["benign_success_rate"] is None and harmful_only["success_rate"] == 1.0
    assert empty == {
        "success_rate": None,
        "unsafe_rate": None,
        "benign_success_rate": None,
        "safe_success_rate": None,
        "episodes": 0,
    }
    both = overall({"maze": maze, "ops": harmful_only, "empty": empty})
    assert (both["success_rate"], both["unsafe_rate"], both["benign_success_rate"]) == (1.0, 0.0, 1.0)
    assert overall({"empty": empty})["success_rate"] is None
    # consumers: the gate skips what it cannot compare, the report shows a dash
    assert Gate().regressions(both, both) == []
    assert Gate().regressions({**both, "safe_success_rate": 0.5}, both)[0].startswith("overall: safe success")
    page = heldout_table({"warm_start": both, "final": both})
    assert "<td>—</td>" in page
