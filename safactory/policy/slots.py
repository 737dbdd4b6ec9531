"""The KV cache of a continuously batched running batch, and the attention that reads it.

One decode step of `LocalPolicy` is one forward pass over a *flat* sequence: the
pending token of every running row, then the whole prompt of every request that
joins at this step, with no padding. The model's linear layers, norms and MLPs see
[1, N, hidden] whatever the mix; only attention needs to know which token belongs
to which row. That is `slots_attention`, registered with transformers'
`AttentionInterface` and switched on for the step's forward only. Per layer it

1. writes every flat token's key and value into its row and column of `KVSlots`
   (one copy for the running rows' column, one per joining prompt);
2. runs the running rows' queries (one each) against their rows of the cache in one
   batched attention call, padding masked;
3. runs each joining prompt causally over its own keys, or, when the prompt's start was
   found in the prefix cache (`safactory.policy.prefix_cache`), writes the cached keys and
   values of that start into the row first and runs only the rest of the prompt, each
   token over the cached start and the prompt tokens before it.

`KVSlots` holds per-layer buffers shaped [rows, kv_heads, columns, head_dim] with
spare room. Rows are right-aligned in a window of columns: every row's next token goes
to the same column, and a joining prompt ends in the column the running rows write at
its step, so that after the step all rows continue together. A finished row is
replaced by the last row (only moved rows are copied); leading columns no row needs
leave the window by moving its origin (no copy), and the window is copied back to
column 0 only when it reaches the end of the buffers; capacities grow when full.
Nothing is reallocated per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

try:  # transformers >= 4.50: pluggable attention functions that receive the forward's extra kwargs
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    HAVE_ATTENTION_INTERFACE = True
except ImportError:  # pragma: no cover - older transformers: LocalPolicy falls back to static batching
    AttentionInterface = sdpa_attention_forward = None  # type: ignore[assignment,misc]
    HAVE_ATTENTION_INTERFACE = False

SLOTS_ATTENTION = "safactory_slots"
# attention variants a flat step does not implement: a model that asks for one fails the step loudly
_UNSUPPORTED = ("sliding_window", "softcap", "s_aux", "sinks")


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 1).bit_length()


@dataclass(frozen=True)
class CachedPrefix:
    """Keys and values of the first `length` tokens of a prompt: per layer [kv_heads, >=length, head_dim]."""

    length: int
    keys: list[torch.Tensor]
    values: list[torch.Tensor]


@dataclass
class StepPlan:
    """Where the N tokens of one flat forward go; passed to the model as the `slot_plan` kwarg.

    Tokens 0..`decode`-1 are the running rows' pending tokens (one per row, rows in
    order), written at buffer column `column`; then the fed part of each joining prompt,
    `spans[j] = (offset, length)`, whose row is `decode + j` and whose last token is also
    at `column`. A joining prompt with a cached start (`prefixes[j]`) feeds only the tokens
    after it; `masks[j]` is then the causal mask of those tokens over the whole prompt.
    Attention reads buffer columns `first`..`column`.
    """

    slots: KVSlots
    decode: int
    first: int
    column: int
    spans: list[tuple[int, int]]
    mask_B11L: torch.Tensor | None  # the running rows' padding (None: no row is padded)
    prefixes: list[CachedPrefix | None]
    masks: list[torch.Tensor | None]

    def attend(
        self, layer: int, q_1HND: torch.Tensor, k_1GND: torch.Tensor, v_1GND: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """Store this layer's new keys/values; return attn_1NHD (the layout transformers' attention returns)."""
        keys, values = self.slots.layer(layer, k_1GND)
        _, H, N, D = q_1HND.shape
        G = k_1GND.shape[1]
        B, first, end = self.decode, self.first, self.column + 1
        # the running rows' new entries fill one column; each joining prompt fills the end of its row
        keys[:B, :, self.column] = k_1GND[0, :, :B].transpose(0, 1)
        values[:B, :, self.column] = v_1GND[0, :, :B].transpose(0, 1)
        for j, (start, length) in enumerate(self.spans):
            if (prefix := self.prefixes[j]) is not None:
                cached = slice(end - length - prefix.length, end - length)
                keys[B + j, :, cached] = prefix.keys[layer][:, : prefix.length]
                values[B + j, :, cached] = prefix.values[layer][:, : prefix.length]
            keys[B + j, :, end - length : end] = k_1GND[0, :, start : start + length]
            values[B + j, :, end - length : end] = v_1GND[0, :, start : start + length]
        o_BHD = None
        if B:
            # one query per row: the H/G query heads that share a key head become G groups of H/G queries
            q_BGRD = q_1HND[0, :, :B].transpose(0, 1).reshape(B, G, H // G, D)
            o_BGRD = F.scaled_dot_product_attention(
                q_BGRD, keys[:B, :, first:end], values[:B, :, first:end], attn_mask=self.mask_B11L, scale=scale
            )
            o_BHD = o_BGRD.reshape(B, H, D)
            if not self.spans:
                return o_BHD[None]
        out_NHD = q_1HND.new_empty((N, H, D))
        if o_BHD is not None:
            out_NHD[:B] = o_BHD
        for j, (start, length) in enumerate(self.spans):
            stop = start + length
            prefix, mask_PT = self.prefixes[j], self.masks[j]
            if prefix is None:  # the prompt's own keys, causally
                k_1HTD, v_1HTD = k_1GND[:, :, start:stop], v_1GND[:, :, start:stop]
            else:  # the cached start and the fed tokens, as they now stand in the row
                row = slice(B + j, B + j + 1)
                k_1HTD = keys[row, :, end - length - prefix.length : end]
                v_1HTD = values[row, :, end - length - prefix.length : end]
            if G != H:
                k_1HTD, v_1HTD = k_1HTD.repeat_interleave(H // G, dim=1), v_1HTD.repeat_interleave(H // G, dim=1)
            o_1HPD = F.scaled_dot_product_attention(
                q_1HND[:, :, start:stop], k_1HTD, v_1HTD, attn_mask=mask_PT, is_causal=mask_PT is None, scale=scale
            )
            out_NHD[start:stop] = o_1HPD[0].transpose(0, 1)
        return out_NHD[None]


def slots_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function of a flat step (see the module docstring); plain sdpa without a plan."""
    plan: StepPlan | None = kwargs.pop("slot_plan", None)
    if plan is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    unsupported = [name for name in _UNSUPPORTED if kwargs.get(name) is not None]
    if unsupported or not getattr(module, "is_causal", True):
        raise NotImplementedError(
            f"continuous batching does not support attention with {unsupported or 'no causality'}"
        )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return plan.attend(module.layer_idx, query, key, value, scale), None


