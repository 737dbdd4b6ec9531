"""Chat rendering and tool-call parsing: the plain-text protocol and HF chat templates.

A policy talks to its model through a `ChatRenderer`: `prompt_ids(messages, tools)`
gives the token ids to condition on, `render(messages)` gives the ids of a whole
conversation with a mask that is 1 on assistant-written tokens (for SFT), `parse`
turns a completion's text into tool calls, and `.tokenizer` (a `ChatTokenizer`)
decodes ids and names the eos and pad ids.

**Plain-text protocol** (`PlainTextChat`, the character-level tiny model). Small
models do not get tool schemas in their prompt; they call tools by writing one line
`name(argument)`, e.g. `calc(12+7)` or `answer(19)`. A JSON object inside the
parentheses gives named arguments: `send({"to": "bob", "text": "hi"})`. A single
plain argument goes to the tool's first (required) parameter. Rendering, as tokens
(each assistant turn ends with the <eos> token it sampled):

    <bos>U: What is 3 + 4?\\nA: calc(3+4)<eos>O: 7\\nA: answer(7)<eos>

**Chat templates** (`TemplateChat`, any HF tokenizer with a chat template, e.g.
SmolLM2). The template renders the conversation. Tools are rendered by the template
when it uses a `tools` variable; otherwise a system message lists their JSON schemas
and asks for `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`. Tool calls
are parsed by the tokenizer's own declared response format where it has one (transformers'
`response_template`, through `parse_response`); otherwise from `<tool_call>{json}</tool_call>`
blocks (SmolLM2 / Qwen style), from a bare JSON object `{"name": ..., "arguments": ...}` (or a list of them), and
otherwise from the plain-text protocol restricted to the offered tools; text that is
none of these is a plain reply (no calls, no error). An assistant turn whose text is
its calls in the plain-text protocol (a scripted expert's demonstration) is shown to the
model in its own format: the template's `tool_calls`, or `<tool_call>` lines.

**Incremental rendering.** The prompt of turn k+1 starts with the prompt and the
completion of turn k token for token, so a whole episode trains as one sequence.
`PlainTextChat` has it whenever the sampled tokens are the tokenisation of their text (a
sampled special token or a non-canonical subword split breaks it; the episode then trains
as several sequences, each still token-exact). `TemplateChat` renders the conversation one
message at a time and tokenises each new piece of template text on its own, so its
prompts are prefix-stable whenever the template's text is (each rendering of a longer
conversation starts with the rendering of the shorter one, as with ChatML templates
such as SmolLM2's). Two limits remain: the assistant turn is re-tokenised from its
text, which gives back the sampled ids only when the model sampled the canonical
tokenisation (stored token ids, not re-renders, are what RL trains on); and templates
that rewrite earlier turns (e.g. drop the reasoning of past turns, or mark the last
turn) are not prefix-stable: `TemplateChat.incremental` turns False for such a
conversation and the whole text is tokenised at once (the mask then comes from
character offsets).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from transformers import PreTrainedTokenizerBase

from safactory.policy.subword import TinyTokenizer
from safactory.types import Message, ToolCall, ToolSpec

PREFIX = {"system": "S: ", "user": "U: ", "assistant": "A: ", "tool": "O: "}
_CALL = re.compile(r"([A-Za-z_][\w.-]*)\((.*)\)", re.DOTALL)  # MCP names may hold . and -
_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
_CLOSE_TAG = re.compile(re.escape(_CLOSE))
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)
TOOLS_PREAMBLE = (
    "You can call the tools below, each described by a JSON schema:\n<tools>\n{tools}\n</tools>\n"
    "To call a tool, reply with one line per call: "
    '<tool_call>{{"name": "<tool name>", "arguments": {{<arguments as JSON>}}}}</tool_call>'
)


def load_json(text: str) -> tuple[Any, str | None]:
    """`json.loads` that never raises: (value, None), or (None, why) for text that is not JSON.

    Model output is untrusted: besides malformed JSON, a deep nest of brackets
    (RecursionError) or an integer over Python's digit limit (ValueError) is a parse
    error here, never an exception.
    """
    try:
        return json.loads(text), None
    except json.JSONDecodeError as exc:
        return None, exc.msg
    except RecursionError:
        return None, "nested too deeply"
    except ValueError as exc:
        return None, str(exc)


def _param_names(spec: ToolSpec) -> list[str]:
    """`spec.param_names()`, or [] for a schema too malformed to name its parameters."""
    try:
        return [str(p) for p in spec.param_names()]
    except (TypeError, AttributeError):
        return []


# ---- the interface a policy uses ---------------------------------------------------------
@runtime_checkable
class ChatTokenizer(Protocol):
    """What a policy needs from a tokenizer: ids of text, text of ids, eos and pad ids."""

    eos_id: int
    pad_id: int

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int], skip_special: bool = True) -> str: ...


@runtime_checkable
class ChatRenderer(Protocol):
    """Messages -> token ids and completion text -> tool calls, for one model's format."""

    tokenizer: ChatTokenizer

    def render(
        self, messages: list[Message], add_generation_prompt: bool = False, tools: list[ToolSpec] | None = None
    ) -> tuple[list[int], list[int]]: ...

    def prompt_ids(self, messages: list[Message], tools: list[ToolSpec] | None = None) -> list[int]: ...

    def parse(self, text: str, tools: list[ToolSpec]) -> tuple[list[ToolCall], str | None]: ...


