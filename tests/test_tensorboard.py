"""Hand-written TensorBoard event files, read back by TensorBoard itself; metrics sinks around them."""

import json
import struct
import sys
import types

import pytest

from safactory.factory.metrics import REQUIRED, MetricsLog, RowChanges, TensorBoardSink, last_row, make_sinks, read_rows
from safactory.factory.tensorboard import TensorBoardWriter, crc32c, encode_event, masked_crc32c, tfrecord


# ---- encoding, no reader needed ----------------------------------------------------------------
def test_crc32c_known_vectors():
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0
    # RFC 3720 (iSCSI) appendix B.4
    assert crc32c(bytes(32)) == 0x8A9136AA
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E
    assert crc32c(bytes(range(31, -1, -1))) == 0x113FDB5C


def test_tfrecord_framing():
    data = b"hello event"
    record = tfrecord(data)
    (length,) = struct.unpack("<Q", record[:8])
    assert length == len(data)
    assert struct.unpack("<I", record[8:12])[0] == masked_crc32c(record[:8])
    assert record[12:-4] == data
    assert struct.unpack("<I", record[-4:])[0] == masked_crc32c(data)


def test_event_encoding_bytes():
    # wall_time=1.0 (fixed64), step=300 (varint 0xac 0x02), one value {tag "a", simple_value 0.5}
    event = encode_event(1.0, 300, values={"a": 0.5})
    value = b"\x0a\x01a" + b"\x15" + struct.pack("<f", 0.5)
    summary = b"\x0a" + bytes([len(value)]) + value
    assert event == b"\x09" + struct.pack("<d", 1.0) + b"\x10\xac\x02" + b"\x2a" + bytes([len(summary)]) + summary
    negative = encode_event(0.0, -1)
    assert negative.endswith(b"\x10" + b"\xff" * 9 + b"\x01")


# ---- read back by TensorBoard ----------------------------------------------------------------
def _scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_writer_read_back_by_tensorboard(tmp_path):
    from tensorboard.backend.event_processing import event_file_loader

    with TensorBoardWriter(tmp_path / "tb") as writer:
        writer.add_scalars({"train/loss": 1.25, "rollout/success_rate": 0.5}, step=1, wall_time=100.0)
        writer.add_scalars({"train/loss": 0.75}, step=2, wall_time=101.0)
        writer.add_scalars({"eval/success_rate": 0.875, "big": 1e300}, step=2**40)
        writer.flush()
    assert writer.path.name.startswith("events.out.tfevents.")

    events = list(event_file_loader.LegacyEventFileLoader(str(writer.path)).Load())
    assert events[0].file_version == "brain.Event:2"
    assert [e.step for e in events[1:]] == [1, 2, 2**40]
    assert events[1].wall_time == 100.0

    scalars = _scalars(tmp_path / "tb")
    assert scalars["train/loss"] == [(1, 1.25), (2, 0.75)]
    assert scalars["rollout/success_rate"] == [(1, 0.5)]
    assert scalars["eval/success_rate"] == [(2**40, 0.875)]
    assert scalars["big"][0][1] == float("inf")  # beyond float32: saturates instead of failing


def test_two_writers_in_one_dir_do_not_collide(tmp_path):
    a, b = TensorBoardWriter(tmp_path), TensorBoardWriter(tmp_path)
    assert a.path != b.path
    a.close()
    b.close()
    with pytest.raises(ValueError):
        a.add_scalars({"x": 1.0}, step=1)


# ---- metrics log and sinks -------------------------------------------------------------------
def test_row_changes_sends_only_new_values():
    changes = RowChanges()
    step, values = changes.update(
        {"time_s": 1.0, "train/step": None, "eval/phase": "warm_start", "eval/success_rate": 0.5}
    )
    assert step == 1 and values == {"eval/success_rate": 0.5}
    row = {"time_s": 2.0, "train/step": 3, "train/loss": 1.0, "eval/phase": "warm_start", "eval/success_rate": 0.5}
    assert changes.update(row) == (3, {"train/step": 3.0, "train/loss": 1.0})
    # same step, nothing new but a flag and a histogram (not a scalar)
    row = {**row, "time_s": 3.0, "gate/accepted": True, "rollout/version_gap_hist": {"0": 3}}
    assert changes.update(row) == (3, {"gate/accepted": 1.0})
    # a new step re-sends train/* even when the loss repeats; a new evaluation re-sends eval/*
    row = {**row, "time_s": 4.0, "train/step": 4, "eval/phase": "rl@4"}
    assert changes.update(row) == (4, {"train/step": 4.0, "train/loss": 1.0, "eval/success_rate": 0.5})


