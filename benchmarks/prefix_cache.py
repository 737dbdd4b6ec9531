"""Benchmark: multi-turn rollouts with and without LocalPolicy's prefix cache.

Every turn of an episode re-sends the whole conversation; with the prefix cache a
turn is fed only from where it differs from the turn before (the previous prompt and
reply are already in the cache). The same episodes (same tasks, seeds and weights)
run through the real runner twice per repeat, once with `prefix_cache_mb=0` and once
with the cache, alternating, in the same process. The headline is
`ratio=<episodes/s with the cache / without>` (wall time, median over the repeats).

Default workload: the demo's maze tasks (5x5 and 7x7 boards, up to 12 turns) and a
fresh tiny model whose replies are `--reply-tokens` sampled tokens, mostly not a valid
move, so the env answers with an error observation and every episode runs all its
turns: the turn structure of a long episode without a trained model. `--model DIR`
(e.g. runs/demo/model) runs a trained model instead, with replies up to 48 tokens.

Run: `.venv/bin/python benchmarks/prefix_cache.py [--episodes E] [--repeats K] [--model DIR] [--env maze]`
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import statistics
import time

import torch

from safactory.policy.base import SamplingParams
from safactory.policy.chat import PlainTextChat
from safactory.policy.local import LocalPolicy
from safactory.policy.models import TinyModelSpec, build_tiny, load_policy_model
from safactory.sim.agent import EpisodeLimits
from safactory.sim.registry import default_registry
from safactory.sim.runner import RolloutRunner

OPTIONS = {"maze": {"sizes": [5, 7], "far": 0.0, "loops": 0.3}, "ops": {"brief": True, "kinds": ["lookup"]}}


async def rollouts(policy: LocalPolicy, env: str, episodes: int, limits: EpisodeLimits) -> tuple[float, int]:
    """Seconds to run `episodes` episodes (groups of 8) and the steps they took."""
    entry = default_registry().get(env)
    tasks = entry.tasks(**OPTIONS.get(env, {})).tasks("train", episodes // 8)
    runner = RolloutRunner(entry.factory, policy, limits=limits, concurrency=256)
    start = time.perf_counter()
    groups = await runner.run_groups(tasks, 8, SamplingParams(temperature=0.8))
    elapsed = time.perf_counter() - start
    await policy.close()
    trajs = [t for g in groups for t in g]
    broken = [t.error for t in trajs if t.termination == "env_error"]  # a context overflow is a policy_error: fine
    assert not broken, broken[:3]
    return elapsed, sum(len(t.steps) for t in trajs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--env", default="maze")
    parser.add_argument("--model", default=None, help="a saved model directory (default: a fresh tiny model)")
    parser.add_argument("--reply-tokens", type=int, default=6, help="reply length of the fresh tiny model")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.model:
        loaded = load_policy_model(args.model)
        model, chat = loaded.model, loaded.chat
        limits = EpisodeLimits(max_turns=12, max_tokens_per_turn=48, max_total_tokens=4096)
    else:
        model, tokenizer = build_tiny(TinyModelSpec(128, 2, 4, 512, 4096), seed=0)
        chat = PlainTextChat(tokenizer)
        limits = EpisodeLimits(max_turns=12, max_tokens_per_turn=args.reply_tokens, max_total_tokens=4096)

    def policy(cache_mb: float) -> LocalPolicy:
        return LocalPolicy(copy.deepcopy(model), chat, seed=0, max_batch=256, prefix_cache_mb=cache_mb)

    asyncio.run(rollouts(policy(1024), args.env, 64, limits))  # warm up
    rates: dict[str, list[float]] = {"plain": [], "cached": []}
    reused = lookups = 0
    for _ in range(args.repeats):
        for name, cache_mb in (("plain", 0.0), ("cached", 1024.0)):
            p = policy(cache_mb)
            elapsed, steps = asyncio.run(rollouts(p, args.env, args.episodes, limits))
            rates[name].append(args.episodes / elapsed)
            if p.prefix_cache is not None:
                reused += p.prefix_cache.stats.reused_tokens
                lookups += p.prefix_cache.stats.lookups
    plain, cached = statistics.median(rates["plain"]), statistics.median(rates["cached"])
    ratios = [c / p for c, p in zip(rates["cached"], rates["plain"], strict=True)]
    print(f"env={args.env} episodes={args.episodes} model={args.model or 'fresh tiny'} repeats={args.repeats}")
    print(f"plain_episodes_per_s={plain:.1f} cached_episodes_per_s={cached:.1f}")
    print(f"reused_prompt_tokens_per_turn={reused / max(lookups, 1):.0f}")
    print(f"ratio={statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
