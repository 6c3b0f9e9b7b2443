"""Read an offline W&B run's binary ``run-*.wandb`` log back, for tests.

W&B has no public reader for this file; its Python implementation (``wandb.sdk.internal.
datastore``) was removed when the writer moved to the Go ``wandb-core`` service. The format is
LevelDB's log format behind a 7-byte W&B header: 32 KiB blocks of records, each with a 7-byte
header (checksum, length, type: full / first / middle / last chunk), whose payloads are
``wandb_internal_pb2.Record`` messages. ``wandb.finish()`` can return before the service has
flushed the file (its last 32 KiB block may still be missing), so the reader waits for the run's
final ``exit`` record. ``skip_if_unsupported`` skips a test with a reason when
the installed wandb writes something else.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest

FILE_HEADER = struct.Struct("<4sHB")  # ident, magic, version
FILE_IDENT, FILE_MAGIC, KNOWN_VERSIONS = b":W&B", 0xBEE1, (0, 1)
RECORD_HEADER = struct.Struct("<IHB")  # checksum, length, chunk type
BLOCK_SIZE = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


class UnsupportedFormat(Exception):
    """The run log is not in the format this reader knows."""


def _payloads(data: bytes) -> Iterator[bytes]:
    if len(data) < FILE_HEADER.size:
        raise UnsupportedFormat("run log shorter than its header")
    ident, magic, version = FILE_HEADER.unpack_from(data)
    if ident != FILE_IDENT or magic != FILE_MAGIC or version not in KNOWN_VERSIONS:
        raise UnsupportedFormat(f"unknown run log header {ident!r} {magic:#x} v{version}")
    pos, pending = FILE_HEADER.size, b""
    while pos + RECORD_HEADER.size <= len(data):
        left_in_block = BLOCK_SIZE - pos % BLOCK_SIZE
        if left_in_block < RECORD_HEADER.size:  # block trailer padding
            pos += left_in_block
            continue
        _, length, kind = RECORD_HEADER.unpack_from(data, pos)
        if kind == 0 and length == 0:  # zero padding (preallocated space)
            pos += left_in_block
            continue
        chunk = data[pos + RECORD_HEADER.size : pos + RECORD_HEADER.size + length]
        pos += RECORD_HEADER.size + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""
        else:
            raise UnsupportedFormat(f"unknown chunk type {kind} at byte {pos}")


def _parse(data: bytes) -> List[Any]:
    from wandb.proto import wandb_internal_pb2

    records = []
    for payload in _payloads(data):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def read_records(run_dir: Path, timeout: float = 30.0) -> List[Any]:
    """All ``Record`` protobufs of the run in ``run_dir`` (the ``offline-run-*`` directory).

    Waits up to ``timeout`` seconds for the log to be complete (its ``exit`` record written).
    """
    from google.protobuf.message import DecodeError

    logs = sorted(Path(run_dir).glob("run-*.wandb"))
    if len(logs) != 1:
        raise UnsupportedFormat(f"expected one run-*.wandb file in {run_dir}, found {logs}")
    deadline = time.monotonic() + timeout
    while True:
        try:
            records = _parse(logs[0].read_bytes())
            if any(r.WhichOneof("record_type") == "exit" for r in records):
                return records
        except DecodeError:  # a record cut off mid-write: not flushed yet
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{logs[0]} still incomplete (no exit record) after {timeout}s; was wandb.finish() called?")
        time.sleep(0.1)


def history(records: List[Any]) -> List[Dict[str, Any]]:
    """Each ``run.log`` call's row: key to decoded JSON value (``_step`` included)."""
    rows = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            row = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            rows.append(row)
    return rows


def artifacts(records: List[Any]) -> List[Any]:
    """The ``ArtifactRecord``s the run logged."""
    return [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]


def skip_if_unsupported(run_dir: Path) -> List[Any]:
    """``read_records``, turning a format this reader does not know into a skipped test."""
    try:
        records = read_records(run_dir)
    except UnsupportedFormat as err:
        import wandb

        pytest.skip(f"wandb {wandb.__version__} run log not readable by tests/wandb_reader.py: {err}")
    if not history(records):
        import wandb

        pytest.skip(f"wandb {wandb.__version__}: no history records found in the run log; internals moved?")
    return records
