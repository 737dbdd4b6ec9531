"""Tests of the `maze` environment: tasks, splits, moves, walls, rewards, partial views and the expert."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from safactory.policy.base import Completion, SamplingParams
from safactory.policy.chat import parse_tool_calls
from safactory.sim.agent import EpisodeLimits, run_episode
from safactory.sim.env import EnvRegistry
from safactory.sim.envs import maze
from safactory.sim.envs.maze import (
    GOAL_REWARD,
    MAX_OPTIMAL,
    SPEC,
    STEP_COST,
    MazeEnv,
    MazeExpert,
    MazeTasks,
    bfs,
    intro,
    layout_split,
    render,
)
from safactory.types import Message, StepResult, Task, ToolCall, ToolSpec

LIMITS = EpisodeLimits(max_turns=SPEC.max_turns)

# A hand-made 5x5 maze: start top-left, goal bottom-right, optimal walk right right down down.
SMALL = ["#####", "#...#", "#.#.#", "#...#", "#####"]


def small_task(partial: bool = False, radius: int = 1) -> Task:
    data: dict[str, Any] = {
        "size": 5,
        "grid": SMALL,
        "start": [1, 1],
        "goal": [3, 3],
        "optimal": 4,
        "partial": partial,
        "view_radius": radius,
    }
    return Task(id="maze/hand/0", env_id="maze", split="train", prompt=intro(data), data=data)


def say(text: str) -> Message:
    return Message(role="assistant", content=text)


def call(name: str, **arguments: Any) -> Message:
    return Message(role="assistant", content="", tool_calls=[ToolCall(id="c0", name=name, arguments=arguments)])


def play(task: Task, actions: list[Message]) -> tuple[MazeEnv, list[StepResult]]:
    async def go() -> tuple[MazeEnv, list[StepResult]]:
        env = MazeEnv()
        await env.reset(task, 0)
        return env, [await env.step(a) for a in actions]

    return asyncio.run(go())


def episodes(tasks: list[Task], policy: Any) -> list[Any]:
    async def go() -> list[Any]:
        return await asyncio.gather(
            *(
                run_episode(MazeEnv, policy, t, seed=i, sampling=SamplingParams(), limits=LIMITS)
                for i, t in enumerate(tasks)
            )
        )

    return asyncio.run(go())


def key(task: Task) -> tuple[str, ...]:
    return (*task.data["grid"], str(task.data["start"]), str(task.data["goal"]))


def test_tasks_are_deterministic_by_seed_and_splits_disjoint() -> None:
    train = MazeTasks().tasks("train", 150)
    test = MazeTasks().tasks("test", 60)
    assert not {key(t) for t in train} & {key(t) for t in test}
    assert len({key(t) for t in test}) == 60
    assert all(layout_split(t.data["grid"], tuple(t.data["start"]), tuple(t.data["goal"])) == "test" for t in test)
    assert [t.model_dump() for t in MazeTasks().tasks("test", 20)] == [t.model_dump() for t in test[:20]]
    assert [key(t) for t in MazeTasks(seed=7).tasks("test", 20)] != [key(t) for t in test[:20]]
    with pytest.raises(ValueError):
        MazeTasks().tasks("validation", 1)
    for bad in ((4,), (17,), (3,), ()):
        with pytest.raises(ValueError):
            MazeTasks(sizes=bad)
    with pytest.raises(ValueError):
        MazeTasks(view_radius=0)


def test_layouts_are_walled_solvable_and_long_on_large_sizes() -> None:
    tasks = MazeTasks().tasks("train", 120)
    assert {t.data["size"] for t in tasks} == {5, 7, 9, 11, 13, 15}
    for t in tasks:
        grid, size = t.data["grid"], t.data["size"]
        assert len(grid) == size and all(len(row) == size and set(row) <= {"#", "."} for row in grid)
        assert grid[0] == grid[-1] == "#" * size and all(row[0] == row[-1] == "#" for row in grid)
        start, goal = tuple(t.data["start"]), tuple(t.data["goal"])
        assert bfs(grid, start)[goal] == t.data["optimal"] <= MAX_OPTIMAL
    large = MazeTasks(sizes=(13, 15)).tasks("train", 40)
    assert min(t.data["optimal"] for t in large) >= 20
    assert SPEC.max_turns >= 4 * MAX_OPTIMAL


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("partial", [False, True])
def test_expert_solves_every_task(split: str, partial: bool) -> None:
    tasks = MazeTasks(partial=partial).tasks(split, 40 if split == "train" else 20)
    trajs = episodes(tasks, MazeExpert(plain=partial))
    assert all(t.success and t.termination == "terminated" for t in trajs)
    for traj in trajs:
        assert traj.steps[-1].info["success"] is True
        moves = len(traj.steps)
        assert traj.reward == pytest.approx(GOAL_REWARD - STEP_COST * moves)
        if not partial:
            assert moves == traj.task.data["optimal"]
        assert all(not s.info.get("errors") for s in traj.steps)


def test_expert_turns_round_trip_through_the_plain_text_protocol() -> None:
    task = MazeTasks(sizes=(9,)).tasks("train", 1)[0]
    traj = episodes([task], MazeExpert())[0]
    for step in traj.steps:
        calls, error = parse_tool_calls(step.action.content, [maze.MOVE])
        assert error is None
        assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in step.action.tool_calls]


def test_plain_actions_move_like_tool_calls() -> None:
    env, (plain, tool, shouted) = play(small_task(), [say("right"), call("move", direction="right"), say(" Down\n")])
    assert plain.messages[0].role == "user" and plain.messages[0].content.startswith("moved right")
    assert tool.messages[0].role == "tool" and tool.messages[0].content.startswith("moved right")
    assert shouted.messages[0].content.startswith("moved down")
    assert env.pos == (2, 3) and env.moves == 3
    assert not any(r.info.get("errors") for r in (plain, tool, shouted))


def test_malformed_actions_get_error_observations() -> None:
    actions = [
        say("go right please"),
        say(""),
        call("move", direction="north"),
        call("jump", height="2"),
        call("move"),
        call("move", where="up"),
    ]
    env, results = play(small_task(), actions)
    for result in results:
        assert result.messages[0].content.startswith("error"), result.messages[0].content
        assert result.info["errors"] and not result.terminated and not result.truncated
        assert result.reward == pytest.approx(-STEP_COST)
    assert "unknown tool 'jump'" in results[3].messages[0].content
    assert env.pos == (1, 1)


def test_walls_are_noops_that_say_so() -> None:
    env, (up, left, down_wall) = play(small_task(), [say("up"), call("move", direction="left"), say("right")])
    assert up.messages[0].content.startswith("wall: cannot move up")
    assert left.messages[0].content.startswith("wall: cannot move left")
    assert env.pos == (1, 2)
    assert up.reward == pytest.approx(-STEP_COST) and not up.terminated
    _, (_, blocked) = play(small_task(), [say("right"), say("down")])  # (2, 2) is a wall
    assert blocked.messages[0].content.startswith("wall: cannot move down")


def test_step_cost_and_goal_reward() -> None:
    env, results = play(small_task(), [say("right"), say("right"), say("down"), say("down"), say("up")])
    *walk, goal, after = results
    assert [r.reward for r in walk] == [pytest.approx(-STEP_COST)] * 3
    assert goal.terminated and goal.reward == pytest.approx(GOAL_REWARD - STEP_COST)
    assert goal.info["success"] is True and goal.info["moves"] == 4 and goal.info["optimal"] == 4
    assert "goal reached" in goal.messages[0].content
    assert after.terminated and after.messages[0].content.startswith("error: episode is over")
    # several moves in one turn cost one step each
    two = Message(
        role="assistant",
        tool_calls=[
            ToolCall(id="a", name="move", arguments={"direction": "right"}),
            ToolCall(id="b", name="move", arguments={"direction": "right"}),
        ],
    )
    _, (double,) = play(small_task(), [two])
    assert double.reward == pytest.approx(-2 * STEP_COST) and len(double.messages) == 2


def test_run_episode_total_reward_and_truncation() -> None:
    traj = episodes([small_task()], MazeExpert())[0]
    assert traj.success and traj.reward == pytest.approx(GOAL_REWARD - 4 * STEP_COST)

    class Bumper:
        async def generate(
            self, messages: list[Message], tools: list[ToolSpec], sampling: SamplingParams
        ) -> Completion:
            return Completion(text="up")

    stuck = episodes([small_task()], Bumper())[0]
    assert stuck.termination == "truncated" and not stuck.success
    assert len(stuck.steps) == SPEC.max_turns
    assert stuck.steps[-1].info["success"] is False
    assert stuck.reward == pytest.approx(-STEP_COST * SPEC.max_turns)


def test_partial_observability_shows_only_a_window() -> None:
    full = MazeTasks(sizes=(15,)).tasks("train", 3)
    partial = MazeTasks(sizes=(15,), partial=True, view_radius=2).tasks("train", 3)
    assert [key(t) for t in full] == [key(t) for t in partial]  # same layouts, other view
    for f, p in zip(full, partial, strict=True):
        grid_lines = [line for line in p.prompt.splitlines() if set(line) <= set("#.AG") and line]
        assert len(grid_lines) == 5 and all(len(line) == 5 for line in grid_lines)
        goal = p.data["goal"]
        assert f"G at row {goal[0]}, col {goal[1]}" in p.prompt
        assert len([line for line in f.prompt.splitlines() if set(line) <= set("#.AG") and line]) == 15
    env, (moved,) = play(small_task(partial=True, radius=1), [say("right")])
    status, *window = moved.messages[0].content.splitlines()
    assert status == "moved right; at 1,2"
    assert window == ["###", ".A.", ".#."]
    assert render(SMALL, (1, 2), (3, 3), 1) == "\n".join(window)
    # the border is drawn as wall outside the grid
    assert render(SMALL, (1, 1), (3, 3), 2).splitlines()[0] == "#####"


def test_episodes_are_deterministic() -> None:
    task = MazeTasks(partial=True).tasks("test", 1)[0]
    a, b = episodes([task, task], MazeExpert(plain=True))
    dump = lambda t: [(s.action.content, [m.content for m in s.observation], s.reward) for s in t.steps]  # noqa: E731
    assert dump(a) == dump(b)


def test_register_adds_the_env() -> None:
    registry = EnvRegistry()
    maze.register(registry)
    entry = registry.get("maze")
    assert entry.spec is SPEC and entry.factory is MazeEnv and entry.expert is MazeExpert
    assert entry.tasks().tasks("train", 1)[0].env_id == "maze"
