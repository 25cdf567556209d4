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


def read_output(uri: str) -> pa.Table:
    """All output rows under `uri` (files starting with '_' or '.' are bookkeeping and skipped)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    if not fs.exists(path):
        return OUTPUT_SCHEMA.empty_table()
    dataset = pads.dataset(path, filesystem=fs, format="parquet", schema=OUTPUT_SCHEMA,
                           exclude_invalid_files=False)
    return dataset.to_table()