# ---- plain-text protocol -----------------------------------------------------------------
def assistant_text(message: Message) -> str:
    """The text of an assistant turn in the plain-text protocol."""
    if message.content or not message.tool_calls:
        return message.content
    lines = []
    for call in message.tool_calls:
        args = call.arguments
        inner = str(next(iter(args.values()))) if len(args) == 1 else json.dumps(args)
        lines.append(f"{call.name}({inner})")
    return "\n".join(lines)


def parse_tool_calls(text: str, tools: list[ToolSpec]) -> tuple[list[ToolCall], str | None]:
    """Parse plain-text tool calls, one per non-empty line. Returns (calls, error)."""
    calls: list[ToolCall] = []
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return [], "empty completion"
    by_name = {t.name: t for t in tools}
    for line in lines:
        match = _CALL.fullmatch(line)
        if match is None:
            return [], f"not a tool call: {line[:60]!r}"
        name, inner = match.group(1), match.group(2).strip()
        arguments: dict[str, object] | None = None
        if inner.startswith("{"):
            loaded, _ = load_json(inner)
            if isinstance(loaded, dict):
                arguments = loaded
        if arguments is None:
            spec = by_name.get(name)
            params = _param_names(spec) if spec is not None else []
            arguments = {params[0] if params else "arg": inner}
        calls.append(ToolCall(id=f"call_{len(calls)}", name=name, arguments=arguments))
    return calls, None


class PlainTextChat:
    """Renders conversations to token ids for a model that uses the plain-text protocol."""

    def __init__(self, tokenizer: TinyTokenizer) -> None:
        self.tokenizer = tokenizer

    def render(
        self, messages: list[Message], add_generation_prompt: bool = False, tools: list[ToolSpec] | None = None
    ) -> tuple[list[int], list[int]]:
        """Token ids of a conversation and a mask that is 1 on assistant-written tokens.

        Tools are not rendered: the plain-text protocol keeps schemas out of the prompt.
        """
        tok = self.tokenizer
        ids = [tok.bos_id]
        mask = [0]
        for message in messages:
            prefix = tok.encode(PREFIX[message.role])
            ids += prefix
            mask += [0] * len(prefix)
            if message.role == "assistant":
                body = tok.encode(assistant_text(message)) + [tok.eos_id]
                ids += body
                mask += [1] * len(body)
            else:
                body = tok.encode(message.content.replace("\n", " ") + "\n")
                ids += body
                mask += [0] * len(body)
        if add_generation_prompt:
            prefix = tok.encode(PREFIX["assistant"])
            ids += prefix
            mask += [0] * len(prefix)
        return ids, mask

    def prompt_ids(self, messages: list[Message], tools: list[ToolSpec] | None = None) -> list[int]:
        return self.render(messages, add_generation_prompt=True)[0]

    def parse(self, text: str, tools: list[ToolSpec]) -> tuple[list[ToolCall], str | None]:
        return parse_tool_calls(text, tools)


