"""Trainer tokens/s vs a bare torch training loop on the same model and batch (same run).

Run: `python benchmarks/trainer_throughput.py [--device cuda]`. The bare loop does the
least a loop can: one forward over the padded batch, masked token log-likelihood
loss, backward, gradient clipping, AdamW step. Ours adds micro-batching, the PPO
objective with behaviour log-probs, statistics and weight bookkeeping. Last line:
`ratio=<trainer/bare>`; target >= 0.85.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from safactory.evolve.experience import TrainSequence
from safactory.evolve.trainer import Trainer


def make_batch(vocab: int, n_seqs: int = 16, length: int = 256, seed: int = 0) -> list[TrainSequence]:
    gen = torch.Generator().manual_seed(seed)
    seqs = []
    for i in range(n_seqs):
        ids = torch.randint(4, vocab, (length,), generator=gen).tolist()
        mask = [0] * (length // 8) + [1] * (length - length // 8)
        seqs.append(
            TrainSequence(ids, mask, (-torch.rand(length, generator=gen)).tolist(), advantage=float(i % 2 * 2 - 1))
        )
    return seqs


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bare_loop(model: LlamaForCausalLM, seqs: list[TrainSequence], steps: int, device: str) -> float:
    """Tokens/s of the minimal loop."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids_BT = torch.tensor([s.input_ids for s in seqs], device=device)
    mask_BT = torch.tensor([s.loss_mask for s in seqs], device=device, dtype=torch.float32)[:, 1:]
    tokens = float(mask_BT.sum())
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        logits_BTV = model(input_ids=ids_BT).logits.float()
        logp_BT = torch.log_softmax(logits_BTV[:, :-1], -1).gather(-1, ids_BT[:, 1:, None]).squeeze(-1)
        (-(logp_BT * mask_BT).sum() / tokens).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    _sync(device)
    return tokens * steps / (time.perf_counter() - start)


def trainer_loop(model: LlamaForCausalLM, seqs: list[TrainSequence], steps: int, device: str) -> float:
    """Tokens/s of our Trainer (PPO objective, one micro-batch of the whole batch)."""
    trainer = Trainer(model, lr=1e-5, micro_batch_size=len(seqs))
    _sync(device)
    start = time.perf_counter()
    tokens = 0.0
    for _ in range(steps):
        tokens += trainer.train_step(seqs, "ppo")["tokens"]
    _sync(device)
    return tokens / (time.perf_counter() - start)


def compare(model: LlamaForCausalLM, seqs: list[TrainSequence], steps: int, device: str) -> tuple[float, float]:
    """(ours, bare) tokens/s, each after a warm-up step, alternating to share machine noise."""
    ours_runs, bare_runs = [], []
    for _ in range(2):
        trainer_loop(copy.deepcopy(model), seqs, 1, device)
        ours_runs.append(trainer_loop(copy.deepcopy(model), seqs, steps, device))
        bare_loop(copy.deepcopy(model), seqs, 1, device)
        bare_runs.append(bare_loop(copy.deepcopy(model), seqs, steps, device))
    return max(ours_runs), max(bare_runs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=99,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).to(args.device)
    seqs = make_batch(config.vocab_size)
    ours, bare = compare(model, seqs, args.steps, args.device)
    print(f"device={args.device} model=4x256 batch=16x256 trainer={ours:,.0f} tok/s bare={bare:,.0f} tok/s")
    print(f"ratio={ours / bare:.3f}")


if __name__ == "__main__":
    main()
