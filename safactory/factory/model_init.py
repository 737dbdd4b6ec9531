"""The models a run starts from: the policy (a tiny model with its tokenizer learned from the
experts, SmolLM2, or any HF chat model; fully trained or with a LoRA adapter), RL's frozen
reference, and an OPD teacher."""

from __future__ import annotations

import asyncio
import copy

from transformers import AutoModelForCausalLM, PreTrainedModel

from safactory.evolve.teacher import LocalTeacher, Teacher
from safactory.factory.context import GREEDY, RunContext
from safactory.factory.learner import Learner
from safactory.policy.chat import PlainTextChat
from safactory.policy.models import (
    PolicyModel,
    TinyModelSpec,
    add_lora,
    build_tiny,
    is_tiny_directory,
    load_policy_model,
    load_tiny_tokenizer,
    save_model,
)
from safactory.policy.subword import TinyTokenizer, train_subword
from safactory.policy.tokenizer import CharTokenizer
from safactory.policy.weights import is_adapter_model, load_version_state
from safactory.sim.agent import run_episode


async def initial_model(ctx: RunContext) -> PolicyModel:
    """The policy the run starts from (`model.kind` / `model.path`), with its LoRA adapter if asked."""
    m = ctx.config.model
    dtype = m.torch_dtype()
    if m.path:
        start = load_policy_model(m.path, dtype=dtype)
    elif m.kind == "smollm2":
        start = load_policy_model("smollm2", dtype=dtype)
    else:
        spec = TinyModelSpec(m.hidden_size, m.layers, m.heads, m.intermediate_size, m.max_positions)
        model, tokenizer = build_tiny(spec, ctx.config.seed, await tiny_tokenizer(ctx))
        start = PolicyModel(model, PlainTextChat(tokenizer), "tiny")
    if m.lora is not None:
        lora = m.lora
        start.model = add_lora(
            start.model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=lora.targets
        )
    if m.gradient_checkpointing:
        start.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return start


async def tiny_tokenizer(ctx: RunContext) -> TinyTokenizer:
    """The tiny model's tokenizer: characters, or a subword vocabulary learned from expert episodes.

    The subword one is trained once per run, on the texts of each env's scripted expert
    over its first training tasks (the texts the warm start will show the model), and kept
    in OUT/tokenizer so that a resumed run and the saved models use the very same ids.
    """
    m = ctx.config.model
    if m.tokenizer == "char":
        return CharTokenizer()
    saved = ctx.out / "tokenizer"
    if is_tiny_directory(saved):
        return load_tiny_tokenizer(saved)
    render = PlainTextChat(CharTokenizer())
    texts: list[str] = []
    for env in ctx.envs.values():
        if env.entry.expert is None:
            continue
        expert = env.entry.expert(**env.expert)
        for i, task in enumerate(env.train[: m.tokenizer_episodes]):
            traj = await run_episode(
                env.entry.factory, expert, task, seed=i, sampling=GREEDY, limits=ctx.limits, kind="expert"
            )
            texts.append(render.tokenizer.decode(render.render(traj.messages())[0]))
    if not texts:
        raise ValueError("model.tokenizer=subword learns its vocabulary from the envs' experts; none has one")
    tokenizer = await asyncio.to_thread(train_subword, texts, m.vocab_size, m.digit_places)
    saved.mkdir(parents=True, exist_ok=True)
    tokenizer.save(saved)
    ctx.log(f"subword tokenizer: {len(tokenizer)} ids learned from {len(texts)} expert episodes")
    return tokenizer


def reference_model(ctx: RunContext, learner: Learner) -> PreTrainedModel | None:
    """RL's KL reference: the weights RL starts from. For a LoRA learner that is its base (the adapter
    disabled, no copy: returns None); otherwise a frozen copy, saved in OUT/reference on the first start
    and read back from there after a resume (the trainer's weights have moved on by then)."""
    if is_adapter_model(learner.trainer.model):
        return None
    saved = ctx.out / "reference"
    reference = copy.deepcopy(learner.trainer.model)
    if (saved / "config.json").is_file():
        load_version_state(reference, AutoModelForCausalLM.from_pretrained(saved, local_files_only=True).state_dict())
    else:
        save_model(reference, learner.tokenizer, saved)
    for param in reference.parameters():
        param.requires_grad_(False)
    return reference.eval()


def rl_teacher(ctx: RunContext, learner: Learner) -> Teacher | None:
    """The teacher of RL with `rl.objective=opd` (None for the other objectives)."""
    rl = ctx.config.rl
    if rl.objective != "opd":
        return None
    if not rl.teacher:
        raise ValueError("rl.objective=opd needs rl.teacher (a saved model directory)")
    teacher = load_policy_model(rl.teacher, dtype=ctx.config.model.torch_dtype())
    model = teacher.model.to(learner.trainer.device)
    return LocalTeacher(model, teacher.chat.tokenizer, learner.tokenizer, pad_id=learner.tokenizer.pad_id)