# ---- JSON tool calls (SmolLM2 / Qwen style) --------------------------------------------------
def _call_from_json(obj: Any, index: int) -> ToolCall | None:
    """A ToolCall from `{"name": ..., "arguments": {...}}` (or "parameters"), else None."""
    if isinstance(obj, dict) and isinstance(obj.get("function"), dict):  # OpenAI-shaped {"function": {...}}
        return _call_from_json(obj["function"], index)
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    arguments = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(arguments, str):  # OpenAI sends arguments as a JSON string
        arguments, error = load_json(arguments) if arguments.strip() else ({}, None)
        if error is not None:
            return None
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        return None
    return ToolCall(id=f"call_{index}", name=obj["name"], arguments=arguments)


def parse_json_tool_calls(text: str) -> tuple[list[ToolCall], str | None] | None:
    """Tool calls written as JSON; None when the text holds no JSON-format call.

    `<tool_call>{json}</tool_call>` blocks (an unclosed last block is accepted, as
    when a stop string cut it) win; otherwise the whole text (optionally in a ```json
    fence) may be one call object or a list of them. A block that is not a valid call
    gives ([], error).
    """
    stripped = text.strip()
    if "<tool_call>" in stripped:
        calls: list[ToolCall] = []
        for obj, error, block in _tool_call_blocks(stripped):
            if error is not None:
                return [], f"malformed tool call JSON: {error}: {block[:60]!r}"
            call = _call_from_json(obj, len(calls))
            if call is None:
                return [], f"a tool call needs a name and JSON-object arguments: {block[:60]!r}"
            calls.append(call)
        return calls, None
    fenced = _FENCE.match(stripped)
    body = fenced.group(1) if fenced else stripped
    if not body.startswith(("{", "[")):
        return None
    obj, error = load_json(body)
    if error is not None:
        if re.match(r'^\[?\s*\{\s*"name"', body):
            return [], f"malformed tool call JSON: {error}: {body[:60]!r}"
        return None
    items = obj if isinstance(obj, list) else [obj]
    found = [_call_from_json(item, i) for i, item in enumerate(items)]
    if not items or any(call is None for call in found):
        return None
    return [call for call in found if call is not None], None


def _tool_call_blocks(text: str) -> Iterator[tuple[Any, str | None, str]]:
    """(value, None, block) for each `<tool_call>` block of `text`, or a last (None, error, block).

    A block ends at the first `</tool_call>` before which its text is JSON (a string inside
    the call may hold `</tool_call>` itself), else at the end of the text (as when a stop
    string cut the closing tag); the error is that of the shortest candidate.
    """
    start = text.find(_OPEN)
    while start >= 0:
        body = start + len(_OPEN)
        ends = [m.start() for m in _CLOSE_TAG.finditer(text, body)] + [len(text)]
        first: tuple[str, str] | None = None
        for end in ends:
            block = text[body:end].strip()
            obj, error = load_json(block)
            if error is None:
                yield obj, None, block
                start = text.find(_OPEN, end + len(_CLOSE)) if end < len(text) else -1
                break
            first = first or (error, block)
        else:
            assert first is not None
            yield None, first[0], first[1]
            return


def tool_call_text(calls: Iterable[ToolCall]) -> str:
    """Tool calls as `<tool_call>{json}</tool_call>` lines (for templates that cannot render calls)."""
    return "\n".join(
        "<tool_call>" + json.dumps({"name": c.name, "arguments": c.arguments}, ensure_ascii=False) + "</tool_call>"
        for c in calls
    )


