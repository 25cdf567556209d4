"""operators/decode.py on generated clips: probing, audio, window planning, frame sampling."""

from __future__ import annotations

import numpy as np
import pytest

from operators import decode as dec
from operators.tokenize import SAMPLE_RATE

from conftest import REAL_CLIPS, REAL_CLIPS_DIR


def open_and_probe(path, max_pixels=None):
    src = dec.open_media(str(path))
    info, reader = dec.probe(src, max_pixels)
    return src, info, reader


def test_probe_generated_clip(clip_set):
    _, info, _ = open_and_probe(clip_set["av"])
    assert (info.width, info.height, info.num_frames) == (96, 64, 30)
    assert info.duration_s == pytest.approx(3.0, abs=0.05)


@pytest.mark.parametrize("name", sorted(REAL_CLIPS))
def test_probe_real_clip_matches_pyav(name):
    """Duration is the video stream's (the container's may include a longer audio track)."""
    import av

    with av.open(str(REAL_CLIPS_DIR / name)) as container:
        stream = container.streams.video[0]
        expected = float(stream.duration * stream.time_base)
        size = (stream.codec_context.width, stream.codec_context.height)
    _, info, _ = open_and_probe(REAL_CLIPS_DIR / name)
    assert info.duration_s == pytest.approx(expected, abs=0.05)
    assert info.duration_s <= REAL_CLIPS[name] + 0.01
    assert (info.width, info.height) == size


def test_audio_track_tone_silent_and_absent(clip_set):
    tone = dec.read_audio_track(dec.open_media(str(clip_set["av"])))
    assert tone.dtype == np.float32 and tone.ndim == 1
    assert len(tone) == pytest.approx(3 * SAMPLE_RATE, rel=0.02)
    assert 0.2 < np.abs(tone).max() < 0.4  # the 0.3-amplitude tone, resampled to 16 kHz mono
    silent = dec.read_audio_track(dec.open_media(str(clip_set["silent"])))
    assert len(silent) == pytest.approx(2 * SAMPLE_RATE, rel=0.03) and np.abs(silent).max() == 0.0
    assert dec.read_audio_track(dec.open_media(str(clip_set["video_only"]))) is None


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        dec.open_media(str(tmp_path / "gone.mp4"))


@pytest.mark.parametrize("name", ["truncated", "zero", "text"])
def test_unreadable_files_raise_decode_error(clip_set, name):
    with pytest.raises(dec.DecodeError, match="cannot open video stream"):
        open_and_probe(clip_set[name])


def test_in_memory_source_decodes_like_a_local_file(clip_set):
    """Non-local URIs are read into memory (BytesIO): probe and audio must match the local path."""
    import fsspec

    with fsspec.open("memory://clips/av.mp4", "wb") as f:
        f.write(clip_set["av"].read_bytes())
    src = dec.open_media("memory://clips/av.mp4")
    assert not isinstance(src, str)
    info, _ = dec.probe(src)
    assert info == open_and_probe(clip_set["av"])[1]
    np.testing.assert_array_equal(dec.read_audio_track(src), dec.read_audio_track(str(clip_set["av"])))
    with pytest.raises(FileNotFoundError):
        dec.open_media("memory://clips/gone.mp4")


@pytest.mark.parametrize("duration, start, end, window, expected", [
    (9.0, None, None, 4.0, [(0, 3), (3, 6), (6, 9)]),
    (10.0, None, None, 5.0, [(0, 5), (5, 10)]),  # an exact multiple: no empty remainder window
    (3.0, None, None, 30.0, [(0, 3)]),
    (9.0, 1.0, 5.0, 4.0, [(1, 5)]),
    (9.0, 2.0, 100.0, 4.0, [(2, 5.5), (5.5, 9)]),  # end clipped to the duration
    (9.0, -3.0, 2.0, 4.0, [(0, 2)]),
])
def test_plan_windows(duration, start, end, window, expected):
    spans = dec.plan_windows(duration, start, end, window)
    assert len(spans) == len(expected)
    for got, want in zip(spans, expected):
        assert got == pytest.approx(want)


