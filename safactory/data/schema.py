"""The store's schema: the SQLAlchemy tables, the column order of the ingest rows, and
setting a store's schema up on open (create missing tables, check or upgrade its version).

Layout (storage grows linearly with the number of steps):
  runs            config, config hash, code version, chain head (count + last hash, the row
                  chain's link and its HMAC)
  tasks           each distinct task once, by its hash
  trajectories    one row per episode (append-only): provenance, outcome, hashes
  steps           one row per turn: action, observation, reward, info, error
  token_traces    one row per sampled turn: int32/float32 blobs; a turn stores only
                  the prompt tokens that are new since the previous turn
  consumption     which training step of which consumer (training run) used each
                  trajectory: exactly once per consumer
  checkpoints     policy versions: weights hash, parent, training step, path
  scores, safety_verdicts   judgements attached to trajectories
  gate_decisions  the evaluation gate's decisions, per run
  chain_heads     the head (count, last link, HMAC) of each chained table

Tamper evidence (`safactory.data.seal`): the rows of runs, consumption, checkpoints, scores,
safety_verdicts and gate_decisions carry their place in their table's hash chain
(`chain_seq`, `chain_hash`); those columns are nullable so that an older store gains them
on open (`add_missing_columns`), and its rows are then sealed as found.

The schema is versioned (`safactory_meta.schema_version`, checked on open; a version-3
store has the same tables and is marked 4 on open, its trajectories keeping their
version-3 hashes).
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    inspect,
    select,
    update,
)
from sqlalchemy.engine import Connection

from safactory.types import SCHEMA_VERSION

metadata = MetaData()

meta_table = Table("safactory_meta", metadata, Column("key", Text, primary_key=True), Column("value", Text))


def _chained() -> tuple[Column, Column]:
    """A chained table's place in its chain: position and link (`safactory.data.seal`)."""
    return Column("chain_seq", Integer, nullable=True), Column("chain_hash", String(64), nullable=True)


runs = Table(
    "runs",
    metadata,
    Column("id", Text, primary_key=True),
    Column("created_at", Float, nullable=False),
    Column("config", Text, nullable=False),
    Column("config_hash", String(64), nullable=False),
    Column("code_version", Text, nullable=False),
    Column("n_trajectories", Integer, nullable=False),
    Column("head_hash", String(64), nullable=False),
    Column("traj_link", String(64), nullable=True),  # the run's trajectory row chain: its last link
    Column("traj_mac", Text, nullable=True),  # HMAC of the run's trajectory head ("" without a key)
    *_chained(),
)
RUN_HEAD_COLUMNS = ("n_trajectories", "head_hash", "traj_link", "traj_mac")  # change with every add

chain_heads = Table(
    "chain_heads",
    metadata,
    Column("scope", Text, primary_key=True),
    Column("n", Integer, nullable=False),
    Column("link", String(64), nullable=False),
    Column("mac", Text, nullable=False),
)

tasks = Table(
    "tasks",
    metadata,
    Column("hash", String(64), primary_key=True),
    Column("task_id", Text, nullable=False),
    Column("env_id", Text, nullable=False),
    Column("split", Text, nullable=False),
    Column("body", Text, nullable=False),
)

