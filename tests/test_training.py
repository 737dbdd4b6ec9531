import asyncio
import copy

import torch

from safactory.evolve.experience import TrainSequence, group_batch, rl_sequences, sft_sequence
from safactory.evolve.trainer import Trainer
from safactory.policy.base import SamplingParams
from safactory.sim.agent import EpisodeLimits
from safactory.sim.envs.arith import ArithEnv, ArithExpert
from safactory.sim.runner import RolloutRunner


def rollouts(policy, tasks, group_size=4, temperature=0.7):
    runner = RolloutRunner(ArithEnv, policy, limits=EpisodeLimits(max_tokens_per_turn=16))
    return asyncio.run(runner.run_groups(tasks, group_size, SamplingParams(temperature=temperature)))


def test_sequences_are_exactly_what_the_policy_saw(policy, arith_tasks):
    groups = rollouts(policy, arith_tasks.tasks("train", 4))
    for traj in (t for g in groups for t in g):
        seqs = rl_sequences(traj)
        traced = [s.trace for s in traj.steps]
        if all(tr.finish_reason == "stop" for tr in traced[:-1]):
            assert len(seqs) == 1  # the renderer is incremental, so turns join into one sequence
        joined = [i for s in seqs for i in s.input_ids]
        sampled = [i for s in seqs for i, m in zip(s.input_ids, s.loss_mask, strict=True) if m]
        assert sampled == [i for tr in traced for i in tr.completion_ids]
        last = seqs[-1]
        assert last.input_ids == traced[-1].prompt_ids + traced[-1].completion_ids
        assert len(joined) >= len(last.input_ids)
        behaviour = [lp for s in seqs for lp, m in zip(s.behaviour_logprobs, s.loss_mask, strict=True) if m]
        assert behaviour == [lp for tr in traced for lp in tr.logprobs]


def test_trainer_logprobs_match_generation_logprobs(policy, tiny, arith_tasks):
    groups = rollouts(policy, arith_tasks.tasks("train", 3))
    seqs = [s for g in groups for t in g for s in rl_sequences(t)]
    trainer = Trainer(copy.deepcopy(policy.model), pad_id=tiny[1].pad_id)
    batch = trainer._collate(seqs)
    with torch.no_grad():
        logp_BT = trainer.sequence_logprobs(batch, use_temperature=True)
    mask_BT = batch["mask_BT"][:, 1:].bool()
    diff = (logp_BT - batch["old_BT"][:, 1:]).abs()[mask_BT]
    assert diff.max().item() < 1e-4


def test_gradient_accumulation_invariance(tiny):
    model, tok = tiny
    gen = torch.Generator().manual_seed(0)
    seqs = []
    for i in range(8):
        n = 10 + i
        ids = torch.randint(4, tok.vocab_size, (n,), generator=gen).tolist()
        mask = [0] * 4 + [1] * (n - 4)
        lps = (-torch.rand(n, generator=gen)).tolist()
        seqs.append(TrainSequence(ids, mask, lps, advantage=float(i % 3 - 1), temperature=0.7))
    grads = []
    for micro in (8, 4, 3):
        trainer = Trainer(copy.deepcopy(model), micro_batch_size=micro, pad_id=tok.pad_id, grad_clip=1e9)
        stats = trainer.train_step(seqs, "ppo")
        grads.append(([p.grad.clone() for p in trainer.model.parameters()], stats["loss"]))
    for other, loss in grads[1:]:
        assert abs(loss - grads[0][1]) < 1e-5
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads[0][0], other, strict=True))


def test_sft_learns_the_demonstrations(tiny, chat, arith_tasks):
    model, tok = tiny
    runner = RolloutRunner(ArithEnv, ArithExpert(), limits=EpisodeLimits())
    demos = [t for g in asyncio.run(runner.run_groups(arith_tasks.tasks("train", 16), 1, SamplingParams())) for t in g]
    seqs = [sft_sequence(t, chat) for t in demos]
    assert all(sum(s.loss_mask) > 0 for s in seqs)
    trainer = Trainer(copy.deepcopy(model), lr=3e-3, pad_id=tok.pad_id)
    first = trainer.train_step(seqs, "sft")["loss"]
    for _ in range(30):
        last = trainer.train_step(seqs, "sft")["loss"]
    assert last < 0.5 * first


def test_group_batch_advantages_and_dropping(policy, arith_tasks):
    groups = rollouts(policy, arith_tasks.tasks("train", 2), group_size=3)
    groups[0][0].reward, groups[0][1].reward, groups[0][2].reward = 1.0, 0.0, 0.0
    for t in groups[1]:
        t.reward = 0.0
    batch = group_batch(groups)
    assert batch.groups_used == 1 and batch.groups_dropped == 1
    advs = sorted({round(s.advantage, 4) for s in batch.sequences})
    assert advs == [-0.7071, 1.4142]
    assert {s.trajectory_id for s in batch.sequences} == {t.id for t in groups[0]}
