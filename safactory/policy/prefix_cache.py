"""Keys and values of finished requests, kept so that a later prompt that starts the same way skips them.

A multi-turn episode sends the policy its whole conversation every turn: turn t's
prompt is turn t-1's prompt, the reply sampled then, and the new observation. Without
a cache every turn recomputes the keys and values of everything before it, so an
episode of T turns prefills on the order of T^2/2 observation lengths. `PrefixCache`
keeps, for each request that finished, the keys and values of its tokens (prompt and
completion but the last token, which was never fed). A joining prompt looks up the
longest start it shares with a kept entry and is fed only from there.

Lookup: every entry is indexed by a chained hash of each full block of `block` tokens
(hash of block k covers tokens 0..k*block-1), so a prompt finds the entry sharing its
longest block-aligned start with one hash per block; the match is then checked token
by token (a hash collision can only cost a miss) and extended past the last block.
Entries of one weights version only: `LocalPolicy` clears the cache when it loads new
weights, so a prefix is never reused across versions. Bounded in bytes, least
recently used entries leave first.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from safactory.policy.slots import CachedPrefix


@dataclass(eq=False)
class _Entry:
    ids: list[int]
    keys: list[torch.Tensor]  # per layer [kv_heads, len(ids), head_dim]
    values: list[torch.Tensor]
    nbytes: int
    blocks: list[int] = field(default_factory=list)  # the index keys of its full blocks


@dataclass
class PrefixCacheStats:
    lookups: int = 0
    hits: int = 0
    reused_tokens: int = 0  # prompt tokens not fed thanks to the cache
    stored: int = 0
    evicted: int = 0


class PrefixCache:
    """Finished requests' keys and values, found by the token ids they start with (see the module docstring)."""

    def __init__(self, max_bytes: int, block: int = 16) -> None:
        if block < 1:
            raise ValueError(f"block must be >= 1, not {block}")
        self.max_bytes = max_bytes
        self.block = block
        self.nbytes = 0
        self.stats = PrefixCacheStats()
        self._index: dict[int, _Entry] = {}
        self._lru: OrderedDict[int, _Entry] = OrderedDict()  # id(entry) -> entry, least recent first

    def __len__(self) -> int:
        return len(self._lru)

    def _block_keys(self, ids: list[int]) -> list[int]:
        out: list[int] = []
        key = 0
        for start in range(0, len(ids) - self.block + 1, self.block):
            key = hash((key, *ids[start : start + self.block]))
            out.append(key)
        return out

    def lookup(self, ids: list[int]) -> CachedPrefix | None:
        """The cached start of `ids` (always shorter than `ids`, at least one block), or None."""
        self.stats.lookups += 1
        best: _Entry | None = None
        depth = 0  # tokens covered by best's deepest matching block
        for i, key in enumerate(self._block_keys(ids)):  # the deepest block wins; no early stop (evictions leave gaps)
            if (entry := self._index.get(key)) is not None:
                best, depth = entry, (i + 1) * self.block
        if best is None:
            return None
        limit = min(len(best.ids), len(ids) - 1)  # at least one prompt token is fed, for its logits
        n = min(depth, limit)
        if best.ids[:n] != ids[:n]:  # a hash collision: compare from the start
            n = 0
        while n < limit and best.ids[n] == ids[n]:
            n += 1
        if n < self.block:
            return None
        self._lru.move_to_end(id(best))
        self.stats.hits += 1
        self.stats.reused_tokens += n
        return CachedPrefix(n, best.keys, best.values)

    def store(self, ids: list[int], keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Keep the keys/values (per layer [kv_heads, len(ids), head_dim]) of the tokens `ids`."""
        if len(ids) < self.block:
            return
        if any(k.shape[1] != len(ids) for k in (*keys, *values)):
            raise ValueError("the cached keys and values must hold one entry per token id")
        nbytes = sum(t.numel() * t.element_size() for t in (*keys, *values))
        if nbytes > self.max_bytes:
            return
        entry = _Entry(list(ids), keys, values, nbytes, self._block_keys(ids))
        for key in entry.blocks:
            self._index[key] = entry
        self._lru[id(entry)] = entry
        self.nbytes += nbytes
        self.stats.stored += 1
        while self.nbytes > self.max_bytes:
            self._evict(next(iter(self._lru.values())))

    def _evict(self, entry: _Entry) -> None:
        del self._lru[id(entry)]
        self.nbytes -= entry.nbytes
        self.stats.evicted += 1
        for key in entry.blocks:
            if self._index.get(key) is entry:
                del self._index[key]

    def clear(self) -> None:
        """Forget every entry (new weights make them stale)."""
        self._index.clear()
        self._lru.clear()
        self.nbytes = 0
