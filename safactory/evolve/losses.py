"""Losses and advantages as pure functions on tensors.

Shapes: B sequences, T positions, V vocabulary, G members of a group. Every
token-level loss takes a `denominator` (the number of loss tokens in the whole
optimiser batch), so splitting a batch into micro-batches gives the same gradient.
The equations and knobs are in docs/evolution.md.
"""

from __future__ import annotations

import torch


def group_advantages(rewards_G: torch.Tensor, normalize_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantages: reward minus the group mean, optionally divided by the group std."""
    centered_G = rewards_G - rewards_G.mean()
    if not normalize_std:
        return centered_G
    return centered_G / (rewards_G.std(unbiased=False) + eps)


def rloo_advantages(rewards_G: torch.Tensor) -> torch.Tensor:
    """RLOO: each reward minus the mean of the *other* members' rewards (needs G >= 2)."""
    G = rewards_G.shape[0]
    if G < 2:
        raise ValueError("RLOO needs at least two samples per group")
    baseline_G = (rewards_G.sum() - rewards_G) / (G - 1)
    return rewards_G - baseline_G


def token_logprobs(
    logits_BTV: torch.Tensor, targets_BT: torch.Tensor, temperature_B: torch.Tensor | None = None
) -> torch.Tensor:
    """Log-prob of each target token under softmax(logits / temperature)."""
    logits_BTV = logits_BTV.float()
    if temperature_B is not None:
        logits_BTV = logits_BTV / temperature_B.clamp(min=1e-6)[:, None, None]
    logp_BTV = torch.log_softmax(logits_BTV, dim=-1)
    return logp_BTV.gather(-1, targets_BT[..., None]).squeeze(-1)


def _denominator(mask_BT: torch.Tensor, denominator: float | None) -> float:
    return max(float(mask_BT.sum().item()) if denominator is None else denominator, 1.0)


def ppo_clip_loss(
    logprobs_BT: torch.Tensor,
    old_logprobs_BT: torch.Tensor,
    advantages: torch.Tensor,
    mask_BT: torch.Tensor,
    clip_eps: float = 0.2,
    denominator: float | None = None,
    behaviour_logprobs_BT: torch.Tensor | None = None,
    behaviour_cap: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-level clipped policy-gradient loss (PPO / GRPO), optionally decoupled.

    ratio = exp(logprobs - old_logprobs); per token
    -w * min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A), summed over mask tokens and
    divided by `denominator` (default: the mask's token count). `advantages` is
    per sequence [B] or per token [B, T].

    Plain PPO/GRPO: `old_logprobs` are the behaviour log-probs from the trace, w = 1.
    Decoupled (AReaL-style): `old_logprobs` are the proximal policy's (the weights
    before this update) and `behaviour_logprobs_BT` the trace's; then
    w = min(exp(proximal - behaviour), behaviour_cap) corrects for staleness, as a
    constant (no gradient flows through it).
    """
    mask_BT = mask_BT.float()
    denom = _denominator(mask_BT, denominator)
    adv_BT = advantages[:, None].expand_as(logprobs_BT) if advantages.dim() == 1 else advantages
    ratio_BT = torch.exp(logprobs_BT - old_logprobs_BT)
    unclipped_BT = ratio_BT * adv_BT
    clipped_BT = ratio_BT.clamp(1 - clip_eps, 1 + clip_eps) * adv_BT
    per_token_BT = -torch.minimum(unclipped_BT, clipped_BT)
    weight_BT = torch.ones_like(per_token_BT)
    if behaviour_logprobs_BT is not None:
        weight_BT = torch.exp(old_logprobs_BT - behaviour_logprobs_BT).detach()
        if behaviour_cap is not None:
            weight_BT = weight_BT.clamp(max=behaviour_cap)
    loss = (weight_BT * per_token_BT * mask_BT).sum() / denom
    with torch.no_grad():
        n = mask_BT.sum().clamp(min=1)
        stats = {
            "clip_frac": float(((unclipped_BT != clipped_BT).float() * mask_BT).sum() / n),
            "approx_kl": float(((old_logprobs_BT - logprobs_BT) * mask_BT).sum() / n),
            "behaviour_weight_mean": float((weight_BT * mask_BT).sum() / n),
        }
        if behaviour_logprobs_BT is not None:
            stats["proximal_behaviour_mismatch"] = float(
                ((old_logprobs_BT - behaviour_logprobs_BT).abs() * mask_BT).sum() / n
            )
    return loss, stats


def k3_kl(
    logprobs_BT: torch.Tensor, ref_logprobs_BT: torch.Tensor, mask_BT: torch.Tensor, denominator: float | None = None
) -> torch.Tensor:
    """KL(policy || reference) estimated per sampled token with k3 = exp(d) - d - 1, d = ref - logp."""
    mask_BT = mask_BT.float()
    d_BT = ref_logprobs_BT - logprobs_BT
    return ((torch.exp(d_BT) - d_BT - 1) * mask_BT).sum() / _denominator(mask_BT, denominator)


def sft_loss(logprobs_BT: torch.Tensor, mask_BT: torch.Tensor, denominator: float | None = None) -> torch.Tensor:
    """Negative log-likelihood of the mask tokens, divided by `denominator` (default: their count)."""
    mask_BT = mask_BT.float()
    return -(logprobs_BT * mask_BT).sum() / _denominator(mask_BT, denominator)


def opd_advantages(
    student_logprobs_BT: torch.Tensor,
    teacher_logprobs_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    kl_coef: float = 1.0,
    env_advantages_B: torch.Tensor | None = None,
) -> torch.Tensor:
    """On-policy distillation: per-token advantage = -kl_coef * (log p_student - log p_teacher).

    The student sampled these tokens, so `log p_student - log p_teacher` is a one-sample
    estimate of the reverse KL at each position; its negative rewards tokens the
    teacher likes more than the student does. Optionally the environment's sequence
    advantage is added to every token. Zero outside the mask.
    """
    adv_BT = -kl_coef * (student_logprobs_BT - teacher_logprobs_BT).detach()
    if env_advantages_B is not None:
        adv_BT = adv_BT + env_advantages_B[:, None]
    return adv_BT * mask_BT.float()
