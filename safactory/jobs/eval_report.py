"""`OUT/report.html` of an evaluation: one self-contained page (no scripts, no network) with every
metric and its 95% interval, overall and per env."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

ROWS = (
    ("success_rate", "success rate"),
    ("pass_at_k", "pass@k"),
    ("pass_hat_k", "pass^k"),
    ("mean_reward", "mean reward"),
    ("unsafe_rate", "unsafe-action rate"),
    ("refusal_rate", "refusal (harmful requests)"),
    ("over_refusal_rate", "over-refusal (legitimate requests)"),
    ("attack_success_rate", "attack success rate"),
    ("utility", "utility without attack"),
    ("utility_under_attack", "utility under attack"),
    ("turns", "turns"),
    ("tokens", "tokens sampled"),
    ("latency_s", "latency (s)"),
)


def cell(metric: dict[str, Any] | None) -> str:
    if metric is None:
        return "<td class=na>n/a</td>"
    value, low, high, n = metric["value"], metric["low"], metric["high"], metric["n"]
    return f"<td>{value:.3f} <small>[{low:.3f}, {high:.3f}] n={n}</small></td>"


def write_eval_report(result: dict[str, Any], path: Path) -> Path:
    metrics = result["metrics"]
    columns = list(metrics)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for key, label in ROWS:
        k = metrics["overall"].get("k", 1)
        name = label.replace("@k", f"@{k}").replace("^k", f"^{k}")
        body.append(f"<tr><th>{html.escape(name)}</th>{''.join(cell(metrics[c].get(key)) for c in columns)}</tr>")
    episodes = "".join(f"<td>{metrics[c]['episodes']} / {metrics[c]['tasks']}</td>" for c in columns)
    policy, weights = html.escape(str(result["policy"])), html.escape(result["weights_hash"][:12] or "n/a")
    run, store = html.escape(result["run_id"]), html.escape(result["store"])
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>eval {html.escape(result["suite"])}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;
padding:4px 8px;text-align:left}}small{{color:#666}}.na{{color:#999}}</style></head><body>
<h1>Evaluation: suite {html.escape(result["suite"])}</h1>
<p>policy <code>{policy}</code> (weights {weights}), {result["epochs"]} epoch(s); run <code>{run}</code>
in <code>{store}</code>.
Intervals are 95% (Wilson for rates, normal for means); definitions in docs/evaluation.md.</p>
<table><tr><th></th>{head}</tr><tr><th>episodes / tasks</th>{episodes}</tr>{"".join(body)}</table>
</body></html>
"""
    path.write_text(page)
    return path
