"""TensorBoard scalar logging without TensorFlow: an event file written by hand.

An event file is a TFRecord stream. Each record is framed as

    uint64 length | uint32 masked crc32c(length) | data | uint32 masked crc32c(data)

(all little endian), and `data` is a serialized `tensorflow.Event` protobuf. We only need
four of its fields, so the protobuf is encoded directly:

    Event   { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
    Summary { repeated Value value = 1; }
    Value   { string tag = 1; float simple_value = 2; }

The first record of a file carries `file_version = "brain.Event:2"` and no summary.
"""

from __future__ import annotations

import math
import os
import socket
import struct
import time
from pathlib import Path
from typing import BinaryIO

FILE_VERSION = "brain.Event:2"

# protobuf wire types
_VARINT = 0
_FIXED64 = 1
_LENGTH_DELIMITED = 2
_FIXED32 = 5

_CRC32C_POLY = 0x82F63B78  # Castagnoli polynomial, bit-reversed
_MASK_DELTA = 0xA282EAD8


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ _CRC32C_POLY if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()  # constant lookup table, computed once


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of `data`, table driven, one byte at a time."""
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """The rotated-and-offset CRC that TFRecord stores (so CRCs of CRCs stay well mixed)."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
    """`data` framed as one TFRecord."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


# ---- protobuf encoding --------------------------------------------------------------------
def _varint(value: int) -> bytes:
    """Base-128 varint; negative int64 values take their 64-bit two's complement (10 bytes)."""
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint((field << 3) | wire_type)


def _bytes_field(field: int, payload: bytes) -> bytes:
    return _key(field, _LENGTH_DELIMITED) + _varint(len(payload)) + payload


def _float32(value: float) -> bytes:
    try:
        return struct.pack("<f", value)
    except OverflowError:  # finite but outside float32: saturate like a C cast would
        return struct.pack("<f", math.copysign(math.inf, value))


def encode_value(tag: str, value: float) -> bytes:
    """A `Summary.Value` with a tag and a simple (float32) value."""
    return _bytes_field(1, tag.encode("utf-8")) + _key(2, _FIXED32) + _float32(value)


def encode_event(
    wall_time: float, step: int, *, file_version: str | None = None, values: dict[str, float] | None = None
) -> bytes:
    """A serialized `Event` with optional file version and scalar summary."""
    out = _key(1, _FIXED64) + struct.pack("<d", wall_time)
    if step:
        out += _key(2, _VARINT) + _varint(step)
    if file_version is not None:
        out += _bytes_field(3, file_version.encode("utf-8"))
    if values is not None:
        summary = b"".join(_bytes_field(1, encode_value(tag, v)) for tag, v in values.items())
        out += _bytes_field(5, summary)
    return out


# ---- writer -------------------------------------------------------------------------------
class TensorBoardWriter:
    """Appends scalar summaries to a fresh event file in `log_dir`."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._file, self.path = self._open_new()
        self._file.write(tfrecord(encode_event(time.time(), 0, file_version=FILE_VERSION)))
        self._file.flush()

    def _open_new(self) -> tuple[BinaryIO, Path]:
        """Create a new event file; a suffix keeps two writers started in the same second apart."""
        base = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
        for attempt in range(1000):
            path = self.log_dir / (base if attempt == 0 else f"{base}.{os.getpid()}.{attempt}")
            try:
                return path.open("xb"), path
            except FileExistsError:
                continue
        raise RuntimeError(f"could not create a new event file in {self.log_dir}")

    @property
    def closed(self) -> bool:
        return self._file.closed

    def add_scalars(self, values: dict[str, float], step: int, wall_time: float | None = None) -> None:
        """Write one event holding every `tag: value` pair at `step`."""
        if self._file.closed:
            raise ValueError("TensorBoardWriter is closed")
        if not values:
            return
        scalars = {str(tag): float(v) for tag, v in values.items()}
        event = encode_event(time.time() if wall_time is None else wall_time, int(step), values=scalars)
        self._file.write(tfrecord(event))

    def flush(self) -> None:
        if not self._file.closed:
            self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            self._file.close()

    def __enter__(self) -> TensorBoardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