trajectories = Table(
    "trajectories",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", Text, unique=True, nullable=False),
    Column("run_id", Text, nullable=False),
    Column("kind", Text, nullable=False),
    Column("group_id", Text, nullable=False, index=True),
    Column("task_hash", String(64), nullable=False, index=True),
    Column("task_id", Text, nullable=False),
    Column("split", Text, nullable=False),
    Column("env_id", Text, nullable=False),
    Column("env_version", Text, nullable=False),
    Column("seed", BigInteger, nullable=False),
    Column("policy_version", Integer, nullable=True),
    Column("n_steps", Integer, nullable=False),
    Column("reward", Float, nullable=False),
    Column("success", Boolean, nullable=False),
    Column("termination", Text, nullable=False),
    Column("error", Text, nullable=True),
    Column("created_at", Float, nullable=False),
    Column("content_hash", String(64), nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("meta", Text, nullable=False),
    Index("ix_traj_run_kind", "run_id", "kind", "seq"),
)

steps = Table(
    "steps",
    metadata,
    Column("trajectory_id", Text, primary_key=True),
    Column("idx", Integer, primary_key=True),
    Column("action", Text, nullable=False),
    Column("observation", Text, nullable=False),
    Column("reward", Float, nullable=True),
    Column("info", Text, nullable=False),
    Column("error", Text, nullable=True),
)

token_traces = Table(
    "token_traces",
    metadata,
    Column("trajectory_id", Text, primary_key=True),
    Column("turn", Integer, primary_key=True),
    Column("policy_version", Integer, nullable=False),
    Column("policy_versions", Text, nullable=False),
    Column("temperature", Float, nullable=False),
    Column("top_p", Float, nullable=False),
    Column("finish_reason", Text, nullable=False),
    Column("prefix_len", Integer, nullable=False),
    Column("prompt_suffix", LargeBinary, nullable=False),
    Column("completion_ids", LargeBinary, nullable=False),
    Column("logprobs", LargeBinary, nullable=True),
)

consumption = Table(
    "consumption",
    metadata,
    Column("consumer", Text, primary_key=True),
    Column("trajectory_id", Text, primary_key=True),
    Column("train_step", Integer, nullable=False),
    Column("consumed_at", Float, nullable=False),
    *_chained(),
    Index("ix_consumption_step", "consumer", "train_step"),
)

checkpoints = Table(
    "checkpoints",
    metadata,
    Column("run_id", Text, primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("parent_version", Integer, nullable=True),
    Column("train_step", Integer, nullable=False),
    Column("weights_hash", String(64), nullable=False),
    Column("path", Text, nullable=True),
    Column("created_at", Float, nullable=False),
    Column("meta", Text, nullable=False),
    *_chained(),
)

scores = Table(
    "scores",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("trajectory_id", Text, nullable=False, index=True),
    Column("judge", Text, nullable=False),
    Column("name", Text, nullable=False),
    Column("value", Float, nullable=False),
    Column("meta", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    *_chained(),
)

safety_verdicts = Table(
    "safety_verdicts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("trajectory_id", Text, nullable=False, index=True),
    Column("judge", Text, nullable=False),
    Column("judge_version", Text, nullable=False),
    Column("unsafe", Boolean, nullable=False),
    Column("severity", Float, nullable=False),
    Column("reasons", Text, nullable=False),
    Column("meta", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    *_chained(),
)

gate_decisions = Table(
    "gate_decisions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", Text, nullable=False, index=True),
    Column("candidate_version", Integer, nullable=False),
    Column("baseline_version", Integer, nullable=False),
    Column("accepted", Boolean, nullable=False),
    Column("reasons", Text, nullable=False),
    Column("decision", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    *_chained(),
)

CHAINED = (runs, consumption, checkpoints, scores, safety_verdicts, gate_decisions)  # one hash chain per table

UPGRADABLE = {3}  # store schemas opened as they are and marked as SCHEMA_VERSION

# column order of the rows `safactory.data.rows` builds for the ingest path
TASK_COLUMNS = ("hash", "task_id", "env_id", "split", "body")
TRAJECTORY_COLUMNS = (
    "id",
    "run_id",
    "kind",
    "group_id",
    "task_hash",
    "task_id",
    "split",
    "env_id",
    "env_version",
    "seed",
    "policy_version",
    "n_steps",
    "reward",
    "success",
    "termination",
    "error",
    "created_at",
    "content_hash",
    "prev_hash",
    "meta",
)
STEP_COLUMNS = ("trajectory_id", "idx", "action", "observation", "reward", "info", "error")
TRACE_COLUMNS = (
    "trajectory_id",
    "turn",
    "policy_version",
    "policy_versions",
    "temperature",
    "top_p",
    "finish_reason",
    "prefix_len",
    "prompt_suffix",
    "completion_ids",
    "logprobs",
)


def set_up_schema(conn: Connection, url: str) -> None:
    """Create missing tables, widen old length-limited text columns, check the schema version
    (in the transaction of `conn`; `url` names the store in the error for a foreign version)."""
    if conn.dialect.name == "postgresql":  # one opener at a time sets up the schema
        conn.exec_driver_sql("SELECT pg_advisory_xact_lock(hashtext('safactory.store.schema'))")
    metadata.create_all(conn)
    if conn.dialect.name == "postgresql":
        _widen_text_columns(conn)
    row = conn.execute(select(meta_table.c.value).where(meta_table.c.key == "schema_version")).first()
    if row is None:
        conn.execute(meta_table.insert().values(key="schema_version", value=str(SCHEMA_VERSION)))
    elif int(row[0]) in UPGRADABLE:
        # same tables; its trajectories keep their version-3 hashes (each records its version)
        conn.execute(update(meta_table).where(meta_table.c.key == "schema_version").values(value=str(SCHEMA_VERSION)))
    elif int(row[0]) != SCHEMA_VERSION:
        raise RuntimeError(
            f"{url} holds store schema {row[0]}, this safactory speaks {SCHEMA_VERSION}; migrate it or use a new store"
        )


def add_missing_columns(conn: Connection) -> list[str]:
    """Add the columns a store made by an older safactory lacks (all nullable); returns them as table.column."""
    present = inspect(conn)
    added = []
    for table in metadata.sorted_tables:
        have = {c["name"] for c in present.get_columns(table.name)}
        for column in table.c:
            if column.name not in have:
                kind = column.type.compile(dialect=conn.dialect)
                preparer = conn.dialect.identifier_preparer
                conn.exec_driver_sql(
                    f"ALTER TABLE {preparer.format_table(table)} ADD COLUMN {preparer.quote(column.name)} {kind}"
                )
                added.append(f"{table.name}.{column.name}")
    return added


def _widen_text_columns(conn: Connection) -> None:
    """PostgreSQL stores made before free-text columns were TEXT: widen their VARCHAR(n) columns
    (a change of the column's type only; PostgreSQL rewrites neither rows nor indexes)."""
    rows = conn.exec_driver_sql(
        "SELECT table_name, column_name FROM information_schema.columns "
        "WHERE table_schema = current_schema() AND data_type = 'character varying'"
    ).all()
    for table_name, column_name in rows:
        table = metadata.tables.get(table_name)
        if table is not None and column_name in table.c and isinstance(table.c[column_name].type, Text):
            preparer = conn.dialect.identifier_preparer
            conn.exec_driver_sql(
                f"ALTER TABLE {preparer.quote(table_name)} ALTER COLUMN {preparer.quote(column_name)} TYPE TEXT"
            )
