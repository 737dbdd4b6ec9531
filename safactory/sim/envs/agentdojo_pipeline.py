"""A safactory policy as an AgentDojo agent pipeline, so the package's own benchmark functions can score it.

`policy_pipeline(policy)` builds the pipeline AgentDojo builds for a model without a
defence (`AgentPipeline.from_config`): the package's default system message, the user's
query, one model turn, then up to 15 rounds of the package's `ToolsExecutor` and a model
turn. Each model turn asks the policy for its next completion. Messages are translated
both ways: the package's chat messages become safactory `Message`s (a tool result that
failed reads `error: <error>`, as in the `agentdojo:` env), and a completion becomes an
assistant message whose tool calls are the package's `FunctionCall`s. The pipeline's
name is the model key the package's attacks address the agent by ("local" unless told).

The result can be passed to `agentdojo.benchmark.benchmark_suite_with_injections` and
friends, which gives AgentDojo's own utility and security figures for any safactory policy
(tests/test_agentdojo_crosscheck.py compares them with the `agentdojo:` env's). The
benchmark functions are synchronous: the pipeline runs the policy's coroutines on an event
loop of its own (`close()` ends it).
"""

from __future__ import annotations

import copy
from asyncio import AbstractEventLoop, new_event_loop
from collections.abc import Sequence
from functools import cache
from typing import Any

from safactory.policy.base import Completion, Policy, SamplingParams
from safactory.sim.envs.agentdojo import TARGET_MODEL, dojo
from safactory.types import Message, ToolCall, ToolSpec

TOOL_ROUNDS = 15  # the package's ToolsExecutionLoop default


def to_messages(chat: Sequence[Any]) -> list[Message]:
    """The package's chat messages as safactory messages."""
    text_of = dojo("types").get_text_content_as_str
    out: list[Message] = []
    for message in chat:
        role, text = message["role"], text_of(message["content"] or [])
        if role == "assistant":
            calls = [
                ToolCall(id=call.id or f"call_{len(out)}_{k}", name=call.function, arguments=dict(call.args))
                for k, call in enumerate(message["tool_calls"] or [])
            ]
            out.append(Message(role="assistant", content=text, tool_calls=calls))
        elif role == "tool":
            error = message["error"]
            call = message["tool_call"]
            content = f"error: {error}" if error is not None else text
            out.append(Message(role="tool", content=content, tool_call_id=message["tool_call_id"], name=call.function))
        else:
            out.append(Message(role=role, content=text))
    return out


def to_chat(completion: Completion) -> Any:
    """A completion as the package's assistant message (`content` None when there is no text)."""
    types, runtime = dojo("types"), dojo("functions_runtime")
    calls = [
        runtime.FunctionCall(function=c.name, args=copy.deepcopy(c.arguments), id=c.id) for c in completion.tool_calls
    ]
    content = [types.text_content_block_from_string(completion.text)] if completion.text else None
    return types.ChatAssistantMessage(role="assistant", content=content, tool_calls=calls or None)


def tool_specs(runtime: Any) -> list[ToolSpec]:
    """The tools of a package runtime, as the policy sees them."""
    return [
        ToolSpec(name=f.name, description=f.description, parameters=f.parameters.model_json_schema())
        for f in runtime.functions.values()
    ]


@cache
def _step_class() -> type:
    base = dojo("agent_pipeline.base_pipeline_element").BasePipelineElement

    class PolicyStep(base):  # type: ignore[misc, valid-type]
        """The model turn of the pipeline: the policy's next completion, appended as an assistant message."""

        def __init__(self, policy: Policy, sampling: SamplingParams, loop: AbstractEventLoop) -> None:
            self.policy, self.sampling, self.loop = policy, sampling, loop
            self._tools: tuple[Any, list[ToolSpec]] | None = None  # (runtime, its tools): one runtime per task

        def query(
            self,
            query: str,
            runtime: Any,
            env: Any = None,
            messages: Sequence[Any] = (),
            extra_args: dict | None = None,
        ) -> tuple[str, Any, Any, Sequence[Any], dict]:
            if self._tools is None or self._tools[0] is not runtime:
                self._tools = (runtime, tool_specs(runtime))
            asked = self.policy.generate(to_messages(messages), self._tools[1], self.sampling)
            completion = self.loop.run_until_complete(asked)
            return query, runtime, env, [*messages, to_chat(completion)], extra_args or {}

    return PolicyStep


def policy_pipeline(
    policy: Policy,
    name: str = TARGET_MODEL,
    sampling: SamplingParams | None = None,
    system_message: str | None = None,
) -> Any:
    """The package's tool-agent pipeline with `policy` as its model (an AgentPipeline named `name`).

    `system_message` names one of the package's system messages (None: its default, as the env uses).
    Call `close()` on the result when done with it.
    """
    pipeline_module = dojo("agent_pipeline.agent_pipeline")
    elements = dojo("agent_pipeline.basic_elements")
    tools = dojo("agent_pipeline.tool_execution")
    loop = new_event_loop()
    step = _step_class()(policy, sampling or SamplingParams(temperature=0.0), loop)
    pipeline = pipeline_module.AgentPipeline(
        [
            elements.SystemMessage(pipeline_module.load_system_message(system_message)),
            elements.InitQuery(),
            step,
            tools.ToolsExecutionLoop([tools.ToolsExecutor(), step], max_iters=TOOL_ROUNDS),
        ]
    )
    pipeline.name = name
    pipeline.close = loop.close
    return pipeline