def tool_schema(tool: ToolSpec) -> dict[str, Any]:
    """A ToolSpec in the JSON-schema shape chat templates take (`{"type": "function", "function": ...}`)."""
    return {
        "type": "function",
        "function": {"name": tool.name, "description": tool.description, "parameters": tool.parameters},
    }


# ---- HF tokenizers ---------------------------------------------------------------------------
class HFTokenizer:
    """A Hugging Face tokenizer seen as a `ChatTokenizer`.

    `encode` adds no special tokens (templates write their own), `decode` skips
    special tokens unless asked. `eos_id` is the tokenizer's end-of-turn token and
    `eos_ids` every id that ends a generation (plus the model's generation-config
    eos ids passed in); `pad_id` falls back to `eos_id`.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, eos_ids: Iterable[int] = ()) -> None:
        self.hf = tokenizer
        extra = [int(i) for i in eos_ids]
        eos = tokenizer.eos_token_id
        if eos is None:
            if not extra:
                raise ValueError("the tokenizer has no eos token and none was given")
            eos = extra[0]
        self.eos_id = int(eos)
        self.eos_ids = frozenset([self.eos_id, *extra])
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.eos_id
        bos = tokenizer.bos_token_id
        self.bos_id = int(bos) if bos is not None else None

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def __len__(self) -> int:
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        # no clean-up of spaces: the text must be exactly what the ids spell
        return str(self.hf.decode(list(ids), skip_special_tokens=skip_special, clean_up_tokenization_spaces=False))

    def normalize(self, text: str) -> str:
        """`text` as the tokenizer's normaliser sees it (e.g. NFC): the text its ids decode back to."""
        backend = getattr(self.hf, "backend_tokenizer", None)
        normalizer = getattr(backend, "normalizer", None)
        return str(normalizer.normalize_str(text)) if normalizer is not None else text

    def save(self, directory: str | Path) -> None:
        self.hf.save_pretrained(str(directory))


def _template_text(tokenizer: PreTrainedTokenizerBase) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        return "\n".join(str(t) for t in template.values())
    return str(template or "")


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(_template_text(tokenizer))


