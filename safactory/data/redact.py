"""Redaction of secrets and personal data from trajectories before they are stored.

A `Redactor` finds secrets with regular expressions (API keys such as `sk-...`,
`AKIA...`, `ghp_...`, `xox...`, JWTs, bearer tokens, `password: ...` /
`password=...` values, the password of a URL such as `postgresql://user:PASS@host`,
private key blocks, email addresses), plus any extra patterns the user configures,
and replaces each with `[REDACTED:<kind>]`. An allow-list keeps matches that are
known not to be secrets (test keys, internal mail domains). Matches of all patterns
are collected on the original text first and replaced at once (earliest, then
longest, wins), so a replacement is never matched again and redacting twice changes
nothing.

Sensitive keys. A key names a secret when its last word is one of `password`,
`passwd`, `passphrase`, `secret`, `api_key`, `access_token`, `private_key`, ... (in
dictionaries also `token` and `authorization`), in any case, with any prefix words
(`db_password`, `DB_PASSWORD`, `MY_API_KEY`, `github_token`), in the plural
(`secrets`, `passwords`) or with a value suffix (`password_hash`, `secret_value`);
not when the word before it counts or describes tokens (`max_tokens`, `num_secrets`,
`eos_token`). In text, the value of `key: value` / `key=value` runs to the closing
quote when it is quoted, else to the next whitespace or quote (inside JSON, after a
quoted key, also to `,`, `}` or `]`; a bare JSON value becomes a quoted placeholder,
so JSON stays JSON). A value that is plainly no secret is kept: a path (`/...`),
email addresses (left to the email pattern), `null`/`true`/`false`, or one without a
letter or digit; so labels such as `read_secret:/secrets/api_key` stay readable.

`redact_trajectory(traj)` returns a redacted copy: task prompt and data values,
opening prompt messages, actions (content and tool call arguments), observations,
step info, step and episode errors, tags and provenance. Dictionary values under a
sensitive key are redacted whole (every string and number in a list or dictionary
under it). The count of redactions is added to `tags["redactions"]` (0 means:
checked, nothing found). Tool specs, ids and numbers are left alone. The copy's
content and previous hashes are cleared: the store computes them for the redacted
content.

Known secrets of a task. An environment may list the literal secret values of a task
in `task.data["secrets"]` (a string, or a list or dictionary of strings; the ops
environment lists its API key and passwords there). Every occurrence of each such
value (of at least 4 characters, matched exactly) is then redacted anywhere in that
trajectory, as `[REDACTED:secret]`, whatever its context: `admin: granite-4962` in a
file, the body of an email, tool arguments, step info. `for_trajectory(traj)` gives
the redactor that does this for one trajectory (`redact_trajectory` uses it).

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

import copy
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from safactory.types import Message, Task, Trajectory

Decode = Callable[[list[int]], str]

PLACEHOLDER = "[REDACTED:{kind}]"
MIN_LITERAL = 4  # shorter known secrets (task.data["secrets"]) are not redacted as literals

# the last word of a key that names a secret (in `key: value` / `key=value` text and in dicts)
SENSITIVE_KEY = (
    r"password|passwd|passphrase|secret|client[_-]?secret|secret[_-]?key|api[_-]?key|apikey|"
    r"access[_-]?token|auth[_-]?token|refresh[_-]?token|private[_-]?key|aws_secret_access_key"
)
_SEP = r"[_.\s-]"
_KEY_PREFIX = rf"(?:[A-Za-z0-9]+{_SEP})*"
_KEY_SUFFIX = rf"(?:s|{_SEP}(?:value|values|hash|plain|plaintext|raw|b64|base64))?"
_SENSITIVE_TEXT_KEY = re.compile(rf"{_KEY_PREFIX}(?:{SENSITIVE_KEY}){_KEY_SUFFIX}", re.IGNORECASE)
# dicts: a bare `token` / `authorization` key counts too (in text, "max token: 64" is prose)
_SENSITIVE_DICT_KEY = re.compile(
    rf"{_KEY_PREFIX}(?:(?:{SENSITIVE_KEY}){_KEY_SUFFIX}|token|authorization)", re.IGNORECASE
)
# ... unless the word before it counts or describes tokens: max_tokens, num_secrets, eos_token
_NOT_SENSITIVE_KEY = re.compile(
    rf"(?:.*{_SEP})?(?:n|num|number|count|max|min|total|has|is|no|eos|bos|pad|unk|sep|cls|mask|special|"
    rf"start|end|stop|prompt|completion|input|output|decoded|sampled|chosen|top){_SEP}[A-Za-z0-9]+",
    re.IGNORECASE,
)
_NOT_PLACEHOLDER = r"(?!\[REDACTED)"
# where a `key: value` / `key=value` / `"key": "value"` starts: the key (quoted or not, also with
# escaped quotes as in JSON inside a JSON string), the separator and the value's opening quote
_KEY_SITE = re.compile(
    r"(?<![A-Za-z0-9_-])(?P<kq>\\?[\"'])?(?P<key>[A-Za-z0-9_-]{1,100}+)(?P<kc>\\?[\"'])?\s*+[:=]\s*+"
    r"(?P<vq>\\?[\"'])?"
)
# the value: quoted, to its closing quote (escapes included; one opened by \" closes at \")
_QUOTED = {
    '\\"': re.compile(r"(?:[^\"\\\n]|\\[^\"\n])++(?=\\\")"),
    '"': re.compile(r"(?:[^\"\\\n]|\\.)++(?=\")"),
    "'": re.compile(r"(?:[^'\\\n]|\\.)++(?=')"),
}
# bare after a quoted key (JSON, a Python dict): to whitespace, a quote, `,`, `}` or `]`
_BARE_JSON = re.compile(r"[^\s\"',}\]]++")
# bare in free text: to whitespace or a quote (an escaped \n, \r or \t ends it: a line break in a JSON string)
_BARE_TEXT = re.compile(r"(?:[^\s\"'\\]|\\[^nrt\s\"'])++")
_NOT_A_SECRET = re.compile(r"(?:\.{0,2}|~)/.*|null|none|nil|true|false|undefined", re.IGNORECASE | re.DOTALL)

Finder = Callable[[str], Iterable[tuple[int, int, str]]]


@dataclass(frozen=True)
class SecretPattern:
    """One kind of secret. When the regex has a group named `secret`, only that part is replaced;
    `accept`, when given, must approve each match (checks that a regex cannot do in linear time).
    `finder`, when given, finds the (start, end, quote) spans instead of the regex; `quote` is put
    around the placeholder (so that a bare JSON value becomes a JSON string)."""

    kind: str
    regex: re.Pattern[str]
    accept: Callable[[re.Match[str]], bool] | None = None
    finder: Finder | None = None

    @classmethod
    def of(
        cls, kind: str, pattern: str, flags: int = 0, accept: Callable[[re.Match[str]], bool] | None = None
    ) -> SecretPattern:
        return cls(kind, re.compile(pattern, flags), accept)


def _is_emails(value: str) -> bool:
    """Only email addresses, separated by `,` or `;` (the email pattern redacts them, as emails)."""
    for part in re.split(r"[,;]", value):
        local, at, domain = part.strip().partition("@")
        if not (local and at and "." in domain.strip(".")):
            return False
    return True


def _plausible_secret(value: str) -> bool:
    """Not plainly something else: a path, email addresses, a null or boolean, punctuation only."""
    return (
        any(c.isalnum() for c in value)
        and not value.startswith(("[", "{"))
        and not _NOT_A_SECRET.fullmatch(value)
        and not ("@" in value and _is_emails(value))
    )


def _key_values(text: str) -> Iterable[tuple[int, int, str]]:
    """Values of `key: value` / `key=value` whose key names a secret, in linear time: only the values
    of sensitive keys are scanned, and no key inside a scanned value is looked at again."""
    scanned = 0
    for site in _KEY_SITE.finditer(text):
        key = site.group("key")
        if site.start() < scanned or not _SENSITIVE_TEXT_KEY.fullmatch(key) or _NOT_SENSITIVE_KEY.fullmatch(key):
            continue
        at = site.end()
        opening = site.group("vq")
        value = _QUOTED[opening].match(text, at) if opening else None
        quote = ""
        if value is None:
            if site.group("kq") and site.group("kc") and not opening:  # `"key": 123` in JSON
                value = _BARE_JSON.match(text, at)
                quote = site.group("kq")
            else:
                value = _BARE_TEXT.match(text, at)
        if value is None:
            continue
        scanned = value.end()
        if _plausible_secret(value.group()) and not value.group().startswith("[REDACTED"):
            yield value.start(), value.end(), quote


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
    # any `key: value` / `key=value` whose key names a secret (found by `_key_values`, in linear time)
    SecretPattern("password", _KEY_SITE, finder=_key_values),
    # the password of a URL: scheme://user:PASSWORD@host
    SecretPattern.of(
        "password",
        r"(?<![A-Za-z0-9+.-])[A-Za-z][A-Za-z0-9+.-]{0,30}+://[^\s/:@\"'<>]{0,200}+:"
        rf"{_NOT_PLACEHOLDER}(?P<secret>[^\s/@\"'<>]{{1,200}}+)@",
    ),
    # starts only where a run of local-part characters starts (no quadratic rescans of long runs)
    SecretPattern.of(
        "email",
        r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]++@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![A-Za-z0-9-])",
    ),
)


def task_secrets(task: Task) -> list[str]:
    """The literal secret values a task declares in `task.data["secrets"]` (see the module docstring)."""
    found: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, str):
            if len(value.strip()) >= MIN_LITERAL and not value.startswith("[REDACTED"):
                found.append(value.strip())
        elif isinstance(value, Mapping):
            for item in value.values():
                walk(item)
        elif isinstance(value, list | tuple):
            for item in value:
                walk(item)

    data = task.data if isinstance(task.data, Mapping) else {}
    walk(data.get("secrets"))
    return list(dict.fromkeys(found))


def literal_pattern(values: Iterable[str], kind: str = "secret") -> SecretPattern | None:
    """A pattern for exact occurrences of the given values (the longest first), or None for none."""
    words = sorted({v for v in values if len(v) >= MIN_LITERAL}, key=lambda v: (-len(v), v))
    return SecretPattern.of(kind, "|".join(re.escape(v) for v in words)) if words else None


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

    def with_secrets(self, values: Iterable[str]) -> Redactor:
        """A copy that also redacts every exact occurrence of the given secret values."""
        pattern = literal_pattern(values)
        if pattern is None:
            return self
        out = copy.copy(self)
        out.patterns = (*self.patterns, pattern)
        return out

    def for_trajectory(self, traj: Trajectory) -> Redactor:
        """The redactor for one trajectory: this one plus the secrets its task declares."""
        return self.with_secrets(task_secrets(traj.task))

    # ---- text --------------------------------------------------------------------------
    def _spans(self, text: str) -> list[tuple[int, int, str, str]]:
        if not text:
            return []
        candidates: list[tuple[int, int, str, str]] = []
        for pattern in self.patterns:
            for start, end, quote in _pattern_spans(pattern, text):
                if end <= start or any(a.fullmatch(text[start:end]) for a in self.allow):
                    continue
                candidates.append((start, end, pattern.kind, quote))
        candidates.sort(key=lambda c: (c[0], -(c[1] - c[0])))
        spans: list[tuple[int, int, str, str]] = []
        for candidate in candidates:
            if spans and candidate[0] < spans[-1][1]:
                continue
            spans.append(candidate)
        return spans

    def find(self, text: str) -> list[tuple[int, int, str]]:
        """Non-overlapping (start, end, kind) spans of secrets, in order."""
        return [(start, end, kind) for start, end, kind, _ in self._spans(text)]

    def contains_secret(self, text: str) -> bool:
        return bool(self._spans(text))

    def redact_text(self, text: str) -> tuple[str, int]:
        """(redacted text, number of secrets replaced)."""
        spans = self._spans(text)
        if not spans:
            return text, 0
        parts: list[str] = []
        last = 0
        for start, end, kind, quote in spans:
            parts += [text[last:start], quote, PLACEHOLDER.format(kind=kind), quote]
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
                if isinstance(key, str) and _sensitive_key(key):
                    out[key], n = _redact_whole(item, "password" if "pass" in key.lower() else "secret")
                else:
                    out[key], n = self.redact_value(item)
                hits += n
            return out, hits
        if isinstance(value, list | tuple):
            return _redact_items(value, self.redact_value)
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
        return self.for_trajectory(traj)._redact_trajectory(traj, decode)

    def _redact_trajectory(self, traj: Trajectory, decode: Decode | None) -> Trajectory:
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


def _pattern_spans(pattern: SecretPattern, text: str) -> Iterable[tuple[int, int, str]]:
    if pattern.finder is not None:
        yield from pattern.finder(text)
        return
    for m in pattern.regex.finditer(text):
        if pattern.accept is None or pattern.accept(m):
            yield (*(m.span("secret") if "secret" in pattern.regex.groupindex else m.span()), "")


def _sensitive_key(key: str) -> bool:
    key = key.strip()
    return bool(_SENSITIVE_DICT_KEY.fullmatch(key)) and not _NOT_SENSITIVE_KEY.fullmatch(key)


def _redact_items(
    value: list[Any] | tuple[Any, ...], redact: Callable[[Any], tuple[Any, int]]
) -> tuple[list[Any] | tuple[Any, ...], int]:
    """Each item redacted by `redact`, as a list or tuple like `value`, and the total count."""
    items, hits = [], 0
    for item in value:
        redacted, n = redact(item)
        items.append(redacted)
        hits += n
    return (items if isinstance(value, list) else tuple(items)), hits


def _redact_whole(value: Any, kind: str) -> tuple[Any, int]:
    """Every string and number in `value` replaced by a placeholder (the shape of lists and dicts kept)."""
    if isinstance(value, Mapping):
        out: dict[Any, Any] = {}
        hits = 0
        for key, item in value.items():
            out[key], n = _redact_whole(item, kind)
            hits += n
        return out, hits
    if isinstance(value, list | tuple):
        return _redact_items(value, lambda item: _redact_whole(item, kind))
    if _is_secret_value(value):
        return PLACEHOLDER.format(kind=kind), 1
    return value, 0


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
