"""Model factory: builds or loads the causal LM and tokenizer a policy runs on.

`tiny` is a small random-init Llama-style model with the character tokenizer; it
is saved and reloaded like any Hugging Face model (weights + config + tokenizer
file in one directory).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from safactory.policy.tokenizer import CharTokenizer


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of the tiny model."""

    hidden_size: int = 128
    layers: int = 2
    heads: int = 4
    intermediate_size: int = 512
    max_positions: int = 1024


def build_tiny(spec: TinyModelSpec, seed: int) -> tuple[PreTrainedModel, CharTokenizer]:
    """A random-init tiny Llama and its character tokenizer, deterministic by seed."""
    tokenizer = CharTokenizer()
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        max_position_embeddings=spec.max_positions,
        pad_token_id=tokenizer.pad_id,
        bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.eval()
    return model, tokenizer


def save_model(model: PreTrainedModel, tokenizer: CharTokenizer, directory: str | Path) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save(directory)


def load_model(directory: str | Path) -> tuple[PreTrainedModel, CharTokenizer]:
    model = AutoModelForCausalLM.from_pretrained(directory)
    model.eval()
    return model, CharTokenizer.load(directory)
