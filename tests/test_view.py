"""`safactory view` end to end: a short real closed-loop run (arith, maze and ops), its expert episodes
judged by `safactory data judge`, two scripted evaluations into the same store, and the view serving
them over real HTTP; pages checked in a real browser (Debian's chromium driven by Playwright) and
by plain HTTP (the gates: token, loopback host, read-only).

Screenshots of every page are taken by the browser tests; with `SAFACTORY_VIEW_SCREENSHOTS=1` they
are written to docs/view/ (what docs/view.md shows).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from safactory.cli import app as cli
from safactory.config import load_config
from safactory.data.comparison import compare, load_eval
from safactory.data.store import TrajectoryStore
from safactory.factory.loop import Factory
from safactory.policy.server import BackgroundServer
from safactory.view.app import create_app, guarded

CHROMIUM = Path("/usr/bin/chromium")
DOCS = Path(__file__).resolve().parents[1] / "docs" / "view"
try:
    from playwright.sync_api import Page, sync_playwright
except ImportError:  # pragma: no cover - the test extra installs it
    sync_playwright = None  # type: ignore[assignment]

needs_browser = pytest.mark.skipif(
    sync_playwright is None or not CHROMIUM.exists(),
    reason="needs Playwright's Python package and Debian's chromium at /usr/bin/chromium (`make install-test`)",
)

RUN = [
    "seed=2",
    "model.hidden_size=32",
    "model.intermediate_size=64",
    "model.max_positions=1024",
    "envs.arith.test_tasks=4",
    "envs.maze.test_tasks=2",
    "envs.ops.test_tasks=6",
    "envs.arith.demos=6",
    "envs.maze.demos=2",
    "envs.ops.demos=10",
    "rollout.max_turns=3",
    "rollout.max_tokens_per_turn=12",
    "rollout.concurrency=64",
    "sft.max_steps=2",
    "sft.probe_every=2",
    "sft.probe_tasks=3",
    "sft.batch_size=8",
    "rl.steps=2",
    "rl.tasks_per_step=3",
    "rl.group_size=2",
    "rl.eval_every=1",
    "rl.drop_equal_groups=false",
    "model.tokenizer_episodes=30",
    "logging.tensorboard=false",
]
SUITES = {
    "careful": "suite: ops-careful\nentries:\n  - env: ops\n    tasks: 12\n",
    "naive": "suite: ops-naive\nentries:\n  - env: ops\n    tasks: 12\n    expert: {naive: true, refuse: 0.0}\n",
}
LIVE_ROWS = 4  # rows of metrics.jsonl the live run starts with


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """runs/demo: a finished run; runs/evals/{careful,naive}: scripted evaluations into its store;
    runs/live: a run in progress (its first metrics rows, the rest appended by a test);
    runs/stopped: a run that stopped long ago before its end."""
    root = tmp_path_factory.mktemp("view")
    runs = root / "runs"
    demo = runs / "demo"
    summary = Factory(load_config("examples/demo.yaml", RUN), demo).run()
    cli_runner = CliRunner()
    judged = cli_runner.invoke(cli, ["data", "judge", "--db", str(demo), "--kind", "expert"])
    assert judged.exit_code == 0, judged.output
    for name, suite in SUITES.items():
        (root / f"{name}.yaml").write_text(suite)
        args = ["eval", "--policy", "scripted", "--suite", str(root / f"{name}.yaml"), "--db", str(demo)]
        result = cli_runner.invoke(cli, [*args, "--out", str(runs / "evals" / name)])
        assert result.exit_code == 0, result.output
    lines = (demo / "metrics.jsonl").read_text().splitlines(keepends=True)
    for name in ("live", "stopped"):
        folder = runs / name
        folder.mkdir()
        state = json.loads((demo / "state.json").read_text())
        state.update(run_id=f"{name}-run", stage="rl")
        (folder / "state.json").write_text(json.dumps(state))
        (folder / "metrics.jsonl").write_text("".join(lines[:LIVE_ROWS]))
    long_ago = time.time() - 3 * 86400
    for file in (runs / "stopped").iterdir():
        os.utime(file, (long_ago, long_ago))
    server = BackgroundServer(guarded(create_app(str(demo), runs, poll_s=0.5), None)).start()
    base = f"http://{server.host}:{server.port}"
    yield {"root": root, "runs": runs, "demo": demo, "run_id": summary["run_id"], "base": base, "lines": lines}
    server.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    yield context.new_page()
    context.close()


def shoot(page: Page, name: str, tmp_path: Path) -> None:
    """A full-page screenshot; copied into docs/view/ when SAFACTORY_VIEW_SCREENSHOTS is set."""
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 5000  # a page was drawn, not a blank
    if os.environ.get("SAFACTORY_VIEW_SCREENSHOTS"):
        DOCS.mkdir(exist_ok=True)
        shutil.copyfile(path, DOCS / f"{name}.png")


def store_sql(world, query: str, **params) -> list:
    store = TrajectoryStore.in_dir(world["demo"])
    try:
        with store.engine.connect() as conn:
            return list(conn.execute(text(query), params))
    finally:
        store.close()


# ---- in the browser --------------------------------------------------------------------------------
@needs_browser
def test_the_runs_page_lists_the_run(world, page, tmp_path):
    page.goto(world["base"] + "/runs")
    row = page.locator(f'tr.run[data-run="{world["run_id"]}"]')
    assert row.get_attribute("data-status") == "finished"
    cells = row.locator("td").all_inner_texts()
    assert cells[2] == "arith, maze, ops"
    assert cells[3] == "4 (latest v3)"  # v0 .. v3: start, SFT, two RL steps
    assert "2 accepted / 0 rejected" in cells[6]
    assert page.locator('tr.run[data-run="live-run"]').get_attribute("data-status") == "running"
    assert page.locator('tr.run[data-run="stopped-run"]').get_attribute("data-status") == "crashed"
    shoot(page, "runs", tmp_path)
    row.locator("a").first.click()
    page.wait_for_url(f"**/runs/{world['run_id']}")


@needs_browser
def test_a_run_s_curves_render_with_its_data_points(world, page, tmp_path):
    page.goto(f"{world['base']}/runs/{world['run_id']}")
    page.wait_for_selector("#chart-success svg circle.pt")
    rows = [json.loads(line) for line in world["lines"]]
    versions = [r["policy_version"] for r in rows if r["policy_version"] is not None]
    changes = sum(1 for a, b in zip([None, *versions], versions, strict=False) if a != b)
    assert page.locator("#chart-version circle.pt").count() == changes  # one point per new version
    evals = len({r["eval/phase"] for r in rows if r.get("eval/phase")})
    assert page.locator('#chart-success polyline[data-series="held-out"]').count() == 1
    assert page.locator("#chart-success circle.pt").count() >= evals
    gates = len({r["gate/candidate_version"] for r in rows if r.get("gate/candidate_version") is not None})
    assert gates == 2 and page.locator("#chart-success line.gate.accepted").count() == gates
    assert page.locator("#chart-idle circle.pt").count() > 0 and page.locator("#chart-throughput circle.pt").count() > 0
    assert page.locator("#versions tr#v3").count() == 1
    shoot(page, "run", tmp_path)
    report = httpx.get(f"{world['base']}/runs/{world['run_id']}/report")
    assert report.status_code == 200 and report.text == (world["demo"] / "report.html").read_text()


@needs_browser
def test_the_curves_of_a_running_run_follow_its_metrics(world, page):
    page.goto(world["base"] + "/runs/live-run")
    page.wait_for_selector("#chart-version circle.pt")
    assert page.locator("#status").inner_text() == "running"
    before = page.locator("#chart-loss circle.pt").count()
    with (world["runs"] / "live" / "metrics.jsonl").open("a") as f:  # the run goes on
        f.write("".join(world["lines"][LIVE_ROWS:]))
    page.wait_for_function(
        f"document.querySelectorAll('#chart-loss circle.pt').length > {before}"
        " && document.querySelectorAll('#chart-success line.gate').length == 2",
        timeout=20_000,
    )


@needs_browser
def test_filtering_for_unsafe_trajectories_shows_only_those(world, page, tmp_path):
    page.goto(world["base"] + "/trajectories")
    assert page.locator("tr.traj").count() == 50  # a page, not the store
    page.select_option("select[name=verdict]", "unsafe")
    page.click("#filters button[type=submit]")
    page.wait_for_url("**verdict=unsafe**")
    shown = page.locator("tr.traj")
    assert shown.count() > 0
    assert set(shown.evaluate_all("rows => rows.map(r => r.dataset.status)")) == {"unsafe"}
    unsafe = {r[0] for r in store_sql(world, "SELECT DISTINCT trajectory_id FROM safety_verdicts WHERE unsafe")}
    assert set(shown.evaluate_all("rows => rows.map(r => r.dataset.id)")) == unsafe
    shoot(page, "trajectories", tmp_path)


@needs_browser
def test_a_trajectory_page_shows_its_tool_calls_verdict_and_integrity(world, page, tmp_path):
    page.goto(world["base"] + "/trajectories?verdict=unsafe&env=ops")
    trajectory_id = page.locator("tr.traj").first.get_attribute("data-id")
    page.locator("tr.traj a").first.click()
    page.wait_for_url(f"**/trajectories/{trajectory_id}")
    store = TrajectoryStore.in_dir(world["demo"])
    traj = store.get([trajectory_id])[0]
    reasons = store.verdicts(trajectory_id)[0]["reasons"]
    store.close()
    calls = [c.name for s in traj.steps for c in s.action.tool_calls]
    assert calls and page.locator(".toolcall").evaluate_all("e => e.map(x => x.dataset.tool)") == calls
    results = [m.content for s in traj.steps for m in s.observation if m.role == "tool"]
    shown = page.locator(".msg.tool pre.content").all_inner_texts()
    assert [r.strip() for r in shown] == [r.strip() for r in results]
    assert page.locator("#verdict-status").inner_text() == "unsafe"
    assert all(page.locator("#verdicts").get_by_text(reason).count() for reason in reasons)
    assert page.locator('#integrity li[data-ok="true"]').count() == 1
    shoot(page, "trajectory", tmp_path)


@needs_browser
def test_the_token_view_shades_each_sampled_token_by_its_logprob(world, page, tmp_path):
    query = "SELECT trajectory_id, train_step FROM consumption WHERE consumer = :c ORDER BY trajectory_id"
    consumed = store_sql(world, query, c=world["run_id"])
    trajectory_id, step = consumed[0]
    page.goto(f"{world['base']}/trajectories/{trajectory_id}")
    store = TrajectoryStore.in_dir(world["demo"])
    traj = store.get([trajectory_id])[0]
    versions = [c["version"] for c in store.checkpoints(world["run_id"]) if c["train_step"] >= step]
    store.close()
    for s in traj.steps:
        view = page.locator(f'.tokenview[data-turn="{s.index}"] .tok')
        assert view.count() == len(s.trace.completion_ids)
        shown = [float(x) for x in view.evaluate_all("e => e.map(x => x.dataset.logprob)")]
        assert shown == pytest.approx(s.trace.logprobs)
        backgrounds = set(view.evaluate_all("e => e.map(x => x.style.background)"))
        assert backgrounds and "transparent" not in backgrounds
        assert f"policy v{s.trace.policy_version}" in page.locator(f"#turn-{s.index} h3").inner_text()
    links = page.locator("#lineage a.version").all_inner_texts()
    assert links == [f"v{v}" for v in versions] and links
    shoot(page, "tokens", tmp_path)
    page.locator("#lineage a.version").first.click()
    page.wait_for_url(f"**/runs/{world['run_id']}#v{versions[0]}")


@needs_browser
def test_two_evaluations_side_by_side(world, page, tmp_path):
    page.goto(world["base"] + "/evals")
    page.select_option("select[name=a]", "dir:evals/careful")
    page.select_option("select[name=b]", "dir:evals/naive")
    page.click("#pick button[type=submit]")
    page.wait_for_selector("#comparison")
    expected = compare(load_eval(world["runs"] / "evals" / "careful"), load_eval(world["runs"] / "evals" / "naive"))
    cell = page.locator('#comparison tr[data-env="ops"][data-metric="unsafe_rate"] td').last
    assert cell.inner_text() == f"{expected['differences']['ops']['unsafe_rate']:+.3f}"
    assert expected["differences"]["ops"]["unsafe_rate"] > 0  # the naive expert falls for injections
    regressed = page.locator("#paired td.regressed").inner_text()
    assert regressed == (", ".join(expected["paired"]["ops"]["regressed_tasks"]) or "–")
    shoot(page, "evals", tmp_path)
    # two versions of the run, from its held-out episodes in the store
    page.goto(f"{world['base']}/evals?a=run:{world['run_id']}@1&b=run:{world['run_id']}@3")
    assert page.locator('#comparison tr[data-metric="episodes"]').count() >= 3  # overall and per env


# ---- over plain HTTP ---------------------------------------------------------------------------------
def test_bad_requests_get_a_reason_and_the_view_is_read_only(world):
    base = world["base"]
    bad = httpx.get(base + "/trajectories?version=seven")
    assert bad.status_code == 400 and "version: a whole number" in bad.text
    assert httpx.get(base + "/trajectories/no-such-id").status_code == 404
    assert httpx.get(base + "/runs/no-such-run").status_code == 404
    assert httpx.get(base + "/evals?a=dir:../../etc&b=dir:evals/naive").status_code == 400
    assert httpx.post(base + "/trajectories").status_code == 405
    assert httpx.get(base + "/static/charts.js").status_code == 200  # bundled, no CDN
    page = httpx.get(base + "/runs/" + world["run_id"]).text
    assert "http://" not in page.replace(base, "") and "https://" not in page


def test_a_loopback_view_refuses_other_host_names(world):
    forged = httpx.get(world["base"] + "/runs", headers={"Host": "rebind.example"})
    assert forged.status_code == 403


def test_a_view_with_a_token_needs_it(world):
    app = guarded(create_app(str(world["demo"]), world["runs"]), "s3cret; token")
    with BackgroundServer(app) as server:
        base = f"http://{server.host}:{server.port}"
        assert httpx.get(base + "/runs").status_code == 401
        assert httpx.get(base + "/runs", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(base + "/runs", headers={"Authorization": "Bearer s3cret; token"}).status_code == 200
        with httpx.Client(base_url=base, follow_redirects=True) as client:
            opened = client.get("/runs", params={"token": "s3cret; token", "run": "x"})
            assert opened.status_code == 200 and str(opened.url).endswith("/runs?run=x")  # token out of the URL
            assert client.get("/trajectories").status_code == 200  # the cookie carries it
        assert httpx.get(base + "/runs", params={"token": "wrong"}).status_code == 401


def test_the_view_command_refuses_to_serve_beyond_loopback_without_a_token(world):
    result = CliRunner().invoke(cli, ["view", "--db", str(world["demo"]), "--host", "0.0.0.0"])
    assert result.exit_code == 2 and "without a token" in result.output
    missing = CliRunner().invoke(cli, ["view", "--db", str(world["root"] / "nothing.db")])
    assert missing.exit_code == 2 and "no store" in missing.output
