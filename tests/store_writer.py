"""A writer process for the crash test: stores synthetic trajectories and prints an `ack` line
with their ids after each commit, so the test knows exactly what was acknowledged."""

from __future__ import annotations

import random
import sys

from safactory.data.store import TrajectoryStore
from safactory.types import Message, Step, Task, TokenTrace, Trajectory


def synthetic(run_id: str, rng: random.Random) -> Trajectory:
    task = Task(id=f"t{rng.randint(0, 50)}", env_id="synthetic", split="train", prompt="p")
    steps = []
    prompt = [rng.randint(4, 90) for _ in range(30)]
    for i in range(3):
        completion = [rng.randint(4, 90) for _ in range(20)]
        trace = TokenTrace(prompt_ids=prompt, completion_ids=completion, logprobs=[-rng.random() for _ in completion])
        steps.append(Step(index=i, action=Message(role="assistant", content="x" * 20), trace=trace))
        prompt = prompt + completion + [5, 6]
    return Trajectory(run_id=run_id, task=task, env_id="synthetic", steps=steps, reward=rng.random())


def main() -> None:
    url, run_id, batches = sys.argv[1], sys.argv[2], int(sys.argv[3])
    store = TrajectoryStore(url)
    store.create_run(run_id, {})
    rng = random.Random()
    for _ in range(batches):
        batch = [synthetic(run_id, rng) for _ in range(20)]
        store.add(batch)
        print("ack " + " ".join(t.id for t in batch), flush=True)


if __name__ == "__main__":
    main()
