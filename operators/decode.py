"""Decode video frames and 16 kHz mono audio for one window of a clip, with decord.

decord is kept behind these few functions (open_media / probe / decode_window) so another backend
can replace it. Notes on decord 0.6.0 that shape this code:
- AudioReader raises on files without an audio stream: such files are captioned from video alone.
- AudioReader.duration() truncates to whole seconds, so durations come from sample counts instead.
- Frame times come from the container timestamps, so variable-frame-rate files sample correctly.
"""

from __future__ import annotations

import io
import math
import os
import re
from dataclasses import dataclass

import numpy as np

from operators.tokenize import SAMPLE_RATE


class DecodeError(RuntimeError):
    """A file that exists but cannot be decoded as video."""


class NoVideoStream(DecodeError):
    """A readable container without a video stream (e.g. audio only)."""


class BadURIError(ValueError):
    """A URI that fsspec cannot resolve to a filesystem (unknown protocol, malformed)."""


@dataclass(frozen=True)
class MediaInfo:
    duration_s: float
    width: int
    height: int
    num_frames: int


@dataclass
class DecodedWindow:
    frames: np.ndarray  # (T, H, W, 3) uint8, T even
    fps: float  # effective sampling rate of `frames` (after --max-frames)
    audio: np.ndarray | None  # mono float32 at 16 kHz, None when the file has no audio stream


def open_media(uri: str):
    """A local path for local files (decord seeks itself), else the whole object in memory."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(uri)
    except ValueError as err:  # "Protocol not known: ..." and friends: the same on every rerun
        raise BadURIError(f"cannot resolve {uri!r}: {err}") from err
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    if protocol in ("file", "local"):
        if not fs.exists(path):
            raise FileNotFoundError(f"no such file: {uri}")
        if fs.isdir(path):
            raise IsADirectoryError(f"a directory, not a media file: {uri}")
        return path
    with fs.open(path, "rb") as f:
        return io.BytesIO(f.read())


def _rewind(src):
    if hasattr(src, "seek"):
        src.seek(0)
    return src


def _video_reader(src, width: int = -1, height: int = -1):
    from decord import VideoReader, cpu

    # Inside a Ray task OMP_NUM_THREADS is the task's CPU share; 0 (decord's auto) elsewhere.
    threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    try:
        return VideoReader(_rewind(src), ctx=cpu(0), width=width, height=height, num_threads=threads)
    except Exception as err:  # decord raises its own DECORDError / RuntimeError variants
        raise DecodeError(f"cannot open video stream: {_first_line(err)}") from err


def read_audio_track(src) -> np.ndarray | None:
    """The whole audio track, mono 16 kHz, or None if the file has no (decodable) audio stream."""
    from decord import AudioReader, cpu

    try:
        reader = AudioReader(_rewind(src), ctx=cpu(0), sample_rate=SAMPLE_RATE, mono=True)
    except Exception:  # no audio stream (or an undecodable one): caption from video alone
        return None
    samples = reader[:].asnumpy()
    return samples.reshape(-1).astype(np.float32) if samples.size else None


_DECORD_PREFIX = re.compile(r"^\[[\d:]+\]\s+\S+:\d+:\s*")  # "[05:53:40] /path/file.cc:292: "


def _first_line(err: Exception) -> str:
    """The readable first line of a decoder error, without decord's time-stamped source prefix."""
    text = str(err).strip().splitlines()
    return _DECORD_PREFIX.sub("", text[0])[:300] if text else type(err).__name__


def _frame_size(src) -> tuple[int, int] | None:
    """(width, height) from the container header via PyAV, without decoding a frame; None if unknown.

    Raises NoVideoStream for a container PyAV reads that has no video stream: decord's own message for
    that case ("cannot find video stream with wanted index: -1") helps nobody.
    """
    import av

    try:
        with av.open(_rewind(src)) as container:
            if not container.streams.video:
                what = "audio only" if container.streams.audio else "no audio either"
                raise NoVideoStream(f"no video stream ({what})")
            stream = container.streams.video[0]
            return int(stream.codec_context.width), int(stream.codec_context.height)
    except NoVideoStream:
        raise
    except Exception:  # PyAV may not parse what decord can: fall back to decoding one frame
        return None


