"""CUDA path check: generation, log-prob agreement, a training step, a checkpoint and a hot swap on a GPU.

Skips cleanly (exit 0) without CUDA. Run: `python benchmarks/gpu_check.py`.
The large model has SmolLM2-135M's transformer shape (30 layers, 576 wide, 9 query /
3 key-value heads) with the character vocabulary, random init (no hub access needed).
Then a short closed loop on an HF chat model with LoRA in bf16 (`benchmarks/hf_loop.py`: a
Qwen3-shaped model on Qwen3's tokenizer, with generation and training tokens/s).
Then, where Ray is installed, a tiny closed loop with its rollouts in a Ray worker actor whose policy
copy runs on the GPU (`rollout.executor=ray`, `rollout.gpus_per_worker=1`, `model.device=cuda`): its
held-out result and wall time. `--ray-loop-cpu` runs only that loop, on the CPU (no GPU needed).
The last line is `ratio=<trainer tokens/s / bare torch loop tokens/s>` on the GPU.
"""

from __future__ import annotations

import asyncio
import copy
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import torch
from trainer_throughput import compare, make_batch
from transformers import LlamaConfig, LlamaForCausalLM

from safactory.evolve.checkpoint import load_checkpoint, save_checkpoint
from safactory.evolve.losses import token_logprobs
from safactory.evolve.trainer import Trainer
from safactory.policy.base import SamplingParams
from safactory.policy.chat import PlainTextChat
from safactory.policy.local import LocalPolicy
from safactory.policy.models import TinyModelSpec, build_tiny
from safactory.policy.tokenizer import CharTokenizer
from safactory.types import Message


