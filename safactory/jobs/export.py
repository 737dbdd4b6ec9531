"""Export and import of stored trajectories.

Formats:
  jsonl    one whole trajectory per line (token traces, hashes, provenance): lossless;
           `import_trajectories` reads it back and checks every content hash.
  parquet  the same records as columns (nested JSON kept as strings) via pyarrow;
           imports back losslessly too.
  trl      TRL's conversational format, one row per trajectory: `messages` (OpenAI
           chat format; tool-call arguments as JSON objects, the call text taken out of
           the assistant's `content` so a chat template writes each call once) and `tools`
           (OpenAI function specs), plus reward/success; loads with `datasets.load_dataset("json", ...)`.
  rl       token-level RL rows: `input_ids`, `loss_mask`, `behaviour_logprobs`,
           `reward`, `group_id`, exactly as the trainer sees them.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from pydantic_core import to_json

from safactory.data.codec import content_hash
from safactory.data.redact import Redactor
from safactory.data.store import TrajectoryStore
from safactory.evolve.experience import rl_sequences
from safactory.policy.chat import parse_json_tool_calls, parse_tool_calls
from safactory.types import Message, ToolSpec, Trajectory

FORMATS = ("jsonl", "parquet", "trl", "rl")


def openai_message(message: Message) -> dict[str, Any]:
    """A message in OpenAI chat format (tool call arguments as JSON strings)."""
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        out["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": json.dumps(c.arguments)}}
            for c in message.tool_calls
        ]
    if message.role == "tool":
        out["tool_call_id"] = message.tool_call_id
        if message.name:
            out["name"] = message.name
    return out


def trl_message(message: Message, tools: list[ToolSpec]) -> dict[str, Any]:
    """A message in TRL's conversational format: tool call arguments as JSON objects, and an
    assistant turn with tool calls keeps only the text around the calls as its `content`
    (chat templates write `content` and then each call, so the call text would show twice)."""
    out = openai_message(message)
    if message.tool_calls:
        out["content"] = text_around_calls(message.content, [c.name for c in message.tool_calls], tools)
        out["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": dict(c.arguments)}}
            for c in message.tool_calls
        ]
    return out


def text_around_calls(content: str, names: list[str], tools: list[ToolSpec]) -> str:
    """`content` less the tool calls written in it, stripped.

    `<tool_call>` blocks are cut out wherever they stand (an unclosed last block runs to the
    end). Content that is nothing but calls, as a bare JSON call object or list, or as
    plain-text lines such as `calc(3+4)` naming the calls `names`, leaves "". Anything else
    is free text and is kept as it is.
    """
    if _OPEN in content:
        return _cut_blocks(content).strip()
    found = parse_json_tool_calls(content)
    if found is not None and found[0] and found[1] is None:
        return ""
    calls, error = parse_tool_calls(content, tools)
    if error is None and [c.name for c in calls] == names:
        return ""
    return content


_OPEN, _CLOSE = "<tool_call>", "</tool_call>"


def _cut_blocks(text: str) -> str:
    """`text` without its `<tool_call>...</tool_call>` blocks. A block ends at the first closing
    tag before which its body is JSON (a string in the call may hold the tag itself), else at the
    first closing tag, else at the end of the text."""
    kept: list[str] = []
    pos = 0
    start = text.find(_OPEN)
    while start >= 0:
        kept.append(text[pos:start])
        body = start + len(_OPEN)
        closes = list(_find_all(text, _CLOSE, body))
        end = next((i for i in closes if _is_json(text[body:i])), closes[0] if closes else len(text))
        pos = min(end + len(_CLOSE), len(text))
        start = text.find(_OPEN, pos)
    kept.append(text[pos:])
    return "".join(kept)


def _find_all(text: str, needle: str, start: int) -> Iterator[int]:
    i = text.find(needle, start)
    while i >= 0:
        yield i
        i = text.find(needle, i + 1)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def openai_tool(spec: ToolSpec) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {"name": spec.name, "description": spec.description, "parameters": spec.parameters},
    }


def trl_row(traj: Trajectory) -> dict[str, Any]:
    return {
        "messages": [trl_message(m, traj.tools) for m in traj.messages()],
        "tools": [openai_tool(t) for t in traj.tools],
        "reward": traj.reward,
        "success": traj.success,
        "trajectory_id": traj.id,
        "env_id": traj.env_id,
        "task_id": traj.task.id,
    }


def rl_rows(traj: Trajectory) -> Iterator[dict[str, Any]]:
    for seq in rl_sequences(traj):
        yield {
            "trajectory_id": traj.id,
            "group_id": traj.group_id,
            "input_ids": seq.input_ids,
            "loss_mask": seq.loss_mask,
            "behaviour_logprobs": seq.behaviour_logprobs if seq.behaviour_known else None,
            "temperature": seq.temperature,
            "policy_version": seq.policy_version,
            "reward": traj.reward,
        }


_NESTED = ("task", "prompt", "tools", "steps", "tags", "provenance")


def _record_json(traj: Trajectory) -> str:
    """The whole record as JSON, NaN and infinities written as the constants `json.loads` reads back.

    `model_dump(mode="json")` would write them as null, and the record would no longer match its hash.
    """
    return to_json(traj.model_dump(), inf_nan_mode="constants").decode()


def _flat(traj: Trajectory) -> dict[str, Any]:
    row = traj.model_dump()
    for key in _NESTED:
        row[key] = to_json(row[key], inf_nan_mode="constants").decode()
    return row


def _parquet_schema() -> Any:
    """The Parquet columns, fixed from the model (inferred types break on a column that starts all null)."""
    import pyarrow as pa

    scalar = {int: pa.int64(), float: pa.float64(), bool: pa.bool_(), str: pa.string(), str | None: pa.string()}
    columns = []
    for name, field in Trajectory.model_fields.items():
        if name in _NESTED:
            columns.append(pa.field(name, pa.string()))
        elif field.annotation in scalar:
            columns.append(pa.field(name, scalar[field.annotation]))
        else:
            raise TypeError(f"no Parquet column type for Trajectory.{name}: {field.annotation}")
    return pa.schema(columns)


def _unflat(row: dict[str, Any]) -> Trajectory:
    data = dict(row)
    for key in _NESTED:
        data[key] = json.loads(data[key])
    return Trajectory.model_validate(data)


def redacted(trajectories: Iterable[Trajectory], redactor: Redactor) -> Iterator[Trajectory]:
    """The trajectories with secrets and personal data redacted, for export. One the store already
    redacted (it carries `tags["redactions"]`) passes as it is; another becomes a redacted copy
    with its own content hash, so the export still imports."""
    for traj in trajectories:
        if "redactions" in traj.tags:
            yield traj
            continue
        copy = redactor.redact_trajectory(traj)
        copy.content_hash = content_hash(copy)
        yield copy


def export(
    trajectories: Iterable[Trajectory], fmt: str, path: Path, progress: Callable[[int], None] | None = None
) -> int:
    """Write trajectories to `path` in `fmt`; returns the number of rows written."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        return _export_parquet(trajectories, path, progress)
    rows = 0
    with path.open("w", encoding="utf-8") as f:
        for traj in trajectories:
            if fmt == "jsonl":
                lines: Iterable[str] = [_record_json(traj)]
            elif fmt == "trl":
                lines = [json.dumps(trl_row(traj), separators=(",", ":"), ensure_ascii=False)]
            else:
                lines = (json.dumps(r, separators=(",", ":"), ensure_ascii=False) for r in rl_rows(traj))
            for line in lines:
                f.write(line + "\n")
                rows += 1
            if progress is not None:
                progress(1)
    return rows


