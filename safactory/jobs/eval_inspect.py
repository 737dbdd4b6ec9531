"""`safactory eval inspect DIR`: an evaluation as an inspect_ai log, to browse with `inspect view`.

The log is built from `DIR/eval.json` and the episodes of its run in its store, and written
with inspect_ai's own writer in its `.eval` format (the one `inspect view` lists whatever the
file is called) to `DIR/inspect/<created>_<suite>_<id>.eval`, named the way inspect names its
own logs. What goes where:

* the task is the suite, the model the policy spec, the eval's run id our run id;
* one sample per episode: id = task id, epoch = its attempt (1, 2, ... in the order stored),
  input = the first user message, messages = the whole conversation (tool calls with their
  dict arguments, tool results with the id and name of the call they answer);
* three scores per sample: `success` (C or I, with the reward, the safety verdict and the
  termination in its metadata), `unsafe` (1 or 0, from the same rule judge `safactory eval`
  uses) and `reward`;
* the results carry the overall metrics of eval.json as inspect metrics (value, with the
  interval and count in each metric's metadata); every metric, per env as well, is in the
  results' metadata.

inspect_ai is optional: `pip install inspect-ai`.
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime
from importlib import metadata as package_metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safactory.data.judges import RuleSafetyJudge
from safactory.data.store import TrajectoryStore
from safactory.types import Message, Trajectory

if TYPE_CHECKING:
    from inspect_ai.log import EvalLog, EvalSample, EvalScore
    from inspect_ai.model import ChatMessage, ModelUsage

INSTALL_HINT = "exporting to inspect needs inspect_ai: pip install inspect-ai"

# Which scorer each overall metric of eval.json belongs to in the inspect log.
METRIC_GROUPS: dict[str, tuple[str, ...]] = {
    "success": ("success_rate", "pass_at_k", "pass_hat_k", "utility", "utility_under_attack"),
    "unsafe": ("unsafe_rate", "attack_success_rate", "refusal_rate", "over_refusal_rate"),
    "reward": ("mean_reward", "turns", "tokens", "latency_s"),
}


def write_inspect_log(eval_dir: Path, out: Path | None = None) -> Path:
    """Write the evaluation in `eval_dir` as an inspect_ai log and return its path.

    `out`: the file to write (`.eval` or `.json`, inspect's two formats); default
    `eval_dir/inspect/<created>_<suite>_<id>.eval`. Raises ValueError when eval.json or its
    run's episodes are missing, RuntimeError when inspect_ai is not installed.
    """
    try:
        from inspect_ai.log import write_eval_log
    except ImportError as exc:
        raise RuntimeError(INSTALL_HINT) from exc
    eval_dir = Path(eval_dir)
    result = _load_eval(eval_dir)
    store = TrajectoryStore(_store_url(eval_dir, result["store"]))
    try:
        trajs = list(store.iter(run_id=result["run_id"], kind="eval"))
        run = _run_info(store, result["run_id"])
    finally:
        store.close()
    if not trajs:
        raise ValueError(f"{eval_dir}: the store holds no episodes of run {result['run_id']}")
    log = build_eval_log(result, trajs, run)
    if out is None:
        out = eval_dir / "inspect" / f"{_log_name(log.eval.created, log.eval.task, log.eval.task_id)}.eval"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_eval_log(log, str(out), format="json" if out.suffix == ".json" else "eval")
    return out


def build_eval_log(result: dict[str, Any], trajs: list[Trajectory], run: dict[str, Any]) -> EvalLog:
    """The inspect EvalLog of one evaluation: eval.json's data, its episodes, its run's record."""
    from inspect_ai.log import (
        EvalConfig,
        EvalDataset,
        EvalLog,
        EvalPlan,
        EvalPlanStep,
        EvalResults,
        EvalSpec,
        EvalStats,
        HeadlineMetric,
    )
    from inspect_ai.model import GenerateConfig

    config = run.get("config", {})
    judge = RuleSafetyJudge()
    attempts: Counter[str] = Counter()
    samples = []
    for traj in trajs:
        attempts[traj.task.id] += 1
        samples.append(_sample(traj, attempts[traj.task.id], result["policy"], judge.judge(traj).unsafe is True))
    task_ids = list(dict.fromkeys(t.task.id for t in trajs))
    epochs = max(attempts.values())
    created = run.get("created_at") or min(t.started_at for t in trajs)
    generate = GenerateConfig(max_tokens=config.get("max_tokens"), temperature=_temperature(config, epochs))
    usage = _usage(trajs)
    spec = EvalSpec(
        run_id=result["run_id"],
        eval_id=result["run_id"].removeprefix("eval-"),
        created=_iso(created),
        task=result["suite"],
        task_id=result["run_id"].removeprefix("eval-").split("-")[-1][:12],
        task_args={"suite": result["suite"]},
        dataset=EvalDataset(name=result["suite"], samples=len(task_ids), sample_ids=task_ids),
        model=result["policy"],
        model_generate_config=generate,
        config=EvalConfig(epochs=epochs),
        packages=_packages(),
        metadata={
            "safactory": {
                "run_id": result["run_id"],
                "store": _hide_password(result["store"]),
                "policy_version": result.get("policy_version"),
                "weights_hash": result.get("weights_hash", ""),
                "code_version": run.get("code_version", ""),
                "suite_entries": config.get("suite_entries", []),
                "redacted": config.get("redact"),
                "tools": {t.env_id: [tool.name for tool in t.tools] for t in trajs},
            }
        },
    )
    step = EvalPlanStep(solver="safactory_policy", params={"policy": result["policy"], "seed": config.get("seed")})
    plan = EvalPlan(steps=[step], config=generate)
    overall = result["metrics"]["overall"]
    results = EvalResults(
        total_samples=len(samples),
        completed_samples=sum(1 for t in trajs if t.error is None),
        scores=[_eval_score(name, keys, overall) for name, keys in METRIC_GROUPS.items()],
        headline=HeadlineMetric(scorer="success", metric="success_rate"),
        metadata={"metrics": result["metrics"]},
    )
    finished = max(t.started_at + t.duration_s for t in trajs)
    stats = EvalStats(
        started_at=_iso(min(t.started_at for t in trajs)),
        completed_at=_iso(finished),
        model_usage={result["policy"]: usage} if usage.total_tokens else {},
    )
    return EvalLog(status="success", eval=spec, plan=plan, results=results, stats=stats, samples=samples)


def _sample(traj: Trajectory, epoch: int, model: str, unsafe: bool) -> EvalSample:
    from inspect_ai.log import EvalSample
    from inspect_ai.model import ChatCompletionChoice, ChatMessageAssistant, ModelOutput
    from inspect_ai.scorer import CORRECT, INCORRECT, Score

    messages = [_chat_message(m, f"{traj.id}-{i}", model) for i, m in enumerate(traj.messages())]
    first_user = next((m.content for m in traj.messages() if m.role == "user"), traj.task.prompt)
    last = next((m for m in reversed(messages) if isinstance(m, ChatMessageAssistant)), None)
    trace = traj.steps[-1].trace if traj.steps else None
    output = ModelOutput(model=model)
    if last is not None:
        stop = "tool_calls" if last.tool_calls else "stop"
        if trace is not None and trace.finish_reason in ("stop", "max_tokens", "tool_calls"):
            stop = trace.finish_reason
        output = ModelOutput(model=model, choices=[ChatCompletionChoice(message=last, stop_reason=stop)])
    verdict = {"reward": traj.reward, "unsafe": unsafe, "termination": traj.termination}
    scores = {
        "success": Score(
            value=CORRECT if traj.success else INCORRECT,
            answer=last.text if last is not None else None,
            explanation=f"termination: {traj.termination}" + (f"; error: {traj.error}" if traj.error else ""),
            metadata=verdict,
        ),
        "unsafe": Score(value=1 if unsafe else 0),
        "reward": Score(value=float(traj.reward)),
    }
    usage = _usage([traj])
    return EvalSample(
        id=traj.task.id,
        epoch=epoch,
        input=first_user,
        target="",
        messages=messages,
        output=output,
        scores=scores,
        metadata={
            "env_id": traj.env_id,
            "env_version": traj.env_version,
            "trajectory_id": traj.id,
            "group_id": traj.group_id,
            "termination": traj.termination,
            "category": str(traj.task.data.get("category", "benign")),
            "split": traj.task.split,
            "seed": traj.seed,
            "turns": len(traj.steps),
            "error": traj.error,
            "task_data": traj.task.data,
        },
        model_usage={model: usage} if usage.total_tokens else {},
        started_at=_iso(traj.started_at) if traj.started_at else None,
        completed_at=_iso(traj.started_at + traj.duration_s) if traj.started_at else None,
        total_time=traj.duration_s,
        uuid=traj.id,
        turn_count=len(traj.steps),
    )


def _chat_message(message: Message, message_id: str, model: str) -> ChatMessage:
    """One of our OpenAI-style messages as the inspect chat message of its role."""
    from inspect_ai.model import ChatMessageAssistant, ChatMessageSystem, ChatMessageTool, ChatMessageUser
    from inspect_ai.tool import ToolCall

    if message.role == "system":
        return ChatMessageSystem(id=message_id, content=message.content)
    if message.role == "user":
        return ChatMessageUser(id=message_id, content=message.content)
    if message.role == "tool":
        return ChatMessageTool(
            id=message_id, content=message.content, tool_call_id=message.tool_call_id, function=message.name
        )
    calls = [ToolCall(id=c.id, function=c.name, arguments=dict(c.arguments)) for c in message.tool_calls]
    return ChatMessageAssistant(
        id=message_id, content=message.content, tool_calls=calls or None, model=model, source="generate"
    )


def _eval_score(name: str, keys: tuple[str, ...], overall: dict[str, Any]) -> EvalScore:
    """One scorer's results: the overall metrics of its group that have a value."""
    from inspect_ai.log import EvalMetric, EvalScore

    metrics = {}
    for key in keys:
        metric = overall.get(key)
        if metric is None:
            continue
        params = {"k": overall["k"]} if key in ("pass_at_k", "pass_hat_k") else {}
        interval = {"low": metric["low"], "high": metric["high"], "n": metric["n"]}
        metrics[key] = EvalMetric(name=key, value=metric["value"], params=params, metadata=interval)
    return EvalScore(name=name, scorer=name, scored_samples=overall["episodes"], unscored_samples=0, metrics=metrics)


def _usage(trajs: list[Trajectory]) -> ModelUsage:
    """Token usage from the recorded traces (none for policies that record no tokens)."""
    from inspect_ai.model import ModelUsage

    traces = [s.trace for t in trajs for s in t.steps if s.trace is not None]
    prompt = sum(len(tr.prompt_ids) for tr in traces)
    completion = sum(len(tr.completion_ids) for tr in traces)
    return ModelUsage(input_tokens=prompt, output_tokens=completion, total_tokens=prompt + completion)


def _load_eval(eval_dir: Path) -> dict[str, Any]:
    file = eval_dir / "eval.json" if eval_dir.is_dir() else eval_dir
    if not file.is_file():
        raise ValueError(f"{eval_dir}: no eval.json (run `safactory eval ... --out {eval_dir}` first)")
    result = json.loads(file.read_text())
    missing = [k for k in ("suite", "policy", "run_id", "store", "metrics") if k not in result]
    if missing:
        raise ValueError(f"{file}: not an evaluation's eval.json (no {', '.join(missing)})")
    return result


def _store_url(eval_dir: Path, url: str) -> str:
    """The store eval.json names; a SQLite file that has moved with its directory is found there."""
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        here = (eval_dir if eval_dir.is_dir() else eval_dir.parent) / "store.db"
        if here.is_file():
            return f"sqlite:///{here.resolve()}"
        raise ValueError(f"the store of this evaluation is gone ({url})")
    return url


def _run_info(store: TrajectoryStore, run_id: str) -> dict[str, Any]:
    try:
        run = store.run_info(run_id)
    except KeyError:
        return {}
    return {**run, "config": json.loads(run.get("config") or "{}")}


def _temperature(config: dict[str, Any], epochs: int) -> float | None:
    if "temperature" not in config:
        return None
    return 0.0 if epochs == 1 else float(config["temperature"])


def _hide_password(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a SQLAlchemy URL: keep it as it is
        return url


def _packages() -> dict[str, str]:
    versions = {}
    for name in ("safactory", "inspect_ai"):
        try:
            versions[name] = package_metadata.version(name)
        except package_metadata.PackageNotFoundError:
            continue
    return versions


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")


def _log_name(created: str, task: str, task_id: str) -> str:
    """`<created>_<task>_<id>`, as inspect names its logs (no `_`, `/`, `:` or `+` inside a part)."""

    def clean(part: str) -> str:
        return "".join("-" if ch in "_/:+ " else ch for ch in part)

    return f"{clean(created)}_{clean(task)}_{clean(task_id)}"
