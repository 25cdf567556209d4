"""Frames as a viewer sees them (issue 29): a video stored turned or mirrored, with the display matrix that
undoes it (as phones write portrait videos), reaches the model as the displayed picture, in its aspect.

The clips are written with PyAV's display matrix (VideoStream.set_display_rotation); what a player shows
was checked against the ffmpeg command line, which applies the matrix itself (autorotate), for every
orientation here. decord 0.6.0 alone turns an MP4 by the matrix's angle but drops a mirror, ignores the
matrix of a Matroska file, and returns whatever width x height it is asked for (the old decode size, from
the stored proportions, squeezed a turned picture): the first test pins that, the others check what
operators.decode makes of it.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from operators import decode as dec
from operators import tokenize as tok
from operators.prepare import prepare_windows

import media

pytestmark = pytest.mark.skipif(not media.can_write_display_matrix(),
                                reason="this PyAV cannot write a display matrix (VideoStream.set_display_rotation)")

# name -> (degrees counter-clockwise, then mirrored left-right), as set_display_rotation takes them
ORIENTATIONS = {
    "rotate90": (90, False), "rotate180": (180, False), "rotate270": (270, False),
    "mirror": (0, True), "rotate90_mirror": (90, True), "rotate270_mirror": (270, True),
}
# The angle FFmpeg reads from each matrix (av_display_rotation_get, VideoFrame.rotation), which decord turns
# an MP4 by: a turn by d then a mirror has the angle 180 - d, so a plain mirror reads as a half turn.
DECORD_TURN = {"rotate90": 90, "rotate180": 180, "rotate270": 270, "mirror": 180, "rotate90_mirror": 90,
               "rotate270_mirror": 270}
# Every orientation in MP4; a few in Matroska, where decord does not see the matrix at all.
CASES = [(name, "mp4") for name in sorted(ORIENTATIONS)] + \
        [(name, "mkv") for name in ("mirror", "rotate180", "rotate90", "rotate270_mirror")]
WIDTH, HEIGHT = 96, 160  # the displayed picture: portrait, as a phone held upright shows it


def displayed_picture(frames: int = 4) -> np.ndarray:
    """Grey, a red block in the top-left corner and a smaller blue one in the bottom-right: every turn and
    mirror moves one of them."""
    img = np.full((HEIGHT, WIDTH, 3), 60, np.uint8)
    img[:40, :24] = (230, 30, 30)
    img[-24:, -12:] = (40, 60, 240)
    return np.repeat(img[None], frames, axis=0)


def _centre(frame: np.ndarray, rgb) -> tuple[float, float]:
    """Where a colour is, as fractions of the width and height."""
    mask = np.all(np.abs(frame.astype(int) - np.array(rgb)) < 60, axis=-1)
    ys, xs = np.nonzero(mask)
    return xs.mean() / frame.shape[1], ys.mean() / frame.shape[0]


@pytest.fixture(scope="module")
def oriented_clips(tmp_path_factory) -> dict[tuple[str, str], str]:
    folder = tmp_path_factory.mktemp("oriented")
    return {(name, ext): str(media.write_oriented_clip(folder / f"{name}.{ext}", displayed_picture(), 4,
                                                       *ORIENTATIONS[name]))
            for name, ext in CASES}


@pytest.mark.parametrize("name, ext", CASES)
def test_decord_alone_turns_by_the_angle_drops_the_mirror_and_squeezes(oriented_clips, name, ext):
    """What operators/decode.py works around (measured on decord 0.6.0): unsized, decord shows an MP4's
    stored picture turned by the matrix's angle without the mirror (a mirrored clip comes out mirrored, or
    upside down), and a Matroska file's as stored; asked for a size, it returns that size whatever the turn
    (the old decode size, from the stored proportions, squeezed a turned picture)."""
    from decord import VideoReader

    degrees, mirror = ORIENTATIONS[name]
    stored = media.stored_picture(displayed_picture(1), degrees, mirror)[0]
    turned = np.rot90(stored, k=DECORD_TURN[name] // 90 if ext == "mp4" else 0)
    frame = VideoReader(oriented_clips[name, ext])[0].asnumpy()
    assert frame.shape == turned.shape
    assert np.abs(frame.astype(int) - turned).mean() < 4
    upright = displayed_picture(1)[0]
    shown = frame.shape == upright.shape and np.abs(frame.astype(int) - upright).mean() < 4
    assert shown == (not mirror and ext == "mp4")
    width, height = stored.shape[1] * 5 // 8, stored.shape[0] * 5 // 8  # the old decode size: stored proportions
    assert VideoReader(oriented_clips[name, ext], width=width, height=height)[0].shape == (height, width, 3)


@pytest.mark.parametrize("max_pixels", [None, 60 * 100])
@pytest.mark.parametrize("name, ext", CASES)
def test_decoded_frames_are_the_displayed_picture(oriented_clips, name, ext, max_pixels):
    """Decoded at full size or resized for max_pixels: the displayed aspect (portrait), the red block top-left,
    the blue one bottom-right, and the whole picture equal to the displayed one resized."""
    from PIL import Image

    src = dec.open_media(oriented_clips[name, ext])
    info, reader = dec.probe(src, max_pixels)
    assert (info.width, info.height) == (WIDTH, HEIGHT)
    frames = dec.decode_window(reader, 0.0, 1.0, 2.0, 64, None).frames
    assert frames.flags.c_contiguous and frames.dtype == np.uint8
    height, width = frames.shape[1:3]
    if max_pixels:
        assert width * height <= max_pixels
    assert height / width == pytest.approx(HEIGHT / WIDTH, rel=0.05)
    red_x, red_y = _centre(frames[0], (230, 30, 30))
    blue_x, blue_y = _centre(frames[0], (40, 60, 240))
    assert red_x < 0.3 and red_y < 0.2 and blue_x > 0.8 and blue_y > 0.8
    expected = np.asarray(Image.fromarray(displayed_picture(1)[0]).resize((width, height), Image.BILINEAR))
    assert np.abs(frames[0].astype(int) - expected).mean() < 6


@pytest.mark.parametrize("ext", ["mp4", "mkv"])
def test_a_first_frame_of_one_colour_goes_by_the_container(tmp_path, ext):
    """Whether decord turned a stream is seen on its first frame; where that frame looks the same turned or
    not, the container decides (decord reads MP4's matrix, not Matroska's)."""
    picture = displayed_picture(4)
    picture[0] = 60
    path = media.write_oriented_clip(tmp_path / f"grey-first.{ext}", picture, 4, 90)
    _, reader = dec.probe(dec.open_media(str(path)), 60 * 100)
    frames = dec.decode_window(reader, 0.0, 1.0, 2.0, 64, None).frames  # frames 1 and 3: the marked ones
    assert frames.shape[1:] == (100, 60, 3)
    red_x, red_y = _centre(frames[-1], (230, 30, 30))
    assert red_x < 0.3 and red_y < 0.2


def test_unrotated_clip_keeps_its_size(clip_set):
    info, reader = dec.probe(dec.open_media(str(clip_set["av"])))
    assert info.orientation == dec.IDENTITY and reader.fix == dec.IDENTITY
    assert (info.width, info.height) == (media.WIDTH, media.HEIGHT)


@pytest.mark.parametrize("width", [48, 72])
def test_widths_decord_mangles_fall_back_to_full_size(clip_set, width):
    """decord 0.6.0 returns a (H, W, 4) array without an error for a few narrow widths (8-72): such a
    size is not used; frames come at full size and the processor resizes them."""
    height = width * media.HEIGHT // media.WIDTH // 2 * 2
    _, reader = dec.probe(dec.open_media(str(clip_set["av"])), width * height)
    frames = dec.decode_window(reader, 0.0, 1.0, 2.0, 64, None).frames
    assert frames.shape[1:] == (media.HEIGHT, media.WIDTH, 3)


def test_portrait_phone_clip_rows_are_taller_than_wide(tmp_path, prepare_settings):
    """A 320x180 stream tagged with a 90-degree turn (a phone's portrait video): the row's frames are the
    upright 180x320 picture resized by the processor, and the compact window for vLLM keeps it so."""
    from operators.models.qwen2_5_omni import load_processor

    picture = np.zeros((10, 320, 180, 3), np.uint8)
    picture[:, :80, :60] = (230, 30, 30)
    path = media.write_oriented_clip(tmp_path / "phone.mp4", picture, 5, 90, audio=np.zeros(32_000, np.float32))
    manifest = {"source_id": "phone", "clip_id": None, "uri": str(path), "start_s": None, "end_s": None, "prompt": None}
    (row,) = prepare_windows(manifest, prepare_settings)
    assert row["status"] == "ok", row["error"]
    assert row["video_height"] > row["video_width"]
    assert row["video_height"] / row["video_width"] == pytest.approx(320 / 180, rel=0.15)  # 28-pixel rounding
    tensors = tok.unpack(row["model_inputs"])
    t, rows, cols = (int(v) for v in tensors["video_grid_thw"][0])
    assert (cols * 14, rows * 14) == (row["video_width"], row["video_height"])
    assert t == row["video_frames"] // 2

    processor = load_processor(prepare_settings.model)
    info, reader = dec.probe(dec.open_media(str(path)), prepare_settings.max_pixels)
    window = dec.decode_window(reader, 0.0, 2.0, 2.0, 64, None)
    size = tok.video_size(processor, prepare_settings.max_pixels, prepare_settings.min_pixels)
    compact = tok.unpack_compact(tok.pack_compact(tensors["input_ids"], window.frames, window.fps, None, "x", size))
    assert compact["frames"].shape[1] > compact["frames"].shape[2]
    np.testing.assert_array_equal(compact["frames"], window.frames)
    again = tok.model_inputs(processor, compact["frames"], compact["fps"], None, "x", prepare_settings.max_pixels,
                             prepare_settings.min_pixels)
    assert [int(v) for v in again["video_grid_thw"][0][1:]] == [rows, cols]


# -------------------------------------------------------------- the embedded model names the direction ---

MOVERS = [("circle", "red", "right"), ("star", "yellow", "left")]
# (degrees, mirrored, max_pixels): before the fix the mirrored ones were captioned moving the other way,
# and the plain 90-degree one at 9,600 pixels squeezed (the circle was read as a star).
STORED = [(90, False, 9600), (90, True, 28224), (270, True, 9600)]


def _mover(shape: str, colour: str, motion: str):
    from operators.synth import world

    ends = ((30.0, 60.0), (130.0, 60.0))
    start, end = ends if motion == "right" else ends[::-1]
    thing = world.VisualObject(shape, colour, "large", motion, 0, 4, start, end)
    plain = world.Background("plain", (40, 40, 45), (40, 40, 45), False, 0, (), ())
    return world.ClipSpec(4, plain, (thing,), (), 0)


@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_embedded_model_names_the_displayed_direction(engine, tmp_path, model_source, request, monkeypatch):
    """A synthetic clip (the world the embedded model learnt) with one object moving left or right as
    displayed, stored turned and mirrored under the matrix that shows it upright: the caption names the
    displayed direction and the right shape."""
    from operators.models.qwen2_5_omni import load_processor, model_card
    from operators.synth import grammar, world
    from pipelines.config import DEFAULT_PROMPT

    captioner = request.getfixturevalue(f"{engine}_captioner")
    monkeypatch.setattr(captioner, "settings", dataclasses.replace(captioner.settings, max_new_tokens=32))
    processor = load_processor(model_source)
    min_pixels = model_card(model_source)["preprocess"]["min_pixels"]
    blobs, expected = [], []
    for shape, colour, motion in MOVERS:
        spec = _mover(shape, colour, motion)
        for degrees, mirror, max_pixels in STORED:
            path = media.write_oriented_clip(tmp_path / f"{shape}-{degrees}-{mirror}.mp4", world.render_video(spec),
                                             spec.fps, degrees, mirror, audio=world.render_audio(spec),
                                             codec="libx264", options={"crf": "20", "threads": "1"})
            src = dec.open_media(str(path))
            _, reader = dec.probe(src, max_pixels)
            window = dec.decode_window(reader, 0.0, 4.0, 2.0, 64, dec.read_audio_track(src))
            assert window.frames.shape[2] > window.frames.shape[1]  # landscape, as displayed
            tensors = tok.model_inputs(processor, window.frames, window.fps, window.audio, DEFAULT_PROMPT,
                                       max_pixels, min_pixels)
            blobs.append(tok.pack(tensors) if engine == "hf" else tok.pack_compact(
                tensors["input_ids"], window.frames, window.fps, window.audio,
                tok.build_prompt(processor, DEFAULT_PROMPT), tok.video_size(processor, max_pixels, min_pixels)))
            expected.append(f"{colour} {shape} {grammar.MOTIONS[motion]}")
    captions = [r["caption"] for r in captioner.caption(blobs)]
    for (degrees, mirror, max_pixels), want, caption in zip(STORED * len(MOVERS), expected, captions):
        assert want in caption, (degrees, mirror, max_pixels, caption)
