"""Small synthetic media files for the tests, written with PyAV (no network, no fixtures on disk).

Every clip is tiny (96x64, a few seconds) so decoding and tokenizing stay cheap on a 2-core machine.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

WIDTH, HEIGHT = 96, 64
AUDIO_RATE = 16_000


def _frame(index: int, fps: int) -> np.ndarray:
    """A moving colour gradient: consecutive frames differ, so decoding the wrong frame is visible."""
    x = np.linspace(0, 255, WIDTH, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, HEIGHT, dtype=np.float32)[:, None]
    shift = 255.0 * index / max(1, fps)
    rgb = np.stack([(x + shift) % 256 + 0 * y, (y + shift) % 256 + 0 * x, np.full((HEIGHT, WIDTH), index % 256)],
                   axis=-1)
    return rgb.astype(np.uint8)


def write_clip(path: str | Path, seconds: float = 2.0, fps: int = 10, audio: str | None = "tone",
               sample_rate: int = AUDIO_RATE) -> Path:
    """An MP4 (mpeg4 video + AAC audio). audio: "tone" (440 Hz), "silent" (all zeros) or None (no stream)."""
    path = Path(path)
    n_frames = int(round(seconds * fps))
    with av.open(str(path), mode="w") as container:
        video = container.add_stream("mpeg4", rate=fps)
        video.width, video.height, video.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        video.time_base = Fraction(1, fps)
        astream = None
        if audio is not None:
            astream = container.add_stream("aac", rate=sample_rate)
            astream.layout = "mono"
        encode_video(container, video, ((_frame(i, fps), i) for i in range(n_frames)))
        if astream is not None:
            encode_tone(container, astream, seconds, sample_rate, silent=audio == "silent")
    return path


def write_sound(path: str | Path, seconds: float = 3.0, container: str | None = None, codec: str = "aac",
                sample_rate: int = AUDIO_RATE, sample_fmt: str = "fltp", cover_art: bool = False) -> Path:
    """An audio-only file (a 440 Hz tone): .m4a by default; `cover_art` adds a one-picture video stream
    marked as an attached picture, as music and podcast files carry."""
    path = Path(path)
    with av.open(str(path), mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=sample_rate)
        stream.layout = "mono"
        if cover_art:
            art = out.add_stream("mjpeg")
            art.width, art.height, art.pix_fmt = 64, 64, "yuvj420p"
            art.disposition = av.stream.Disposition.attached_pic
            encode_video(out, art, [(np.full((64, 64, 3), 200, np.uint8), 0)])
        encode_tone(out, stream, seconds, sample_rate, sample_fmt=sample_fmt)
    return path


def encode_video(container, stream, frames, time_base: Fraction | None = None) -> None:
    """Encode and mux (rgb24 array, pts) pairs on a video stream, then flush the encoder."""
    for pixels, pts in frames:
        frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
        frame.pts = pts
        if time_base is not None:
            frame.time_base = time_base
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)


def encode_tone(container, stream, seconds: float, rate: int, silent: bool = False, sample_fmt: str = "fltp",
                layout: str = "mono") -> None:
    """Encode and mux `seconds` of a 440 Hz tone (or silence) on every channel of an audio stream."""
    channels = stream.codec_context.layout.nb_channels
    total = int(round(seconds * rate))
    t = np.arange(total) / rate
    wave = np.zeros(total, np.float32) if silent else (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    chunk = stream.codec_context.frame_size or 1024
    for start in range(0, total, chunk):
        block = np.repeat(wave[None, start:start + chunk], channels, axis=0)
        if sample_fmt == "s16":  # packed: one row of interleaved samples
            data = (block.T.reshape(1, -1) * 32767).astype(np.int16)
        else:
            data = block
        frame = av.AudioFrame.from_ndarray(data, format=sample_fmt, layout=layout)
        frame.sample_rate = rate
        frame.pts = start
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)


def stored_picture(displayed: np.ndarray, degrees: int, mirror: bool) -> np.ndarray:
    """The (T, H, W, 3) frames to store so that a player shows `displayed` under a display matrix written
    with set_display_rotation(degrees, hflip=mirror): PyAV's degrees turn counter-clockwise, then the mirror
    flips left-right; numpy's rot90 also turns counter-clockwise, so this undoes both (no avsieve code)."""
    if mirror:
        displayed = displayed[:, :, ::-1]
    return np.ascontiguousarray(np.rot90(displayed, k=-(degrees // 90), axes=(1, 2)))


def write_oriented_clip(path: str | Path, displayed: np.ndarray, fps: int, degrees: int, mirror: bool = False,
                        audio: np.ndarray | None = None, codec: str = "mpeg4", options: dict | None = None) -> Path:
    """An MP4 that a player shows as `displayed` (T, H, W, 3) uint8, stored turned and mirrored with the
    display matrix that undoes it, as a phone writes a portrait video (optional mono 16 kHz audio).
    The matrix is written by PyAV (VideoStream.set_display_rotation); the caller skips where it is missing."""
    path = Path(path)
    frames = stored_picture(displayed, degrees, mirror)
    with av.open(str(path), mode="w") as container:
        video = container.add_stream(codec, rate=fps, options=options or {})
        video.height, video.width = frames.shape[1:3]
        video.pix_fmt = "yuv420p"
        video.time_base = Fraction(1, fps)
        if degrees % 360 or mirror:
            video.set_display_rotation(degrees, hflip=mirror)
        astream = None
        if audio is not None:
            astream = container.add_stream("aac", rate=AUDIO_RATE)
            astream.layout = "mono"
        encode_video(container, video, ((frame, i) for i, frame in enumerate(frames)))
        if astream is not None:
            chunk = astream.codec_context.frame_size or 1024
            for start in range(0, len(audio), chunk):
                frame = av.AudioFrame.from_ndarray(audio[None, start:start + chunk].astype(np.float32), format="fltp",
                                                   layout="mono")
                frame.sample_rate, frame.pts = AUDIO_RATE, start
                for packet in astream.encode(frame):
                    container.mux(packet)
            for packet in astream.encode():
                container.mux(packet)
    return path


def can_write_display_matrix() -> bool:
    return hasattr(av.video.stream.VideoStream, "set_display_rotation")


def write_truncated(src: str | Path, dst: str | Path, keep: float = 0.4) -> Path:
    """The first `keep` fraction of a valid MP4: PyAV writes the moov atom last, so it is cut off."""
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[: int(len(data) * keep)])
    return Path(dst)


def write_corrupt_payload(src: str | Path, dst: str | Path, seed: int = 0) -> Path:
    """A valid MP4 whose media data is overwritten with noise: the container (moov) still opens,
    decoding the frames fails. Bytes are changed only inside the mdat box."""
    data = bytearray(Path(src).read_bytes())
    mdat, moov = data.find(b"mdat"), data.find(b"moov")
    assert 0 < mdat < moov, "expected PyAV's layout: mdat before moov"
    rng = np.random.default_rng(seed)
    for i in range(mdat + 64, moov - 64, 16):
        data[i] = int(rng.integers(256))
    Path(dst).write_bytes(bytes(data))
    return Path(dst)


def write_zero_bytes(path: str | Path) -> Path:
    Path(path).write_bytes(b"")
    return Path(path)


def write_text_as_mp4(path: str | Path) -> Path:
    Path(path).write_text("this is not a video, only text named like one\n" * 20)
    return Path(path)


def make_clip_set(folder: str | Path) -> dict[str, Path]:
    """The standard set used by job tests: name -> path. Expected results are in EXPECTED below."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    av_clip = write_clip(folder / "av.mp4", seconds=3.0, audio="tone")
    clips = {
        "av": av_clip,
        "long": write_clip(folder / "long.mp4", seconds=9.0, fps=5, audio="tone"),
        "video_only": write_clip(folder / "video_only.mp4", seconds=2.0, audio=None),
        "silent": write_clip(folder / "silent.mp4", seconds=2.0, audio="silent"),
        "sound": write_sound(folder / "sound.m4a", seconds=3.0),  # audio only: captioned from its sound
        "truncated": write_truncated(av_clip, folder / "truncated.mp4"),
        "zero": write_zero_bytes(folder / "zero.mp4"),
        "text": write_text_as_mp4(folder / "text.mp4"),
    }
    return clips


# name -> (windows with window_s=4, status, error_kind, has_audio, has_video)
EXPECTED = {
    "av": (1, "ok", None, True, True),
    "long": (3, "ok", None, True, True),  # 9 s / 4 s -> 3 equal windows of 3 s
    "video_only": (1, "ok", None, False, True),
    "silent": (1, "ok", None, True, True),
    "sound": (1, "ok", None, True, False),
    "truncated": (1, "error", "decode", None, None),
    "zero": (1, "error", "decode", None, None),
    "text": (1, "error", "decode", None, None),
}
