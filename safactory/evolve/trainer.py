"""Trainer: optimisation of an HF causal LM on token-exact sequences.

One `train_step` is one optimiser step over a list of sequences, split into
micro-batches with gradients accumulated; every loss is normalised by the token
count of the whole step, so the micro-batch size does not change the update.
"""

from __future__ import annotations

from typing import Literal

import torch
from transformers import PreTrainedModel

from safactory.data.experience import TrainSequence
from safactory.evolve.losses import ppo_clip_loss, sft_loss, token_logprobs

Objective = Literal["sft", "ppo"]


class Trainer:
    def __init__(
        self,
        model: PreTrainedModel,
        *,
        lr: float = 3e-4,
        weight_decay: float = 0.0,
        grad_clip: float = 1.0,
        micro_batch_size: int = 64,
        pad_id: int = 0,
    ) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.grad_clip = grad_clip
        self.micro_batch_size = micro_batch_size
        self.pad_id = pad_id
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        self.step = 0

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _collate(self, seqs: list[TrainSequence]) -> dict[str, torch.Tensor]:
        B = len(seqs)
        T = max(len(s.input_ids) for s in seqs)
        ids_BT = torch.full((B, T), self.pad_id, dtype=torch.long)
        attn_BT = torch.zeros((B, T), dtype=torch.long)
        mask_BT = torch.zeros((B, T))
        old_BT = torch.zeros((B, T))
        for b, s in enumerate(seqs):
            n = len(s.input_ids)
            ids_BT[b, :n] = torch.tensor(s.input_ids)
            attn_BT[b, :n] = 1
            mask_BT[b, :n] = torch.tensor(s.loss_mask, dtype=torch.float32)
            if s.behaviour_logprobs:
                old_BT[b, :n] = torch.tensor(s.behaviour_logprobs, dtype=torch.float32)
        batch = {
            "ids_BT": ids_BT,
            "attn_BT": attn_BT,
            "mask_BT": mask_BT,
            "old_BT": old_BT,
            "adv_B": torch.tensor([s.advantage for s in seqs], dtype=torch.float32),
            "temp_B": torch.tensor([s.temperature for s in seqs], dtype=torch.float32),
        }
        return {k: v.to(self.device) for k, v in batch.items()}

    def sequence_logprobs(self, batch: dict[str, torch.Tensor], use_temperature: bool) -> torch.Tensor:
        """Log-probs of tokens 1..T-1 given their prefix, shape [B, T-1]."""
        logits_BTV = self.model(input_ids=batch["ids_BT"], attention_mask=batch["attn_BT"]).logits
        temp_B = batch["temp_B"] if use_temperature else None
        return token_logprobs(logits_BTV[:, :-1], batch["ids_BT"][:, 1:], temp_B)

    def train_step(self, seqs: list[TrainSequence], objective: Objective, clip_eps: float = 0.2) -> dict[str, float]:
        """One optimiser step over `seqs`; returns loss and diagnostics."""
        if not seqs:
            raise ValueError("train_step needs at least one sequence")
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        n_tokens = float(sum(sum(s.loss_mask[1:]) for s in seqs))
        total_loss = 0.0
        stats = {"clip_frac": 0.0, "approx_kl": 0.0}
        for start in range(0, len(seqs), self.micro_batch_size):
            micro = seqs[start : start + self.micro_batch_size]
            batch = self._collate(micro)
            mask_BT = batch["mask_BT"][:, 1:]
            if objective == "sft":
                logp_BT = self.sequence_logprobs(batch, use_temperature=False)
                loss = sft_loss(logp_BT, mask_BT, denominator=n_tokens)
            else:
                logp_BT = self.sequence_logprobs(batch, use_temperature=True)
                loss, micro_stats = ppo_clip_loss(
                    logp_BT, batch["old_BT"][:, 1:], batch["adv_B"], mask_BT, clip_eps, denominator=n_tokens
                )
                share = float(mask_BT.sum()) / max(n_tokens, 1.0)
                for key, value in micro_stats.items():
                    stats[key] += value * share
            loss.backward()
            total_loss += float(loss.detach())
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.step += 1
        self.model.eval()
        out = {"loss": total_loss, "grad_norm": float(grad_norm), "tokens": n_tokens}
        if objective == "ppo":
            out.update(stats)
        return out

    def weights(self) -> dict[str, torch.Tensor]:
        """A detached copy of the weights, safe to hand to another thread or policy."""
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}
