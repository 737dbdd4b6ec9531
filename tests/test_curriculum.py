"""The warm start's curriculum: the first `sft.first_steps` steps train on `sft.first_envs` alone."""

import asyncio

import pytest

from safactory.evolve.experience import sft_sequence
from safactory.factory.warm_start import first_sequences
from safactory.policy.base import SamplingParams
from safactory.policy.chat import PlainTextChat
from safactory.policy.tokenizer import CharTokenizer
from safactory.sim.agent import EpisodeLimits
from safactory.sim.envs.arith import ArithEnv, ArithExpert, ArithTasks
from safactory.sim.envs.ops import OpsEnv, OpsExpert, OpsTasks
from safactory.sim.runner import RolloutRunner


def played(env, expert, tasks):
    runner = RolloutRunner(env, expert, limits=EpisodeLimits())
    return [t for g in asyncio.run(runner.run_groups(tasks, 1, SamplingParams())) for t in g]


@pytest.fixture(scope="module")
def demos():
    return played(ArithEnv, ArithExpert(), ArithTasks().tasks("train", 5)) + played(
        OpsEnv, OpsExpert(), OpsTasks().tasks("train", 4)
    )


def test_first_sequences_are_those_of_the_named_envs(demos):
    chat = PlainTextChat(CharTokenizer())
    sequences = [sft_sequence(t, chat) for t in demos]
    first = first_sequences(demos, sequences, ["ops"], ["arith", "ops"])
    ops_ids = {t.id for t in demos if t.task.env_id == "ops"}
    assert len(first) == 4 and {s.trajectory_id for s in first} == ops_ids
    assert len(first_sequences(demos, sequences, ["arith", "ops"], ["arith", "ops"])) == 9


def test_first_envs_must_be_envs_of_the_run_with_demonstrations(demos):
    chat = PlainTextChat(CharTokenizer())
    sequences = [sft_sequence(t, chat) for t in demos]
    with pytest.raises(ValueError, match="must name some of the run's envs"):
        first_sequences(demos, sequences, ["maze"], ["arith", "ops"])
    with pytest.raises(ValueError, match="must name some"):
        first_sequences(demos, sequences, [], ["arith", "ops"])
    arith_only = [t for t in demos if t.task.env_id == "arith"]
    with pytest.raises(ValueError, match="no demonstrations"):
        first_sequences(arith_only, [sft_sequence(t, chat) for t in arith_only], ["ops"], ["arith", "ops"])
