"""A local policy on a Hugging Face causal LM that batches across concurrent episodes.

Every `generate` call queues a request; a worker task takes all requests that are
waiting, runs them as one left-padded batch with a KV cache in a worker thread,
and resolves each request with its exact sampled token ids and their log-probs
under the distribution actually sampled from (temperature and top-p applied).
Requests that arrive while a batch runs form the next batch.

Weights are hot-swapped with `load_weights`: a lock makes the swap happen between
batches, so every completion was produced by exactly one version, the one it
records.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from safactory.policy.base import Completion, PolicyError, SamplingParams
from safactory.policy.chat import PlainTextChat
from safactory.types import Message, ToolSpec


@dataclass
class _Request:
    prompt_ids: list[int]
    sampling: SamplingParams
    future: asyncio.Future[tuple[list[int], list[float], str, int]]


@dataclass
class _Worker:
    loop: asyncio.AbstractEventLoop
    wake: asyncio.Event
    task: asyncio.Task[None]


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


class LocalPolicy:
    """In-process policy on an HF causal LM with cross-episode batching and hot swap."""

    def __init__(
        self,
        model: PreTrainedModel,
        chat: PlainTextChat,
        *,
        max_batch: int = 256,
        seed: int = 0,
        version: int = 0,
    ) -> None:
        self.model = model.eval()
        self.chat = chat
        self.max_batch = max_batch
        self.version = version
        self.device = next(model.parameters()).device
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.max_positions = int(getattr(model.config, "max_position_embeddings", 2048))
        # transformers 5.x renamed `past_key_values` to `cache`; speak whichever this version uses
        self._cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self._lock = threading.Lock()
        self._pending: list[_Request] = []
        self._worker: _Worker | None = None
        self.batches = 0
        self.batched_requests = 0

    # ---- serving -------------------------------------------------------------------
    async def generate(self, messages: list[Message], tools: list[ToolSpec], sampling: SamplingParams) -> Completion:
        prompt_ids = self.chat.prompt_ids(messages)
        if len(prompt_ids) + sampling.max_tokens > self.max_positions:
            raise PolicyError(
                f"prompt of {len(prompt_ids)} tokens + max_tokens {sampling.max_tokens} "
                f"exceeds the model's {self.max_positions} positions"
            )
        worker = self._ensure_worker()
        future: asyncio.Future[tuple[list[int], list[float], str, int]] = worker.loop.create_future()
        self._pending.append(_Request(prompt_ids, sampling, future))
        worker.wake.set()
        token_ids, logprobs, finish, version = await future
        text = self.chat.tokenizer.decode(token_ids)
        for stop in sampling.stop:
            if stop and text.endswith(stop):
                text = text[: -len(stop)]
        calls, error = self.chat.parse(text, tools)
        return Completion(
            text=text,
            tool_calls=calls,
            parse_error=error,
            prompt_ids=prompt_ids,
            token_ids=token_ids,
            logprobs=logprobs,
            policy_version=version,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            finish_reason=finish,
        )

    def _ensure_worker(self) -> _Worker:
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.loop is not loop or self._worker.task.done():
            wake = asyncio.Event()
            self._worker = _Worker(loop, wake, loop.create_task(self._serve(wake)))
        return self._worker

    async def _serve(self, wake: asyncio.Event) -> None:
        while True:
            await wake.wait()
            wake.clear()
            await asyncio.sleep(0)  # let episodes scheduled in the same tick enqueue too
            while self._pending:
                batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
                try:
                    results = await asyncio.to_thread(self._generate_batch, batch)
                except Exception as exc:  # a failed batch fails its requests, not the worker
                    for req in batch:
                        if not req.future.done():
                            req.future.set_exception(PolicyError(f"generation failed: {exc!r}"))
                    continue
                for req, result in zip(batch, results, strict=True):
                    if not req.future.done():
                        req.future.set_result(result)

    async def close(self) -> None:
        if self._worker is not None and not self._worker.task.done():
            self._worker.task.cancel()
        self._worker = None

    # ---- raw token ids (for the OpenAI-compatible server) -------------------------------
    async def generate_ids(self, prompt_ids: list[int], sampling: SamplingParams) -> Completion:
        """Continue raw token ids (no chat rendering, no tool parsing); batched with `generate`.

        `max_tokens` 0 returns an empty completion without running the model.
        """
        prompt_ids = list(prompt_ids)
        self._check_ids(prompt_ids, sampling.max_tokens)
        if sampling.max_tokens <= 0:
            return Completion(
                text="",
                prompt_ids=prompt_ids,
                token_ids=[],
                logprobs=[],
                policy_version=self.version,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                finish_reason="length",
            )
        worker = self._ensure_worker()
        future: asyncio.Future[tuple[list[int], list[float], str, int]] = worker.loop.create_future()
        self._pending.append(_Request(prompt_ids, sampling, future))
        worker.wake.set()
        token_ids, logprobs, finish, version = await future
        text = self.chat.tokenizer.decode(token_ids)
        for stop in sampling.stop:
            if stop and text.endswith(stop):
                text = text[: -len(stop)]
        return Completion(
            text=text,
            prompt_ids=prompt_ids,
            token_ids=token_ids,
            logprobs=logprobs,
            policy_version=version,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            finish_reason=finish,
        )

    async def score(self, token_ids: list[int], temperature: float = 1.0) -> list[float | None]:
        """Log-prob of each token given its prefix (None for the first), in one forward pass.

        This is what an on-policy-distillation teacher needs: the model's own
        distribution (temperature 1 unless asked otherwise), no sampling.
        """
        logprobs, _ = await self.score_with_version(token_ids, temperature)
        return logprobs

    async def score_with_version(
        self, token_ids: list[int], temperature: float = 1.0
    ) -> tuple[list[float | None], int]:
        """`score` plus the policy version whose weights computed it."""
        token_ids = list(token_ids)
        if not token_ids:
            raise PolicyError("nothing to score: no token ids")
        self._check_ids(token_ids, 0)
        return await asyncio.to_thread(self._score_sync, token_ids, temperature)

    def _check_ids(self, token_ids: list[int], max_tokens: int) -> None:
        vocab = int(getattr(self.model.config, "vocab_size", 0) or 0)
        if vocab and any(not 0 <= t < vocab for t in token_ids):
            raise PolicyError(f"token ids must lie in [0, {vocab}) for this model")
        if len(token_ids) + max(max_tokens, 0) > self.max_positions:
            raise PolicyError(
                f"prompt of {len(token_ids)} tokens + max_tokens {max_tokens} "
                f"exceeds the model's {self.max_positions} positions"
            )

    @torch.inference_mode()
    def _score_sync(self, token_ids: list[int], temperature: float) -> tuple[list[float | None], int]:
        with self._lock:
            ids_1T = torch.tensor([token_ids], dtype=torch.long, device=self.device)
            logits_TV = self.model(input_ids=ids_1T).logits[0, :-1].float()
            scale = temperature if temperature > 0 else 1.0
            logp_TV = torch.log_softmax(logits_TV / scale, dim=-1)
            logp_T = logp_TV.gather(-1, ids_1T[0, 1:, None]).squeeze(-1)
            out: list[float | None] = [None]
            out.extend(logp_T.tolist())
            return out, self.version

    # ---- weights -------------------------------------------------------------------
    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int | None = None) -> int:
        """Swap in new weights between batches; returns the new version (default +1)."""
        with self._lock:
            self.model.load_state_dict(state_dict)
            self.version = self.version + 1 if version is None else version
            return self.version

    async def publish(self, state_dict: dict[str, torch.Tensor], version: int | None = None) -> int:
        """`load_weights` without blocking the event loop while a batch finishes."""
        return await asyncio.to_thread(self.load_weights, state_dict, version)

    # ---- the batch -----------------------------------------------------------------
    @torch.inference_mode()
    def _generate_batch(self, batch: list[_Request]) -> list[tuple[list[int], list[float], str, int]]:
        with self._lock:
            version = self.version
            self.batches += 1
            self.batched_requests += len(batch)
            return [(*row, version) for row in self._decode(batch)]

    def _decode(self, batch: list[_Request]) -> list[tuple[list[int], list[float], str]]:
        tok = self.chat.tokenizer
        dev = self.device
        B = len(batch)
        T = max(len(r.prompt_ids) for r in batch)
        ids_BT = torch.full((B, T), tok.pad_id, dtype=torch.long)
        attn_BT = torch.zeros((B, T), dtype=torch.long)
        for b, req in enumerate(batch):
            n = len(req.prompt_ids)
            ids_BT[b, T - n :] = torch.tensor(req.prompt_ids)
            attn_BT[b, T - n :] = 1
        ids_BT, attn_BT = ids_BT.to(dev), attn_BT.to(dev)
        pos_BT = (attn_BT.cumsum(-1) - 1).clamp(min=0)
        temperature_B = torch.tensor([r.sampling.temperature for r in batch], device=dev)
        top_p_B = torch.tensor([r.sampling.top_p for r in batch], device=dev)
        max_new = [r.sampling.max_tokens for r in batch]

        out = self.model(
            input_ids=ids_BT, attention_mask=attn_BT, position_ids=pos_BT, use_cache=True, logits_to_keep=1
        )
        tokens: list[list[int]] = [[] for _ in batch]
        logprobs: list[list[float]] = [[] for _ in batch]
        finish = ["" for _ in batch]
        pos_B1 = pos_BT[:, -1:]
        for _ in range(max(max_new)):
            tok_B, lp_B = sample_tokens(out.logits[:, -1, :].float(), temperature_B, top_p_B, self.generator)
            for b, (t, lp) in enumerate(zip(tok_B.tolist(), lp_B.tolist(), strict=True)):
                if finish[b]:
                    continue
                tokens[b].append(t)
                logprobs[b].append(lp)
                if t == tok.eos_id:
                    finish[b] = "stop"
                elif batch[b].sampling.stop and _hits_stop(tok.decode(tokens[b]), batch[b].sampling.stop):
                    finish[b] = "stop"
                elif len(tokens[b]) >= max_new[b]:
                    finish[b] = "length"
            if all(finish):
                break
            attn_BT = torch.cat([attn_BT, attn_BT.new_ones((B, 1))], dim=1)
            pos_B1 = pos_B1 + 1
            out = self.model(
                input_ids=tok_B[:, None],
                attention_mask=attn_BT,
                position_ids=pos_B1,
                use_cache=True,
                **{self._cache_kw: out[self._cache_kw]},
            )
        return [(tokens[b], logprobs[b], finish[b] or "length") for b in range(B)]


def _hits_stop(text: str, stops: list[str]) -> bool:
    return any(stop and text.endswith(stop) for stop in stops)
