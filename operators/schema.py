"""The output contract: one pyarrow schema, versioned. Every other module refers to these names.

Bump SCHEMA_VERSION when a column is removed or changes meaning; adding a nullable column at the end
is backwards compatible and keeps the version.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = "1"

OUTPUT_SCHEMA = pa.schema([
    pa.field("clip_id", pa.string(), nullable=False),  # hash of (uri, window); stable across runs
    pa.field("source_id", pa.string()),  # hash of the input row (uri + requested span)
    pa.field("uri", pa.string()),
    pa.field("window_index", pa.int32()),
    pa.field("start_s", pa.float64()),
    pa.field("end_s", pa.float64()),
    pa.field("prompt", pa.string()),
    pa.field("caption", pa.string()),
    pa.field("status", pa.string(), nullable=False),  # "ok" or "error"
    pa.field("error", pa.string()),  # readable message when status == "error"
    pa.field("error_kind", pa.string()),  # short class of the error (e.g. "decode", "missing", "model")
    pa.field("model", pa.string()),
    pa.field("pruner", pa.string()),
    pa.field("budget", pa.string()),  # "fixed" or "adaptive"
    pa.field("retention_target", pa.float64()),
    pa.field("has_audio", pa.bool_()),
    pa.field("text_tokens", pa.int32()),
    pa.field("video_tokens", pa.int32()),
    pa.field("audio_tokens", pa.int32()),
    pa.field("video_tokens_kept", pa.int32()),
    pa.field("audio_tokens_kept", pa.int32()),
    pa.field("output_tokens", pa.int32()),
    pa.field("prefill_flops", pa.float64()),  # analytic LLM prefill FLOPs for this window
    pa.field("decode_ms", pa.float64()),  # CPU decode + tokenize time of this window
    pa.field("prefill_ms", pa.float64()),  # encoders + LLM prefill (batch time split across rows)
    pa.field("generate_ms", pa.float64()),  # token-by-token decoding (batch time split across rows)
    pa.field("config_hash", pa.string()),  # hash of the run configuration that produced the row
    pa.field("schema_version", pa.string()),
])

COLUMNS = OUTPUT_SCHEMA.names


def empty_row() -> dict:
    return {name: None for name in COLUMNS}


def conform(rows: list[dict]) -> pa.Table:
    """Build a table with exactly OUTPUT_SCHEMA from row dicts (missing keys become null)."""
    for row in rows:
        if not row.get("clip_id") or row.get("status") not in ("ok", "error"):
            raise ValueError(f"output row needs a clip_id and status ok/error, got {row.get('clip_id')!r}, "
                             f"{row.get('status')!r}")
    columns = {name: [row.get(name) for row in rows] for name in COLUMNS}
    return pa.Table.from_pydict(columns, schema=OUTPUT_SCHEMA)
