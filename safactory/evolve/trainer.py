"""Trainer: optimisation of an HF causal LM on token-exact sequences.

One `train_step` is one optimiser step over a list of sequences, split into
micro-batches with gradients accumulated; every loss is normalised by the token
count of the whole step, so the micro-batch size does not change the update.

Objectives:
  sft        negative log-likelihood of the mask tokens;
  ppo        clipped ratio against the behaviour log-probs stored in the trace (GRPO);
  decoupled  clipped ratio against the proximal policy (`fill_proximal`, the weights
             before this batch's updates) times a capped behaviour importance weight;
  opd        like `decoupled`/`ppo` but with per-token advantages (on-policy
             distillation: `TrainSequence.token_advantages`).
An optional frozen reference model adds `kl_coef * k3` KL to the loss; for a LoRA model the
reference can be the model itself with its adapter switched off (`use_base_as_reference`: the
base weights, no second copy). `imitate` is an
extra SFT update at its own learning rate inside the current step (RL's imitation of
curated experience).
"""

from __future__ import annotations

from typing import Literal

import torch
from transformers import PreTrainedModel

from safactory.evolve.experience import TrainSequence
from safactory.evolve.losses import k3_kl, ppo_clip_loss, sft_loss, token_logprobs
from safactory.policy.weights import is_adapter_model, version_state

Objective = Literal["sft", "ppo", "decoupled", "opd"]


