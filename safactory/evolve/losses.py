"""Losses and advantages as pure functions on tensors.

Shapes: B sequences, T positions, V vocabulary, G members of a group. Every
token-level loss takes a `denominator` (the number of loss tokens in the whole
optimiser batch), so splitting a batch into micro-batches gives the same gradient.
"""

from __future__ import annotations

import torch


def group_advantages(rewards_G: torch.Tensor, normalize_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantages: reward minus the group mean, optionally divided by the group std."""
    centered_G = rewards_G - rewards_G.mean()
    if not normalize_std:
        return centered_G
    return centered_G / (rewards_G.std(unbiased=False) + eps)


def token_logprobs(
    logits_BTV: torch.Tensor, targets_BT: torch.Tensor, temperature_B: torch.Tensor | None = None
) -> torch.Tensor:
    """Log-prob of each target token under softmax(logits / temperature)."""
    logits_BTV = logits_BTV.float()
    if temperature_B is not None:
        logits_BTV = logits_BTV / temperature_B.clamp(min=1e-6)[:, None, None]
    logp_BTV = torch.log_softmax(logits_BTV, dim=-1)
    return logp_BTV.gather(-1, targets_BT[..., None]).squeeze(-1)


def ppo_clip_loss(
    logprobs_BT: torch.Tensor,
    old_logprobs_BT: torch.Tensor,
    advantages_B: torch.Tensor,
    mask_BT: torch.Tensor,
    clip_eps: float = 0.2,
    denominator: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-level clipped policy-gradient loss (GRPO/PPO).

    ratio = exp(logprobs - old_logprobs); per token
    -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A), summed over mask tokens and
    divided by `denominator` (default: the mask's token count).
    """
    mask_BT = mask_BT.float()
    denom = float(mask_BT.sum().item()) if denominator is None else denominator
    denom = max(denom, 1.0)
    ratio_BT = torch.exp(logprobs_BT - old_logprobs_BT)
    adv_BT = advantages_B[:, None].expand_as(ratio_BT)
    unclipped_BT = ratio_BT * adv_BT
    clipped_BT = ratio_BT.clamp(1 - clip_eps, 1 + clip_eps) * adv_BT
    loss = -(torch.minimum(unclipped_BT, clipped_BT) * mask_BT).sum() / denom
    with torch.no_grad():
        n = mask_BT.sum().clamp(min=1)
        clipped = ((unclipped_BT != clipped_BT).float() * mask_BT).sum() / n
        approx_kl = ((old_logprobs_BT - logprobs_BT) * mask_BT).sum() / n
    return loss, {"clip_frac": float(clipped), "approx_kl": float(approx_kl)}


def sft_loss(logprobs_BT: torch.Tensor, mask_BT: torch.Tensor, denominator: float | None = None) -> torch.Tensor:
    """Negative log-likelihood of the mask tokens, divided by `denominator` (default: their count)."""
    mask_BT = mask_BT.float()
    denom = max(float(mask_BT.sum().item()) if denominator is None else denominator, 1.0)
    return -(logprobs_BT * mask_BT).sum() / denom