def _export_parquet(trajectories: Iterable[Trajectory], path: Path, progress: Callable[[int], None] | None) -> int:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise RuntimeError("Parquet export needs pyarrow: pip install 'safactory[export]'") from exc
    schema = _parquet_schema()
    writer = None
    rows = 0
    batch: list[dict[str, Any]] = []

    def flush() -> None:
        nonlocal writer
        if writer is None:
            writer = pq.ParquetWriter(path, schema)
        writer.write_table(pa.Table.from_pylist(batch, schema=schema))
        batch.clear()

    for traj in trajectories:
        batch.append(_flat(traj))
        rows += 1
        if progress is not None:
            progress(1)
        if len(batch) >= 1000:
            flush()
    if batch:
        flush()
    if writer is not None:
        writer.close()
    return rows


def read_trajectories(path: Path) -> Iterator[Trajectory]:
    """Trajectories from a `jsonl` or `parquet` export."""
    for _, traj in _read_records(path):
        yield traj


def _read_records(path: Path) -> Iterator[tuple[str, Trajectory]]:
    """Each trajectory of an export with where it was read: `path:line` (jsonl) or `path:row` (parquet).

    A record that cannot be read is a ValueError that names its line or row.
    """
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        n = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1000):
            for row in batch.to_pylist():
                n += 1
                try:
                    traj = _unflat(row)
                except (ValueError, TypeError, RecursionError) as exc:
                    raise ValueError(f"{path}:row {n}: not a trajectory record ({exc})") from exc
                yield f"{path}:row {n}", traj
        return
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{path}:{n}: not UTF-8 text ({exc})") from exc
            if line.strip():
                try:
                    traj = Trajectory.model_validate_json(line)
                except (ValueError, RecursionError) as exc:
                    raise ValueError(f"{path}:{n}: not a trajectory record ({exc})") from exc
                yield f"{path}:{n}", traj