def smollm2_shaped(vocab: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def check_generation(device: str) -> None:
    model, tok = build_tiny(TinyModelSpec(), seed=0)
    policy = LocalPolicy(model.to(device), PlainTextChat(tok), seed=0)
    prompts = [[Message(role="user", content="Compute " + "12+3" * k + ".")] for k in range(1, 17)]

    async def go() -> tuple[list, list, list]:
        sampled = await asyncio.gather(
            *(policy.generate(p, [], SamplingParams(temperature=0.7, max_tokens=24)) for p in prompts)
        )
        greedy = await asyncio.gather(
            *(policy.generate(p, [], SamplingParams(temperature=0, max_tokens=16)) for p in prompts)
        )
        single = [await policy.generate(p, [], SamplingParams(temperature=0, max_tokens=16)) for p in prompts]
        return sampled, greedy, single

    sampled, greedy, single = asyncio.run(go())
    worst = 0.0
    for c in sampled:
        ids = torch.tensor([c.prompt_ids + c.token_ids], device=device)
        with torch.no_grad():
            logits = policy.model(input_ids=ids).logits
        lp = token_logprobs(logits[:, :-1], ids[:, 1:], torch.tensor([0.7], device=device))[0, len(c.prompt_ids) - 1 :]
        worst = max(worst, max(abs(a - b) for a, b in zip(c.logprobs, lp.tolist(), strict=True)))
    same = sum(a.token_ids == b.token_ids for a, b in zip(greedy, single, strict=True))
    print(f"generation on {device}: logprob max |diff| vs forward pass = {worst:.2e}")
    print(f"batched greedy == unbatched: {same}/{len(greedy)}")


def check_ray_loop(device: str) -> None:
    """A tiny arith closed loop (no SFT, 2 RL steps) whose rollouts a Ray worker actor plays with its own
    copy of the policy on `device` (on CUDA Ray reserves the GPU for it: `rollout.gpus_per_worker=1`);
    prints its held-out result and wall time, or a line saying why it was skipped."""
    if importlib.util.find_spec("ray") is None:
        print("ray loop: skipped (Ray is not installed: pip install 'safactory[ray]')")
        return
    from rich.console import Console

    from safactory.config import load_config
    from safactory.factory.loop import Factory

    test_tasks = 16
    overrides = [
        "seed=1",
        "env.train_tasks=64",
        f"env.test_tasks={test_tasks}",
        "model.hidden_size=64",
        "model.intermediate_size=128",
        f"model.device={device}",
        "sft.enabled=false",
        "rl.steps=2",
        "rl.tasks_per_step=4",
        "rl.group_size=4",
        "rl.eval_every=0",
        "gate.enabled=false",
        "checkpoint_every=100",
        "logging.tensorboard=false",
        "logging.report=false",
        "rollout.concurrency=16",
        "rollout.max_batch=16",
        "rollout.executor=ray",  # no rollout.ray_address: a Ray instance of its own on this machine
        "rollout.workers_per_node=1",
        "rollout.cpus_per_worker=1",
        f"rollout.gpus_per_worker={1 if device.startswith('cuda') else 0}",
    ]
    config = load_config(str(Path(__file__).resolve().parents[1] / "examples" / "arith.yaml"), overrides)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        summary = Factory(config, Path(tmp) / "run", console=Console(stderr=True, quiet=True)).run()
        wall_s = time.perf_counter() - started
    final, ray_stats = summary["heldout"]["final"], summary["ray"]["policy"]
    print(
        f"ray loop (rollouts in {ray_stats['workers']} Ray worker(s), policy on {device}): "
        f"held-out success {final['success_rate']:.3f} on {test_tasks} tasks, "
        f"{ray_stats['groups']} groups played by workers, {wall_s:.1f} s wall"
    )


def main() -> None:
    if "--ray-loop-cpu" in sys.argv[1:]:  # the Ray section alone, on the CPU (checks it without a GPU)
        check_ray_loop("cpu")
        return
    if not torch.cuda.is_available():
        print("skipped: no CUDA device")
        print("ray loop: skipped (no CUDA device; `--ray-loop-cpu` runs it on the CPU)")
        return
    device = "cuda"
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    check_generation(device)

    tok = CharTokenizer()
    model = smollm2_shaped(tok.vocab_size).to(device)
    print(f"SmolLM2-shaped model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
    seqs = make_batch(tok.vocab_size, n_seqs=16, length=512)
    ours, bare = compare(model, seqs, 5, device)
    print(f"training step: {ours:,.0f} tokens/s (trainer) vs {bare:,.0f} tokens/s (bare torch loop)")
    trainer = Trainer(copy.deepcopy(model), lr=1e-5, micro_batch_size=16, pad_id=tok.pad_id)
    trainer.train_step(seqs, "ppo")

    with tempfile.TemporaryDirectory() as tmp:
        path = save_checkpoint(
            Path(tmp),
            model=trainer.model,
            tokenizer=tok,
            optimizer=trainer.optimizer,
            version=1,
            parent_version=0,
            train_step=trainer.step,
        )
        _, meta = load_checkpoint(path)
        print(f"checkpoint: {path.name}, weights hash verified on reload ({meta.weights_hash[:12]}), v{meta.version}")

    policy = LocalPolicy(copy.deepcopy(model), PlainTextChat(tok), seed=0)
    prompt = [Message(role="user", content="Compute 1+2.")]

    async def swap() -> tuple[int, int]:
        before = await policy.generate(prompt, [], SamplingParams(temperature=0, max_tokens=8))
        await policy.publish(trainer.weights())
        after = await policy.generate(prompt, [], SamplingParams(temperature=0, max_tokens=8))
        return before.policy_version, after.policy_version

    v0, v1 = asyncio.run(swap())
    print(f"hot swap on {device}: completions before v{v0}, after v{v1}")
    try:  # an HF chat model in the closed loop: Qwen3-shaped, Qwen3's tokenizer, bf16, LoRA
        from hf_loop import main as hf_loop

        figures = hf_loop(device)
        generation, training = figures["generation_tokens_per_s"], figures["training_tokens_per_s"]
        print(
            f"HF loop (Qwen3-shaped, bf16, LoRA): {figures['loop_s']:.0f} s; generation "
            f"{generation:,.0f} tokens/s, training {training:,.0f} tokens/s"
        )
    except Exception as exc:  # the checks above stand on their own
        print(f"HF loop check failed: {exc!r}")
    try:
        check_ray_loop(device)
    except Exception as exc:  # so does the rest
        print(f"ray loop check failed: {exc!r}")
    print(f"ratio={ours / bare:.3f}")


if __name__ == "__main__":
    main()
