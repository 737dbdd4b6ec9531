"""Synthetic multi-turn trajectories with token traces, for benchmarks and crash tests."""

from __future__ import annotations

import random

from safactory.types import Message, Step, Task, TokenTrace, Trajectory


def synthetic_trajectory(run_id: str, rng: random.Random, turns: int = 3, tokens_per_turn: int = 20) -> Trajectory:
    """A trajectory shaped like a short tool-use episode: each turn's prompt extends the last."""
    task = Task(id=f"t{rng.randint(0, 50)}", env_id="synthetic", split="train", prompt="p")
    steps = []
    prompt = [rng.randint(4, 90) for _ in range(30)]
    for i in range(turns):
        completion = [rng.randint(4, 90) for _ in range(tokens_per_turn)]
        trace = TokenTrace(prompt_ids=prompt, completion_ids=completion, logprobs=[-rng.random() for _ in completion])
        observation = [Message(role="tool", content=str(rng.randint(0, 999)), tool_call_id=f"c{i}")]
        action = Message(role="assistant", content="x" * tokens_per_turn)
        steps.append(Step(index=i, action=action, observation=observation, reward=0.0, trace=trace))
        prompt = prompt + completion + [5, 6]
    return Trajectory(run_id=run_id, task=task, env_id="synthetic", steps=steps, reward=rng.random())
