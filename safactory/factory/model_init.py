"""The models a run starts from: the policy (a saved directory, or a tiny model with its
tokenizer learned from the experts), RL's frozen reference, and an OPD teacher."""

from __future__ import annotations

import asyncio
import copy

from transformers import PreTrainedModel

from safactory.evolve.teacher import LocalTeacher, Teacher
from safactory.factory.context import GREEDY, RunContext
from safactory.factory.learner import Learner
from safactory.policy.chat import PlainTextChat
from safactory.policy.models import (
    TinyModelSpec,
    build_tiny,
    is_tiny_directory,
    load_model,
    load_tiny_tokenizer,
    save_model,
)
from safactory.policy.subword import TinyTokenizer, train_subword
from safactory.policy.tokenizer import CharTokenizer
from safactory.sim.agent import run_episode


async def initial_model(ctx: RunContext) -> tuple[PreTrainedModel, TinyTokenizer]:
    """The policy the run starts from: `model.path`, else a random-init tiny model."""
    m = ctx.config.model
    if m.path:
        return load_model(m.path)
    if m.kind == "tiny":
        spec = TinyModelSpec(m.hidden_size, m.layers, m.heads, m.intermediate_size, m.max_positions)
        return build_tiny(spec, ctx.config.seed, await tiny_tokenizer(ctx))
    raise ValueError(f"model kind {m.kind!r} is not supported by `run` yet; use 'tiny' or model.path")


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


def reference_model(ctx: RunContext, learner: Learner) -> PreTrainedModel:
    """A frozen copy of the weights RL starts from, saved in OUT/reference on the first start
    and read back from there after a resume (the trainer's weights have moved on by then)."""
    saved = ctx.out / "reference"
    reference = copy.deepcopy(learner.trainer.model)
    if is_tiny_directory(saved):
        loaded, _ = load_model(saved)
        reference.load_state_dict(loaded.state_dict())
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
    model, tokenizer = load_model(rl.teacher)
    model = model.to(learner.trainer.device)
    return LocalTeacher(model, tokenizer, learner.tokenizer, pad_id=learner.tokenizer.pad_id)
