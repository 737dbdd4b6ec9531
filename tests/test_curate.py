"""Curation filters: staleness, equal-reward groups, duplicates, length, safety, and their composition."""

from __future__ import annotations

import asyncio

import pytest

from safactory.data.curate import (
    curate,
    duplicates,
    equal_rewards,
    group_by_id,
    length,
    n_tokens,
    per_group,
    safety,
    staleness,
    version_gap,
)
from safactory.data.judges import RuleSafetyJudge
from safactory.data.verdicts import SafetyVerdict
from safactory.evolve.experience import group_batch, rl_sequences
from safactory.policy.base import SamplingParams
from safactory.policy.chat import PlainTextChat, assistant_text
from safactory.policy.tokenizer import CharTokenizer
from safactory.sim.agent import EpisodeLimits, run_episode
from safactory.sim.envs.ops import SPEC, OpsEnv, OpsExpert, OpsTasks
from safactory.types import Message, Step, Task, TokenTrace, Trajectory

TOK = CharTokenizer()
CHAT = PlainTextChat(TOK)


def episode(
    prompt: str,
    actions: list[str],
    *,
    reward: float = 0.0,
    versions: list[int] | None = None,
    group: str = "",
    traces: bool = True,
    unsafe_at: int | None = None,
) -> Trajectory:
    """A trajectory whose traces are what the plain-text chat renders (one observation per turn)."""
    task = Task(id=prompt[:10], env_id="toy", split="train", prompt=prompt)
    messages = [Message(role="user", content=prompt)]
    steps = []
    for i, text in enumerate(actions):
        action = Message(role="assistant", content=text)
        trace = None
        if traces:
            version = versions[i] if versions else 0
            completion = TOK.encode(assistant_text(action)) + [TOK.eos_id]
            trace = TokenTrace(prompt_ids=CHAT.prompt_ids(messages), completion_ids=completion, policy_version=version)
        observation = [Message(role="user", content=f"obs {i}")]
        info = {"unsafe_actions": ["bad:thing"] if i == unsafe_at else []}
        steps.append(Step(index=i, action=action, observation=observation, trace=trace, info=info))
        messages += [action, *observation]
    traj = Trajectory(group_id=group, task=task, env_id="toy", prompt=messages[:1], steps=steps, reward=reward)
    traj.task_hash = task.hash()
    return traj


def test_version_gap_and_staleness() -> None:
    fresh = episode("p", ["a()", "b()"], versions=[5, 6], group="g1", reward=1.0)
    stale = episode("p", ["a()", "c()"], versions=[3, 6], group="g1")
    untraced = episode("q", ["a()"], traces=False, group="g2")
    assert (version_gap(fresh, 6), version_gap(stale, 6), version_gap(untraced, 6)) == (1, 3, 0)
    assert version_gap(fresh, 2) == 0  # a sample newer than the "current" version is not stale
    groups = group_by_id([fresh, stale, untraced])
    kept, report = curate(groups, staleness(6, max_gap=2))
    assert kept == [[untraced]]  # the whole group goes, so survivors' advantages stay meaningful
    assert report.dropped("staleness") == 2
    kept, _ = curate(groups, staleness(6, max_gap=2, whole_group=False))
    assert kept == [[fresh], [untraced]]
    kept, _ = curate(groups, staleness(6, max_gap=3))
    assert kept == groups
    with pytest.raises(ValueError):
        staleness(6, -1)


def test_equal_reward_groups_are_dropped() -> None:
    same = [episode("p", ["a()"], reward=1.0, group="s"), episode("p", ["b()"], reward=1.0, group="s")]
    varied = [episode("q", ["a()"], reward=0.0, group="v"), episode("q", ["b()"], reward=1.0, group="v")]
    single = [episode("r", ["a()"], reward=1.0, group="x")]
    kept, report = curate([same, varied, single], equal_rewards())
    assert kept == [varied]
    assert report.as_dict()["equal_rewards"] == {
        "groups_in": 3,
        "groups_out": 1,
        "trajectories_in": 5,
        "trajectories_out": 2,
    }
    near = [episode("q", ["a()"], reward=0.5, group="n"), episode("q", ["b()"], reward=0.5 + 1e-9, group="n")]
    assert curate([near], equal_rewards(tolerance=1e-6))[0] == []
    # the same decision group_batch makes
    assert group_batch([same, varied, single]).groups_used == 1


def test_duplicates_same_task_same_actions() -> None:
    a = episode("p", ["read(x)", "finish(1)"], group="g1", reward=1.0)
    a_again = episode("p", ["read(x)", "finish(1)"], group="g2", reward=0.0)  # same task, same actions
    other_actions = episode("p", ["read(y)", "finish(1)"], group="g2")
    other_task = episode("p2", ["read(x)", "finish(1)"], group="g3")
    kept, report = curate([[a], [a_again, other_actions], [other_task]], duplicates())
    assert kept == [[a], [other_actions], [other_task]] and report.dropped("duplicates") == 1
    # a shared memory deduplicates across calls (batches); a fresh filter starts empty
    seen: set[str] = set()
    assert curate([[a]], duplicates(seen))[0] == [[a]]
    assert curate([[a_again]], duplicates(seen))[0] == []
    assert curate([[a_again]], duplicates())[0] == [[a_again]]
    assert curate([[a, a_again]], duplicates(whole_group=True))[0] == []


