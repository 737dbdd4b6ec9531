"""A local policy on a Hugging Face causal LM with continuous batching and weight hot swap.

Every `generate` call queues a request. A worker task runs decode steps in a worker
thread, one at a time. A step is one forward pass over a flat, unpadded sequence:
the pending token of every running row, then the prompts of the requests that
arrived since the last step (see `safactory.policy.slots`: the attention of that
pass writes each token's keys and values into `KVSlots`, per-layer buffers with
spare room, and attends each row to its own cache). Then:

1. one sampling call over the whole batch gives every row its next token and log-prob;
2. every row checks its stop conditions; finished rows (and rows whose caller gave
   up) leave the batch at once: the last rows move into their places in the cache,
   and leading columns no remaining row needs are dropped, so they stop costing
   compute.

A stop string ends a row on the token whose text completes it, also when it lies inside a
multi-character token (`StopScanner`, in `safactory.policy.sampling` with the sampling maths,
decodes only each row's newest tokens); that token stays in the completion's token ids and
log-probs (what was sampled), and the text is cut before the earliest stop, as OpenAI and vLLM
return it.

So a request joins at the next decode step instead of waiting for the whole batch
to finish. `LocalPolicy(..., continuous=False)` keeps the older static batching
(take all waiting requests, run them until every row finishes) for comparison; it
is also what runs for models whose cache is not plain full attention (sliding
windows, linear attention) or that do not take transformers' pluggable attention.

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

Prefix cache (continuous batching, `prefix_cache_mb` > 0): the keys and values of every
request that finishes on one weights version are kept (`safactory.policy.prefix_cache`),
and a joining prompt that starts with a kept request's tokens (the next turn of the same
episode, which re-sends the whole conversation) is fed only from where they differ. The
cache is cleared whenever new weights are loaded, so reused keys and values are always
those the current weights compute (up to float rounding).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel

from safactory.policy.base import Completion, PolicyError, SamplingParams
from safactory.policy.chat import ChatRenderer
from safactory.policy.continuation import Continuations
from safactory.policy.prefix_cache import PrefixCache
from safactory.policy.sampling import StopScanner, cut_at_stop, finish_reason, next_token_logprobs, sample_tokens
from safactory.policy.slots import HAVE_ATTENTION_INTERFACE, SLOTS_ATTENTION, CachedPrefix, KVSlots
from safactory.policy.weights import is_adapter_model, load_version_state
from safactory.types import Message, ToolCall, ToolSpec

log = logging.getLogger(__name__)


class EngineError(PolicyError):
    """The engine failed or stopped under a request: a server fault (5xx, worth a retry), not a bad request."""

    def __init__(self, message: str, status_code: int = 500) -> None:
        super().__init__(message)
        self.status_code = status_code


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
    stops: StopScanner | None = None


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


def supports_continuous(model: PreTrainedModel) -> bool:
    """Whether flat steps work for the model: plain full attention, through transformers' pluggable attention."""
    if not HAVE_ATTENTION_INTERFACE or not getattr(model, "_supports_attention_backend", False):
        return False
    try:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        layers = DynamicCache(config=model.config).layers
    except Exception:
        return False
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


