"""Benchmark: continuous batching against static batching in LocalPolicy on a mixed-length workload.

R requests (default 256) with max_tokens drawn uniformly from 4..64 and prompts of
varied length are sent by C concurrent clients (default 64), each sending its next
request as soon as its previous one is answered, as concurrent episodes do. The
same workload, seed and weights run through `LocalPolicy(continuous=False)` (static
batching: a batch runs until its longest row finishes, new requests wait for the
next batch) and `LocalPolicy(continuous=True)` (requests join at the next decode
step, finished rows leave), in the same process and run. Throughput is generated
tokens per second of wall time; the headline is `ratio=<continuous / static>`, the median of
the ratios of K alternating pairs of runs (after one warm-up run of each).

Run: `.venv/bin/python benchmarks/continuous_batching.py [--requests R] [--clients C] [--repeats K] [--threads T]
[--hidden H --layers N] [--device cuda] [--check N]`
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import random
import statistics
import time

import torch

from safactory.policy.base import SamplingParams
from safactory.policy.chat import PlainTextChat
from safactory.policy.local import LocalPolicy
from safactory.policy.models import TinyModelSpec, build_tiny
from safactory.types import Message


def workload(requests: int, seed: int) -> list[tuple[list[Message], SamplingParams]]:
    rng = random.Random(seed)
    out = []
    for _ in range(requests):
        terms = "+".join(str(rng.randint(1, 99)) for _ in range(rng.randint(1, 12)))
        messages = [Message(role="user", content=f"Compute {terms}.")]
        out.append((messages, SamplingParams(temperature=1.0, max_tokens=rng.randint(4, 64))))
    return out


async def drive(policy: LocalPolicy, items: list[tuple[list[Message], SamplingParams]], clients: int) -> int:
    """Run every item through `clients` closed-loop clients; return the tokens generated."""
    queue = list(reversed(items))
    tokens = 0

    async def client() -> None:
        nonlocal tokens
        while queue:
            messages, sampling = queue.pop()
            completion = await policy.generate(messages, [], sampling)
            tokens += len(completion.token_ids or [])

    await asyncio.gather(*(client() for _ in range(clients)))
    await policy.close()
    return tokens


def greedy_agreement(model: torch.nn.Module, chat: PlainTextChat, args: argparse.Namespace) -> int:
    """How many of the first `args.check` requests, greedy, give the same tokens with static and continuous batching."""
    items = [(m, s.model_copy(update={"temperature": 0.0})) for m, s in workload(args.check, args.seed)]
    outs = []
    for continuous in (False, True):
        policy = LocalPolicy(copy.deepcopy(model), chat, seed=args.seed, continuous=continuous)

        async def go(policy: LocalPolicy = policy) -> list[list[int]]:
            done = await asyncio.gather(*(policy.generate(m, [], s) for m, s in items))
            await policy.close()
            return [c.token_ids or [] for c in done]

        outs.append(asyncio.run(go()))
    return sum(a == b for a, b in zip(*outs, strict=True))


def run_once(
    continuous: bool, model: torch.nn.Module, chat: PlainTextChat, args: argparse.Namespace
) -> tuple[float, float]:
    """(tokens per wall second, tokens per CPU second) of one pass of the workload through a fresh policy."""
    policy = LocalPolicy(copy.deepcopy(model), chat, seed=args.seed, continuous=continuous)
    started, cpu_started = time.perf_counter(), time.process_time()
    tokens = asyncio.run(drive(policy, workload(args.requests, args.seed), args.clients))
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    print(
        f"{'continuous' if continuous else 'static':>10}: {tokens} tokens in {elapsed:.2f} s ({cpu:.2f} s CPU) = "
        f"{tokens / elapsed:.0f} tok/s, {policy.batches} batches, {policy.decode_steps} decode steps"
    )
    return tokens / elapsed, tokens / cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared machine)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--check", type=int, default=0, help="first compare greedy tokens of N requests, both ways")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = TinyModelSpec(hidden_size=args.hidden, layers=args.layers, intermediate_size=4 * args.hidden)
    model, tokenizer = build_tiny(spec, seed=args.seed)
    model = model.to(args.device)
    chat = PlainTextChat(tokenizer)
    if args.check:
        print(f"check: {greedy_agreement(model, chat, args)}/{args.check} greedy completions equal both ways")
    run_once(False, model, chat, args)  # warm-up of both paths
    run_once(True, model, chat, args)
    # alternate the two so that load from elsewhere on the machine hits both alike; pair them up
    static: list[tuple[float, float]] = []
    continuous: list[tuple[float, float]] = []
    for _ in range(args.repeats):
        static.append(run_once(False, model, chat, args))
        continuous.append(run_once(True, model, chat, args))
    ratios = [c[0] / s[0] for s, c in zip(static, continuous, strict=True)]
    cpu_ratios = [c[1] / s[1] for s, c in zip(static, continuous, strict=True)]
    print(
        f"static {statistics.median(s[0] for s in static):.0f} tok/s, "
        f"continuous {statistics.median(c[0] for c in continuous):.0f} tok/s (medians of {args.repeats}); "
        f"per-pair ratios {', '.join(f'{r:.2f}' for r in ratios)}; "
        f"per CPU second: median ratio {statistics.median(cpu_ratios):.2f}"
    )
    print(f"ratio={statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