def test_duplicates_whole_group_forgets_dropped_groups() -> None:
    """Episodes of a group dropped as a whole were never kept, so they do not make later ones repeats."""
    z, z_again = episode("p", ["z()"], group="g1"), episode("p", ["z()"], group="g2")
    x, x_again, w = (
        episode("p", ["x()"], group="g2"),
        episode("p", ["x()"], group="g3"),
        episode("p", ["w()"], group="g3"),
    )
    kept, report = curate([[z], [x, z_again], [x_again, w]], duplicates(whole_group=True))
    assert kept == [[z], [x_again, w]] and report.dropped("duplicates") == 2


def test_length_by_steps_and_tokens() -> None:
    short = episode("p", ["a()"])
    long = episode("p", ["a()", "b()", "c()", "d()"])
    untraced = episode("p", ["a()", "b()"], traces=False)
    for traj in (short, long):
        assert n_tokens(traj) == sum(len(s.input_ids) for s in rl_sequences(traj)) > 0
    assert n_tokens(untraced) == 0
    kept, _ = curate([[short], [long], [untraced]], length(max_steps=2))
    assert kept == [[short], [untraced]]
    kept, _ = curate([[short], [long], [untraced]], length(min_steps=2))
    assert kept == [[long], [untraced]]
    kept, _ = curate([[short, long]], length(max_tokens=n_tokens(short)))
    assert kept == [[short]]
    assert curate([[short, long]], length(max_tokens=n_tokens(short), whole_group=True))[0] == []


def test_safety_by_env_labels_and_verdicts() -> None:
    clean = episode("p", ["a()"], group="g", reward=1.0)
    labelled = episode("p", ["b()", "c()"], group="g", unsafe_at=1)
    judged = episode("p", ["d()"], group="g")
    unsure = episode("p", ["e()"], group="g")
    verdicts = {
        judged.id: [
            SafetyVerdict(judge="j", judge_version="1", unsafe=False),
            {"judge": "k", "judge_version": "1", "unsafe": True, "severity": 1.0, "reasons": [], "meta": {}},
        ],
        unsure.id: [SafetyVerdict(judge="llm", judge_version="1", unsafe=None)],
        clean.id: [SafetyVerdict(judge="j", judge_version="1", unsafe=False)],
    }
    group = [clean, labelled, judged, unsure]
    assert curate([group], safety(verdicts))[0] == [[clean, unsure]]
    assert curate([group], safety(verdicts, drop_unknown=True))[0] == [[clean]]
    assert curate([group], safety(verdicts, use_env_labels=False))[0] == [[clean, labelled, unsure]]
    assert curate([group], safety())[0] == [[clean, judged, unsure]]
    assert curate([group], safety(verdicts, whole_group=True))[0] == []


def test_filters_compose_in_order_with_a_report() -> None:
    g1 = [episode("p", ["a()"], reward=1.0, versions=[9], group="g1"), episode("p", ["b()"], versions=[9], group="g1")]
    g2 = [episode("q", ["a()"], reward=1.0, versions=[1], group="g2"), episode("q", ["b()"], versions=[1], group="g2")]
    g3 = [episode("r", ["a()"], reward=1.0, versions=[9], group="g3"), episode("r", ["a()"], versions=[9], group="g3")]
    g4 = [episode("s", ["a()"], reward=1.0, versions=[9], group="g4"), episode("s", ["b()"], versions=[9], group="g4")]
    g4[1].steps[0].info["unsafe_actions"] = ["x"]
    g4.append(episode("s", ["c()"], reward=0.0, versions=[9], group="g4"))
    trajs = [t for g in (g1, g2, g3, g4) for t in g]
    kept, report = curate(
        group_by_id(trajs),
        staleness(10, max_gap=2),
        duplicates(),
        safety(),
        equal_rewards(),
        per_group(lambda g: len(g) >= 2),
    )
    assert [[t.id for t in g] for g in kept] == [[t.id for t in g1], [g4[0].id, g4[2].id]]
    names = [stage[0] for stage in report.stages]
    assert names[:4] == ["staleness", "duplicates", "safety", "equal_rewards"]
    assert [report.dropped(n) for n in names[:4]] == [2, 1, 1, 1]
    assert group_by_id([episode("a", ["x()"]), episode("b", ["x()"])]) != []  # no group id: one group each
    assert len(group_by_id([episode("a", ["x()"]), episode("b", ["x()"])])) == 2


def test_safety_filter_on_ops_episodes_with_rule_verdicts() -> None:
    tasks = OpsTasks().tasks("train", 20)

    async def go() -> list[Trajectory]:
        limits = EpisodeLimits(max_turns=SPEC.max_turns)
        out = []
        for i, task in enumerate(tasks):
            for naive in (False, True):
                traj = await run_episode(
                    OpsEnv,
                    OpsExpert(naive=naive),
                    task,
                    seed=0,
                    sampling=SamplingParams(),
                    limits=limits,
                    group_id=f"g{i}",
                )
                out.append(traj)
        return out

    trajs = asyncio.run(go())
    judge = RuleSafetyJudge()
    verdicts = {t.id: [judge.judge(t)] for t in trajs}
    kept, _ = curate(group_by_id(trajs), safety(verdicts, use_env_labels=False))
    kept_ids = {t.id for g in kept for t in g}
    assert kept_ids == {t.id for t in trajs if not t.steps[-1].info["unsafe"]}
    assert len(kept_ids) >= 20  # every safe-expert episode, and the benign naive ones
