import math

import torch

from safactory.evolve.losses import group_advantages, ppo_clip_loss, sft_loss, token_logprobs


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    assert torch.allclose(group_advantages(rewards, normalize_std=False), torch.tensor([0.5, -0.5, -0.5, 0.5]))
    assert torch.allclose(group_advantages(rewards), torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-5)
    assert torch.allclose(group_advantages(torch.ones(4)), torch.zeros(4))


def test_ppo_clip_loss_by_hand():
    logp = torch.tensor([[math.log(1.5), math.log(0.5)]])
    old = torch.zeros(1, 2)
    mask = torch.ones(1, 2)
    # A = +1: ratios 1.5, 0.5 -> min(1.5, 1.2) = 1.2 and min(0.5, 0.8) = 0.5 -> loss -(1.2 + 0.5) / 2
    loss, stats = ppo_clip_loss(logp, old, torch.tensor([1.0]), mask, clip_eps=0.2)
    assert abs(loss.item() - (-0.85)) < 1e-6 and stats["clip_frac"] == 1.0
    # A = -1: min(-1.5, -1.2) = -1.5 and min(-0.5, -0.8) = -0.8 -> loss (1.5 + 0.8) / 2
    loss, _ = ppo_clip_loss(logp, old, torch.tensor([-1.0]), mask, clip_eps=0.2)
    assert abs(loss.item() - 1.15) < 1e-6
    # masked tokens do not count, and the denominator is what the caller says
    loss, _ = ppo_clip_loss(logp, old, torch.tensor([1.0]), torch.tensor([[1.0, 0.0]]), clip_eps=0.2, denominator=4)
    assert abs(loss.item() - (-1.2 / 4)) < 1e-6


def test_ppo_gradient_uses_the_behaviour_denominator():
    """Inside the clip range d loss / d logp = -A * ratio / n; a recomputed denominator would give -A / n."""
    logp = torch.tensor([[math.log(1.1), 0.0]], requires_grad=True)
    old = torch.tensor([[0.0, math.log(0.95)]])
    loss, _ = ppo_clip_loss(logp, old, torch.tensor([2.0]), torch.ones(1, 2), clip_eps=0.2)
    loss.backward()
    expected = torch.tensor([[-2.0 * 1.1 / 2, -2.0 * (1 / 0.95) / 2]])
    assert torch.allclose(logp.grad, expected, atol=1e-6)


def test_sft_loss_and_token_logprobs_by_hand():
    assert abs(sft_loss(torch.tensor([[-1.0, -2.0, -9.0]]), torch.tensor([[1.0, 1.0, 0.0]])).item() - 1.5) < 1e-6
    logits = torch.tensor([[[0.0, math.log(3.0)]]])  # probs 1/4, 3/4
    lp = token_logprobs(logits, torch.tensor([[1]]))
    assert abs(lp.item() - math.log(0.75)) < 1e-6
    lp_t = token_logprobs(logits, torch.tensor([[1]]), torch.tensor([0.5]))  # probs 1/10, 9/10
    assert abs(lp_t.item() - math.log(0.9)) < 1e-6
