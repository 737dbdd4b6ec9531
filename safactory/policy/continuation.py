"""Token-in, token-out across the turns of a conversation.

Re-rendering a conversation with its chat template each turn does not give back the
tokens the model sampled: the assistant turn is re-tokenised from its text (a model can
sample a non-canonical split, or special tokens that decoding drops), templates
re-serialise tool calls, and some rewrite history (Qwen3 drops the `<think>` blocks of
turns before the last user query). Training would then not see what was sampled.

`Continuations` keeps, for every completion a policy returned, the token ids the model
saw and sampled (`prompt_ids + token_ids`), keyed by the conversation that completion
ends (the messages before it plus the assistant message built from it, and the tools).
When the next turn's conversation starts with such a conversation, its prompt is

    earlier prompt + sampled ids (+ the end-of-turn id, if the model did not sample one)
    + the renderer's own ids of everything after that turn (tool results, the next
      generation prompt)

so the whole episode is one token sequence that holds exactly what the model saw and
sampled. This is used only while it is also what the template says: the text of the
kept ids must equal the template's rendering of the same history. Where it does not
(the template rewrote an earlier turn, the model's reply was cut at a stop string, or
it sampled special tokens that its message text lost), the prompt is the template's own
fresh rendering and the turn is counted in `breaks`; the trainer then sees the episode
as several sequences, each still token-exact (`safactory.evolve.experience.rl_sequences`,
reported as `rollout/prefix_breaks`). A conversation that continues one no longer kept
(evicted, or written by another policy) is rendered fresh and counted in `misses`.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from collections import OrderedDict
from typing import Any

from safactory.policy.chat import ChatRenderer
from safactory.types import Message, ToolCall, ToolSpec


def conversation_key(messages: list[Message], tools: list[ToolSpec]) -> str:
    """A digest of a conversation and its tools (what a kept turn is looked up by)."""
    digest = hashlib.sha256()
    for tool in tools:
        digest.update(json.dumps(tool.model_dump(mode="json"), sort_keys=True).encode())
    digest.update(b"\x00")
    for message in messages:
        digest.update(json.dumps(message.model_dump(mode="json"), sort_keys=True).encode())
        digest.update(b"\x01")
    return digest.hexdigest()


def assistant_message(text: str, tool_calls: list[ToolCall]) -> Message:
    """The assistant message an agent builds from a completion (as `safactory.sim.agent` does)."""
    return Message(role="assistant", content=text, tool_calls=tool_calls)


class Continuations:
    """Prompts that continue the sampled tokens of a conversation's earlier turns (see the module docstring).

    Counters: `continued` (prompts that continued an earlier turn's tokens), `breaks`
    (the template's history differed from the kept tokens: rendered fresh), `misses`
    (an earlier assistant turn that is not kept: rendered fresh).
    """

    def __init__(self, chat: ChatRenderer, size: int = 4096) -> None:
        self.chat = chat
        self.size = size
        self._kept: OrderedDict[str, array[int]] = OrderedDict()  # compact: 8 bytes an id
        tokenizer: Any = chat.tokenizer
        self._eos_ids = frozenset(getattr(tokenizer, "eos_ids", None) or {tokenizer.eos_id})
        self.continued = 0
        self.breaks = 0
        self.misses = 0

    def prompt_ids(self, messages: list[Message], tools: list[ToolSpec]) -> list[int]:
        """The ids to condition the next turn on: a continuation of the kept ids where it is faithful."""
        last = next((i for i in range(len(messages) - 1, -1, -1) if messages[i].role == "assistant"), None)
        if last is None:
            return self.chat.prompt_ids(messages, tools)
        key = conversation_key(messages[: last + 1], tools)
        found = self._kept.get(key)
        if found is None:
            self.misses += 1
            return self.chat.prompt_ids(messages, tools)
        self._kept.move_to_end(key)
        kept = found.tolist()
        ids, mask = self.chat.render(messages, add_generation_prompt=True, tools=tools)
        end = max((i for i, m in enumerate(mask) if m), default=-1) + 1  # past the last assistant token
        history = kept if kept and kept[-1] in self._eos_ids else [*kept, self.chat.tokenizer.eos_id]
        tokenizer: Any = self.chat.tokenizer
        normalize = getattr(tokenizer, "normalize", None) or (lambda text: text)  # as the template's ids spell it
        if end == 0 or normalize(tokenizer.decode(history, False)) != tokenizer.decode(ids[:end], False):
            self.breaks += 1
            return ids
        self.continued += 1
        return history + ids[end:]

    def record(
        self,
        messages: list[Message],
        tools: list[ToolSpec],
        text: str,
        tool_calls: list[ToolCall],
        prompt_ids: list[int],
        token_ids: list[int],
    ) -> None:
        """Keep what the model saw and sampled for the conversation this completion ends."""
        key = conversation_key([*messages, assistant_message(text, tool_calls)], tools)
        self._kept[key] = array("q", [*prompt_ids, *token_ids])
        self._kept.move_to_end(key)
        while len(self._kept) > self.size:
            self._kept.popitem(last=False)

    def __len__(self) -> int:
        return len(self._kept)
