"""The closed loop (the Factory): simulate -> store -> judge -> train -> gate -> redeploy, over several envs.

Read top to bottom: `Factory.run` opens the run (`context.py`), builds the main learner
and runs the stages in order; each stage is an object with a `run` and a `resume`
(what to do when a resumed run is already past it):

  WarmStart   scripted demonstrations (e.g. a helpful but naive ops agent) are
              collected through the same runner, stored, read back and used for
              supervised training until a probe target is reached (`warm_start.py`);
  RL          continuous asynchronous RL on the policy's own rollouts in every env at
              once, judged and safety-shaped, hot-swapped into the running rollouts and
              gated every `rl.eval_every` steps (`online.py`, `gating.py`);
  Distill     on-policy distillation of the deployed policy into a smaller student,
              gated the same way (`distill.py`).

Everything lands in the run directory: store, checkpoints, metrics.jsonl, TensorBoard
logs, summary.json, report.html, state.json (for `--resume` after a crash).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console

from safactory.config import RunConfig
from safactory.factory.checkpoints import checkpoint, restore
from safactory.factory.console import print_heldout_table, progress_bars
from safactory.factory.context import RunContext, open_context
from safactory.factory.distill import distill_student
from safactory.factory.gating import gate
from safactory.factory.heldout import evaluate
from safactory.factory.learner import Learner, make_learner, register_start, save_deployed
from safactory.factory.model_init import initial_model, rl_teacher
from safactory.factory.online import OnlineSpec, OnlineStage
from safactory.factory.warm_start import warm_start


class Stage(Protocol):
    """One stage of the loop. `name` is the stage as `state.json` records it."""

    name: str

    async def run(self, ctx: RunContext, main: Learner, learners: list[Learner]) -> None: ...

    async def resume(self, ctx: RunContext, main: Learner) -> None:
        """Called instead of `run` when a resumed run is already past this stage."""
        ...


class WarmStart:
    """Evaluate the starting weights, SFT on demonstrations, evaluate again: the RL baseline."""

    name = "warm_start"

    async def run(self, ctx: RunContext, main: Learner, learners: list[Learner]) -> None:
        sft = ctx.config.sft
        await register_start(ctx, main)
        if (sft.eval_before or not sft.enabled) and "init" not in ctx.summary["phases"]:
            await evaluate(ctx, main, "init")
            ctx.milestone()
        if sft.enabled:
            await warm_start(ctx, main, ctx.state.run_id)
            warm = await evaluate(ctx, main, "sft")
        else:
            warm = ctx.summary["phases"]["init"]
        ctx.summary.setdefault("heldout", {})["warm_start"] = warm
        main.deployed = {"version": main.policy.version, "metrics": warm}
        checkpoint(main, 0)
        ctx.milestone("rl")

    async def resume(self, ctx: RunContext, main: Learner) -> None:
        await restore(ctx, main)  # the main policy continues from its latest checkpoint


class RL:
    """Asynchronous safety-aware RL, gated at the end too; the deployed version is saved to OUT/model
    (a LoRA run: merged there, and its adapter in OUT/adapter)."""

    name = "rl"

    async def run(self, ctx: RunContext, main: Learner, learners: list[Learner]) -> None:
        rl = ctx.config.rl
        if rl.enabled:
            await OnlineStage(ctx, main, OnlineSpec.rl(rl, rl_teacher(ctx, main))).run()
            await gate(ctx, main, "rl", rl.steps)  # the end of RL is gated too
        ctx.summary["heldout"]["final"] = main.deployed["metrics"]
        save_deployed(main, ctx.out)
        ctx.milestone("distill")

    async def resume(self, ctx: RunContext, main: Learner) -> None:
        return None


class Distill:
    """On-policy distillation into a smaller student, when `distill.enabled`."""

    name = "distill"

    async def run(self, ctx: RunContext, main: Learner, learners: list[Learner]) -> None:
        if ctx.config.distill.enabled:
            await distill_student(ctx, main, learners)

    async def resume(self, ctx: RunContext, main: Learner) -> None:
        return None


STAGES: tuple[Stage, ...] = (WarmStart(), RL(), Distill())


class Factory:
    """Runs one configured closed loop into an output directory (or resumes one)."""

    def __init__(self, config: RunConfig, out_dir: Path, console: Console | None = None, resume: bool = False) -> None:
        self.config = config
        self.out = Path(out_dir)
        self.console = console or Console(stderr=True)
        self.resume = resume

    def run(self) -> dict[str, Any]:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one save per checkpoint: no bar for each
        return asyncio.run(self._run())

    async def _run(self) -> dict[str, Any]:
        ctx = open_context(self.config, self.out, self.console, self.resume)
        learners: list[Learner] = []
        try:
            with progress_bars(self.console) as ctx.progress:
                await self._stages(ctx, learners)
        finally:
            for learner in learners:
                await learner.policy.close()
            ctx.close()
        (self.out / "summary.json").write_text(json.dumps(ctx.summary, indent=2))
        if self.config.logging.report:
            from safactory.factory.report import write_report

            write_report(self.out)
        print_heldout_table(self.console, ctx.summary, list(ctx.envs), self.out)
        return ctx.summary

    async def _stages(self, ctx: RunContext, learners: list[Learner]) -> None:
        start = await initial_model(ctx)
        main = make_learner(ctx, "policy", ctx.state.run_id, start, ctx.config.sft.lr, main=True)
        learners.append(main)
        for stage in STAGES:
            if ctx.state.reached(stage.name):
                await stage.resume(ctx, main)
            else:
                await stage.run(ctx, main, learners)
        ctx.milestone("done")
