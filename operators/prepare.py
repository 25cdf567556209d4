"""CPU stage: one manifest row -> one row per window, decoded and tokenized (or an error row).

Decode and tokenize run back to back inside one task so raw frames never enter Ray's object store;
only the processor's tensors (one safetensors blob) travel to the caption actors.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

from operators import decode as dec
from operators import tokenize as tok
from operators.schema import SCHEMA_VERSION
from operators.sources import window_id


@dataclass(frozen=True)
class PrepareSettings:
    model: str  # resolved model source (for the processor)
    prompt: str
    fps: float = 2.0
    max_frames: int = 64
    max_pixels: int | None = None
    min_pixels: int | None = None
    window_s: float = 30.0


def classify_error(err: BaseException) -> str:
    if isinstance(err, FileNotFoundError):
        return "missing"
    if isinstance(err, PermissionError):
        return "unreadable"
    if isinstance(err, dec.DecodeError):
        return "decode"
    if isinstance(err, OSError):
        return "io"
    return "internal"


def error_text(err: BaseException) -> str:
    message = str(err).strip().splitlines()
    return f"{type(err).__name__}: {message[0][:500] if message else ''}".rstrip(": ")


PREPARED_COLUMNS = ("clip_id", "source_id", "uri", "window_index", "start_s", "end_s", "prompt", "status",
                    "error", "error_kind", "has_audio", "decode_ms", "model_inputs", "schema_version")


def complete(row: dict) -> dict:
    """Every prepared row carries the same columns (Ray blocks need a uniform schema)."""
    return {name: row.get(name) for name in PREPARED_COLUMNS}


def _base(row: dict) -> dict:
    return {"source_id": row["source_id"], "uri": row["uri"], "prompt": row.get("prompt"),
            "schema_version": SCHEMA_VERSION}


def error_row(row: dict, err: BaseException, kind: str | None = None, index: int = 0,
              span: tuple | None = None) -> dict:
    start, end = span if span else (row.get("start_s"), row.get("end_s"))
    return {
        **_base(row),
        "clip_id": window_id(row.get("clip_id"), row["uri"], start or 0.0, end or -1.0, 1, index),
        "window_index": index, "start_s": start, "end_s": end, "status": "error",
        "error": error_text(err), "error_kind": kind or classify_error(err), "model_inputs": b"",
    }


def prepare_windows(row: dict, settings: PrepareSettings) -> Iterator[dict]:
    """Yield one row per window of `row`. Never raises: failures become status='error' rows."""
    try:
        t0 = time.perf_counter()
        src = dec.open_media(row["uri"])
        info, reader = dec.probe(src, settings.max_pixels)
        spans = dec.plan_windows(info.duration_s, row.get("start_s"), row.get("end_s"), settings.window_s)
        audio_track = dec.read_audio_track(src)
        processor = _processor(settings.model)
        open_s = time.perf_counter() - t0
    except Exception as err:  # noqa: BLE001 - every failure is reported as a row
        yield complete(error_row(row, err))
        return
    for index, (start, end) in enumerate(spans):
        out = {**_base(row), "window_index": index, "start_s": start, "end_s": end,
               "clip_id": window_id(row.get("clip_id"), row["uri"], start, end, len(spans), index)}
        t0 = time.perf_counter()
        stage = "decode"
        try:
            window = dec.decode_window(reader, start, end, settings.fps, settings.max_frames, audio_track)
            stage = "tokenize"
            tensors = tok.model_inputs(processor, window.frames, window.fps, window.audio, row.get("prompt")
                                       or settings.prompt, settings.max_pixels, settings.min_pixels)
            out.update(status="ok", has_audio=window.audio is not None, model_inputs=tok.pack(tensors),
                       decode_ms=1000 * (time.perf_counter() - t0 + open_s / len(spans)))
        except Exception as err:  # noqa: BLE001
            kind = "tokenize" if stage == "tokenize" else classify_error(err)
            out.update(status="error", error=error_text(err), error_kind=kind, model_inputs=b"")
        yield complete(out)


def _processor(model: str):
    from operators.models.qwen2_5_omni import load_processor

    return load_processor(model)