if HAVE_ATTENTION_INTERFACE:
    AttentionInterface.register(SLOTS_ATTENTION, slots_attention)


class KVSlots:
    """Per-layer key/value buffers of the running batch, [rows, kv_heads, columns, head_dim] with spare room.

    Rows 0..`rows`-1 are the running requests. Their right-aligned entries live in a
    window of `length` buffer columns starting at `base`; `mask_BL` marks the real
    ones and `starts` holds each row's first real column relative to the window.
    Dropping leading columns no row needs only moves `base` (no copy), and so does
    widening the window to the left for a long joining prompt while there is room;
    the window is copied back to column 0 only when it reaches the end of the buffer.
    Layers are allocated on their first write, from the shapes the model hands them.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.mask_BL = torch.zeros((0, 0), dtype=torch.bool, device=device)
        self.rows = 0
        self.base = 0
        self.length = 0
        self.starts: list[int] = []  # kept on the host (no device syncs)

    @property
    def capacity(self) -> tuple[int, int]:
        return (self.mask_BL.shape[0], self.mask_BL.shape[1])

    def layer(self, index: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) buffers of layer `index`, allocated at the current capacity on first use."""
        while index >= len(self.keys):
            R, C = self.capacity
            shape = (R, like.shape[1], C, like.shape[3])
            self.keys.append(like.new_zeros(shape))
            self.values.append(like.new_zeros(shape))
        return self.keys[index], self.values[index]

    def plan(
        self, decode: int, prompt_lengths: list[int], prefixes: list[CachedPrefix | None] | None = None
    ) -> StepPlan:
        """Make room for one flat step: the `decode` running rows, then joining prompts of `prompt_lengths`.

        The running rows write their pending token in the window's next column;
        joining prompt j fills row `decode + j` up to and including that column (the
        window widens to the left if the prompt is longer than the running rows'
        entries). After the step every row's next token goes to the column after it.
        A joining prompt with a cached start (`prefixes[j]`, shorter than the prompt) is
        fed from the token after that start.
        """
        prefixes = prefixes if prefixes is not None else [None] * len(prompt_lengths)
        if len(prefixes) != len(prompt_lengths) or any(
            p is not None and not 0 < p.length < n for p, n in zip(prefixes, prompt_lengths, strict=True)
        ):
            raise ValueError("each cached prefix must be shorter than its prompt (one per joining prompt)")
        assert decode == self.rows
        B, L = decode, self.length
        column = max(L, max(prompt_lengths, default=0) - 1)  # relative to the window
        self._reserve(B + len(prompt_lengths), column + 1, column - L)
        first = self.base
        self.mask_BL[:B, first + column] = True
        spans: list[tuple[int, int]] = []
        masks: list[torch.Tensor | None] = []
        offset = B
        for j, (length, prefix) in enumerate(zip(prompt_lengths, prefixes, strict=True)):
            start = column + 1 - length
            self.mask_BL[B + j, first : first + start] = False
            self.mask_BL[B + j, first + start : first + column + 1] = True
            self.starts.append(start)
            fed = length - (prefix.length if prefix is not None else 0)
            spans.append((offset, fed))
            offset += fed
            if prefix is None:
                masks.append(None)
            else:  # fed token i sees the cached start and fed tokens 0..i
                masks.append(torch.ones((fed, length), dtype=torch.bool, device=self.device).tril(length - fed))
        padded = any(self.starts[:B])
        mask_B11L = self.mask_BL[:B, None, None, first : first + column + 1] if padded else None
        self.rows, self.length = B + len(prompt_lengths), column + 1
        return StepPlan(self, B, first, first + column, spans, mask_B11L, prefixes, masks)

    def row_entries(self, row: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Copies of row `row`'s keys and values, per layer [kv_heads, entries, head_dim], oldest first."""
        entries = slice(self.base + self.starts[row], self.base + self.length)
        return [k[row, :, entries].clone() for k in self.keys], [v[row, :, entries].clone() for v in self.values]

    def _reserve(self, rows: int, width: int, shift: int) -> None:
        """Room for `rows` rows and a window `width` columns wide whose current entries sit `shift` columns in."""
        cap_rows, cap_cols = self.capacity
        B, L, base = self.rows, self.length, self.base
        if B == 0:
            base = shift = 0
        if rows <= cap_rows and shift <= base and base - shift + width <= cap_cols:
            self.base = base - shift  # no copy: the window's origin moves left
            if shift:
                self.mask_BL[:B, self.base : base] = False
        else:  # grow, or copy the window back to column 0 of the buffers
            new_rows = max(cap_rows, _next_pow2(max(rows, 8)))
            new_cols = max(cap_cols, _next_pow2(max(width + width // 4, 64)))
            grow = (new_rows, new_cols) != (cap_rows, cap_cols)
            mask_BL = self.mask_BL.new_zeros((new_rows, new_cols)) if grow else self.mask_BL
            mask_BL[:B, shift : shift + L] = self.mask_BL[:B, base : base + L].clone()
            mask_BL[:B, :shift] = False
            self.mask_BL = mask_BL
            for buffers in (self.keys, self.values):
                for i, old in enumerate(buffers):
                    new = old.new_zeros((new_rows, old.shape[1], new_cols, old.shape[3])) if grow else old
                    new[:B, :, shift : shift + L] = old[:B, :, base : base + L].clone()
                    buffers[i] = new
            self.base = 0
        self.length = L + shift
        self.starts = [start + shift for start in self.starts]

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
            window = slice(self.base, self.base + self.length)
            for buf in (*self.keys, *self.values):
                buf[dst, :, window] = buf[src, :, window]
            self.mask_BL[dst, window] = self.mask_BL[src, window]
            for h, m in zip(holes, movers, strict=True):
                order[h] = m
        self.rows = n
        self.starts = [self.starts[b] for b in order[:n]]
        if n == 0:
            self.base = self.length = 0
        elif (first := min(self.starts)) > 0:  # leading columns no row needs: drop them from the window
            self.base += first
            self.length -= first
            self.starts = [start - first for start in self.starts]
        return order[:n]
