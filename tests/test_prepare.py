"""operators/prepare.py: one manifest row -> one prepared row per window (decode + tokenize), never raising."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from operators import tokenize as tok
from operators.prepare import PREPARED_COLUMNS, prepare_windows
from operators.schema import SCHEMA_VERSION
from operators.sources import window_id

import media
from conftest import REAL_CLIPS, REAL_CLIPS_DIR


def manifest_row(uri, **extra) -> dict:
    row = {"source_id": "src", "clip_id": None, "uri": str(uri), "start_s": None, "end_s": None, "prompt": None}
    return {**row, **extra}


def prepare(uri, settings, **extra) -> list[dict]:
    return list(prepare_windows(manifest_row(uri, **extra), settings))


@pytest.fixture(scope="module")
def prepared(clip_set, prepare_settings) -> dict[str, list[dict]]:
    return {name: prepare(path, prepare_settings) for name, path in clip_set.items()}


@pytest.mark.parametrize("name", sorted(media.EXPECTED))
def test_generated_clip_windows_status_and_audio(prepared, name):
    windows, status, kind, has_audio, has_video = media.EXPECTED[name]
    rows = prepared[name]
    assert len(rows) == windows
    assert [r["status"] for r in rows] == [status] * windows
    assert [r["error_kind"] for r in rows] == [kind] * windows
    assert [r["has_audio"] for r in rows] == [has_audio] * windows
    assert [r["has_video"] for r in rows] == [has_video] * windows
    assert [r["window_index"] for r in rows] == list(range(windows))
    for row in rows:
        assert tuple(row) == PREPARED_COLUMNS
        assert row["schema_version"] == SCHEMA_VERSION
        if status == "ok":
            assert row["error"] is None and len(row["model_inputs"]) > 0 and row["decode_ms"] > 0
        else:
            assert row["model_inputs"] == b"" and row["error"].startswith("DecodeError: ")


def test_windows_cover_the_clip_and_have_distinct_stable_ids(prepared, clip_set, prepare_settings):
    rows = prepared["long"]
    spans = [(r["start_s"], r["end_s"]) for r in rows]
    assert [s for s, _ in spans] == pytest.approx([0.0, 3.0, 6.0], abs=0.01)
    assert [e for _, e in spans] == pytest.approx([3.0, 6.0, 9.0], abs=0.01)
    ids = [r["clip_id"] for r in rows]
    assert len(set(ids)) == 3
    assert ids == [window_id(None, str(clip_set["long"]), s, e, 3, i) for i, (s, e) in enumerate(spans)]
    again = prepare(clip_set["long"], prepare_settings)
    assert [r["clip_id"] for r in again] == ids
    assert [r["model_inputs"] for r in again] == [r["model_inputs"] for r in rows]  # decoding is deterministic


def test_model_inputs_carry_video_and_audio_tokens(prepared, model_source):
    from operators.models.qwen2_5_omni import load_processor

    tokenizer = load_processor(model_source).tokenizer
    video_id, audio_id = tokenizer.convert_tokens_to_ids(["<|VIDEO|>", "<|AUDIO|>"])
    with_audio = tok.unpack(prepared["av"][0]["model_inputs"])
    without = tok.unpack(prepared["video_only"][0]["model_inputs"])
    assert {"input_ids", "pixel_values_videos", "video_grid_thw", "input_features"} <= set(with_audio)
    assert "input_features" not in without and "feature_attention_mask" not in without
    v, a = tok.token_counts(with_audio, video_id, audio_id)
    assert v > 0 and a > 0
    assert tok.token_counts(without, video_id, audio_id)[1] == 0
    # Audio features are trimmed to the valid frames (Whisper pads to 30 s): 3 s -> 300 mel frames.
    assert with_audio["input_features"].shape[-1] == int(with_audio["feature_attention_mask"].sum())
    assert 290 <= with_audio["input_features"].shape[-1] <= 310
    assert with_audio["input_ids"].dtype == torch.long


def test_missing_file_is_one_missing_error_row(tmp_path, prepare_settings):
    rows = prepare(tmp_path / "gone.mp4", prepare_settings)
    assert len(rows) == 1
    row = rows[0]
    assert (row["status"], row["error_kind"], row["window_index"]) == ("error", "missing", 0)
    assert "gone.mp4" in row["error"] and row["clip_id"] and tuple(row) == PREPARED_COLUMNS


def test_user_clip_id_span_and_prompt(clip_set, prepare_settings):
    rows = prepare(clip_set["long"], prepare_settings, clip_id="user-7", start_s=1.0, end_s=5.0, prompt="Other?")
    assert [(r["clip_id"], r["start_s"], r["end_s"], r["prompt"]) for r in rows] == [("user-7", 1.0, 5.0, "Other?")]
    split = prepare(clip_set["long"], prepare_settings, clip_id="user-7", start_s=1.0)
    assert [r["clip_id"] for r in split] == ["user-7#w0", "user-7#w1"]
    # The row's prompt reaches the tokens: same window, another prompt -> other input_ids.
    default = prepare(clip_set["long"], prepare_settings, start_s=1.0, end_s=5.0)
    ids = [tok.unpack(r["model_inputs"])["input_ids"] for r in (rows[0], default[0])]
    assert not torch.equal(ids[0], ids[1])


def test_span_outside_the_clip_is_a_decode_error(clip_set, prepare_settings):
    rows = prepare(clip_set["av"], prepare_settings, start_s=10.0, end_s=12.0)
    assert [(r["status"], r["error_kind"]) for r in rows] == [("error", "decode")]
    assert "empty span" in rows[0]["error"]


def test_unknown_protocol_becomes_an_error_row(prepare_settings):
    rows = prepare("nosuchproto://bucket/a.mp4", prepare_settings)
    assert [r["status"] for r in rows] == ["error"] and rows[0]["error"]


@pytest.mark.parametrize("name", sorted(REAL_CLIPS))
def test_real_clips_prepare_ok_with_audio(name, prepare_settings):
    rows = prepare(REAL_CLIPS_DIR / name, prepare_settings)
    assert [(r["status"], r["has_audio"]) for r in rows] == [("ok", True)]
    assert rows[0]["end_s"] == pytest.approx(REAL_CLIPS[name], abs=0.2)


def test_max_frames_caps_the_video_tokens(clip_set, prepare_settings):
    few = dataclasses.replace(prepare_settings, max_frames=2)
    many, capped = (tok.unpack(prepare(clip_set["av"], s)[0]["model_inputs"]) for s in (prepare_settings, few))
    assert capped["video_grid_thw"][0, 0] == 1  # 2 frames = one temporal patch
    assert many["video_grid_thw"][0, 0] == 3  # 3 s at 2 fps = 6 frames = 3 temporal patches


def test_corrupt_payload_is_an_error_row(corrupt_payload_clip, prepare_settings):
    rows = prepare(corrupt_payload_clip, prepare_settings)
    assert [r["status"] for r in rows] == ["error"]
    assert rows[0]["model_inputs"] == b""


def test_corrupt_payload_is_classified_as_decode_error(corrupt_payload_clip, prepare_settings):
    rows = prepare(corrupt_payload_clip, prepare_settings)
    assert [r["error_kind"] for r in rows] == ["decode"]
