"""Turn --input (folder, glob, fsspec URI or manifest file) into manifest rows with stable ids."""

from __future__ import annotations

import hashlib
import json
import posixpath

import fsspec
import pyarrow as pa

MEDIA_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".flv", ".wmv",
                    ".3gp", ".ogv")
MANIFEST_EXTENSIONS = (".parquet", ".csv", ".jsonl", ".json")

MANIFEST_SCHEMA = pa.schema([
    ("source_id", pa.string()),
    ("clip_id", pa.string()),  # optional user-given id; windows derive theirs from it
    ("uri", pa.string()),
    ("start_s", pa.float64()),
    ("end_s", pa.float64()),
    ("prompt", pa.string()),
])


def stable_id(*parts) -> str:
    """Short, stable hex id of the given parts (same inputs -> same id on every machine and run)."""
    text = "\x1f".join("" if p is None else (f"{p:.3f}" if isinstance(p, float) else str(p)) for p in parts)
    return hashlib.sha1(text.encode()).hexdigest()[:20]


def window_id(source_clip_id: str | None, uri: str, start_s: float, end_s: float, n_windows: int,
              index: int) -> str:
    """clip_id of one window: the user's clip_id for single-window inputs, else a hash of uri + span."""
    if source_clip_id:
        return source_clip_id if n_windows == 1 else f"{source_clip_id}#w{index}"
    return stable_id(uri, float(start_s), float(end_s))


def _is_media(path: str) -> bool:
    return path.lower().endswith(MEDIA_EXTENSIONS)


def _with_protocol(fs, path: str) -> str:
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    if protocol in ("file", "local"):
        return path
    return path if "://" in path else f"{protocol}://{path}"


def read_manifest(uri: str) -> list[dict]:
    """Rows of a Parquet / CSV / JSONL manifest with at least a `uri` column."""
    lower = uri.lower()
    with fsspec.open(uri, "rb") as f:
        if lower.endswith(".parquet"):
            import pyarrow.parquet as pq

            rows = pq.read_table(f).to_pylist()
        elif lower.endswith(".csv"):
            import pyarrow.csv as pcsv

            # Ids and paths are text: never let type inference turn "007" into 7.0.
            strings = {name: pa.string() for name in ("clip_id", "uri", "prompt")}
            rows = pcsv.read_csv(f, convert_options=pcsv.ConvertOptions(column_types=strings)).to_pylist()
        elif lower.endswith(".json"):
            data = json.loads(f.read().decode())
            rows = data if isinstance(data, list) else [data]
        else:
            rows = [json.loads(line) for line in f.read().decode().splitlines() if line.strip()]
    if rows and "uri" not in rows[0]:
        raise ValueError(f"manifest {uri} has no 'uri' column (columns: {sorted(rows[0])})")
    base = posixpath.dirname(uri)
    for row in rows:
        # Relative paths in a manifest are relative to the manifest itself.
        if row.get("uri") and "://" not in row["uri"] and not row["uri"].startswith("/"):
            row["uri"] = posixpath.join(base, row["uri"])
    return rows


def list_inputs(input_uri: str, limit: int | None = None, default_prompt: str = "") -> list[dict]:
    """Manifest rows for --input. Order is sorted by uri so that --limit and ids are reproducible."""
    if input_uri.lower().endswith(MANIFEST_EXTENSIONS):
        raw = read_manifest(input_uri)
    else:
        fs, path = fsspec.core.url_to_fs(input_uri)
        if any(ch in path for ch in "*?["):
            paths = [p for p in fs.glob(path) if not fs.isdir(p)]  # the pattern chose these files
        elif fs.isdir(path):
            paths = [p for p in fs.find(path) if _is_media(p)]
        else:
            paths = [path]  # a single file (missing files become error rows downstream)
        raw = [{"uri": _with_protocol(fs, p)} for p in sorted(paths)]
    rows = []
    for r in raw:
        start = float(r["start_s"]) if r.get("start_s") is not None else None
        end = float(r["end_s"]) if r.get("end_s") is not None else None
        rows.append({
            "source_id": stable_id(r["uri"], start, end),
            "clip_id": str(r["clip_id"]) if r.get("clip_id") not in (None, "") else None,
            "uri": str(r["uri"]),
            "start_s": start,
            "end_s": end,
            "prompt": r.get("prompt") or default_prompt,
        })
    rows.sort(key=lambda r: (r["uri"], r["start_s"] or 0.0))
    return rows[:limit] if limit is not None else rows