@pytest.mark.parametrize("start, end", [(10.0, 12.0), (4.0, 4.0), (5.0, 1.0)])
def test_plan_windows_empty_span_is_a_decode_error(start, end):
    with pytest.raises(dec.DecodeError, match="empty span"):
        dec.plan_windows(9.0, start, end, 4.0)


def test_frame_times_even_bounded_and_inside_window():
    times, fps = dec.frame_times(2.0, 5.0, 2.0, 64)
    assert len(times) == 6 and fps == pytest.approx(2.0)
    assert times[0] > 2.0 and times[-1] < 5.0
    times, fps = dec.frame_times(0.0, 100.0, 2.0, 17)  # too many: fps lowered, count even
    assert len(times) == 16 and fps == pytest.approx(0.16)
    times, _ = dec.frame_times(0.0, 0.2, 2.0, 64)  # very short window: still two frames
    assert len(times) == 2


@pytest.mark.parametrize("end, fps, max_frames, pair_ids", [(7.3, 2.0, 64, 13), (3.0, 2.0, 64, 13), (9.0, 1.0, 64, 29),
                                                             (60.0, 2.0, 64, 24), (5.0, 3.0, 64, 8)])
def test_frame_pairs_can_be_held_to_whole_time_quanta(end, fps, max_frames, pair_ids):
    """Qwen3-Omni's 1/13-s position ids: a frame pair spans a whole number of them, never more time than
    the rate asked for, and every frame stays inside the window."""
    plain, plain_fps = dec.frame_times(0.0, end, fps, max_frames)
    times, got_fps = dec.frame_times(0.0, end, fps, max_frames, step_quantum_s=1 / 13)
    assert len(times) == len(plain) and got_fps >= plain_fps
    assert 2 / got_fps * 13 == pytest.approx(pair_ids, abs=1e-9)
    assert 0 < times[0] and times[-1] < end



def test_fit_pixels():
    assert dec.fit_pixels(640, 360, None) == (-1, -1)
    assert dec.fit_pixels(96, 64, 168 * 168) == (-1, -1)
    w, h = dec.fit_pixels(640, 360, 168 * 168)
    assert w * h <= 168 * 168 and w % 2 == 0 and h % 2 == 0 and abs(w / h - 640 / 360) < 0.05


def test_decode_window_samples_the_right_frames_and_audio(clip_set):
    """Frame i of the generated clip has blue == i: the sampled frames must be the ones at the sample times."""
    src, info, reader = open_and_probe(clip_set["long"])  # 9 s at 5 fps
    audio = dec.read_audio_track(src)
    window = dec.decode_window(reader, 3.0, 6.0, 2.0, 64, audio)
    assert window.frames.shape == (6, 64, 96, 3) and window.frames.dtype == np.uint8
    assert window.fps == pytest.approx(2.0)
    blue = window.frames[..., 2].reshape(6, -1).mean(axis=1)
    times = 3.0 + (np.arange(6) + 0.5) / 2.0
    np.testing.assert_allclose(blue, np.floor(times * 5), atol=3)
    assert window.audio.shape == (3 * SAMPLE_RATE,)
    np.testing.assert_array_equal(window.audio, audio[3 * SAMPLE_RATE:6 * SAMPLE_RATE])


def test_probe_resizes_and_missing_audio_stays_absent(clip_set):
    """info keeps the source size; the reader decodes at the size that fits max_pixels."""
    src, info, reader = open_and_probe(clip_set["video_only"], max_pixels=62 * 42)
    assert (info.width, info.height) == (96, 64)
    width, height = dec.fit_pixels(96, 64, 62 * 42)
    window = dec.decode_window(reader, 0.0, 2.0, 2.0, 64, dec.read_audio_track(src))
    assert window.frames.shape == (4, height, width, 3) and width * height <= 62 * 42
    assert window.audio is None


def test_audio_shorter_than_window_becomes_silence(clip_set):
    src, _, reader = open_and_probe(clip_set["av"])
    short = dec.read_audio_track(src)[: SAMPLE_RATE]  # audio stops after 1 s
    window = dec.decode_window(reader, 2.0, 3.0, 2.0, 64, short)
    assert window.audio.shape == (SAMPLE_RATE,) and not window.audio.any()
