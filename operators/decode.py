"""Decode video frames and 16 kHz mono audio for one window of a clip, with decord.

decord is kept behind these few functions (open_media / probe / decode_window) so another backend
can replace it. Notes on decord 0.6.0 that shape this code:
- AudioReader raises on files without an audio stream: such files are captioned from video alone. Files
  without a video stream (PyAV says which) are captioned from their audio alone (`probe_audio_only`).
- AudioReader.duration() truncates to whole seconds, so durations come from sample counts instead.
- Frame times come from the container timestamps, so variable-frame-rate files sample correctly.
- It turns rotated videos (a display matrix, as phones write) by the matrix's angle but drops a mirror in
  it, only where its own FFmpeg 4.1 reads the matrix (MP4/MOV, not Matroska/WebM), and a requested
  width x height is the size of its output: sizes are computed here from the displayed picture, and what
  decord did not do is done to its frames (`Orientation`, `_decord_turn`, `VideoFrames`).
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
    """A readable container with an audio stream and no video stream: captioned from its audio alone."""


class NoMediaStream(DecodeError):
    """A readable container with neither a video nor an audio stream (subtitles, data, nothing)."""


class BadURIError(ValueError):
    """A URI that fsspec cannot resolve to a filesystem (unknown protocol, malformed)."""


@dataclass(frozen=True)
class Orientation:
    """How a stored picture is shown, from the stream's display matrix (right angles and mirrors only).

    FFmpeg's convention, entries -1, 0 or 1: a stored pixel (x, y) is displayed at (a*x + c*y, b*x + d*y),
    shifted back into the picture (x to the right, y down). The identity is a picture shown as stored.
    """

    a: int = 1
    b: int = 0
    c: int = 0
    d: int = 1

    @classmethod
    def from_matrix(cls, matrix) -> "Orientation":
        """From the 9 int32 of an AV_PKT_DATA_DISPLAYMATRIX (16.16 fixed point); a matrix that is not a right
        angle (possibly mirrored) is shown as stored."""
        a, b, _, c, d = (int(v) for v in list(matrix)[:5])
        if (a == 0 and d == 0 and b and c) or (b == 0 and c == 0 and a and d):
            return cls(*(int(np.sign(v)) for v in (a, b, c, d)))
        return cls()

    @property
    def swaps_axes(self) -> bool:
        return self.a == 0

    @property
    def is_identity(self) -> bool:
        return self == Orientation()

    def displayed_size(self, width: int, height: int) -> tuple[int, int]:
        return (height, width) if self.swaps_axes else (width, height)

    def then(self, other: "Orientation") -> "Orientation":
        """This transform followed by `other` (row vectors: the matrix product self @ other)."""
        return Orientation(self.a * other.a + self.b * other.c, self.a * other.b + self.b * other.d,
                           self.c * other.a + self.d * other.c, self.c * other.b + self.d * other.d)

    def inverse(self) -> "Orientation":
        return Orientation(self.a, self.c, self.b, self.d)  # signed permutations: the inverse is the transpose

    def turn_only(self) -> "Orientation":
        """The pure rotation by this matrix's angle (FFmpeg's av_display_rotation_get), mirror dropped: what
        decord 0.6.0 applies where it reads the matrix."""
        return Orientation(self.a, self.b, -self.b, self.a)

    def apply(self, frames: np.ndarray) -> np.ndarray:
        """(T, H, W, C) stored frames -> displayed frames (a view; C-contiguous only when unchanged)."""
        if self.swaps_axes:  # row index = stored x, column index = stored y
            frames = frames.swapaxes(1, 2)
            flip_x, flip_y = self.c < 0, self.b < 0
        else:
            flip_x, flip_y = self.a < 0, self.d < 0
        if flip_y:
            frames = frames[:, ::-1]
        if flip_x:
            frames = frames[:, :, ::-1]
        return frames

    def describe(self) -> str:
        """e.g. "rotate 90" (counter-clockwise, as FFmpeg and PyAV's set_display_rotation count) or
        "rotate 90, then mirror left-right"."""
        mirrored = self.a * self.d - self.b * self.c < 0
        turn = self.then(Orientation(-1, 0, 0, 1)) if mirrored else self
        angle = int(round(np.degrees(np.arctan2(-turn.b, turn.a)))) % 360
        return f"rotate {angle}" + (", then mirror left-right" if mirrored else "")


IDENTITY = Orientation()


@dataclass(frozen=True)
class MediaInfo:
    duration_s: float
    width: int  # the picture as displayed (stored size turned by the display matrix)
    height: int
    num_frames: int
    orientation: Orientation = IDENTITY  # stored -> displayed


class VideoFrames:
    """decord's reader and the fix that turns its frames into the displayed picture (decord drops a display
    matrix's mirror, and in some containers the whole matrix)."""

    def __init__(self, reader, fix: Orientation = IDENTITY):
        self.reader = reader
        self.fix = fix

    def __len__(self) -> int:
        return len(self.reader)

    def get_frame_timestamp(self, index):
        return self.reader.get_frame_timestamp(index)

    def get_avg_fps(self) -> float:
        return self.reader.get_avg_fps()

    def frames(self, index: list[int]) -> np.ndarray:
        frames = self.reader.get_batch(index).asnumpy()
        return frames if self.fix.is_identity else np.ascontiguousarray(self.fix.apply(frames))


@dataclass
class DecodedWindow:
    frames: np.ndarray | None  # (T, H, W, 3) uint8, T even, the picture as displayed; None for audio-only input
    fps: float  # effective sampling rate of `frames` (after --max-frames); 0 without frames
    audio: np.ndarray | None  # mono float32 at 16 kHz, None when the file has no audio stream

    @property
    def has_video(self) -> bool:
        return self.frames is not None

    @property
    def frame_count(self) -> int:
        return len(self.frames) if self.frames is not None else 0


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


@dataclass(frozen=True)
class StreamHeader:
    """What PyAV reads of the first video stream: its stored size and display matrix, and for a turned or
    mirrored stream a small square thumbnail of the stored first frame and whether the container is one that
    decord's own FFmpeg (4.1) reads display matrices from (MP4/MOV)."""

    width: int
    height: int
    orientation: Orientation = IDENTITY
    thumbnail: np.ndarray | None = None  # (THUMB, THUMB, 3) float32, stored orientation, squeezed
    mov_family: bool = False


THUMB = 64  # side of the square first-frame thumbnails that tell whether decord turned a stream


def _stream_header(src) -> StreamHeader | None:
    """The first video stream's header via PyAV; None if PyAV cannot read it.

    The size comes from the container header. The display matrix is read from the first decoded frame
    (PyAV does not expose a stream's side data; FFmpeg copies it onto every frame); a stream whose first
    frame does not decode here counts as not rotated.

    Raises NoVideoStream for a container PyAV reads that has no video stream (cover art does not count:
    such a file is captioned from its sound) and NoMediaStream for one with no audio stream either.
    """
    import av

    try:
        with av.open(_rewind(src)) as container:
            # Cover art in music and podcast files is a one-picture "video" stream: not a video.
            moving = [v for v in container.streams.video if not v.disposition & av.stream.Disposition.attached_pic]
            if not moving:
                if not container.streams.audio:
                    raise NoMediaStream("neither a video nor an audio stream")
                raise NoVideoStream("no video stream (audio only)")
            stream = moving[0]
            width, height = int(stream.codec_context.width), int(stream.codec_context.height)
            stream.codec_context.thread_count = 1  # one frame: threads would only add latency
            try:
                frame = next(container.decode(stream), None)
            except Exception:  # a payload PyAV cannot decode: decord reports it, if it cannot either
                frame = None
            orientation = _display_orientation(frame)
            if orientation.is_identity:
                return StreamHeader(width, height)
            thumbnail = frame.reformat(width=THUMB, height=THUMB, format="rgb24").to_ndarray().astype(np.float32)
            return StreamHeader(width, height, orientation, thumbnail, "mov" in container.format.name.split(","))
    except (NoVideoStream, NoMediaStream):
        raise
    except Exception:  # PyAV may not parse what decord can: fall back to decoding one frame
        return None


def _display_orientation(frame) -> Orientation:
    for data in frame.side_data if frame is not None else ():
        if data.type.name == "DISPLAYMATRIX":
            return Orientation.from_matrix(np.frombuffer(bytes(data), dtype=np.int32))
    return IDENTITY


def _decord_turn(src, header: StreamHeader) -> Orientation:
    """The turn decord applies to this stream's frames: its matrix's angle where decord's FFmpeg 4.1 reads
    the matrix (MP4/MOV), none where only a newer FFmpeg finds one (Matroska, WebM, a codec's own
    orientation message). Checked on the first frame: decord's, squeezed to a square, against PyAV's turned
    and as stored; a first frame that looks alike either way (one colour) goes by the container."""
    turn = header.orientation.turn_only()
    if turn.is_identity:  # an upside-down mirror: angle 0, nothing for decord to do
        return IDENTITY
    guess = turn if header.mov_family else IDENTITY
    if header.thumbnail is None:
        return guess
    try:
        seen = _video_reader(src, THUMB, THUMB).get_batch([0]).asnumpy()[0].astype(np.float32)
    except Exception:  # decord cannot open or decode it: probe reports that
        return guess
    if seen.shape != header.thumbnail.shape:
        return guess
    turned = np.abs(seen - turn.apply(header.thumbnail[None])[0]).mean()
    as_stored = np.abs(seen - header.thumbnail).mean()
    if abs(turned - as_stored) < 3.0:  # grey levels: scaler differences are about 1
        return guess
    return turn if turned < as_stored else IDENTITY


def probe(src, max_pixels: int | None = None) -> tuple[MediaInfo, VideoFrames]:
    """Open the video once, already resized for max_pixels in the displayed orientation, and read what
    windowing needs."""
    header = _stream_header(src)
    if header is None or min(header.width, header.height) <= 0:
        first = _video_reader(src)
        if len(first) == 0:
            raise DecodeError("video stream has no frames")
        size, orientation, fix = (first[0].shape[1], first[0].shape[0]), IDENTITY, IDENTITY  # as decord shows it
    else:
        orientation = header.orientation
        size = orientation.displayed_size(header.width, header.height)
        # decord shows the stored picture turned by `turn`; `fix` takes that to the displayed picture.
        turn = _decord_turn(src, header) if not orientation.is_identity else IDENTITY
        fix = turn.inverse().then(orientation)
    width, height = fit_pixels(size[0], size[1], max_pixels)
    ask = (height, width) if fix.swaps_axes else (width, height)  # decord's size: before `fix`
    reader = _video_reader(src, *ask)
    if width > 0:
        # decord rejects some small target sizes, and returns garbage for a few narrow widths (48: a
        # 4-channel array): check, else full size (the processor does the final resize).
        try:
            ok = reader.get_batch([0]).asnumpy().shape[1:] == (ask[1], ask[0], 3)
        except Exception:
            ok = False
        if not ok:
            reader = _video_reader(src)
    n = len(reader)
    if n == 0:
        raise DecodeError("video stream has no frames")
    stamps = reader.get_frame_timestamp(n - 1)
    duration = float(stamps[1]) if stamps[1] > 0 else n / max(reader.get_avg_fps(), 1e-6)
    return MediaInfo(duration, int(size[0]), int(size[1]), n, orientation), VideoFrames(reader, fix)


def probe_audio_only(src) -> tuple[MediaInfo, np.ndarray]:
    """An input without a video stream: its whole audio track (mono 16 kHz) and its duration, from the
    sample count. Raises DecodeError when the audio stream does not decode to any samples."""
    track = read_audio_track(src)
    if track is None or track.size < SAMPLE_RATE // 10:
        raise DecodeError("audio-only input whose audio stream does not decode (or lasts under 0.1 s)")
    return MediaInfo(track.size / SAMPLE_RATE, 0, 0, 0), track


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


def frame_times(start: float, end: float, fps: float, max_frames: int,
                step_quantum_s: float = 0.0) -> tuple[np.ndarray, float]:
    """Sample times at `fps` (lowered if needed so at most max_frames), always an even count >= 2, spread
    over the window. With step_quantum_s, the time a frame pair spans is cut down to whole quanta (the rate
    rises a little; the last frames then end up to a quantum a pair before the window's end)."""
    length = end - start
    count = max(2, int(round(length * fps / 2)) * 2)
    if count > max_frames:
        count = max(2, max_frames // 2 * 2)
    eff_fps = count / length
    if step_quantum_s > 0:
        step = max(1, int(2 / eff_fps / step_quantum_s + 1e-9)) * step_quantum_s
        eff_fps = 2 / step
    return start + (np.arange(count) + 0.5) / eff_fps, eff_fps


def decode_window(reader: VideoFrames | None, start: float, end: float, fps: float, max_frames: int,
                  audio_track: np.ndarray | None, step_quantum_s: float = 0.0) -> DecodedWindow:
    """Frames (from a reader opened by probe, as displayed) and the audio slice of one window; no frames
    for an audio-only input (reader None). step_quantum_s: see frame_times."""
    if reader is None:
        lo, hi = int(round(start * SAMPLE_RATE)), int(round(end * SAMPLE_RATE))
        return DecodedWindow(None, 0.0, audio_track[lo:hi])
    times, eff_fps = frame_times(start, end, fps, max_frames, step_quantum_s)
    stamps = reader.get_frame_timestamp(np.arange(len(reader)))[:, 0]
    index = np.clip(np.searchsorted(stamps, times, side="right") - 1, 0, len(reader) - 1)
    try:
        frames = reader.frames(index.tolist())
    except Exception as err:  # corrupt payload behind a readable container header
        raise DecodeError(f"cannot decode frames {start:.2f}-{end:.2f}s: {_first_line(err)}") from err
    audio = None
    if audio_track is not None:
        lo, hi = int(round(start * SAMPLE_RATE)), int(round(end * SAMPLE_RATE))
        audio = audio_track[lo:hi]
        if audio.size < SAMPLE_RATE // 10:  # audio ends before this window: treat as silence of full length
            audio = np.zeros(hi - lo, dtype=np.float32)
    return DecodedWindow(frames, eff_fps, audio)

