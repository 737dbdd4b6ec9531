"""Teachers for on-policy distillation: log-probs of the student's exact tokens.

A local teacher is any HF causal LM sharing the student's tokenizer; an endpoint
teacher is an OpenAI-compatible server that returns prompt log-probs (our
`serve-policy`, or vLLM with prompt_logprobs). `distill` turns teacher scores into
per-token advantages (negative reverse KL). Mismatched tokenizers are refused: the
same ids must mean the same text for both models.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from transformers import PreTrainedModel

from safactory.evolve.experience import TrainSequence
from safactory.evolve.trainer import Trainer
from safactory.policy.chat import tokenizer_fingerprint


class Teacher(Protocol):
    def score(self, seqs: list[TrainSequence]) -> list[list[float]]: ...


def check_tokenizers(student: Any, teacher: Any) -> None:
    if tokenizer_fingerprint(student) != tokenizer_fingerprint(teacher):
        raise ValueError(
            "teacher and student tokenizers differ: on-policy distillation scores the student's exact "
            "token ids with the teacher, so both must share one tokenizer (vocabulary and special tokens)"
        )


class LocalTeacher:
    """A frozen local HF model scoring at each sequence's sampling temperature."""

    def __init__(self, model: PreTrainedModel, tokenizer: Any, student_tokenizer: Any, pad_id: int = 0) -> None:
        check_tokenizers(student_tokenizer, tokenizer)
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._scorer = Trainer(self.model, pad_id=pad_id, lr=0.0)

    def score(self, seqs: list[TrainSequence]) -> list[list[float]]:
        return self._scorer.score(seqs)


class EndpointTeacher:
    """A teacher behind an OpenAI-compatible endpoint that returns prompt log-probs (temperature 1)."""

    def __init__(self, endpoint: Any, tokenizer: Any, student_tokenizer: Any) -> None:
        check_tokenizers(student_tokenizer, tokenizer)
        self.endpoint = endpoint

    def score(self, seqs: list[TrainSequence]) -> list[list[float]]:
        if any(abs(s.temperature - 1.0) > 1e-6 for s in seqs):
            raise ValueError("an endpoint teacher scores at temperature 1; sample the student at temperature 1")

        async def all_scores() -> list[list[float | None]]:
            return await asyncio.gather(*(self.endpoint.score(s.input_ids) for s in seqs))

        return [[0.0 if lp is None else float(lp) for lp in row] for row in asyncio.run(all_scores())]


def distill(
    seqs: list[TrainSequence], teacher_logprobs: list[list[float]], kl_coef: float = 1.0, env_weight: float = 0.0
) -> dict[str, float]:
    """Set per-token advantages: -kl_coef * (log p_student - log p_teacher) on sampled tokens,
    plus `env_weight` times the sequence's environment advantage. Returns the mean reverse KL.

    The student's log-probs are its current ones (`proximal_logprobs`, see `Trainer.fill_proximal`)
    when filled, else the behaviour log-probs the episode was sampled with (the same policy when
    the student sampled it just now)."""
    total = count = 0.0
    for seq, teacher in zip(seqs, teacher_logprobs, strict=True):
        if len(teacher) != len(seq.input_ids):
            raise ValueError("teacher scores must align with the sequence's tokens")
        student = seq.proximal_logprobs if seq.proximal_logprobs is not None else seq.behaviour_logprobs
        adv: list[float] = []
        for m, student_lp, teacher_lp in zip(seq.loss_mask, student, teacher, strict=True):
            if not m:
                adv.append(0.0)
                continue
            kl = student_lp - teacher_lp
            total += kl
            count += 1
            adv.append(-kl_coef * kl + env_weight * seq.advantage)
        seq.token_advantages = adv
    return {"reverse_kl": total / max(count, 1.0)}