class TemplateChat:
    """Renders conversations with a tokenizer's own chat template and parses JSON tool calls.

    See the module docstring for how tools are rendered and calls parsed, and where
    rendering is (and is not) incremental.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, eos_ids: Iterable[int] = (), cache_size: int = 1024) -> None:
        if not has_chat_template(tokenizer):
            raise ValueError("this tokenizer has no chat template; use PlainTextChat or set tokenizer.chat_template")
        self.hf = tokenizer
        self.tokenizer = HFTokenizer(tokenizer, eos_ids)
        text = _template_text(tokenizer)
        self.template_tools = "tools" in text
        self.template_tool_calls = "tool_calls" in text
        self.incremental = True
        self._prefixes: OrderedDict[str, tuple[str, list[int], list[int]]] = OrderedDict()
        self._cache_size = cache_size

    # ---- conversation -> template input ------------------------------------------------------
    def template_input(
        self, messages: list[Message], tools: list[ToolSpec] | None
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
        """(conversation, tools) exactly as they go into `apply_chat_template`."""
        schemas = [tool_schema(t) for t in tools] if tools and self.template_tools else None
        return self._dicts(messages, tools), schemas

    def _dicts(self, messages: list[Message], tools: list[ToolSpec] | None) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for m in messages:
            d: dict[str, Any] = {"role": m.role, "content": m.content}
            if m.role == "assistant" and m.tool_calls and (not m.content or _plain_protocol(m, tools or [])):
                if self.template_tool_calls:
                    d["tool_calls"] = [
                        {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                        for c in m.tool_calls
                    ]
                else:
                    d["content"] = tool_call_text(m.tool_calls)
            if m.role == "tool":
                if m.tool_call_id is not None:
                    d["tool_call_id"] = m.tool_call_id
                if m.name is not None:
                    d["name"] = m.name
            out.append(d)
        if tools and not self.template_tools:  # the template cannot show tools: a system message does
            listing = TOOLS_PREAMBLE.format(tools="\n".join(json.dumps(tool_schema(t)) for t in tools))
            if out and out[0]["role"] == "system":
                out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{listing}".lstrip()}
            else:
                out.insert(0, {"role": "system", "content": listing})
        return out

    def _apply(self, convo: list[dict[str, Any]], tools: list[ToolSpec] | None, generation: bool) -> str:
        schemas = [tool_schema(t) for t in tools] if tools and self.template_tools else None
        text = self.hf.apply_chat_template(convo, tools=schemas, add_generation_prompt=generation, tokenize=False)
        return str(text)

    # ---- rendering -----------------------------------------------------------------------
    def render(
        self, messages: list[Message], add_generation_prompt: bool = False, tools: list[ToolSpec] | None = None
    ) -> tuple[list[int], list[int]]:
        """Token ids of a conversation and a mask that is 1 on assistant-written tokens.

        The assistant-written tokens of a turn are its text and the end-of-turn
        (eos) token the model samples to end it; template text around them is 0.
        """
        convo = self._dicts(messages, tools)
        if not convo:
            raise ValueError("nothing to render: no messages")
        try:
            return self._render_incremental(convo, tools, add_generation_prompt)
        except _NotPrefixStable:
            self.incremental = False
            return self._render_whole(convo, tools, add_generation_prompt)

    def prompt_ids(self, messages: list[Message], tools: list[ToolSpec] | None = None) -> list[int]:
        return self.render(messages, add_generation_prompt=True, tools=tools)[0]

    def _key(self, parent: str, message: dict[str, Any]) -> str:
        return hashlib.sha256((parent + json.dumps(message, sort_keys=True, default=str)).encode()).hexdigest()

    def _render_incremental(
        self, convo: list[dict[str, Any]], tools: list[ToolSpec] | None, generation: bool
    ) -> tuple[list[int], list[int]]:
        tools_key = json.dumps([t.model_dump() for t in tools or []], sort_keys=True)
        key = hashlib.sha256(tools_key.encode()).hexdigest()
        text, ids, mask = "", [], []
        for i, message in enumerate(convo):
            key = self._key(key, message)
            cached = self._prefixes.get(key)
            if cached is not None:
                self._prefixes.move_to_end(key)
                text, ids, mask = cached
                continue
            ids, mask = list(ids), list(mask)
            if message["role"] == "assistant":
                if i == 0:
                    raise _NotPrefixStable
                head = self._apply(convo[:i], tools, True)
                ids, mask = self._extend(text, head, ids, mask, assistant=False)
                full = self._apply(convo[: i + 1], tools, False)
                ids, mask = self._extend(head, full, ids, mask, assistant=True)
            else:
                full = self._apply(convo[: i + 1], tools, False)
                ids, mask = self._extend(text, full, ids, mask, assistant=False)
            text = full
            self._prefixes[key] = (text, ids, mask)
            if len(self._prefixes) > self._cache_size:
                self._prefixes.popitem(last=False)
        if generation:
            head = self._apply(convo, tools, True)
            ids, mask = self._extend(text, head, list(ids), list(mask), assistant=False)
        return list(ids), list(mask)

    def _extend(
        self, before: str, after: str, ids: list[int], mask: list[int], *, assistant: bool
    ) -> tuple[list[int], list[int]]:
        """Append the tokens of `after` past `before` (which it must start with)."""
        if not after.startswith(before):
            raise _NotPrefixStable
        piece = self.tokenizer.encode(after[len(before) :])
        ids += piece
        if not assistant:
            mask += [0] * len(piece)
            return ids, mask
        end = next((j for j, t in enumerate(piece) if t in self.tokenizer.eos_ids), len(piece) - 1)
        mask += [1] * (end + 1) + [0] * (len(piece) - end - 1)
        return ids, mask

    def _render_whole(
        self, convo: list[dict[str, Any]], tools: list[ToolSpec] | None, generation: bool
    ) -> tuple[list[int], list[int]]:
        """Tokenise the whole rendering; mask assistant text (+ its eos) found by character offsets."""
        text = self._apply(convo, tools, generation)
        enc = self.hf(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        spans: list[tuple[int, int]] = []
        cursor = 0
        eos_text = self.hf.convert_ids_to_tokens(self.tokenizer.eos_id)
        for message in convo:
            body = message["content"] if message["role"] == "assistant" else ""
            if not body:
                continue
            start = text.find(body, cursor)
            if start < 0:
                continue
            end = start + len(body)
            if isinstance(eos_text, str) and text.startswith(eos_text, end):
                end += len(eos_text)
            spans.append((start, end))
            cursor = end
        mask = [int(any(s <= a and b <= e and b > a for s, e in spans)) for a, b in enc["offset_mapping"]]
        return ids, mask

    # ---- parsing ---------------------------------------------------------------------------
    def _parse_declared(self, text: str) -> tuple[list[ToolCall], str | None]:
        """Parse with `tokenizer.parse_response` (transformers' response templates); a reply that does
        not follow the format is a parse error (an error observation), never an exception."""
        try:
            message = self.hf.parse_response(text, prefix="")
        except Exception as exc:
            return [], f"reply does not follow the model's response format: {str(exc)[:200]}"
        return _declared_calls(message)

    def parse(self, text: str, tools: list[ToolSpec]) -> tuple[list[ToolCall], str | None]:
        """Tool calls by the tokenizer's declared response format where it has one (`response_template`),
        else in JSON (`<tool_call>` blocks or a bare object), else plain-text calls of offered tools."""
        if getattr(self.hf, "response_template", None) is not None:
            return self._parse_declared(text)
        found = parse_json_tool_calls(text)
        if found is not None:
            return found
        if tools and text.strip():
            calls, error = parse_tool_calls(text, tools)
            names = {t.name for t in tools}
            if error is None and all(c.name in names for c in calls):
                return calls, None
        return [], None


def _plain_protocol(message: Message, tools: list[ToolSpec]) -> bool:
    """Whether an assistant message's text is its tool calls written in the plain-text protocol (as
    scripted experts write them, e.g. `calc(3+4)`): a chat model is shown those calls in its own format."""
    calls, error = parse_tool_calls(message.content, tools)
    wanted = [(c.name, c.arguments) for c in message.tool_calls]
    return error is None and [(c.name, c.arguments) for c in calls] == wanted


def _declared_calls(message: Any) -> tuple[list[ToolCall], str | None]:
    """The `tool_calls` of a message parsed by a tokenizer's response format, as ToolCalls."""
    raw = message.get("tool_calls") if isinstance(message, dict) else None
    calls: list[ToolCall] = []
    for item in raw or []:
        call = _call_from_json(item, len(calls))
        if call is None:
            return [], f"a tool call needs a name and JSON-object arguments: {str(item)[:60]!r}"
        calls.append(call)
    return calls, None


class _NotPrefixStable(Exception):
    """The template's rendering of a longer conversation does not extend the shorter one."""


def tokenizer_fingerprint(tokenizer: Any) -> tuple[Any, ...]:
    """What two tokenizers must share for token ids to mean the same text: vocabulary and eos."""
    inner = getattr(tokenizer, "hf", tokenizer)
    if hasattr(inner, "get_vocab"):
        vocab: Any = tuple(sorted(inner.get_vocab().items()))
    else:
        vocab = (getattr(inner, "chars", None), len(inner))
    return vocab, getattr(tokenizer, "eos_id", getattr(tokenizer, "eos_token_id", None))
