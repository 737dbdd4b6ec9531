"""A local policy on a Hugging Face causal LM with continuous batching and weight hot swap.

Every `generate` call queues a request. A worker task runs decode steps in a worker
thread, one at a time. At each step:

1. the running rows (one pending token each) take one decode step together over a
   left-padded KV cache (`KVSlots`: per-layer buffers with spare room that the model
   writes into in place through a transformers `Cache` of our own layers);
2. requests that arrived since the last step are prefilled as their own left-padded
   batch, and their KV rows are copied into the running cache, right-aligned;
3. every row that sampled a token checks its stop conditions; finished rows (and
   rows whose caller gave up) leave the batch at once: the last rows move into their
   places in the cache, and leading columns no remaining row needs are dropped, so
   they stop costing compute.

So a request joins at the next decode step instead of waiting for the whole batch
to finish. `LocalPolicy(..., continuous=False)` keeps the older static batching
(take all waiting requests, run them until every row finishes) for comparison; it
is also what runs for models whose cache is not plain full attention (sliding
windows, linear attention) and with transformers older than 4.56.

Each sampled token's log-prob is that of the distribution actually sampled from
(temperature and top-p applied), recorded per token: the behaviour log-probs.

Weights are hot-swapped with `load_weights`/`publish`. A lock makes the swap happen
between decode steps; it never waits for in-flight requests to finish. A request in
flight across a swap keeps its KV cache (computed by the old weights) and samples
its later tokens with the new weights over it (an in-flight update); the log-prob of
each of those tokens is still exactly that of the distribution it was sampled from,
so it remains a valid behaviour log-prob. Every completion records the versions it
touched: `Completion.policy_versions` lists them in order (several when a swap fell
inside the request) and `Completion.policy_version` is the version of its first token.
With static batching a swap waits for the running batch, so every completion there
touches exactly one version.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel

try:  # transformers >= 4.56 keeps the KV cache as a list of layer objects; continuous batching needs that
    from transformers.cache_utils import Cache, DynamicLayer

    _LAYER_CACHES = True
except ImportError:  # older versions: static batching only
    Cache = DynamicLayer = object  # type: ignore[assignment,misc]
    _LAYER_CACHES = False

from safactory.policy.base import Completion, PolicyError, SamplingParams
from safactory.policy.chat import ChatRenderer
from safactory.types import Message, ToolCall, ToolSpec

log = logging.getLogger(__name__)

KVLayers = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class _Result:
    token_ids: list[int]
    logprobs: list[float]
    finish: str
    versions: list[int]


@dataclass(eq=False)
class _Request:
    prompt_ids: list[int]
    sampling: SamplingParams
    future: asyncio.Future[_Result]


@dataclass
class _Worker:
    loop: asyncio.AbstractEventLoop
    wake: asyncio.Event
    task: asyncio.Task[None]


@dataclass
class _Row:
    """One request in the running batch. Its last sampled token is not in the KV cache yet."""

    req: _Request
    next_pos: int
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    finish: str = ""


@dataclass(frozen=True)
class StepRecord:
    """What one continuous-batching decode step did (see `LocalPolicy.step_log`).

    `decoded` rows took a decode step, `joined` rows were prefilled and merged in,
    `finished` rows left after it; `running` rows remain; `cache_len` is the padded
    KV length kept for them.
    """

    step: int
    version: int
    decoded: int
    joined: int
    finished: int
    running: int
    cache_len: int


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


# ---- the KV cache of the running batch -------------------------------------------------------
def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 1).bit_length()


class KVSlots:
    """Per-layer key/value buffers of the running batch, shaped [rows, heads, columns, head_dim] with spare room.

    Rows 0..`rows`-1 are the running requests; columns 0..`length`-1 hold their
    left-padded KV entries, `mask_BL` marks the real ones. A decode step writes one
    column in place (no copy of the cache); a joining request's prefilled KV is
    copied into a new row, right-aligned with the others; a leaving row is replaced
    by the last row (only moved rows are copied); leading columns that no row needs
    any more are dropped once they are half the length. Capacities double when full.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.mask_BL = torch.zeros((0, 0), dtype=torch.long, device=device)
        self.rows = 0
        self.length = 0
        self.starts: list[int] = []  # first real column of each row, kept on the host (no device syncs)

    @property
    def capacity(self) -> tuple[int, int]:
        return (self.mask_BL.shape[0], self.mask_BL.shape[1])

    def cache(self) -> Any:
        """A transformers cache whose layers write into these buffers."""
        return Cache(layers=[_SlotLayer(self, i) for i in range(len(self.keys))])

    def attention_mask(self, extra: int) -> torch.Tensor:
        """mask_B(L+extra): the running rows' mask with `extra` new columns set (the step's own tokens)."""
        self._ensure(self.rows, self.length + extra)
        self.mask_BL[: self.rows, self.length : self.length + extra] = 1
        return self.mask_BL[: self.rows, : self.length + extra]

    def _ensure(self, rows: int, columns: int) -> None:
        cap_rows, cap_cols = self.capacity
        if rows <= cap_rows and columns <= cap_cols:
            return
        new_rows = max(cap_rows, _next_pow2(max(rows, 8)))
        new_cols = max(cap_cols, _next_pow2(max(columns, 64)))
        B, L = self.rows, self.length
        mask_BL = self.mask_BL.new_zeros((new_rows, new_cols))
        mask_BL[:B, :L] = self.mask_BL[:B, :L]
        self.mask_BL = mask_BL
        for buffers in (self.keys, self.values):
            for i, old in enumerate(buffers):
                grown = old.new_zeros((new_rows, old.shape[1], new_cols, old.shape[3]))
                grown[:B, :, :L] = old[:B, :, :L]
                buffers[i] = grown

    def append(self, kv: KVLayers, mask_BP: torch.Tensor, lengths: list[int]) -> None:
        """Add rows from a prefill: kv per layer [k, heads, P, head_dim], their mask_BP and prompt lengths."""
        k, P = mask_BP.shape
        if not self.keys:  # first rows ever: take shapes, dtype and device from the prefill
            self.keys = [x.new_zeros((0, x.shape[1], 0, x.shape[3])) for x, _ in kv]
            self.values = [x.new_zeros((0, x.shape[1], 0, x.shape[3])) for _, x in kv]
        B, L = self.rows, max(self.length, P)
        self._ensure(B + k, L + 1)
        if L > self.length:  # the new prompt is longer than the running rows' cache: shift them right
            shift = L - self.length
            for buf in (*self.keys, *self.values):
                buf[:B, :, shift:L] = buf[:B, :, : self.length].clone()
            self.mask_BL[:B, shift:L] = self.mask_BL[:B, : self.length].clone()
            self.mask_BL[:B, :shift] = 0
            self.length = L
            self.starts = [start + shift for start in self.starts]
        for buf, (keys, values) in zip(zip(self.keys, self.values, strict=True), kv, strict=True):
            buf[0][B : B + k, :, L - P : L] = keys
            buf[1][B : B + k, :, L - P : L] = values
        self.mask_BL[B : B + k, : L - P] = 0
        self.mask_BL[B : B + k, L - P : L] = mask_BP
        self.starts += [L - n for n in lengths]
        self.rows = B + k

    def keep(self, keep: list[int]) -> list[int]:
        """Keep only rows `keep` (ascending); returns the kept old row indices in their new order.

        Each row that leaves from below the new row count is filled by one of the last
        rows, so only moved rows are copied.
        """
        n = len(keep)
        kept = set(keep)
        order = list(range(self.rows))
        movers = [b for b in keep if b >= n]  # kept rows beyond the new end move into holes
        holes = [b for b in range(n) if b not in kept]
        if holes:
            src = torch.tensor(movers, dtype=torch.long, device=self.device)
            dst = torch.tensor(holes, dtype=torch.long, device=self.device)
            L = self.length
            for buf in (*self.keys, *self.values):
                buf[dst, :, :L] = buf[src, :, :L]
            self.mask_BL[dst, :L] = self.mask_BL[src, :L]
            for h, m in zip(holes, movers, strict=True):
                order[h] = m
        self.rows = n
        self.starts = [self.starts[b] for b in order[:n]]
        self._trim()
        return order[:n]

    def _trim(self) -> None:
        B, L = self.rows, self.length
        if B == 0:
            self.length, self.starts = 0, []
            return
        first = min(self.starts)
        if first < 16 or 2 * first < L:
            return
        for buf in (*self.keys, *self.values):
            buf[:B, :, : L - first] = buf[:B, :, first:L].clone()
        self.mask_BL[:B, : L - first] = self.mask_BL[:B, first:L].clone()
        self.length = L - first
        self.starts = [start - first for start in self.starts]


