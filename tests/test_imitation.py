"""RL's imitation of curated experience: the trainer's extra update and the curated pool."""

import asyncio
import copy
import random

import pytest
import torch

from safactory.data.judges import RuleSafetyJudge
from safactory.evolve.experience import rl_sequences, sft_sequence
from safactory.evolve.imitation import ImitationPool, curated
from safactory.evolve.schedule import decayed_lr
from safactory.evolve.trainer import Trainer
from safactory.policy.base import SamplingParams
from safactory.sim.agent import EpisodeLimits
from safactory.sim.envs.arith import ArithEnv, ArithExpert
from safactory.sim.envs.ops import OpsEnv, OpsExpert, OpsTasks
from safactory.sim.runner import RolloutRunner


def demos(tasks):
    runner = RolloutRunner(ArithEnv, ArithExpert(), limits=EpisodeLimits())
    return [t for g in asyncio.run(runner.run_groups(tasks, 1, SamplingParams())) for t in g]


def nll(trainer, seqs):
    with torch.no_grad():
        batch = trainer._collate(seqs)
        logp_BT = trainer.sequence_logprobs(batch, use_temperature=False)
        mask_BT = batch["mask_BT"][:, 1:]
        return float(-(logp_BT * mask_BT).sum() / mask_BT.sum())


def test_imitate_is_an_sft_update_at_its_own_lr_inside_the_step(tiny, chat, arith_tasks):
    model, tok = tiny
    seqs = [sft_sequence(t, chat) for t in demos(arith_tasks.tasks("train", 8))]
    trainer = Trainer(copy.deepcopy(model), lr=1e-4, pad_id=tok.pad_id)
    sft = Trainer(copy.deepcopy(model), lr=3e-3, pad_id=tok.pad_id)
    before = nll(trainer, seqs)
    for _ in range(10):
        got = trainer.imitate(seqs, lr=3e-3)
        want = sft.train_step(seqs, "sft")["loss"]
        assert abs(got - want) < 1e-4  # the same update as an SFT step at that lr
    assert trainer.step == 0 and trainer.lr() == 1e-4  # no step counted, the RL lr restored
    assert nll(trainer, seqs) < 0.7 * before
    for a, b in zip(trainer.model.parameters(), sft.model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_pool_keeps_what_fits_and_samples_without_repeats(policy, chat, arith_tasks):
    trajs = demos(arith_tasks.tasks("train", 6))
    seqs = [sft_sequence(t, chat) for t in trajs]
    limit = sorted(len(s.input_ids) for s in seqs)[3]
    pool = ImitationPool(context=limit, per_sequence=True)
    pool.add_demos(seqs, {t.id: "arith" for t in trajs})
    assert pool.demos == len(pool) == sum(len(s.input_ids) <= limit for s in seqs) >= 4
    assert all(abs(sum(s.loss_mask) - 1.0) < 1e-9 for s in pool.sequences)  # each weighs the same
    runner = RolloutRunner(ArithEnv, policy, limits=EpisodeLimits(max_tokens_per_turn=12))
    own = [t for g in asyncio.run(runner.run_groups(arith_tasks.tasks("train", 2), 2, SamplingParams())) for t in g]
    pool = ImitationPool(context=10_000, per_sequence=False)  # demonstrations only, the default
    pool.add_rollouts(own)
    assert len(pool) == pool.own == 0
    pool = ImitationPool(context=10_000, per_sequence=False, own=True)
    pool.add_rollouts(own)
    expected = [s.input_ids for t in own for s in rl_sequences(t)]
    assert pool.own == len(expected) and [s.input_ids for s in pool.sequences] == expected
    assert all(s.advantage == 0.0 and not s.behaviour_logprobs for s in pool.sequences)  # plain NLL targets
    sample = pool.sample(random.Random(0), 100)
    assert len(sample) == len(pool) and len({id(s) for s in sample}) == len(pool)
    assert ImitationPool(context=10, per_sequence=False).sample(random.Random(0), 4) == []


def test_quota_sampling_takes_each_envs_share(chat, arith_tasks):
    arith = demos(arith_tasks.tasks("train", 12))
    ops_tasks = OpsTasks(kinds=("lookup",)).tasks("train", 6)
    runner = RolloutRunner(OpsEnv, OpsExpert(), limits=EpisodeLimits())
    ops = [t for g in asyncio.run(runner.run_groups(ops_tasks, 1, SamplingParams())) for t in g]
    pool = ImitationPool(context=10_000, per_sequence=False)
    pool.add_demos([sft_sequence(t, chat) for t in arith + ops], {t.id: t.task.env_id for t in arith + ops})
    assert {env: len(seqs) for env, seqs in pool.by_env.items()} == {"arith": 12, "ops": 6}
    env_of = {id(s): env for env, seqs in pool.by_env.items() for s in seqs}
    for seed in range(5):
        drawn = pool.sample(random.Random(seed), 8, {"arith": 2, "ops": 6})
        assert sorted(env_of[id(s)] for s in drawn) == ["arith"] * 2 + ["ops"] * 6
        assert len({id(s) for s in drawn}) == 8
    # an env with fewer sequences than its quota gives what it has; one left out of the quota gives none
    assert len(pool.sample(random.Random(0), 20, {"arith": 2, "ops": 18})) == 8
    assert {env_of[id(s)] for s in pool.sample(random.Random(0), 4, {"arith": 4})} == {"arith"}


def test_curated_leaves_out_what_the_judge_flags_unless_told_not_to_judge():
    # a naive ops expert obeys injected instructions and still finishes the lookup: successes the judge flags
    tasks = OpsTasks(benign=0.0, injection=1.0, harmful=0.0, kinds=("lookup",)).tasks("train", 12)
    runner = RolloutRunner(OpsEnv, OpsExpert(naive=True), limits=EpisodeLimits())
    trajs = [t for g in asyncio.run(runner.run_groups(tasks, 1, SamplingParams())) for t in g]
    judge = RuleSafetyJudge()
    unsafe = [t for t in trajs if t.success and judge.judge(t).unsafe]
    assert unsafe  # the setting the ablation is about
    safe = [t for t in trajs if t.success and not judge.judge(t).unsafe]

    kept, left_out = curated(trajs, lambda t: bool(judge.judge(t).unsafe))
    assert {t.id for t in kept} == {t.id for t in safe} and left_out == len(unsafe)
    kept, left_out = curated(trajs, lambda t: bool(judge.judge(t).unsafe), judged=False)
    assert {t.id for t in kept} == {t.id for t in safe + unsafe} and left_out == 0
    assert all(t.success for t in kept)  # failures are never imitated, judged or not


def test_imitation_lr_is_constant_then_falls_linearly_over_the_last_steps() -> None:
    assert [decayed_lr(1.0, s, 10, 0) for s in range(1, 11)] == [1.0] * 10
    assert [decayed_lr(1.0, s, 10, 4) for s in range(1, 11)] == pytest.approx([1.0] * 6 + [0.8, 0.6, 0.4, 0.2])
