"""Turning a model's next-token logits into tokens, and finding where a completion stops.

`sample_tokens` samples one token per row (temperature, top-p, greedy at temperature 0) and returns
the log-prob of the distribution actually sampled from: the behaviour log-prob a trainer needs.
`StopScanner` finds stop strings as tokens arrive (also one inside a multi-character token), and
`cut_at_stop` cuts the text before the earliest one, as OpenAI and vLLM return it. The engine that
calls them is `safactory.policy.local.LocalPolicy`.
"""

from __future__ import annotations

from typing import Any

import torch

from safactory.policy.base import SamplingParams


def sample_tokens(
    logits_BV: torch.Tensor, temperature_B: torch.Tensor, top_p_B: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row; return (tokens_B, logprobs_B) of the sampling distribution.

    Rows with temperature 0 are greedy and report the temperature-1 log-prob.
    With top_p < 1 the distribution is truncated and renormalised, and the reported
    log-prob is that of the truncated distribution (what was actually sampled from).
    """
    greedy_B = temperature_B <= 0
    scale_B = torch.where(greedy_B, torch.ones_like(temperature_B), temperature_B)
    logp_BV = torch.log_softmax(logits_BV / scale_B[:, None], dim=-1)
    if bool((top_p_B < 1).any()):
        sorted_BV, order_BV = torch.sort(logp_BV, dim=-1, descending=True)
        cum_BV = sorted_BV.exp().cumsum(dim=-1)
        drop_sorted_BV = (cum_BV - sorted_BV.exp()) >= top_p_B[:, None]
        drop_BV = torch.zeros_like(drop_sorted_BV).scatter(-1, order_BV, drop_sorted_BV)
        logp_BV = torch.log_softmax(logp_BV.masked_fill(drop_BV, float("-inf")), dim=-1)
    sampled_B = torch.multinomial(logp_BV.exp(), 1, generator=generator).squeeze(-1)
    tokens_B = torch.where(greedy_B, logp_BV.argmax(dim=-1), sampled_B)
    return tokens_B, logp_BV.gather(-1, tokens_B[:, None]).squeeze(-1)


def next_token_logprobs(logits_TV: torch.Tensor, next_ids_T: torch.Tensor, temperature: float) -> torch.Tensor:
    """logp_T: the log-prob of each next token under the logits at `temperature` (1 when it is <= 0)."""
    scale = temperature if temperature > 0 else 1.0
    logp_TV = torch.log_softmax(logits_TV / scale, dim=-1)
    return logp_TV.gather(-1, next_ids_T[:, None]).squeeze(-1)


def finish_reason(
    tokens: list[int], eos_ids: frozenset[int], sampling: SamplingParams, stops: StopScanner | None
) -> str:
    """The finish reason once `tokens` (the newest last) end a request, else "".

    `stops` (the row's own scanner, fed every token in order) finds a stop string in the
    text the newest token added, also one that ends inside that token; the token stays
    in the completion, and the text is cut before the stop (`cut_at_stop`).
    """
    if tokens[-1] in eos_ids:
        return "stop"
    if stops is not None and stops.hit(tokens):
        return "stop"
    if len(tokens) >= sampling.max_tokens:
        return "length"
    return ""


class StopScanner:
    """Finds stop strings in a completion as its tokens arrive, decoding only the newest tokens.

    Each call decodes a short window of the latest tokens (vLLM's incremental detokenizer: the
    text a new token adds is what the window decodes to beyond the window without it, which
    keeps a tokenizer's word-leading spaces right, and waits while a character's bytes are
    incomplete). A stop is looked for in that new text plus the last (longest stop - 1)
    characters before it, so one that spans tokens or lies anywhere inside one token is found.
    """

    def __init__(self, tokenizer: Any, stops: list[str]) -> None:
        self.decode = tokenizer.decode
        self.stops = [s for s in stops if s]
        self.keep = max((len(s) for s in self.stops), default=1) - 1
        self.tail = ""
        self.prefix_offset = 0
        self.read_offset = 0

    def hit(self, tokens: list[int]) -> bool:
        """Whether the text up to the newest of `tokens` (all of them, in order, one call each) holds a stop."""
        before = self.decode(tokens[self.prefix_offset : self.read_offset])
        after = self.decode(tokens[self.prefix_offset :])
        window = self.tail + after[len(before) :]
        if any(stop in window for stop in self.stops):
            return True
        if len(after) > len(before) and not after.endswith("\ufffd"):
            # complete text: move on; otherwise (no text yet, or a character whose bytes are
            # incomplete) the same tokens are decoded again with the next one
            self.prefix_offset, self.read_offset = self.read_offset, len(tokens)
            self.tail = window[-self.keep :] if self.keep else ""
        return False


def cut_at_stop(text: str, stops: list[str]) -> str:
    """`text` up to the earliest occurrence of any stop string (as OpenAI and vLLM return it)."""
    hits = [i for i in (text.find(stop) for stop in stops if stop) if i >= 0]
    return text[: min(hits)] if hits else text
