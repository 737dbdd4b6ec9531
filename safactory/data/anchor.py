"""The store's head kept outside the database: the store-wide head a verification ends in,
head files, and what an expected head says about the store now.

A verification walks every chain of the store (`safactory.data.integrity.verify`): each
run's trajectory row chain (scope `trajectories:<run id>`) and each chained table (scope:
the table's name). Its heads, {scope: (rows, last link)}, make the store's head: the sha256
of their canonical JSON (`sha256:<hex>`), or with a key its HMAC-SHA256
(`hmac-sha256:<hex>`). Any change to a row that a chain covers, any deletion, reordering or
append, changes it. A head file (`data verify --write-head`) holds the head and the scope
heads it was made of, so a later check can say which scope changed and whether rows were
only appended after it. Kept where whoever can write to the database cannot (or taken with
a key), it catches what the database alone cannot: an attacker who rewrites rows and
recomputes every link and head inside the store.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from safactory.types import canonical_json

HEAD_FORMAT = "safactory-store-head/1"
_HEAD = re.compile(r"^(sha256|hmac-sha256):[0-9a-f]{64}$")

Heads = Mapping[str, tuple[int, str]]


def store_head(heads: Heads, key: bytes | None) -> str:
    """The store's head: over every scope's (rows, last link); keyed when `key` is given."""
    body = canonical_json({scope: [n, link] for scope, (n, link) in heads.items()}).encode()
    if key is None:
        return "sha256:" + hashlib.sha256(body).hexdigest()
    return "hmac-sha256:" + hmac.new(key, body, hashlib.sha256).hexdigest()


@dataclass
class Expected:
    """What the store is expected to be: a head (`--expect-head`) and/or a head file (`--head-file`)."""

    head: str | None = None
    scopes: dict[str, tuple[int, str]] | None = None  # the head file's scope heads
    file_head: str | None = None  # the head the file records
    source: str = ""

    @classmethod
    def from_options(cls, head: str | None, head_file: Path | None) -> Expected | None:
        """From the command's options; raises ValueError naming what is wrong with them."""
        if head is None and head_file is None:
            return None
        expected = cls()
        if head is not None:
            expected.head = _parse_head(head.strip(), "--expect-head")
        if head_file is not None:
            expected.source = str(head_file)
            try:
                data = json.loads(Path(head_file).read_text())
                if data.get("format") != HEAD_FORMAT:
                    raise ValueError(f"not a {HEAD_FORMAT} file")
                expected.file_head = _parse_head(data["head"], str(head_file))
                expected.scopes = {str(s): (int(v[0]), str(v[1])) for s, v in data["scopes"].items()}
            except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
                raise ValueError(f"cannot read the head file {head_file}: {exc}") from exc
        return expected

    def positions(self) -> dict[str, int]:
        """Per scope, the number of rows at the expected head (where a walk notes its link)."""
        return {scope: n for scope, (n, _) in (self.scopes or {}).items()}


def _parse_head(text: str, where: str) -> str:
    if re.fullmatch(r"[0-9a-f]{64}", text):
        text = "sha256:" + text
    if not _HEAD.match(text):
        raise ValueError(f"{where}: a head is sha256:<64 hex> or hmac-sha256:<64 hex>, not {text!r}")
    return text


def write_head_file(path: Path, heads: Heads, head: str) -> None:
    """Write a head file (atomically: a temporary file renamed over `path`)."""
    data = {"format": HEAD_FORMAT, "head": head, "scopes": {s: [n, link] for s, (n, link) in sorted(heads.items())}}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def compare(expected: Expected, heads: Heads, links_at: Mapping[str, str], key: bytes | None) -> list[str]:
    """What differs between the store (its walked `heads`; `links_at`: each scope's link after as
    many rows as the head file records) and what was expected."""
    problems: list[str] = []
    if expected.head is not None:
        problems += _compare_head(expected.head, heads, key, "the expected head")
    if expected.scopes is not None and expected.file_head is not None:
        keyed = expected.file_head.startswith("hmac-")
        if keyed and key is None:
            problems.append(f"the head file {expected.source} was written with a key: set SAFACTORY_STORE_KEY")
        elif store_head(expected.scopes, key if keyed else None) != expected.file_head:
            problems.append(
                f"the head file {expected.source} does not hold together: it was edited, or written under another key"
            )
        problems += _scope_changes(expected.scopes, heads, links_at)
    return problems


def _compare_head(want: str, heads: Heads, key: bytes | None, what: str) -> list[str]:
    keyed = want.startswith("hmac-")
    if keyed and key is None:
        return [f"{what} was taken with a key: set SAFACTORY_STORE_KEY to check it"]
    now = store_head(heads, key if keyed else None)
    if now != want:
        return [f"the store's head is {now}, not {what} {want}: rows were added, changed or deleted since it was taken"]
    return []


def _scope_changes(was: Mapping[str, tuple[int, str]], heads: Heads, links_at: Mapping[str, str]) -> list[str]:
    out: list[str] = []
    for scope in sorted(set(was) | set(heads)):
        before, now = was.get(scope), heads.get(scope)
        if before == now:
            continue
        if before is None:
            if now is not None and now[0]:
                out.append(f"{scope}: {now[0]} rows added after the expected head (the scope is new since)")
        elif now is None:
            out.append(f"{scope}: its {before[0]} rows at the expected head are gone (deleted)")
        elif now[0] > before[0] and links_at.get(scope) == before[1]:
            out.append(f"{scope}: {now[0] - before[0]} rows appended after the expected head")
        else:
            out.append(
                f"{scope}: changed since the expected head ({before[0]} rows then, {now[0]} now): "
                "rows it covered were modified, deleted or reordered"
            )
    return out