class LocalPolicy:
    """In-process policy on an HF causal LM: continuous batching across episodes, hot swap.

    Counters: `batches` (busy periods of the continuous engine, or batches of the
    static one), `batched_requests`, `decode_steps` and `step_log` (the last steps'
    `StepRecord`s: batch composition per decode step); `prefix_cache.stats` (None
    without a prefix cache).
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
        prefix_cache_mb: float = 1024.0,
    ) -> None:
        self.model = model.eval()
        self.chat = chat
        self.max_batch = max_batch
        self.version = version
        self.device = next(model.parameters()).device
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.max_positions = int(getattr(model.config, "max_position_embeddings", 2048))
        # transformers 5.x renamed `past_key_values` to `cache`; speak whichever this version uses
        # (a LoRA model's forward passes these on to its base model's, which is the one to ask)
        self._forward_params = inspect.signature(
            model.get_base_model().forward if is_adapter_model(model) else model.forward
        ).parameters
        self._cache_kw = "cache" if "cache" in self._forward_params else "past_key_values"
        if continuous and not supports_continuous(model):
            log.warning(
                "%s has no plain full-attention KV cache or pluggable attention; using static batching",
                type(model).__name__,
            )
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
        self._logits_to_keep = "logits_to_keep" in self._forward_params
        use_cache = continuous and prefix_cache_mb > 0
        self.prefix_cache = PrefixCache(int(prefix_cache_mb * 2**20)) if use_cache else None
        self.turns = Continuations(chat)  # token-in, token-out across an episode's turns

    @property
    def running(self) -> int:
        """Rows in the running batch now."""
        return len(self._rows)

    # ---- serving -------------------------------------------------------------------
    async def generate(self, messages: list[Message], tools: list[ToolSpec], sampling: SamplingParams) -> Completion:
        """Render the conversation (continuing the tokens of its earlier turns, `Continuations`), sample a
        completion, parse its tool calls."""
        prompt_ids = self.turns.prompt_ids(messages, tools)
        if len(prompt_ids) + sampling.max_tokens > self.max_positions:
            raise PolicyError(
                f"prompt of {len(prompt_ids)} tokens + max_tokens {sampling.max_tokens} "
                f"exceeds the model's {self.max_positions} positions"
            )
        result = await self._submit(prompt_ids, sampling)
        text = self._text(result.token_ids, sampling)
        calls, error = self.chat.parse(text, tools)
        with contextlib.suppress(ValueError):  # a reply no message can hold is not continued (the agent ends there)
            self.turns.record(messages, tools, text, calls, prompt_ids, result.token_ids)
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
        """The completion's text, cut before the earliest stop string (its tokens all stay in the trace)."""
        return cut_at_stop(self.chat.tokenizer.decode(token_ids), sampling.stop)

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
                req.future.set_exception(EngineError("the policy was closed", 503))

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
            logp_T = next_token_logprobs(logits_TV, ids_1T[0, 1:], temperature)
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
            load_version_state(self.model, state_dict)  # a whole model, or a LoRA model's adapter
            self.version = self.version + 1 if version is None else version
            if self.prefix_cache is not None:
                self.prefix_cache.clear()  # what it holds was computed by the old weights
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

    def _stop_scanner(self, sampling: SamplingParams) -> StopScanner | None:
        return StopScanner(self.chat.tokenizer, sampling.stop) if any(sampling.stop) else None

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
                error = EngineError(f"generation failed: {exc!r}")
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
            if done:  # let the callers just answered send their next requests: they join the next step
                await asyncio.sleep(0)

    def _reset_running(self) -> None:
        self._rows, self._slots = [], None

    @torch.inference_mode()
    def _step(self, joining: list[_Request]) -> list[tuple[_Request, _Result]]:
        """One flat forward of the running rows and the joining prompts, then sampling and stop checks."""
        with self._lock:
            version = self.version
            self.decode_steps += 1
            if not self._rows and joining:
                self.batches += 1
            self.batched_requests += len(joining)
            decoded = len(self._rows)
            logits_BV = self._forward(joining)
            rows = self._rows  # running rows first, then the joined ones, as in the cache
            tok_B, lp_B = sample_tokens(
                logits_BV.float(),
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
                row.finish = finish_reason(row.tokens, self._eos_ids, row.req.sampling, row.stops)
                if row.finish:
                    done.append((row.req, _Result(row.tokens, row.logprobs, row.finish, row.versions)))
                    if self.prefix_cache is not None and row.versions == [version]:
                        self._keep_prefix(b, row)
                elif not row.req.future.done():  # a caller that gave up leaves too
                    keep.append(b)
            self._drop_rows(keep)
            cache_len = 0 if self._slots is None else self._slots.length
            record = StepRecord(self.decode_steps, version, decoded, len(joining), len(done), len(keep), cache_len)
            self.step_log.append(record)
            return done

    def _keep_prefix(self, b: int, row: _Row) -> None:
        """Put finished row `b`'s keys and values in the prefix cache: its prompt and all but its last token."""
        assert self._slots is not None and self.prefix_cache is not None
        keys, values = self._slots.row_entries(b)
        self.prefix_cache.store(row.req.prompt_ids + row.tokens[:-1], keys, values)

    def _forward(self, joining: list[_Request]) -> torch.Tensor:
        """Feed every running row its pending token and every joining request its prompt; return logits_BV.

        One forward pass over the flat sequence of those tokens (see `safactory.policy.slots`);
        a joining prompt whose start is in the prefix cache is fed from the end of that start.
        The joined rows are appended to the running batch. Logit rows follow the batch's rows.
        """
        rows = self._rows
        if self._slots is None:
            self._slots = KVSlots(self.device)
        cache = self.prefix_cache
        prefixes: list[CachedPrefix | None] = [
            cache.lookup(r.prompt_ids) if cache is not None else None for r in joining
        ]
        plan = self._slots.plan(len(rows), [len(r.prompt_ids) for r in joining], prefixes)
        ids = [r.tokens[-1] for r in rows]
        positions = [r.next_pos for r in rows]
        last = list(range(len(rows)))
        for req, prefix in zip(joining, prefixes, strict=True):
            cached = prefix.length if prefix is not None else 0
            ids += req.prompt_ids[cached:]
            positions += range(cached, len(req.prompt_ids))
            last.append(len(ids) - 1)
        ids_1N = torch.tensor([ids], dtype=torch.long, device=self.device)
        pos_1N = torch.tensor([positions], dtype=torch.long, device=self.device)
        # every token's logits are needed unless prompts joined (then only each prompt's last)
        last_B = torch.tensor(last, dtype=torch.long, device=self.device) if joining else None
        kwargs: dict[str, Any] = {}
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = 0 if last_B is None else last_B
        with self._slots_attention():
            out = self.model(input_ids=ids_1N, position_ids=pos_1N, use_cache=False, slot_plan=plan, **kwargs)
        for row in rows:
            row.next_pos += 1
        joined = [_Row(req, next_pos=len(req.prompt_ids), stops=self._stop_scanner(req.sampling)) for req in joining]
        self._rows = rows + joined
        logits_NV = out.logits[0]
        return logits_NV if self._logits_to_keep or last_B is None else logits_NV[last_B]

    @contextlib.contextmanager
    def _slots_attention(self) -> Iterator[None]:
        """The model's attention is `slots_attention` inside (one pass, under the lock), its own outside."""
        config = self.model.config
        fields = vars(config)
        if "_attn_implementation_internal" not in fields or getattr(config, "sub_configs", None):
            previous = config._attn_implementation  # the general (slower) path: transformers' own setter
            config._attn_implementation = SLOTS_ATTENTION
            try:
                yield
            finally:
                config._attn_implementation = previous
            return
        previous = fields["_attn_implementation_internal"]  # a plain text config: flip the field itself
        fields["_attn_implementation_internal"] = SLOTS_ATTENTION
        try:
            yield
        finally:
            fields["_attn_implementation_internal"] = previous

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
                            req.future.set_exception(EngineError(f"generation failed: {exc!r}"))
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
        stops = [self._stop_scanner(r.sampling) for r in batch]
        pos_B1 = pos_BT[:, -1:]
        for _ in range(max(max_new)):
            self.decode_steps += 1
            tok_B, lp_B = sample_tokens(out.logits[:, -1, :].float(), temperature_B, top_p_B, self.generator)
            for b, (t, lp) in enumerate(zip(tok_B.tolist(), lp_B.tolist(), strict=True)):
                if finish[b]:
                    continue
                tokens[b].append(t)
                logprobs[b].append(lp)
                finish[b] = finish_reason(tokens[b], self._eos_ids, batch[b].sampling, stops[b])
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
