"""Small closed-loop runs shared by the Factory tests: configs and a warm-started arith model."""

from __future__ import annotations

from pathlib import Path

from safactory.config import load_config
from safactory.factory.loop import Factory

# arith only, small model, few tasks: a run takes tens of seconds on 2 CPU cores
ARITH = [
    "seed=1",
    "env.train_tasks=400",
    "env.test_tasks=40",
    "model.hidden_size=64",
    "model.intermediate_size=128",
    "rollout.concurrency=64",
    "rollout.max_batch=64",
    "logging.tensorboard=false",
    "logging.report=false",
    # raw: an untrained model's random text can look like a secret (an address, say), and redaction
    # would then drop that turn's token trace; these runs check traces, not redaction
    "redact=false",
]


def warm_arith_model(out: Path) -> Path:
    """SFT a small arith model until it solves some held-out tasks; returns its model directory."""
    overrides = [
        *ARITH,
        "sft.demos=400",
        "sft.batch_size=32",
        "sft.max_steps=400",
        "sft.probe_every=20",
        "sft.probe_tasks=40",
        "sft.target_success=0.35",
        "rl.enabled=false",
        "gate.enabled=false",
    ]
    Factory(load_config("examples/arith.yaml", overrides), out).run()
    return out / "model"
