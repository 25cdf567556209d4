"""A corpus of awkward and broken inputs, written with PyAV, and what the caption job must make of each.

Every file is tiny (seconds long, small frames) except where size is the point, and even then cheap:
the "very long" clip is 10 minutes at 1 fps and 32x32, the "very high resolution" one is two 4096x2160
frames. `make_corpus(folder)` writes them all; `EXPECTED` says what each must yield with window_s=30.
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

import media


def _frame(index: int, width: int, height: int) -> np.ndarray:
    """A gradient that moves with the frame index (cheap at any size)."""
    x = (np.arange(width, dtype=np.uint16)[None, :] + 7 * index) % 256
    y = (np.arange(height, dtype=np.uint16)[:, None] + 3 * index) % 256
    rgb = np.empty((height, width, 3), np.uint8)
    rgb[..., 0] = x
    rgb[..., 1] = y
    rgb[..., 2] = (index * 40) % 256
    return rgb


def write_media(path: str | Path, *, container: str | None = None, vcodec: str | None = "mpeg4",
                acodec: str | None = "aac", seconds: float = 2.0, fps: int = 10, size: tuple[int, int] = (96, 64),
                frame_times: list[float] | None = None, layout: str = "mono", rate: int = 16_000,
                sample_fmt: str = "fltp", silent: bool = False, pix_fmt: str = "yuv420p") -> Path:
    """One media file. frame_times (seconds) overrides the constant frame rate (variable frame rate)."""
    path = Path(path)
    with av.open(str(path), mode="w", format=container) as out:
        video = audio = None
        if vcodec:
            video = out.add_stream(vcodec, rate=fps)
            video.width, video.height = size
            video.pix_fmt = pix_fmt
            if frame_times is not None:  # millisecond timestamps, irregular steps
                video.time_base = video.codec_context.time_base = Fraction(1, 1000)
            else:
                video.time_base = Fraction(1, fps)
        if acodec:
            audio = out.add_stream(acodec, rate=rate)
            audio.layout = layout
        if video is not None:
            if frame_times is not None:  # pts in milliseconds
                frames = ((_frame(i, *size), int(round(t * 1000))) for i, t in enumerate(frame_times))
                media.encode_video(out, video, frames, Fraction(1, 1000))
            else:
                frames = ((_frame(i, *size), i) for i in range(int(round(seconds * fps))))
                media.encode_video(out, video, frames)
        if audio is not None:
            media.encode_tone(out, audio, seconds, rate, silent=silent, sample_fmt=sample_fmt, layout=layout)
    return path


def make_corpus(folder: str | Path) -> dict[str, Path]:
    """name -> path of every case (the "missing" one does not exist; "hang" is a FIFO nobody writes)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    good = media.write_clip(folder / "good.mp4", seconds=2.0)
    cases = {
        "good": good,
        "truncated": media.write_truncated(good, folder / "truncated.mp4"),
        "zero_bytes": media.write_zero_bytes(folder / "zero_bytes.mp4"),
        "not_video": media.write_text_as_mp4(folder / "not_video.mp4"),
        "corrupt_payload": media.write_corrupt_payload(good, folder / "corrupt_payload.mp4"),
        "audio_only": write_media(folder / "audio_only.mp4", vcodec=None),
        "cover_art": media.write_sound(folder / "cover_art.mp3", codec="libmp3lame", cover_art=True),
        "subtitles_only": _write_subtitles(folder / "subtitles_only.mkv"),
        "video_only": write_media(folder / "video_only.mp4", acodec=None),
        "silent_audio": write_media(folder / "silent_audio.mp4", silent=True),
        "one_frame": write_media(folder / "one_frame.mp4", seconds=0.1, fps=10),
        "high_res": write_media(folder / "high_res.mp4", vcodec="libx264", size=(4096, 2160), seconds=0.2, fps=10),
        "very_long": write_media(folder / "very_long.mp4", seconds=600.0, fps=1, size=(32, 32), rate=8000),
        "variable_fps": write_media(folder / "variable_fps.mp4", vcodec="libx264",
                                    frame_times=[0.0, 0.05, 0.1, 0.4, 0.45, 1.2, 1.25, 1.3, 1.9, 2.0],
                                    seconds=2.0),
        "webm_vp8": write_media(folder / "webm_vp8.webm", vcodec="libvpx", acodec="libopus", rate=48_000),
        "avi_mpeg4": write_media(folder / "avi_mpeg4.avi", acodec="libmp3lame", rate=16_000),
        "mov_pcm": write_media(folder / "mov_pcm.mov", vcodec="libx264", acodec="pcm_s16le", sample_fmt="s16"),
        "surround_5_1": write_media(folder / "surround_5_1.mkv", vcodec="libx264", acodec="aac", layout="5.1",
                                    rate=48_000),
        "odd_name": write_media(folder / "odd name — é 日本 #1.mp4"),
        "directory": _mkdir(folder / "directory.mp4"),
        "missing": folder / "missing.mp4",
        "bad_protocol": "nosuchproto://bucket/clip.mp4",
        "hang": _mkfifo(folder / "hang.mp4"),
    }
    return cases


def _write_subtitles(path: Path) -> Path:
    """A container FFmpeg opens (an SRT subtitle file) with neither a video nor an audio stream."""
    path.write_text("1\n00:00:00,000 --> 00:00:02,000\nno picture, no sound\n")
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir(exist_ok=True)
    return path


def _mkfifo(path: Path) -> Path:
    """Opening a FIFO for reading blocks until a writer appears: a real stuck system call, the way a dead
    network mount or a decoder bug hangs. Only a decode timeout (a killable helper process) gets past it."""
    if not path.exists():
        os.mkfifo(path)
    return path


# name -> (windows with window_s=30, status, error_kind, has_audio). Every name of make_corpus is here.
EXPECTED = {
    "good": (1, "ok", None, True),
    "truncated": (1, "error", "decode", None),
    "zero_bytes": (1, "error", "decode", None),
    "not_video": (1, "error", "decode", None),
    "corrupt_payload": (1, "error", "decode", None),
    "audio_only": (1, "ok", None, True),  # an mp4 of sound alone: captioned from its sound
    "cover_art": (1, "ok", None, True),  # an mp3 whose cover picture is not a video
    "subtitles_only": (1, "error", "no_streams", None),
    "video_only": (1, "ok", None, False),
    "silent_audio": (1, "ok", None, True),
    "one_frame": (1, "ok", None, True),
    "high_res": (1, "ok", None, True),
    "very_long": (20, "ok", None, True),  # 600 s / 30 s
    "variable_fps": (1, "ok", None, True),
    "webm_vp8": (1, "ok", None, True),
    "avi_mpeg4": (1, "ok", None, True),
    "mov_pcm": (1, "ok", None, True),
    "surround_5_1": (1, "ok", None, True),
    "odd_name": (1, "ok", None, True),
    "directory": (1, "error", "unreadable", None),
    "missing": (1, "error", "missing", None),
    "bad_protocol": (1, "error", "bad_uri", None),
    "hang": (1, "error", "timeout", None),  # only with a decode timeout; without one the read blocks forever
}