def test_metrics_log_feeds_tensorboard(tmp_path):
    sinks = make_sinks(tmp_path)
    assert len(sinks) == 1 and isinstance(sinks[0], TensorBoardSink)
    log = MetricsLog(tmp_path / "metrics.jsonl", sinks=sinks, time_offset=1000.0)
    log.log({"eval/phase": "warm_start", "eval/success_rate": 0.25})
    for step in (1, 2, 3):
        log.log({"phase": "rl", "train/step": step, "train/loss": 1.0 / step, "rollout/success_rate": 0.5})
    log.log({"eval/phase": "final", "eval/success_rate": 0.75})
    log.close()
    log.close()  # closing twice is harmless

    rows, skipped = read_rows(tmp_path / "metrics.jsonl")
    assert skipped == 0 and len(rows) == 5
    assert all(r["time_s"] >= 1000.0 for r in rows)
    assert all(k in r for k in REQUIRED for r in rows)

    scalars = _scalars(tmp_path / "tensorboard")
    assert scalars["eval/success_rate"] == [(1, 0.25), (3, 0.75)]
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3]
    assert scalars["rollout/success_rate"] == [(1, 0.5), (2, 0.5), (3, 0.5)]
    assert "time_s" not in scalars and "eval/phase" not in scalars


def test_resume_cuts_a_truncated_line_and_carries_the_snapshot(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path, sinks=[])
    log.log({"train/step": 5, "policy_version": 5, "eval/phase": "rl@5"})
    log.close()
    with path.open("a") as f:
        f.write('{"time_s": 9.0, "train/st')  # killed mid-write
    assert read_rows(path)[1] == 1
    previous = last_row(path)
    assert previous is not None and previous["train/step"] == 5

    log = MetricsLog(path, time_offset=previous["time_s"] + 60.0, resume=True)
    row = log.log({"train/step": 6})
    log.close()
    assert row["policy_version"] == 5 and row["eval/phase"] == "rl@5" and row["train/step"] == 6
    assert row["time_s"] >= previous["time_s"] + 60.0
    rows, skipped = read_rows(path)
    assert skipped == 0 and [r["train/step"] for r in rows] == [5, 6]
    assert path.read_text().endswith("\n") and all(json.loads(line) for line in path.read_text().splitlines())


def test_a_failing_sink_is_switched_off_not_fatal(tmp_path, caplog):
    class Broken:
        closed = False

        def write(self, row):
            raise OSError("disk full")

        def close(self):
            self.closed = True

    broken = Broken()
    log = MetricsLog(tmp_path / "metrics.jsonl", sinks=[broken])
    log.log({"train/step": 1})
    log.log({"train/step": 2})
    log.close()
    assert broken.closed and log.sinks == []
    assert len(read_rows(tmp_path / "metrics.jsonl")[0]) == 2
    assert "switched off" in caplog.text


@pytest.mark.parametrize(("flag", "module"), [("wandb", "wandb"), ("mlflow", "mlflow")])
def test_optional_sinks_explain_a_missing_package(tmp_path, monkeypatch, flag, module):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail even where it is installed
    with pytest.raises(RuntimeError, match=f"pip install {module}"):
        make_sinks(tmp_path, **{flag: True})


def test_wandb_sink_with_a_stand_in_module(tmp_path, monkeypatch):
    calls: list = []

    class Run:
        def log(self, values):
            calls.append(("log", values))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    (sink,) = make_sinks(tmp_path, tensorboard=False, wandb=True, run_name="r1")
    sink.write({"time_s": 1.0, "train/step": 1, "train/loss": 0.5, "phase": "rl"})
    sink.write({"time_s": 2.0, "train/step": 1, "train/loss": 0.5, "phase": "rl"})  # nothing new
    sink.close()
    assert calls[0] == ("init", {"project": "safactory", "name": "r1", "dir": str(tmp_path)})
    assert calls[1:] == [("log", {"train/step": 1.0, "train/loss": 0.5}), ("finish",)]


def test_mlflow_sink_with_a_stand_in_module(tmp_path, monkeypatch):
    calls: list = []

    class Client:
        def __init__(self, tracking_uri=None):
            calls.append(("client", tracking_uri))

        def get_experiment_by_name(self, name):
            return None

        def create_experiment(self, name):
            return "exp-1"

        def create_run(self, experiment_id, run_name=None):
            calls.append(("run", experiment_id, run_name))
            return types.SimpleNamespace(info=types.SimpleNamespace(run_id="run-1"))

        def log_batch(self, run_id, metrics):
            calls.append(("batch", run_id, sorted((m.key, m.value, m.step) for m in metrics)))

        def set_terminated(self, run_id):
            calls.append(("end", run_id))

    class Metric:
        def __init__(self, key, value, timestamp, step):
            self.key, self.value, self.timestamp, self.step = key, value, timestamp, step

    mlflow = types.ModuleType("mlflow")
    mlflow.MlflowClient = Client
    entities = types.ModuleType("mlflow.entities")
    entities.Metric = Metric
    mlflow.entities = entities
    monkeypatch.setitem(sys.modules, "mlflow", mlflow)
    monkeypatch.setitem(sys.modules, "mlflow.entities", entities)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    (sink,) = make_sinks(tmp_path, tensorboard=False, mlflow=True, run_name="r2")
    sink.write({"time_s": 1.0, "train/step": 7, "rollout/success_rate": 0.25})
    sink.close()
    assert calls[0] == ("client", (tmp_path / "mlruns").resolve().as_uri())
    assert calls[1] == ("run", "exp-1", "r2")
    assert calls[2] == ("batch", "run-1", [("rollout/success_rate", 0.25, 7), ("train/step", 7.0, 7)])
    assert calls[3] == ("end", "run-1")
