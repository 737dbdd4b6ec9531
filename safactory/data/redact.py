"""Redaction of secrets and personal data from trajectories before they are stored.

A `Redactor` finds secrets with regular expressions (API keys such as `sk-...`,
`AKIA...`, `ghp_...`, `xox...`, JWTs, bearer tokens, `password: ...` /
`password=...` values, private key blocks, email addresses), plus any extra
patterns the user configures, and replaces each with `[REDACTED:<kind>]`. An
allow-list keeps matches that are known not to be secrets (test keys, internal
mail domains). Matches of all patterns are collected on the original text first
and replaced at once (earliest, then longest, wins), so a replacement is never
matched again and redacting twice changes nothing.

`redact_trajectory(traj)` returns a redacted copy: task prompt and data values,
opening prompt messages, actions (content and tool call arguments), observations,
step info, step and episode errors, tags and provenance. Dictionary values under a
sensitive key (`password`, `api_key`, `token`, ...) are redacted whole. The count
of redactions is added to `tags["redactions"]` (0 means: checked, nothing found).
Tool specs, ids and numbers are left alone. The copy's content and previous
hashes are cleared: the store computes them for the redacted content.

Token traces. Token ids spell the text the policy saw and wrote, so a secret in a
conversation survives in the trace even when the text is redacted. A turn's trace
is dropped (`step.trace = None`, `step.info["trace_redacted"] = True`) when its
prompt or completion contains a secret, judged

* from the text: something was redacted in what the policy saw before that turn
  (opening messages, earlier actions and observations) or in the turn's own
  action (content or tool call arguments);
* and, with `decode` (token ids -> text, e.g. the policy's tokenizer), also from
  the tokens: the decoded prompt or completion ids contain a secret (this catches
  what the chat template or the serving side added beyond the stored messages).

Since each prompt holds the whole conversation so far, every turn after the
first secret loses its trace too. Such turns are no longer trainable with RL or
distillation (there are no token ids to train on); they remain in the store as
text, for evaluation and SFT re-rendering.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from safactory.types import Message, Trajectory

Decode = Callable[[list[int]], str]

PLACEHOLDER = "[REDACTED:{kind}]"

# values of these keys are secrets: in `key: value` / `key=value` text, and in dicts (where a bare
# `token` key counts too)
SENSITIVE_KEY = (
    r"password|passwd|passphrase|secret|client[_-]?secret|secret[_-]?key|api[_-]?key|apikey|"
    r"access[_-]?token|auth[_-]?token|refresh[_-]?token|private[_-]?key|aws_secret_access_key"
)
_SENSITIVE_DICT_KEY = re.compile(rf"(?:{SENSITIVE_KEY}|token|authorization)", re.IGNORECASE)
_NOT_PLACEHOLDER = r"(?!\[REDACTED)"
_VALUE = r"(?P<secret>(?<=\")[^\"\n]+(?=\")|(?<=')[^'\n]+(?=')|[^\s\"',;}]+)"


@dataclass(frozen=True)
class SecretPattern:
    """One kind of secret. When the regex has a group named `secret`, only that part is replaced;
    `accept`, when given, must approve each match (checks that a regex cannot do in linear time)."""

    kind: str
    regex: re.Pattern[str]
    accept: Callable[[re.Match[str]], bool] | None = None

    @classmethod
    def of(
        cls, kind: str, pattern: str, flags: int = 0, accept: Callable[[re.Match[str]], bool] | None = None
    ) -> SecretPattern:
        return cls(kind, re.compile(pattern, flags), accept)


_SENSITIVE_TEXT_KEY = re.compile(rf"(?:[A-Za-z0-9]+[_-])*(?:{SENSITIVE_KEY})", re.IGNORECASE)


def _sensitive_text_key(match: re.Match[str]) -> bool:
    return bool(_SENSITIVE_TEXT_KEY.fullmatch(match.group("key")))


DEFAULT_PATTERNS: tuple[SecretPattern, ...] = (
    SecretPattern.of(
        "private_key",
        r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----[\s\S]*?"
        r"(?:-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----|\Z)",
    ),
    SecretPattern.of("api_key", r"(?<![A-Za-z0-9_-])sk-(?=[A-Za-z_-]*+\d)[A-Za-z0-9_-]{20,}"),
    SecretPattern.of("aws_key", r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA)[0-9A-Z]{16}\b"),
    SecretPattern.of("github_token", r"(?<![A-Za-z0-9_])(?:gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,})"),
    SecretPattern.of("slack_token", r"(?<![A-Za-z0-9-])xox[abposre]-[A-Za-z0-9-]{10,}"),
    SecretPattern.of("jwt", r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"),
    SecretPattern.of("bearer", rf"\bbearer\s+{_NOT_PLACEHOLDER}(?P<secret>[A-Za-z0-9._~+/=-]{{12,}})", re.IGNORECASE),
    SecretPattern.of(
        "auth_header",
        rf"\bauthorization[\"']?\s*[:=]\s*[\"']?(?:basic|token|digest)\s+{_NOT_PLACEHOLDER}"
        r"(?P<secret>[A-Za-z0-9._~+/=-]{8,})",
        re.IGNORECASE,
    ),
    # any `key: value` / `key=value` whose key names a secret (checked by `accept`, in linear time)
    SecretPattern.of(
        "password",
        rf"(?<![A-Za-z0-9_-])(?P<key>[A-Za-z0-9_-]{{1,100}}+)[\"']?\s*[:=]\s*[\"']?{_NOT_PLACEHOLDER}{_VALUE}",
        accept=_sensitive_text_key,
    ),
    # starts only where a run of local-part characters starts (no quadratic rescans of long runs)
    SecretPattern.of(
        "email",
        r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]++@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![A-Za-z0-9-])",
    ),
)


class Redactor:
    """Finds and replaces secrets in text and in trajectories.

    `extra`: more patterns, as `{kind: regex}` or SecretPattern objects (a group named
    `secret` limits the replacement to that part). `allow`: regexes; a match whose
    secret text fully matches one of them is kept. `emails=False` keeps email
    addresses. `decode`: the default token decoder for `redact_trajectory`.
    """

    def __init__(
        self,
        extra: Mapping[str, str] | Iterable[SecretPattern] = (),
        *,
        allow: Iterable[str] = (),
        emails: bool = True,
        defaults: bool = True,
        decode: Decode | None = None,
    ) -> None:
        patterns = [p for p in DEFAULT_PATTERNS if emails or p.kind != "email"] if defaults else []
        if isinstance(extra, Mapping):
            patterns += [SecretPattern.of(kind, regex) for kind, regex in extra.items()]
        else:
            patterns += list(extra)
        self.patterns: tuple[SecretPattern, ...] = tuple(patterns)
        self.allow: tuple[re.Pattern[str], ...] = tuple(re.compile(a) for a in allow)
        self.decode = decode

    # ---- text --------------------------------------------------------------------------
    def find(self, text: str) -> list[tuple[int, int, str]]:
        """Non-overlapping (start, end, kind) spans of secrets, in order."""
        if not text:
            return []
        candidates: list[tuple[int, int, str]] = []
        for pattern in self.patterns:
            for m in pattern.regex.finditer(text):
                if pattern.accept is not None and not pattern.accept(m):
                    continue
                start, end = m.span("secret") if "secret" in pattern.regex.groupindex else m.span()
                if end <= start or any(a.fullmatch(text[start:end]) for a in self.allow):
                    continue
                candidates.append((start, end, pattern.kind))
        candidates.sort(key=lambda c: (c[0], -(c[1] - c[0])))
        spans: list[tuple[int, int, str]] = []
        for start, end, kind in candidates:
            if spans and start < spans[-1][1]:
                continue
            spans.append((start, end, kind))
        return spans

    def contains_secret(self, text: str) -> bool:
        return bool(self.find(text))

    def redact_text(self, text: str) -> tuple[str, int]:
        """(redacted text, number of secrets replaced)."""
        spans = self.find(text)
        if not spans:
            return text, 0
        parts: list[str] = []
        last = 0
        for start, end, kind in spans:
            parts += [text[last:start], PLACEHOLDER.format(kind=kind)]
            last = end
        parts.append(text[last:])
        return "".join(parts), len(spans)

    def redact_value(self, value: Any) -> tuple[Any, int]:
        """Any JSON-like value with every string redacted; values under sensitive keys redacted whole."""
        if isinstance(value, str):
            return self.redact_text(value)
        if isinstance(value, Mapping):
            out: dict[Any, Any] = {}
            hits = 0
            for key, item in value.items():
                if isinstance(key, str) and _sensitive_key(key) and _is_secret_value(item):
                    out[key] = PLACEHOLDER.format(kind="password" if "pass" in key.lower() else "secret")
                    hits += 1
                else:
                    out[key], n = self.redact_value(item)
                    hits += n
            return out, hits
        if isinstance(value, list | tuple):
            items = []
            hits = 0
            for item in value:
                redacted, n = self.redact_value(item)
                items.append(redacted)
                hits += n
            return (items if isinstance(value, list) else tuple(items)), hits
        return value, 0

    # ---- trajectories ------------------------------------------------------------------
    def _has_secret(self, message: Message) -> bool:
        return self.redact_message(message)[1] > 0

    def redact_message(self, message: Message) -> tuple[Message, int]:
        content, hits = self.redact_text(message.content)
        calls = []
        for call in message.tool_calls:
            arguments, n = self.redact_value(call.arguments)
            hits += n
            calls.append(call.model_copy(update={"arguments": arguments}))
        return message.model_copy(update={"content": content, "tool_calls": calls}), hits

    def redact_trajectory(self, traj: Trajectory, decode: Decode | None = None) -> Trajectory:
        """A redacted deep copy of `traj` (see the module docstring); `traj` itself is not changed."""
        decode = decode if decode is not None else self.decode
        out = traj.model_copy(deep=True)
        hits = 0
        # token traces first, while the text still shows the secrets
        seen_secret = any(self._has_secret(m) for m in out.prompt)
        for step in out.steps:
            acted_secret = self._has_secret(step.action)
            if step.trace is not None:
                leaked = seen_secret or acted_secret
                if not leaked and decode is not None:
                    leaked = self.contains_secret(decode(step.trace.prompt_ids)) or self.contains_secret(
                        decode(step.trace.completion_ids)
                    )
                if leaked:
                    step.trace = None
                    step.info["trace_redacted"] = True
            seen_secret = seen_secret or acted_secret or any(self._has_secret(m) for m in step.observation)

        task_prompt, n = self.redact_text(out.task.prompt)
        hits += n
        task_data, n = self.redact_value(out.task.data)
        hits += n
        out.task = out.task.model_copy(update={"prompt": task_prompt, "data": task_data})
        out.task_hash = out.task.hash()
        prompt = []
        for message in out.prompt:
            redacted, n = self.redact_message(message)
            prompt.append(redacted)
            hits += n
        out.prompt = prompt
        for step in out.steps:
            step.action, n = self.redact_message(step.action)
            hits += n
            observation = []
            for message in step.observation:
                redacted, n = self.redact_message(message)
                observation.append(redacted)
                hits += n
            step.observation = observation
            step.info, n = self.redact_value(step.info)
            hits += n
            if step.error is not None:
                step.error, n = self.redact_text(step.error)
                hits += n
        if out.error is not None:
            out.error, n = self.redact_text(out.error)
            hits += n
        out.provenance, n = self.redact_value(out.provenance)
        hits += n
        previous = out.tags.pop("redactions", 0)
        out.tags, n = self.redact_value(out.tags)
        hits += n
        out.tags["redactions"] = (previous if isinstance(previous, int) else 0) + hits
        out.content_hash = ""
        out.prev_hash = ""
        return out


def _sensitive_key(key: str) -> bool:
    return bool(_SENSITIVE_DICT_KEY.fullmatch(key.strip()))


def _is_secret_value(value: Any) -> bool:
    """A value worth hiding: a non-empty string that is not already a placeholder, or a number."""
    if isinstance(value, bool) or value is None:
        return False
    if isinstance(value, str):
        return bool(value.strip()) and not value.startswith("[REDACTED")
    return isinstance(value, int | float)


_DEFAULT = Redactor()


def redact_text(text: str) -> tuple[str, int]:
    """Redact with the default patterns: (redacted text, number of secrets replaced)."""
    return _DEFAULT.redact_text(text)


def redact_trajectory(traj: Trajectory, decode: Decode | None = None) -> Trajectory:
    """Redact a trajectory with the default patterns (see `Redactor.redact_trajectory`)."""
    return _DEFAULT.redact_trajectory(traj, decode)
