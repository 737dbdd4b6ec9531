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


def test_rloo_by_hand():
    from safactory.evolve.losses import rloo_advantages

    adv = rloo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]))
    # member 0: 1 - mean(0, 0, 1) = 2/3; member 1: 0 - mean(1, 0, 1) = -2/3
    assert torch.allclose(adv, torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3]))


def test_decoupled_objective_by_hand():
    """Proximal 1.0, behaviour 0.5 -> weight 2 capped at 1.5; ratio 1.1 inside the clip range."""
    logp = torch.tensor([[math.log(1.1)]])
    proximal = torch.zeros(1, 1)
    behaviour = torch.tensor([[math.log(0.5)]])
    loss, stats = ppo_clip_loss(
        logp, proximal, torch.tensor([1.0]), torch.ones(1, 1), 0.2, behaviour_logprobs_BT=behaviour, behaviour_cap=1.5
    )
    assert abs(loss.item() - (-1.5 * 1.1)) < 1e-6
    assert abs(stats["proximal_behaviour_mismatch"] - math.log(2)) < 1e-6
    # without a cap the weight is the full importance ratio 2
    loss, _ = ppo_clip_loss(logp, proximal, torch.tensor([1.0]), torch.ones(1, 1), 0.2, behaviour_logprobs_BT=behaviour)
    assert abs(loss.item() - (-2.0 * 1.1)) < 1e-6


def test_per_token_advantages():
    logp = torch.zeros(1, 3)
    adv = torch.tensor([[1.0, -2.0, 4.0]])
    loss, _ = ppo_clip_loss(logp, logp, adv, torch.tensor([[1.0, 1.0, 0.0]]))
    assert abs(loss.item() - (-(1.0 - 2.0) / 2)) < 1e-6


def test_k3_kl_by_hand():
    from safactory.evolve.losses import k3_kl

    logp = torch.tensor([[0.0, math.log(0.5)]])
    ref = torch.tensor([[0.0, 0.0]])
    # token 1: d = 0 -> 0; token 2: d = log 2 -> 2 - log 2 - 1
    assert abs(k3_kl(logp, ref, torch.ones(1, 2)).item() - (1 - math.log(2)) / 2) < 1e-6
    assert k3_kl(ref, ref, torch.ones(1, 2)).item() == 0.0


def test_opd_is_zero_when_teacher_equals_student():
    from safactory.evolve.losses import opd_advantages

    student = -torch.rand(2, 5)
    mask = torch.ones(2, 5)
    adv = opd_advantages(student, student.clone(), mask)
    assert torch.count_nonzero(adv) == 0
    logp = student.clone().requires_grad_(True)
    loss, _ = ppo_clip_loss(logp, student, adv, mask)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(logp.grad) == 0
    # a teacher that prefers a token gives it a positive advantage of exactly the log-ratio
    teacher = student.clone()
    teacher[0, 1] += 0.5
    assert abs(opd_advantages(student, teacher, mask)[0, 1].item() - 0.5) < 1e-6
