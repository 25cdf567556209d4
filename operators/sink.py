"""Parquet output with deterministic, content-addressed file names, and reading results back.

Layout: every run writes into the one output folder (`OUTPUT/part-*.parquet`); rows of different
configurations live side by side and are told apart by their `config_hash` column (part names hash
clip ids *and* config hashes, so another configuration never overwrites a part). Bookkeeping lives in
`OUTPUT/_avsieve/` and half-written parts are hidden `.tmp-*` files; Parquet readers skip both.

Reruns append rather than rewrite, so a window can have several rows (a resumed block written twice,
an error retried, a changed input recaptioned). `read_output` returns the current one: rows of an older
version of the input are dropped, then per window an "ok" row beats an error row and the newest wins.
Readers that scan the folder themselves should filter on `config_hash` and apply the same rule (or call
`read_output`).
"""

from __future__ import annotations

import hashlib
import posixpath
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from operators import faults
from operators.schema import OUTPUT_SCHEMA

TEMP_PREFIX = ".tmp-"


def part_name(keys: list[str], prefix: str = "part") -> str:
    """Same rows -> same file name, on every run and machine (no random write UUIDs)."""
    digest = hashlib.sha1("\n".join(sorted(keys)).encode()).hexdigest()[:20]
    return f"{prefix}-{digest}.parquet"


def _row_keys(table: pa.Table) -> list[str]:
    hashes = table.column("config_hash").to_pylist() if "config_hash" in table.column_names else []
    ids = table.column("clip_id").to_pylist()
    return [f"{c}\x1f{h}" if h else c for c, h in zip(ids, hashes or [None] * len(ids))]


def write_part(table: pa.Table, output: str) -> str:
    """Write one part atomically: a hidden temporary file, then a rename to its content-addressed name.

    Readers skip names starting with '.', so a half-written part (a killed writer) is never read, and a
    rerun that produces the same rows produces the same file name.
    """
    import uuid

    import fsspec
    import pyarrow.parquet as pq

    fs, root = fsspec.core.url_to_fs(output)
    fs.makedirs(root, exist_ok=True)
    name = part_name(_row_keys(table))
    final = posixpath.join(root, name)
    temp = posixpath.join(root, f"{TEMP_PREFIX}{uuid.uuid4().hex}-{name}")
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    data = buffer.getvalue().to_pybytes()
    with fs.open(temp, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        faults.on_write()  # tests: a kill can land here, with half a file on disk
        f.write(data[len(data) // 2:])
    fs.mv(temp, final)
    return final


def sweep_temp_parts(output: str, older_than_s: float = 6 * 3600) -> int:
    """Delete hidden temporary parts left by killed writers. Only old ones: a concurrent job into the same
    folder may be writing the young ones right now. Returns how many were removed."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(output)
    if not fs.exists(root):
        return 0
    removed = 0
    now = time.time()
    for info in fs.ls(root, detail=True):
        name = posixpath.basename(info["name"].rstrip("/"))
        if not name.startswith(TEMP_PREFIX):
            continue
        mtime = info.get("mtime") or info.get("LastModified") or info.get("updated")
        mtime = getattr(mtime, "timestamp", lambda: mtime)()
        if isinstance(mtime, (int, float)) and now - mtime > older_than_s:
            fs.rm(info["name"])
            removed += 1
    return removed


def _dataset(uri: str):
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    if not fs.exists(path):
        return None
    # Only our part files: a report or notes someone saved into the folder must not break every later run.
    root = path.rstrip("/") + "/"
    parts = [f for f in fs.find(path) if f.endswith(".parquet")
             and not any(piece.startswith(("_", ".")) for piece in f[len(root):].split("/"))]
    return pads.dataset(parts, filesystem=fs, format="parquet", schema=OUTPUT_SCHEMA) if parts else None


DEDUPE_COLUMNS = ("clip_id", "source_id", "config_hash", "window_index", "source_version", "status", "created_at")


def read_output(uri: str, dedupe: bool = True, config_hash: str | None = None,
                columns: list[str] | None = None) -> pa.Table:
    """Output rows under `uri` (files starting with '_' or '.' are bookkeeping and skipped).

    config_hash: only rows of that configuration (a pushed-down filter). columns: only these columns
    (the dedupe columns are read as well, then dropped). With `dedupe`, one current row per window
    (source_id, config_hash, window_index): see the module docstring.
    """
    dataset = _dataset(uri)
    names = list(columns) if columns else list(OUTPUT_SCHEMA.names)
    read = names + [c for c in DEDUPE_COLUMNS if c not in names] if dedupe else names
    if dataset is None:
        return OUTPUT_SCHEMA.empty_table().select(names)
    flt = pc.field("config_hash") == config_hash if config_hash else None
    table = dataset.to_table(columns=read, filter=flt)
    if dedupe and table.num_rows:
        table = current_rows(table)
    return table.select(names)


def current_rows(table: pa.Table) -> pa.Table:
    """One row per (source_id, config_hash, window_index), vectorised (O(rows log rows), no Python loop).

    1. The newest row of each (source_id, config_hash) names the input's current source_version; rows
       of other versions are stale (the file changed and was captioned again).
    2. Per window: an "ok" row before an error row, then the newest (created_at; legacy rows without
       one count as oldest). Windows are keyed by index, not clip_id, so the single error row of a source
       that once failed to open does not outlive the windows of a later successful run.
    """
    table = table.combine_chunks()
    col = lambda name: table.column(name).combine_chunks()  # noqa: E731
    # Rows without a source or window index (hand-made tables) fall back to their clip_id as the key.
    keyless = pc.or_(pc.is_null(col("source_id")), pc.is_null(col("window_index")))
    source = pc.if_else(keyless, pc.binary_join_element_wise("clip:", col("clip_id"), ""), col("source_id"))
    keys = pa.table({
        "s": pc.fill_null(source, ""), "c": pc.fill_null(col("config_hash"), ""),
        "w": pc.fill_null(col("window_index"), -1), "v": pc.fill_null(col("source_version"), ""),
        "ok": pc.fill_null(pc.equal(col("status"), "ok"), False),
        "t": pc.fill_null(col("created_at").cast(pa.int64()), -1),
        "i": pa.array(np.arange(table.num_rows)),
    })
    newest = keys.sort_by([("t", "descending")])
    latest = newest.group_by(["s", "c"], use_threads=False).aggregate([("v", "first")])
    keys = keys.join(latest, ["s", "c"], join_type="inner")
    keys = keys.filter(pc.equal(keys.column("v"), keys.column("v_first")))
    ranked = keys.sort_by([("ok", "descending"), ("t", "descending")])
    best = ranked.group_by(["s", "c", "w"], use_threads=False).aggregate([("i", "first")])
    return table.take(np.sort(best.column("i_first").to_numpy()))
