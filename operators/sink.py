"""Parquet output with deterministic, content-addressed file names, and reading results back."""

from __future__ import annotations

import hashlib

import pyarrow as pa
import pyarrow.dataset as pads

from operators.schema import OUTPUT_SCHEMA


def part_name(clip_ids: list[str], prefix: str = "part") -> str:
    """Same rows -> same file name, on every run and machine (no random write UUIDs)."""
    digest = hashlib.sha1("\n".join(sorted(clip_ids)).encode()).hexdigest()[:20]
    return f"{prefix}-{digest}.parquet"


def write_part(table: pa.Table, output: str) -> str:
    """Write one part atomically: a hidden temporary file, then a rename to its content-addressed name.

    Readers skip names starting with '.', so a half-written part (a killed writer) is never read, and a
    rerun that produces the same rows produces the same file name.
    """
    import posixpath
    import uuid

    import fsspec
    import pyarrow.parquet as pq

    fs, root = fsspec.core.url_to_fs(output)
    fs.makedirs(root, exist_ok=True)
    name = part_name(table.column("clip_id").to_pylist())
    final = posixpath.join(root, name)
    temp = posixpath.join(root, f".tmp-{uuid.uuid4().hex}-{name}")
    with fs.open(temp, "wb") as f:
        pq.write_table(table, f)
    fs.mv(temp, final)
    return final


def read_output(uri: str, dedupe: bool = True) -> pa.Table:
    """All output rows under `uri` (files starting with '_' or '.' are bookkeeping and skipped).

    With `dedupe`, one row per (clip_id, config_hash) is returned, preferring "ok" rows: reruns and
    retried blocks may have written a window twice, in different parts.
    """
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    if not fs.exists(path):
        return OUTPUT_SCHEMA.empty_table()
    dataset = pads.dataset(path, filesystem=fs, format="parquet", schema=OUTPUT_SCHEMA,
                           exclude_invalid_files=False)
    table = dataset.to_table()
    if not dedupe or table.num_rows == 0:
        return table
    keys = list(zip(table.column("clip_id").to_pylist(), table.column("config_hash").to_pylist()))
    ok = [s == "ok" for s in table.column("status").to_pylist()]
    best: dict = {}
    for i, key in enumerate(keys):
        if key not in best or (ok[i] and not ok[best[key]]):
            best[key] = i
    return table.take(sorted(best.values()))