class _SlotLayer(DynamicLayer):  # type: ignore[misc,valid-type]
    """One layer of a `KVSlots` seen as a transformers DynamicLayer: `update` writes in place."""

    def __init__(self, slots: KVSlots, index: int) -> None:
        super().__init__()
        self.slots, self.index = slots, index
        self.is_initialized = True
        self.device = slots.device

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        return None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.slots
        B, L, q = s.rows, s.length, key_states.shape[-2]
        keys, values = s.keys[self.index], s.values[self.index]
        keys[:B, :, L : L + q] = key_states
        values[:B, :, L : L + q] = value_states
        self.keys, self.values = keys[:B, :, : L + q], values[:B, :, : L + q]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return int(self.slots.length)


def _cache_layers(cache: Any) -> KVLayers:
    """(keys_BHLD, values_BHLD) of every layer of a transformers (>= 4.56) cache object."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def supports_continuous(model: PreTrainedModel) -> bool:
    """Whether the model's KV cache is plain full attention (transformers >= 4.56 layer caches)."""
    if not _LAYER_CACHES:
        return False
    from transformers import DynamicCache

    try:
        layers = DynamicCache(config=model.config).layers
    except Exception:
        return False
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


class LocalPolicy:
    """In-process policy on an HF causal LM: continuous batching across episodes, hot swap.

    Counters: `batches` (busy periods of the continuous engine, or batches of the
    static one), `batched_requests`, `decode_steps` and `step_log` (the last steps'
    `StepRecord`s: batch composition per decode step).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        chat: ChatRenderer,
        *,
        max_batch: int = 256,
        seed: int = 0,
        version: int = 0,
        continuous: bool = True,
        step_log_size: int = 4096,
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
        if continuous and not supports_continuous(model):
            log.warning("%s has no plain dynamic KV cache; using static batching", type(model).__name__)
            continuous = False
        self.continuous = continuous
        tok = chat.tokenizer
        self._eos_ids = frozenset(getattr(tok, "eos_ids", None) or {tok.eos_id})
        self._lock = threading.Lock()
        self._pending: list[_Request] = []
        self._inflight: set[_Request] = set()
        self._worker: _Worker | None = None
        self.batches = 0
        self.batched_requests = 0
        self.decode_steps = 0
        self.step_log: deque[StepRecord] = deque(maxlen=step_log_size)
        # the running batch of the continuous engine (touched only by the step in the worker thread)
        self._rows: list[_Row] = []
        self._slots: KVSlots | None = None
        self._slot_cache: Any = None

    @property
    def running(self) -> int:
        """Rows in the running batch now."""
        return len(self._rows)

    # ---- serving -------------------------------------------------------------------
    async def generate(self, messages: list[Message], tools: list[ToolSpec], sampling: SamplingParams) -> Completion:
        """Render the conversation with the chat renderer, sample a completion, parse its tool calls."""
        prompt_ids = self.chat.prompt_ids(messages, tools)
        if len(prompt_ids) + sampling.max_tokens > self.max_positions:
            raise PolicyError(
                f"prompt of {len(prompt_ids)} tokens + max_tokens {sampling.max_tokens} "
                f"exceeds the model's {self.max_positions} positions"
            )
        result = await self._submit(prompt_ids, sampling)
        text = self._text(result.token_ids, sampling)
        calls, error = self.chat.parse(text, tools)
        return self._completion(prompt_ids, sampling, result, text, calls, error)

    async def generate_ids(self, prompt_ids: list[int], sampling: SamplingParams) -> Completion:
        """Continue raw token ids (no chat rendering, no tool parsing); batched with `generate`.

        `max_tokens` 0 returns an empty completion without running the model.
        """
        prompt_ids = list(prompt_ids)
        self._check_ids(prompt_ids, sampling.max_tokens)
        result = await self._submit(prompt_ids, sampling)
        return self._completion(prompt_ids, sampling, result, self._text(result.token_ids, sampling), [], None)

    def _text(self, token_ids: list[int], sampling: SamplingParams) -> str:
        text = self.chat.tokenizer.decode(token_ids)
        for stop in sampling.stop:
            if stop and text.endswith(stop):
                text = text[: -len(stop)]
        return text

    @staticmethod
    def _completion(
        prompt_ids: list[int],
        sampling: SamplingParams,
        result: _Result,
        text: str,
        calls: list[ToolCall],
        error: str | None,
    ) -> Completion:
        return Completion(
            text=text,
            tool_calls=calls,
            parse_error=error,
            prompt_ids=prompt_ids,
            token_ids=result.token_ids,
            logprobs=result.logprobs,
            policy_version=result.versions[0],
            policy_versions=result.versions,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            finish_reason=result.finish,
        )

    async def _submit(self, prompt_ids: list[int], sampling: SamplingParams) -> _Result:
        """Queue one request for the engine and wait for its tokens (none, at once, for max_tokens <= 0)."""
        if sampling.max_tokens <= 0:
            return _Result([], [], "length", [self.version])
        if not prompt_ids:
            raise PolicyError("empty prompt: nothing to condition on")
        worker = self._ensure_worker()
        request = _Request(prompt_ids, sampling, worker.loop.create_future())
        self._pending.append(request)
        self._inflight.add(request)
        worker.wake.set()
        try:
            return await request.future
        finally:
            self._inflight.discard(request)

    def _ensure_worker(self) -> _Worker:
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.loop is not loop or self._worker.task.done():
            # requests of an earlier event loop can no longer be answered; start clean
            self._pending = [r for r in self._pending if r.future.get_loop() is loop and not r.future.done()]
            with self._lock:
                self._reset_running()
            wake = asyncio.Event()
            serve = self._serve_continuous if self.continuous else self._serve_static
            self._worker = _Worker(loop, wake, loop.create_task(serve(wake)))
        return self._worker

    async def close(self) -> None:
        """Stop the engine; requests still waiting or running fail with PolicyError."""
        worker, self._worker = self._worker, None
        if worker is not None and not worker.task.done():
            worker.task.cancel()

        def reset() -> None:
            with self._lock:  # after the step in flight, if any
                self._reset_running()

        await asyncio.to_thread(reset)
        self._pending = []
        loop = asyncio.get_running_loop()
        for req in list(self._inflight):
            if req.future.get_loop() is loop and not req.future.done():
                req.future.set_exception(PolicyError("the policy was closed"))

    # ---- scoring ---------------------------------------------------------------------
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
        """Swap in new weights between decode steps; returns the new version (default +1).

        In-flight requests continue on the new weights from their next token and
        record both versions (see the module docstring).
        """
        with self._lock:
            self.model.load_state_dict(state_dict)
            self.version = self.version + 1 if version is None else version
            return self.version

    async def publish(self, state_dict: dict[str, torch.Tensor], version: int | None = None) -> int:
        """`load_weights` without blocking the event loop while a decode step finishes."""
        return await asyncio.to_thread(self.load_weights, state_dict, version)

    # ---- shared helpers ---------------------------------------------------------------
    def _left_padded(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids_BT, attn_BT, pos_BT) of left-padded prompts on the model's device."""
        B, T = len(prompts), max(len(p) for p in prompts)
        ids_BT = torch.full((B, T), self.chat.tokenizer.pad_id, dtype=torch.long)
        attn_BT = torch.zeros((B, T), dtype=torch.long)
        for b, prompt in enumerate(prompts):
            ids_BT[b, T - len(prompt) :] = torch.tensor(prompt)
            attn_BT[b, T - len(prompt) :] = 1
        ids_BT, attn_BT = ids_BT.to(self.device), attn_BT.to(self.device)
        pos_BT = (attn_BT.cumsum(-1) - 1).clamp(min=0)
        return ids_BT, attn_BT, pos_BT

    def _finished(self, tokens: list[int], sampling: SamplingParams) -> str:
        """The finish reason once `tokens` (the newest last) end the request, else ""."""
        if tokens[-1] in self._eos_ids:
            return "stop"
        if sampling.stop and _hits_stop(self.chat.tokenizer.decode(tokens), sampling.stop):
            return "stop"
        if len(tokens) >= sampling.max_tokens:
            return "length"
        return ""

    # ---- continuous batching -------------------------------------------------------------
    async def _serve_continuous(self, wake: asyncio.Event) -> None:
        while True:
            if not self._rows and not self._pending:
                await wake.wait()
                wake.clear()
                await asyncio.sleep(0)  # let episodes scheduled in the same tick enqueue too
            room = max(self.max_batch - len(self._rows), 0)
            joining, self._pending = self._pending[:room], self._pending[room:]
            joining = [r for r in joining if not r.future.done()]
            if not joining and not self._rows:
                continue
            try:
                done = await asyncio.to_thread(self._step, joining)
            except Exception as exc:  # a failed step fails the requests in it, not the worker
                error = PolicyError(f"generation failed: {exc!r}")
                with self._lock:
                    failed = [row.req for row in self._rows] + joining
                    self._reset_running()
                for req in failed:
                    if not req.future.done():
                        req.future.set_exception(error)
                continue
            for req, result in done:
                if not req.future.done():
                    req.future.set_result(result)

    def _reset_running(self) -> None:
        self._rows, self._slots, self._slot_cache = [], None, None

    @torch.inference_mode()
    def _step(self, joining: list[_Request]) -> list[tuple[_Request, _Result]]:
        """One decode step of the running rows plus the prefill of the joining requests."""
        with self._lock:
            version = self.version
            self.decode_steps += 1
            if not self._rows and joining:
                self.batches += 1
            self.batched_requests += len(joining)
            rows = self._rows
            decoded = len(rows)
            logits = []
            if rows:
                logits.append(self._decode_running())
            if joining:
                logits.append(self._prefill_and_merge(joining))
            rows = self._rows  # running rows first, then the joined ones, as in the cache
            tok_B, lp_B = sample_tokens(
                torch.cat(logits).float(),
                torch.tensor([r.req.sampling.temperature for r in rows], device=self.device),
                torch.tensor([r.req.sampling.top_p for r in rows], device=self.device),
                self.generator,
            )
            done: list[tuple[_Request, _Result]] = []
            keep: list[int] = []
            for b, (row, t, lp) in enumerate(zip(rows, tok_B.tolist(), lp_B.tolist(), strict=True)):
                row.tokens.append(t)
                row.logprobs.append(lp)
                if not row.versions or row.versions[-1] != version:
                    row.versions.append(version)
                row.finish = self._finished(row.tokens, row.req.sampling)
                if row.finish:
                    done.append((row.req, _Result(row.tokens, row.logprobs, row.finish, row.versions)))
                elif not row.req.future.done():  # a caller that gave up leaves too
                    keep.append(b)
            self._drop_rows(keep)
            cache_len = 0 if self._slots is None else self._slots.length
            record = StepRecord(self.decode_steps, version, decoded, len(joining), len(done), len(keep), cache_len)
            self.step_log.append(record)
            return done

    def _decode_running(self) -> torch.Tensor:
        """Feed every running row its pending token; return logits_BV for the next one."""
        assert self._slots is not None
        rows = self._rows
        attn_BL = self._slots.attention_mask(1)
        ids_B1 = torch.tensor([[r.tokens[-1]] for r in rows], dtype=torch.long, device=self.device)
        pos_B1 = torch.tensor([[r.next_pos] for r in rows], dtype=torch.long, device=self.device)
        out = self.model(
            input_ids=ids_B1,
            attention_mask=attn_BL,
            position_ids=pos_B1,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_kw: self._slot_cache},
        )
        self._slots.length += 1
        for row in rows:
            row.next_pos += 1
        return out.logits[:, -1, :]

    def _prefill_and_merge(self, joining: list[_Request]) -> torch.Tensor:
        """Prefill the joining prompts and copy their KV rows into the running batch; return their logits_BV."""
        ids_BT, attn_BT, pos_BT = self._left_padded([r.prompt_ids for r in joining])
        out = self.model(
            input_ids=ids_BT, attention_mask=attn_BT, position_ids=pos_BT, use_cache=True, logits_to_keep=1
        )
        if self._slots is None:
            self._slots = KVSlots(self.device)
        self._slots.append(_cache_layers(out[self._cache_kw]), attn_BT, [len(r.prompt_ids) for r in joining])
        if self._slot_cache is None:
            self._slot_cache = self._slots.cache()
        self._rows = self._rows + [_Row(req, next_pos=len(req.prompt_ids)) for req in joining]
        return out.logits[:, -1, :]

    def _drop_rows(self, keep: list[int]) -> None:
        """Keep only rows `keep` in the batch and the KV cache."""
        if not keep:
            self._reset_running()
            return
        if len(keep) < len(self._rows):
            assert self._slots is not None
            order = self._slots.keep(keep)
            self._rows = [self._rows[b] for b in order]

    # ---- static batching (the older scheme, kept for comparison) -----------------------------
    async def _serve_static(self, wake: asyncio.Event) -> None:
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

    @torch.inference_mode()
    def _generate_batch(self, batch: list[_Request]) -> list[_Result]:
        with self._lock:
            version = self.version
            self.batches += 1
            self.batched_requests += len(batch)
            return [_Result(*row, [version]) for row in self._decode_static(batch)]

    def _decode_static(self, batch: list[_Request]) -> list[tuple[list[int], list[float], str]]:
        B = len(batch)
        ids_BT, attn_BT, pos_BT = self._left_padded([r.prompt_ids for r in batch])
        temperature_B = torch.tensor([r.sampling.temperature for r in batch], device=self.device)
        top_p_B = torch.tensor([r.sampling.top_p for r in batch], device=self.device)
        max_new = [r.sampling.max_tokens for r in batch]

        out = self.model(
            input_ids=ids_BT, attention_mask=attn_BT, position_ids=pos_BT, use_cache=True, logits_to_keep=1
        )
        tokens: list[list[int]] = [[] for _ in batch]
        logprobs: list[list[float]] = [[] for _ in batch]
        finish = ["" for _ in batch]
        pos_B1 = pos_BT[:, -1:]
        for _ in range(max(max_new)):
            self.decode_steps += 1
            tok_B, lp_B = sample_tokens(out.logits[:, -1, :].float(), temperature_B, top_p_B, self.generator)
            for b, (t, lp) in enumerate(zip(tok_B.tolist(), lp_B.tolist(), strict=True)):
                if finish[b]:
                    continue
                tokens[b].append(t)
                logprobs[b].append(lp)
                finish[b] = self._finished(tokens[b], batch[b].sampling)
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
