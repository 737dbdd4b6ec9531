"""The token view: each sampled token of a turn with its text, id and behaviour log-prob, shaded by
its probability, and the policy version that sampled the turn.

Token texts come from the tokenizer saved in the run's directory (`model/`, `tokenizer/` or
`student/`: a tiny model's character or subword tokenizer, or a Hugging Face `tokenizer.json`),
decoded one id at a time; without one the view shows ids. A byte-level token that is part of a
character decodes to a replacement character; its id and log-prob are exact all the same.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from safactory.types import Step

TOKENIZER_FOLDERS = ("model", "tokenizer", "student", ".")
MAX_TOKENS = 4096  # tokens shown per turn at most
MAX_DECODERS = 8  # tokenizers kept loaded
FLOOR = -8.0  # log-probs at or below this get the deepest shade


@dataclass(frozen=True)
class Token:
    id: int
    text: str
    logprob: float | None
    prob: float | None

    @property
    def shade(self) -> str:
        return shade(self.logprob)


@dataclass
class TurnTokens:
    """One sampled turn as the token view shows it."""

    index: int
    policy_version: int
    policy_versions: list[int]
    temperature: float
    top_p: float
    finish_reason: str
    prompt_tokens: int
    new_prompt: str  # the prompt tokens new since the previous turn, as text
    tokens: list[Token] = field(default_factory=list)
    truncated: int = 0  # tokens left out past MAX_TOKENS
    mean_logprob: float | None = None


def shade(logprob: float | None) -> str:
    """A CSS background for a token by its log-prob: white at 0 (the policy was sure), deeper red the
    lower it is, deepest from `FLOOR` down (a log scale: p = 0.5 is faint, p = 0.001 strong)."""
    if logprob is None or not math.isfinite(logprob):
        return "transparent"
    depth = min(1.0, max(0.0, logprob / FLOOR))
    return f"hsl(0, 90%, {100 - 40 * depth:.0f}%)"


Decode = Callable[[int], str]


def _loader(folder: Path) -> Decode | None:
    """How to decode one token id with the tokenizer saved in `folder`, or None if it holds none."""
    from safactory.policy.subword import FILENAME as SUBWORD_FILE
    from safactory.policy.subword import SubwordTokenizer
    from safactory.policy.tokenizer import FILENAME as CHAR_FILE
    from safactory.policy.tokenizer import CharTokenizer

    if (folder / SUBWORD_FILE).is_file():
        subword = SubwordTokenizer.load(folder)
        return lambda i: subword.decode([i], skip_special=False)
    if (folder / CHAR_FILE).is_file():
        chars = CharTokenizer.load(folder)
        return lambda i: chars.decode([i], skip_special=False)
    if (folder / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        hf = Tokenizer.from_file(str(folder / "tokenizer.json"))
        return lambda i: hf.decode([i], skip_special_tokens=False)
    return None


class Decoders:
    """Token decoders by run directory, loaded once each (a few kept)."""

    def __init__(self) -> None:
        self._by_dir: dict[Path, tuple[Decode | None, str]] = {}

    def get(self, run_dir: Path | None) -> tuple[Decode | None, str]:
        """The decoder for a run directory and where its tokenizer came from ("" without one)."""
        if run_dir is None:
            return None, ""
        if run_dir not in self._by_dir:
            if len(self._by_dir) >= MAX_DECODERS:
                self._by_dir.pop(next(iter(self._by_dir)))
            self._by_dir[run_dir] = _find(run_dir)
        return self._by_dir[run_dir]


def _find(run_dir: Path) -> tuple[Decode | None, str]:
    for name in TOKENIZER_FOLDERS:
        folder = run_dir / name
        try:
            decode = _loader(folder) if folder.is_dir() else None
        except (OSError, ValueError, RuntimeError):  # a damaged tokenizer file: show ids
            decode = None
        if decode is not None:
            return decode, str(folder)
    return None, ""


def _text(decode: Decode | None, token_id: int) -> str:
    if decode is None:
        return f"#{token_id}"
    try:
        return decode(token_id)
    except Exception:  # an id outside this tokenizer (another model's trace): its number
        return f"#{token_id}"


def turn_tokens(step: Step, previous_ids: int, decode: Decode | None) -> TurnTokens | None:
    """The token view of one step (None for a step without a trace). `previous_ids` is how many
    prompt tokens the previous turn's prompt and completion already covered."""
    trace = step.trace
    if trace is None:
        return None
    new_ids = trace.prompt_ids[previous_ids:] if previous_ids <= len(trace.prompt_ids) else trace.prompt_ids
    logprobs = trace.logprobs or []
    shown = trace.completion_ids[:MAX_TOKENS]
    tokens = []
    for i, token_id in enumerate(shown):
        lp = float(logprobs[i]) if i < len(logprobs) else None
        tokens.append(Token(token_id, _text(decode, token_id), lp, math.exp(lp) if lp is not None else None))
    known = [t.logprob for t in tokens if t.logprob is not None]
    return TurnTokens(
        index=step.index,
        policy_version=trace.policy_version,
        policy_versions=list(trace.policy_versions),
        temperature=trace.temperature,
        top_p=trace.top_p,
        finish_reason=trace.finish_reason,
        prompt_tokens=len(trace.prompt_ids),
        new_prompt="".join(_text(decode, i) for i in new_ids[:MAX_TOKENS]),
        tokens=tokens,
        truncated=max(0, len(trace.completion_ids) - MAX_TOKENS),
        mean_logprob=sum(known) / len(known) if known else None,
    )


def all_turns(steps: list[Step], decode: Decode | None) -> dict[int, TurnTokens]:
    """The token view of every traced step, by step index."""
    out: dict[int, TurnTokens] = {}
    covered = 0
    for step in steps:
        view = turn_tokens(step, covered, decode)
        if view is not None and step.trace is not None:
            out[step.index] = view
            covered = len(step.trace.prompt_ids) + len(step.trace.completion_ids)
    return out
