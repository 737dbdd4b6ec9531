"""Distillation of the deployed policy into a smaller student, on-policy (reverse KL).

The student (a tiny model sharing the teacher's tokenizer and chat format) gets its own warm start on
the run's demonstrations, then online steps on its own rollouts scored by the teacher,
and is gated like the main policy. It is saved to OUT/student.
"""

from __future__ import annotations

import copy

from safactory.evolve.checkpoint import latest_checkpoint
from safactory.evolve.teacher import LocalTeacher
from safactory.factory.checkpoints import checkpoint, restore
from safactory.factory.context import RunContext
from safactory.factory.gating import gate
from safactory.factory.heldout import evaluate
from safactory.factory.learner import Learner, make_learner, register_start
from safactory.factory.online import OnlineSpec, OnlineStage
from safactory.factory.warm_start import warm_start
from safactory.policy.models import PolicyModel, TinyModelSpec, build_tiny, save_model


async def distill_student(ctx: RunContext, main: Learner, learners: list[Learner]) -> None:
    """Warm-start (or resume) the student, distil the main policy into it, gate and save it."""
    cfg = ctx.config
    d = cfg.distill
    teacher_model = copy.deepcopy(main.trainer.model).eval()
    teacher = LocalTeacher(teacher_model, main.tokenizer, main.tokenizer, pad_id=main.tokenizer.pad_id)
    spec = TinyModelSpec(d.hidden_size, d.layers, cfg.model.heads, d.intermediate_size, cfg.model.max_positions)
    model, _ = build_tiny(spec, cfg.seed + 1, main.tokenizer)
    start = PolicyModel(model, main.chat, "tiny")
    student = make_learner(ctx, "student", f"{ctx.state.run_id}-student", start, cfg.sft.lr, main=False)
    learners.append(student)
    if latest_checkpoint(student.checkpoints) is None:
        await register_start(ctx, student)
        await warm_start(ctx, student, ctx.state.run_id)
        warm = await evaluate(ctx, student, "sft")
        ctx.summary["heldout"]["student_warm_start"] = warm
        student.deployed = {"version": student.policy.version, "metrics": warm}
        checkpoint(student, 0)
        ctx.milestone()
    else:
        await restore(ctx, student)
    online = OnlineSpec("distill", d.steps, d.lr, "opd", teacher, d.kl_coef, d.env_weight)
    await OnlineStage(ctx, student, online).run()
    await gate(ctx, student, "final", d.steps)
    ctx.summary["heldout"]["student"] = student.deployed["metrics"]
    save_model(student.trainer.model, student.tokenizer, ctx.out / "student")