def _checked_records(path: Path) -> Iterator[Trajectory]:
    """The trajectories of an export, each refused (a ValueError naming its row) unless its content
    hash is there and still matches, and its reward is one the store takes."""
    for where, traj in _read_records(path):
        if not traj.content_hash:
            raise ValueError(f"{where}: trajectory {traj.id} has no content hash; refusing to import it")
        try:
            digest = content_hash(traj)
        except (ValueError, TypeError, OverflowError, struct.error, RecursionError) as exc:  # e.g. an id past int32
            raise ValueError(f"{where}: trajectory {traj.id} cannot be encoded ({exc}); refusing to import it") from exc
        if digest != traj.content_hash:
            raise ValueError(f"{where}: trajectory {traj.id} does not match its content hash; refusing to import it")
        if not math.isfinite(traj.reward):
            raise ValueError(f"{where}: trajectory {traj.id} has a non-finite reward; refusing to import it")
        yield traj


def import_trajectories(
    store: TrajectoryStore, path: Path, progress: Callable[[int], None] | None = None, batch_size: int = 500
) -> int:
    """Load an export into `store` (creating runs as needed); every content hash must still match.

    Returns how many trajectories were new. The whole file is checked first: a record that
    cannot be read, has no content hash (an empty one would let an edited record through) or
    fails it refuses the import with a ValueError naming its line, and nothing is stored, so an
    import is never left half done by a bad record. Then the records are stored in batches of
    `batch_size` (a second reading, checked again); re-importing is idempotent.
    """
    for _ in _checked_records(path):
        pass
    known_runs = set(store.run_ids())
    added = 0
    batch: list[Trajectory] = []

    def flush() -> None:
        nonlocal added
        for run_id in {t.run_id for t in batch} - known_runs:
            store.create_run(run_id, {"imported_from": str(path)})
            known_runs.add(run_id)
        added += store.add(batch)
        if progress is not None:
            progress(len(batch))
        batch.clear()

    for traj in _checked_records(path):
        batch.append(traj)
        if len(batch) >= batch_size:
            flush()
    if batch:
        flush()
    return added
