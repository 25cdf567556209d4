"""The output contract: one pyarrow schema, versioned. Every other module refers to these names.

Bump SCHEMA_VERSION when a column is removed or changes meaning; adding a nullable column at the end
is backwards compatible and keeps the version.
"""

from __future__ import annotations

import pyarrow as pa

# 2: `engine`, `pruner_weights_version`; prefill_ms / generate_ms as each engine splits its time.
# 3: `video_width`, `video_height`; frames are the picture as displayed (a rotated or mirrored video's display
#    matrix applied; earlier versions squeezed a rotated picture into its stored, unrotated size).
# 4: audio-only inputs are captioned (`has_video` false, `video_tokens` 0, no frame columns); error_kind
#    "no_streams" for a file with neither stream ("no_video", which audio-only files got before, is retried).
SCHEMA_VERSION = "4"

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
    # Added for resume and scheduled reprocessing (nullable: rows written before them read as null).
    pa.field("n_windows", pa.int32()),  # windows of this source under this config: completeness is decidable
    pa.field("source_size", pa.int64()),  # the input file as listed (fsspec info): size in bytes,
    pa.field("source_mtime", pa.float64()),  # modification time (seconds since the epoch),
    pa.field("source_etag", pa.string()),  # and ETag / content hash where the store has one
    pa.field("source_version", pa.string()),  # hash of size, mtime and etag: a new version is recaptioned
    pa.field("video_frames", pa.int32()),  # frames given to the model (fewer if the token cap lowered fps)
    pa.field("video_fps", pa.float64()),  # their effective sampling rate
    pa.field("run_id", pa.string()),  # the run that wrote the row
    pa.field("created_at", pa.timestamp("ms", tz="UTC")),  # when; the newest row of a window wins on read
    # Fingerprint of the checkpoint's files (operators/models/fingerprint.py): a rerun after the model at the
    # same path or hub id was retrained or updated captions again. Null in rows written before it existed.
    pa.field("model_version", pa.string()),
    # True when generation stopped at max_new_tokens before the model ended the caption: the caption is cut
    # short (raise --max-new-tokens). Null in rows written before it existed.
    pa.field("caption_truncated", pa.bool_()),
    # Schema version 2: which engine wrote the caption, "hf" or "vllm" (operators/engines). Null in earlier rows.
    pa.field("engine", pa.string()),
    # Schema version 2: the captioner fingerprint a trained pruner's weights were made for (null for untrained
    # methods and weights that record none). Equal to model_version unless --allow-foreign-pruner-weights.
    pa.field("pruner_weights_version", pa.string()),
    # Schema version 3: width and height in pixels of the frames the vision encoder got (the processor's resize
    # of the picture as displayed: a portrait phone video is taller than wide). Null in error rows and earlier rows.
    pa.field("video_width", pa.int32()),
    pa.field("video_height", pa.int32()),
    # Schema version 4: whether the window had a picture (false: captioned from its sound alone, an audio-only
    # input). Null in error rows and in earlier rows.
    pa.field("has_video", pa.bool_()),
])

# error_kind values, and whether a rerun retries them by default (transient) or keeps them (deterministic:
# the same input fails the same way; `--retry-errors` retries those too). A changed input is always redone.
ERROR_KINDS = {
    "missing": False,  # no such file (a file that appears later has a new source_version)
    "unreadable": False,  # permission denied, a directory, ...
    "bad_uri": False,  # a URI fsspec cannot parse (unknown protocol)
    "decode": False,  # not a video, truncated, corrupt payload, empty span
    "no_streams": False,  # a container with neither a video nor an audio stream
    "no_video": True,  # written before schema 4 for audio-only files, which are captioned now: retried
    "too_long": False,  # audio + text alone exceed max_prompt_tokens
    "tokenize": False,  # the processor rejected the decoded window
    "io": True,  # a read that failed midway (network, storage)
    "timeout": True,  # decode + tokenize of a window exceeded --decode-timeout-s
    "crash": True,  # a helper or caption process died while working on the window (twice)
    "model": True,  # the model raised on this window (twice)
    "oom": True,  # out of memory in the model
    "internal": True,  # anything else: a bug or a passing condition
}
TRANSIENT_ERROR_KINDS = frozenset(kind for kind, transient in ERROR_KINDS.items() if transient)

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
