"""CPU stage: one manifest row -> one row per window, decoded and tokenized (or an error row).

Decode and tokenize run back to back inside one task so raw frames never enter Ray's object store;
only the processor's tensors (one safetensors blob) travel to the caption actors.

- Windows listed in the row's `done_windows` (clip ids already written under this configuration) are
  not decoded again: a resumed run only does what is missing.
- A window whose prompt would exceed `max_prompt_tokens` is resampled with fewer frames (then smaller
  frames) until it fits, instead of failing in the model.
- With `decode_timeout_s`, the work runs in a helper process (operators/isolate.py) that is killed when
  a window takes longer: a decoder stuck in a C call becomes an error row, not a stuck job.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Iterator

from operators import decode as dec
from operators import faults
from operators import tokenize as tok
from operators.schema import SCHEMA_VERSION
from operators.sources import VERSION_FIELDS, stat_version, window_id


@dataclass(frozen=True)
class PrepareSettings:
    model: str  # resolved model source (for the processor)
    prompt: str
    fps: float = 2.0
    max_frames: int = 64
    max_pixels: int | None = None
    min_pixels: int | None = None
    window_s: float = 30.0
    max_prompt_tokens: int | None = None  # None = no cap
    decode_timeout_s: float | None = None  # per window; None = decode in this process
    window_form: str = "tensors"  # what caption actors get: processor tensors, or the compact window (window_form())


class TooLongError(ValueError):
    """Audio and text alone exceed the prompt token cap: fewer frames cannot help."""


class DecodeTimeout(TimeoutError):
    """Decoding a window did not finish in time (the helper process was killed)."""


class HelperCrash(RuntimeError):
    """The decode helper process died (a crashing decoder, out of memory)."""


def classify_error(err: BaseException) -> str:
    """error_kind of an exception; operators/schema.py ERROR_KINDS says which kinds a rerun retries."""
    checks = ((FileNotFoundError, "missing"), ((PermissionError, IsADirectoryError), "unreadable"),
              (dec.BadURIError, "bad_uri"), (dec.NoMediaStream, "no_streams"), (TooLongError, "too_long"),
              (dec.DecodeError, "decode"), (TimeoutError, "timeout"), (HelperCrash, "crash"), (OSError, "io"))
    return next((kind for cls, kind in checks if isinstance(err, cls)), "internal")


def error_text(err: BaseException) -> str:
    message = str(err).strip().splitlines()
    return f"{type(err).__name__}: {message[0][:500] if message else ''}".rstrip(": ")


PREPARED_COLUMNS = ("clip_id", "source_id", "uri", "window_index", "start_s", "end_s", "prompt", "status",
                    "error", "error_kind", "has_audio", "has_video", "decode_ms", "model_inputs", "schema_version",
                    "n_windows", *VERSION_FIELDS, "video_frames", "video_fps", "video_width", "video_height")


def complete(row: dict) -> dict:
    """Every prepared row carries the same columns (Ray blocks need a uniform schema)."""
    return {name: row.get(name) for name in PREPARED_COLUMNS}


def _base(row: dict) -> dict:
    return {"source_id": row["source_id"], "uri": row["uri"], "prompt": row.get("prompt"),
            "schema_version": SCHEMA_VERSION, **{k: row.get(k) for k in VERSION_FIELDS}}


def error_row(row: dict, err: BaseException, kind: str | None = None, index: int = 0,
              span: tuple | None = None) -> dict:
    """The single row of a source that could not be opened (its windows are unknown)."""
    start, end = span if span else (row.get("start_s"), row.get("end_s"))
    return complete({
        **_base(row),
        "clip_id": window_id(row.get("clip_id"), row["uri"], start or 0.0, end or -1.0, 1, index),
        "window_index": index, "start_s": start, "end_s": end, "status": "error", "n_windows": 1,
        "error": error_text(err), "error_kind": kind or classify_error(err), "model_inputs": b"",
    })


@dataclass(frozen=True)
class PlannedWindow:
    index: int
    clip_id: str
    start: float
    end: float
    n_windows: int


def window_error(row: dict, window: PlannedWindow, err: BaseException, kind: str | None = None) -> dict:
    """An error row for one planned window (its id and span are known)."""
    return complete({**_base(row), "clip_id": window.clip_id, "window_index": window.index,
                     "start_s": window.start, "end_s": window.end, "n_windows": window.n_windows,
                     "status": "error", "error": error_text(err), "error_kind": kind or classify_error(err),
                     "model_inputs": b""})


def done_windows(row: dict) -> set[str]:
    done = row.get("done_windows")  # a list, or a numpy array when Ray hands the row over
    return set(done) if done is not None else set()


def open_streams(src, max_pixels: int | None):
    """(MediaInfo, frame reader or None, whole audio track or None) of one input: a video with or without
    sound, or sound alone (no reader)."""
    try:
        info, reader = dec.probe(src, max_pixels)
    except dec.NoVideoStream:
        info, audio_track = dec.probe_audio_only(src)
        return info, None, audio_track
    return info, reader, dec.read_audio_track(src)


def prepare_events(row: dict, settings: PrepareSettings) -> Iterator[tuple[str, object]]:
    """("plan", [PlannedWindow, ...]) once the source is open (the windows still to do), then ("row", row)
    per window; a source that cannot be opened gives a single ("row", error_row). Never raises."""
    if row.get("source_version") is None:  # a manifest entry nobody has stat-ed yet (operators/sources.py)
        row = {**row, **stat_version(row["uri"])}
    try:
        t0 = time.perf_counter()
        src = dec.open_media(row["uri"])
        info, reader, audio_track = open_streams(src, settings.max_pixels)
        spans = dec.plan_windows(info.duration_s, row.get("start_s"), row.get("end_s"), settings.window_s)
        processor = _processor(settings.model)
        open_s = time.perf_counter() - t0
    except Exception as err:  # noqa: BLE001 - every failure is reported as a row
        yield "row", error_row(row, err)
        return
    skip = done_windows(row)
    plan = [PlannedWindow(i, window_id(row.get("clip_id"), row["uri"], s, e, len(spans), i), s, e, len(spans))
            for i, (s, e) in enumerate(spans)]
    plan = [w for w in plan if w.clip_id not in skip]
    yield "plan", plan
    for window in plan:
        yield "row", prepare_window(row, window, reader, audio_track, processor, settings,
                                    open_s / len(spans))


def prepare_window(row: dict, window: PlannedWindow, reader, audio_track, processor, settings: PrepareSettings,
                   open_share_s: float = 0.0) -> dict:
    out = {**_base(row), "window_index": window.index, "start_s": window.start, "end_s": window.end,
           "clip_id": window.clip_id, "n_windows": window.n_windows}
    t0 = time.perf_counter()
    stage = "decode"
    try:
        prompt = row.get("prompt") or settings.prompt
        tensors, decoded, max_pixels = _fit_window(reader, audio_track, processor, window, prompt, settings)
        stage = "tokenize"
        if settings.window_form == "compact":
            blob = tok.pack_compact(tensors["input_ids"], decoded.frames, decoded.fps, decoded.audio,
                                    tok.build_prompt(processor, prompt, decoded.has_video),
                                    tok.video_size(processor, max_pixels, settings.min_pixels))
        else:
            blob = tok.pack(tensors)
        width, height = model_frame_size(processor, tensors)
        out.update(status="ok", has_audio=decoded.audio is not None, has_video=decoded.has_video,
                   model_inputs=blob, video_frames=decoded.frame_count,
                   video_fps=float(decoded.fps) if decoded.has_video else None,
                   video_width=width, video_height=height,
                   decode_ms=1000 * (time.perf_counter() - t0 + open_share_s))
    except Exception as err:  # noqa: BLE001
        kind = "tokenize" if stage == "tokenize" or isinstance(err, _TokenizeError) else classify_error(err)
        out.update(status="error", error=error_text(err.__cause__ if isinstance(err, _TokenizeError) else err),
                   error_kind=kind, model_inputs=b"")
    return complete(out)


def model_frame_size(processor, tensors) -> tuple[int | None, int | None]:
    """(width, height) in pixels of the frames the vision encoder gets: the processor's resize of the
    decoded frames (the picture as displayed), read from its patch grid. Both engines resize alike.
    (None, None) for a window without video."""
    if "video_grid_thw" not in tensors:
        return None, None
    _, rows, cols = (int(v) for v in tensors["video_grid_thw"].reshape(-1, 3)[0])
    patch = int(processor.video_processor.patch_size)
    return cols * patch, rows * patch


class _TokenizeError(Exception):
    """Wraps a processor failure so it is reported as error_kind "tokenize"."""


MAX_FIT_ATTEMPTS = 6


def _fit_window(reader, audio_track, processor, window: PlannedWindow, prompt: str, settings: PrepareSettings):
    """Decode + tokenize one window; if the prompt exceeds max_prompt_tokens, lower the frame count in
    proportion (then the frame size, once only two frames are left) and try again. Returns the
    processor's tensors, the decoded window and the frame-size bound that fitted."""
    max_frames, max_pixels = settings.max_frames, settings.max_pixels
    cap = settings.max_prompt_tokens
    for _ in range(MAX_FIT_ATTEMPTS):
        decoded = _whole_feature_frames(dec.decode_window(reader, window.start, window.end, settings.fps, max_frames,
                                                          audio_track, grid_step_quantum_s(processor)), processor)
        try:
            tensors = tok.model_inputs(processor, decoded.frames, decoded.fps, decoded.audio, prompt, max_pixels,
                                       settings.min_pixels)
        except Exception as err:  # noqa: BLE001
            raise _TokenizeError(str(err)) from err
        total = int(tensors["input_ids"].shape[-1])
        if not cap or total <= cap:
            return tensors, decoded, max_pixels
        frames = decoded.frame_count
        video = _video_tokens(processor, tensors)
        room = cap - (total - video)  # what is left for video after audio and text
        if room <= 0 or video == 0:
            raise TooLongError(f"{total - video} audio+text tokens exceed max_prompt_tokens={cap}")
        if frames > 2:  # fewer frames first: keeps detail, lowers the sampling rate
            max_frames = min(frames - 2, max(2, int(frames * room / video) // 2 * 2))
        else:  # two frames already: shrink them (token count scales with pixels)
            pixels = max_pixels or int(decoded.frames.shape[1] * decoded.frames.shape[2])
            max_pixels = max(28 * 28, int(pixels * room / video * 0.9))
    raise TooLongError(f"window still above max_prompt_tokens={cap} after {MAX_FIT_ATTEMPTS} attempts")


def grid_step_quantum_s(processor) -> float:
    """Qwen3-Omni: the seconds of one time position id (1/13 s). Its positions keep a video's time in those
    ids as the product of the seconds a frame pair spans and ids a second, as floats, where vLLM holds whole
    numbers only; frame rates whose pair spans whole ids (2 and 1 frames per second among them) keep both
    engines exact. Other models: 0 (transformers' Qwen2.5-Omni positions round the time ids themselves)."""
    from operators.models.qwen3_omni import is_qwen3_omni_processor

    return 1.0 / processor.position_id_per_seconds if is_qwen3_omni_processor(processor) else 0.0


def _whole_feature_frames(decoded: dec.DecodedWindow, processor) -> dec.DecodedWindow:
    """Qwen3-Omni: the window's sound cut to whole feature frames (qwen3_omni.whole_feature_frames), once,
    so the HF tensors and the vLLM engine's compact window hold the same samples. Other models: as is."""
    from operators.models.qwen3_omni import is_qwen3_omni_processor, whole_feature_frames

    if decoded.audio is None or not is_qwen3_omni_processor(processor):
        return decoded
    return replace(decoded, audio=whole_feature_frames(decoded.audio, processor))


def _video_tokens(processor, tensors) -> int:
    token = getattr(processor, "video_token", "<|VIDEO|>")
    video_id = processor.tokenizer.convert_tokens_to_ids(token)
    return int((tensors["input_ids"] == video_id).sum())


def prepare_local(row: dict, settings: PrepareSettings) -> Iterator[dict]:
    for kind, payload in prepare_events(row, settings):
        if kind == "row":
            yield payload


def prepare_windows(row: dict, settings: PrepareSettings) -> Iterator[dict]:
    """Yield one row per window of `row` still to do. Never raises: failures become status='error' rows."""
    faults.on_prepare(row)  # tests only (operators/faults.py): nothing unless AVSIEVE_FAULT_* is set
    if settings.decode_timeout_s:
        from operators.isolate import prepare_isolated

        yield from prepare_isolated(row, settings)
    else:
        yield from prepare_local(row, settings)


def _processor(model: str):
    from operators.models.qwen2_5_omni import load_processor

    return load_processor(model)
