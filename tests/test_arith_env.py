import asyncio

import pytest

from safactory.policy.base import SamplingParams
from safactory.sim.agent import EpisodeLimits, run_episode
from safactory.sim.env import ToolError
from safactory.sim.envs.arith import ArithEnv, ArithExpert, ArithTasks, expression_split, safe_eval
from safactory.types import Message, ToolCall


def call(name, **arguments):
    return Message(role="assistant", content="", tool_calls=[ToolCall(id="c0", name=name, arguments=arguments)])


def test_splits_are_disjoint_deterministic_and_from_the_generator(arith_tasks):
    train = arith_tasks.tasks("train", 500)
    test = arith_tasks.tasks("test", 200)
    train_exprs = {t.data["expression"] for t in train}
    test_exprs = {t.data["expression"] for t in test}
    assert not train_exprs & test_exprs
    assert len(test_exprs) == 200
    assert all(expression_split(e) == "test" for e in test_exprs)
    assert [t.prompt for t in ArithTasks().tasks("test", 50)] == [t.prompt for t in test[:50]]
    assert [t.prompt for t in ArithTasks(seed=7).tasks("test", 50)] != [t.prompt for t in test[:50]]
    with pytest.raises(ValueError):
        arith_tasks.tasks("validation", 1)


@pytest.mark.parametrize("split", ["train", "test"])
def test_expert_solves_every_task(arith_tasks, split):
    tasks = arith_tasks.tasks(split, 300)

    async def go():
        return await asyncio.gather(
            *(
                run_episode(ArithEnv, ArithExpert(), t, seed=i, sampling=SamplingParams(), limits=EpisodeLimits())
                for i, t in enumerate(tasks)
            )
        )

    trajs = asyncio.run(go())
    assert all(t.success and t.reward == 1.0 and t.termination == "terminated" for t in trajs)
    assert all(len(t.steps) == 2 for t in trajs)


def test_bad_tool_calls_give_error_observations(arith_tasks):
    task = arith_tasks.tasks("train", 1)[0]

    async def go():
        env = ArithEnv()
        await env.reset(task, 0)
        results = [
            await env.step(Message(role="assistant", content="I think it is 5")),
            await env.step(call("sqrt", x="4")),
            await env.step(call("calc")),
        ]
        return env, results

    env, results = asyncio.run(go())
    no_call, unknown, missing = results
    assert no_call.messages[0].content.startswith("error: no tool call")
    assert "unknown tool 'sqrt'" in unknown.messages[0].content and unknown.messages[0].role == "tool"
    assert "needs argument" in missing.messages[0].content
    assert all(r.info["errors"] and not r.terminated for r in (no_call, unknown, missing))
    # the fourth turn reaches the env's limit of 4 turns
    last = asyncio.run(env.step(call("calc", expression="1+")))
    assert last.messages[0].content.startswith("error: bad expression")
    assert last.truncated and not last.terminated


def test_calc_and_answer(arith_tasks):
    task = arith_tasks.tasks("train", 1)[0]
    env = ArithEnv()
    asyncio.run(env.reset(task, 0))
    assert asyncio.run(env.step(call("calc", expression="(2+3)*4"))).messages[0].content == "20"
    assert asyncio.run(env.step(call("calc", expression="__import__('os')"))).messages[0].content.startswith("error")
    wrong = asyncio.run(env.step(call("answer", value="abc")))
    assert wrong.terminated and wrong.reward == 0.0 and wrong.info["success"] is False
    env2 = ArithEnv()
    asyncio.run(env2.reset(task, 0))
    right = asyncio.run(env2.step(call("answer", value=task.data["answer"])))
    assert right.terminated and right.reward == 1.0 and right.info["success"] is True


def test_safe_eval_refuses_everything_but_arithmetic():
    assert safe_eval("2*(3-5)") == -4
    for bad in ("2**100", "a+1", "1/0", "[1]", "9" * 300):
        with pytest.raises(ToolError):
            safe_eval(bad)
