"""Recording what passes through the policy server: every chat completion as `proxy` trajectories.

`ProxyRecorder` turns one chat request and its returned choices into trajectories (with the token
trace, so an unmodified agent that speaks OpenAI can be trained on) and stores them in anything
shaped like `RecordingStore`. The server calls it; a store failure never breaks serving.

What passes through a proxy is the user's real data, so the recorder stores it redacted: it
takes only a store that redacts (`TrajectoryStore(url, redactor=Redactor())`) unless it is
told `raw=True`; each trajectory's provenance says which (`"redacted": true|false`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

from safactory.policy.base import Completion
from safactory.types import (
    Message,
    Step,
    Task,
    TokenTrace,
    ToolSpec,
    Trajectory,
    canonical_json,
    sha256_hex,
)

log = logging.getLogger(__name__)


class RecordingStore(Protocol):
    """What the recorder needs of a trajectory store (`safactory.data.TrajectoryStore` is one)."""

    def create_run(self, run_id: str, config: dict[str, Any], code_version: str = ...) -> None: ...

    def add(self, items: list[Trajectory]) -> Any: ...

    @property
    def redactor(self) -> Any:
        """What redacts each trajectory before it is stored (None: nothing does)."""
        ...


class ProxyRecorder:
    """Stores every chat completion that passes through the server as `proxy` trajectories.

    One trajectory per returned choice; the choices of one request share a group id (the
    request id), so `n > 1` requests are ready-made GRPO groups. The task is built from the
    conversation's opening (everything before the first assistant turn), so all the turns of
    one agent episode share a task id. A failure to store is logged and counted, never raised
    into the request.
    """

    def __init__(
        self,
        store: RecordingStore,
        *,
        run_id: str = "proxy",
        env_id: str = "proxy",
        tags: dict[str, Any] | None = None,
        raw: bool = False,
    ) -> None:
        if not raw and getattr(store, "redactor", None) is None:
            raise ValueError(
                "the proxy recorder stores redacted data: open the store with a redactor "
                "(TrajectoryStore(url, redactor=Redactor())), or pass raw=True to keep raw data"
            )
        self.raw = raw
        self.store = store
        self.run_id = run_id
        self.env_id = env_id
        self.tags = dict(tags or {})
        self.recorded = 0
        self.failures = 0
        self.last_error: str | None = None
        self._run_created = False

    def build(
        self,
        *,
        request_id: str,
        model: str,
        messages: list[Message],
        tools: list[ToolSpec],
        completions: list[Completion],
        actions: list[Message],
        finish_reasons: list[str],
        started_at: float,
        duration_s: float,
    ) -> list[Trajectory]:
        opening: list[Message] = []
        for m in messages:
            if m.role == "assistant":
                break
            opening.append(m)
        digest = sha256_hex(canonical_json([m.model_dump(mode="json") for m in opening]))
        first_user = next((m.content for m in opening if m.role == "user"), "")
        task = Task(id=f"proxy-{digest[:16]}", env_id=self.env_id, split="proxy", prompt=first_user)
        out: list[Trajectory] = []
        for i, (c, action, finish) in enumerate(zip(completions, actions, finish_reasons, strict=True)):
            trace = None
            if c.prompt_ids is not None and c.token_ids is not None:
                logprobs = c.logprobs if c.logprobs is not None and len(c.logprobs) == len(c.token_ids) else None
                trace = TokenTrace(
                    prompt_ids=c.prompt_ids,
                    completion_ids=c.token_ids,
                    logprobs=logprobs,
                    policy_version=c.policy_version,
                    policy_versions=c.policy_versions or [c.policy_version],
                    temperature=c.temperature,
                    top_p=c.top_p,
                    finish_reason=c.finish_reason,
                )
            step = Step(index=0, action=action, trace=trace, error=c.parse_error)
            out.append(
                Trajectory(
                    run_id=self.run_id,
                    group_id=request_id,
                    kind="proxy",
                    task=task,
                    task_hash=task.hash(),
                    env_id=self.env_id,
                    env_version="1",
                    prompt=list(messages),
                    tools=list(tools),
                    steps=[step],
                    termination=finish,
                    started_at=started_at,
                    duration_s=duration_s,
                    provenance={"redacted": not self.raw},
                    tags={**self.tags, "model": model, "request_id": request_id, "choice": i, "n": len(completions)},
                )
            )
        return out

    async def record(self, trajectories: list[Trajectory]) -> bool:
        """Store the trajectories; False (and logged) when the store failed."""
        try:
            await asyncio.to_thread(self._add, trajectories)
        except Exception as exc:  # recording must not break serving; the failure is visible
            self.failures += 1
            self.last_error = repr(exc)
            log.exception("proxy recorder could not store %d trajectories", len(trajectories))
            return False
        self.recorded += len(trajectories)
        return True

    def _add(self, trajectories: list[Trajectory]) -> None:
        if not self._run_created:
            self.store.create_run(self.run_id, {"source": "proxy", "env_id": self.env_id})
            self._run_created = True
        self.store.add(trajectories)