def probe(src, max_pixels: int | None = None) -> tuple[MediaInfo, object]:
    """Open the video once, already resized for max_pixels, and read what windowing needs."""
    size = _frame_size(src)
    if size is None or min(size) <= 0:
        first = _video_reader(src)
        if len(first) == 0:
            raise DecodeError("video stream has no frames")
        size = first[0].shape[1], first[0].shape[0]
    width, height = fit_pixels(size[0], size[1], max_pixels)
    reader = _video_reader(src, width, height)
    if width > 0:
        try:
            reader.get_batch([0]).asnumpy()  # decord rejects some small target sizes: check, else full size
        except Exception:
            reader = _video_reader(src)
    n = len(reader)
    if n == 0:
        raise DecodeError("video stream has no frames")
    stamps = reader.get_frame_timestamp(n - 1)
    duration = float(stamps[1]) if stamps[1] > 0 else n / max(reader.get_avg_fps(), 1e-6)
    return MediaInfo(duration, int(size[0]), int(size[1]), n), reader


def plan_windows(duration_s: float, start_s: float | None, end_s: float | None, window_s: float) -> list[tuple]:
    """Split [start, end) into equal windows no longer than window_s (no tiny remainder window)."""
    start = max(0.0, start_s or 0.0)
    end = min(duration_s, end_s) if end_s is not None else duration_s
    if end <= start:
        raise DecodeError(f"empty span: start {start:.3f}s >= end {end:.3f}s (duration {duration_s:.3f}s)")
    count = max(1, math.ceil((end - start) / window_s - 1e-9))
    step = (end - start) / count
    return [(start + i * step, start + (i + 1) * step if i < count - 1 else end) for i in range(count)]


def fit_pixels(width: int, height: int, max_pixels: int | None) -> tuple[int, int]:
    """Decode size that keeps aspect ratio and stays under max_pixels (the processor does the final resize)."""
    if not max_pixels or width * height <= max_pixels:
        return -1, -1
    scale = math.sqrt(max_pixels / (width * height))
    return max(2, int(width * scale) // 2 * 2), max(2, int(height * scale) // 2 * 2)


def frame_times(start: float, end: float, fps: float, max_frames: int) -> tuple[np.ndarray, float]:
    """Sample times at `fps` (lowered if needed so at most max_frames), always an even count >= 2."""
    length = end - start
    count = max(2, int(round(length * fps / 2)) * 2)
    if count > max_frames:
        count = max(2, max_frames // 2 * 2)
    eff_fps = count / length
    return start + (np.arange(count) + 0.5) / eff_fps, eff_fps


def decode_window(reader, start: float, end: float, fps: float, max_frames: int,
                  audio_track: np.ndarray | None) -> DecodedWindow:
    """Frames (from a reader opened by probe) and the audio slice of one window."""
    times, eff_fps = frame_times(start, end, fps, max_frames)
    stamps = reader.get_frame_timestamp(np.arange(len(reader)))[:, 0]
    index = np.clip(np.searchsorted(stamps, times, side="right") - 1, 0, len(reader) - 1)
    try:
        frames = reader.get_batch(index.tolist()).asnumpy()
    except Exception as err:  # corrupt payload behind a readable container header
        raise DecodeError(f"cannot decode frames {start:.2f}-{end:.2f}s: {_first_line(err)}") from err
    audio = None
    if audio_track is not None:
        lo, hi = int(round(start * SAMPLE_RATE)), int(round(end * SAMPLE_RATE))
        audio = audio_track[lo:hi]
        if audio.size < SAMPLE_RATE // 10:  # audio ends before this window: treat as silence of full length
            audio = np.zeros(hi - lo, dtype=np.float32)
    return DecodedWindow(frames, eff_fps, audio)