class Trainer:
    def __init__(
        self,
        model: PreTrainedModel,
        *,
        lr: float = 3e-4,
        weight_decay: float = 0.0,
        grad_clip: float = 1.0,
        micro_batch_size: int = 64,
        micro_tokens: int = 16384,
        pad_id: int = 0,
        ref_model: PreTrainedModel | None = None,
        kl_coef: float = 0.0,
        logits_mb: float = 1024.0,
    ) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.grad_clip = grad_clip
        self.micro_batch_size = micro_batch_size
        # a micro-batch's logits and their log-softmax (about 16 bytes a token per vocabulary entry while
        # the graph holds them) stay within `logits_mb`: a 150k vocabulary gets far fewer tokens than a tiny one
        vocab = int(getattr(model.config, "vocab_size", 0) or 1)
        self.micro_tokens = max(64, min(micro_tokens, int(logits_mb * 2**20 / (16 * vocab))))
        self.pad_id = pad_id
        self.ref_model = ref_model.eval() if ref_model is not None else None
        self.kl_coef = kl_coef
        self.base_reference = False  # the KL reference is this model with its adapter disabled
        if kl_coef > 0 and ref_model is None:
            raise ValueError("kl_coef > 0 needs a reference model")
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay) if params else None
        self.step = 0

    def use_base_as_reference(self) -> None:
        """Make the KL reference the base model under this LoRA model's adapter (the adapter disabled)."""
        if not is_adapter_model(self.model):
            raise ValueError("only a LoRA (peft) model can use its base as the KL reference")
        self.ref_model = None
        self.base_reference = True

    def _reference_logprobs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            if self.base_reference:
                with self.model.disable_adapter():
                    return self.sequence_logprobs(batch, use_temperature=True)
            return self.sequence_logprobs(batch, use_temperature=True, model=self.ref_model)

    def lr(self) -> float:
        """The learning rate of the next step (0.0 without trainable parameters)."""
        return float(self.optimizer.param_groups[0]["lr"]) if self.optimizer is not None else 0.0

    def set_lr(self, lr: float) -> None:
        if self.optimizer is None:
            return
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _micro_batches(self, seqs: list[TrainSequence]) -> list[list[int]]:
        """Indices of `seqs` in micro-batches of similar length: at most `micro_batch_size`
        sequences and (past the first) `micro_tokens` padded tokens each, so mixing short and
        long episodes does not pad every short one to the longest."""
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i].input_ids))
        out: list[list[int]] = []
        for i in order:
            n = len(seqs[i].input_ids)  # the longest so far, since the order is ascending
            if out and len(out[-1]) < self.micro_batch_size and (len(out[-1]) + 1) * n <= self.micro_tokens:
                out[-1].append(i)
            else:
                out.append([i])
        return out

    def _collate(self, seqs: list[TrainSequence]) -> dict[str, torch.Tensor]:
        B = len(seqs)
        T = max(len(s.input_ids) for s in seqs)
        ids_BT = torch.full((B, T), self.pad_id, dtype=torch.long)
        attn_BT = torch.zeros((B, T), dtype=torch.long)
        mask_BT = torch.zeros((B, T))
        old_BT = torch.zeros((B, T))
        prox_BT = torch.zeros((B, T))
        tokadv_BT = torch.zeros((B, T))
        for b, s in enumerate(seqs):
            n = len(s.input_ids)
            ids_BT[b, :n] = torch.tensor(s.input_ids)
            attn_BT[b, :n] = 1
            mask_BT[b, :n] = torch.tensor(s.loss_mask, dtype=torch.float32)
            if s.behaviour_logprobs:
                old_BT[b, :n] = torch.tensor(s.behaviour_logprobs, dtype=torch.float32)
            if s.proximal_logprobs is not None:
                prox_BT[b, :n] = torch.tensor(s.proximal_logprobs, dtype=torch.float32)
            if s.token_advantages is not None:
                tokadv_BT[b, :n] = torch.tensor(s.token_advantages, dtype=torch.float32)
        batch = {
            "ids_BT": ids_BT,
            "attn_BT": attn_BT,
            "mask_BT": mask_BT,
            "old_BT": old_BT,
            "prox_BT": prox_BT,
            "tokadv_BT": tokadv_BT,
            "adv_B": torch.tensor([s.advantage for s in seqs], dtype=torch.float32),
            "temp_B": torch.tensor([s.temperature for s in seqs], dtype=torch.float32),
        }
        return {k: v.to(self.device) for k, v in batch.items()}

    def sequence_logprobs(
        self, batch: dict[str, torch.Tensor], use_temperature: bool, model: PreTrainedModel | None = None
    ) -> torch.Tensor:
        """Log-probs of tokens 1..T-1 given their prefix, shape [B, T-1]."""
        net = model if model is not None else self.model
        attn_BT = batch["attn_BT"]
        # without padding the causal fast path needs no mask
        mask_arg = None if bool(attn_BT.all()) else attn_BT
        logits_BTV = net(input_ids=batch["ids_BT"], attention_mask=mask_arg).logits
        temp_B = batch["temp_B"] if use_temperature else None
        return token_logprobs(logits_BTV[:, :-1], batch["ids_BT"][:, 1:], temp_B)

    @torch.no_grad()
    def score(self, seqs: list[TrainSequence], model: PreTrainedModel | None = None) -> list[list[float]]:
        """Per-position log-probs (aligned with input_ids, 0.0 at position 0) under `model`
        (default: the current weights), at each sequence's sampling temperature."""
        net = model if model is not None else self.model
        out: list[list[float]] = [[] for _ in seqs]
        for indices in self._micro_batches(seqs):
            micro = [seqs[i] for i in indices]
            logp_BT = self.sequence_logprobs(self._collate(micro), use_temperature=True, model=net).float().cpu()
            for b, (i, s) in enumerate(zip(indices, micro, strict=True)):
                out[i] = [0.0] + logp_BT[b, : len(s.input_ids) - 1].tolist()
        return out

    def fill_proximal(self, seqs: list[TrainSequence]) -> None:
        """Record the current weights' log-probs as the proximal policy of the decoupled objective."""
        for seq, logprobs in zip(seqs, self.score(seqs), strict=True):
            seq.proximal_logprobs = logprobs

    def train_step(
        self,
        seqs: list[TrainSequence],
        objective: Objective,
        clip_eps: float = 0.2,
        behaviour_cap: float | None = 2.0,
        count: bool = True,
    ) -> dict[str, float]:
        """One optimiser step over `seqs`; returns loss and diagnostics. `count=False` leaves
        `step` alone (an extra update inside the current step, as `imitate` takes)."""
        if not seqs:
            raise ValueError("train_step needs at least one sequence")
        if self.optimizer is None:
            raise ValueError("this trainer's model has no trainable parameters")
        if objective != "sft" and (unknown := [s.trajectory_id for s in seqs if not s.behaviour_known]):
            raise ValueError(
                f"{len(unknown)} sequences (e.g. trajectory {unknown[0]}) have no behaviour log-probs: their policy "
                "did not return them (an endpoint asked without logprobs?), and RL needs them for its ratios"
            )
        decoupled = objective in ("decoupled", "opd") and all(s.proximal_logprobs is not None for s in seqs)
        if objective == "decoupled" and not decoupled:
            raise ValueError("the decoupled objective needs proximal log-probs: call fill_proximal first")
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        n_tokens = float(sum(sum(s.loss_mask[1:]) for s in seqs))
        total_loss = 0.0
        stats: dict[str, float] = {}
        for indices in self._micro_batches(seqs):
            batch = self._collate([seqs[i] for i in indices])
            mask_BT = batch["mask_BT"][:, 1:]
            share = float(mask_BT.sum()) / max(n_tokens, 1.0)
            if objective == "sft":
                logp_BT = self.sequence_logprobs(batch, use_temperature=False)
                loss = sft_loss(logp_BT, mask_BT, denominator=n_tokens)
            else:
                logp_BT = self.sequence_logprobs(batch, use_temperature=True)
                advantages = batch["tokadv_BT"][:, 1:] if objective == "opd" else batch["adv_B"]
                old_BT = batch["prox_BT"][:, 1:] if decoupled else batch["old_BT"][:, 1:]
                loss, micro_stats = ppo_clip_loss(
                    logp_BT,
                    old_BT,
                    advantages,
                    mask_BT,
                    clip_eps,
                    denominator=n_tokens,
                    behaviour_logprobs_BT=batch["old_BT"][:, 1:] if decoupled else None,
                    behaviour_cap=behaviour_cap,
                )
                if (self.ref_model is not None or self.base_reference) and self.kl_coef > 0:
                    ref_BT = self._reference_logprobs(batch)
                    kl = k3_kl(logp_BT, ref_BT, mask_BT, denominator=n_tokens)
                    loss = loss + self.kl_coef * kl
                    micro_stats["kl_ref"] = float(kl.detach()) * n_tokens / max(float(mask_BT.sum()), 1.0)
                for key, value in micro_stats.items():
                    stats[key] = stats.get(key, 0.0) + value * share
            loss.backward()
            total_loss += float(loss.detach())
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        if count:
            self.step += 1
        self.model.eval()
        return {"loss": total_loss, "grad_norm": float(grad_norm), "tokens": n_tokens, **stats}

    def imitate(self, seqs: list[TrainSequence], lr: float) -> float:
        """One optimiser update on the SFT loss of `seqs` at learning rate `lr`, inside the current
        step (`step` is not advanced; the optimiser's own lr is restored); returns the NLL."""
        before = self.lr()
        self.set_lr(lr)
        try:
            return self.train_step(seqs, "sft", count=False)["loss"]
        finally:
            self.set_lr(before)

    def weights(self) -> dict[str, torch.Tensor]:
        """A detached copy of a version's weights (a LoRA model's: its adapter), safe to hand to another
        thread or policy."""
        return version_state(self.model)
