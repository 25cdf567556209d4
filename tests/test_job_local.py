"""The whole caption job in-process (pipelines.caption.run) on the shared local Ray cluster.

One manifest mixes generated clips (audio, video-only, silent, 3 windows), broken files (truncated,
zero bytes, text, corrupt payload), a missing file, spans and real clips. Every input window must come
back as exactly one row with the right status.
"""

from __future__ import annotations

import dataclasses

import json
import re
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from operators.schema import OUTPUT_SCHEMA, SCHEMA_VERSION
from operators.sources import stable_id
from pipelines import caption as caption_job
from pipelines.config import CaptionConfig, build_parser, load_config

import media
from conftest import REAL_CLIPS_DIR, job_config
from operators.models.qwen2_5_omni import model_label, resolve_model_source

pytestmark = pytest.mark.timeout(600)
job = pytest.mark.slow  # tests that run the Ray job

REAL = ("bbb_revenge_0281.5-0284.7.mp4", "mdn_stream-of-water.mp4")
# key -> (windows, status, error_kind, has_audio, has_video); None = any error_kind
EXPECTED = {
    **media.EXPECTED,
    "corrupt": (1, "error", "decode", None, None),
    "missing": (1, "error", "missing", None, None),
    "span": (1, "ok", None, True, True),
    "bad_span": (1, "error", "decode", None, None),
    **{name: (1, "ok", None, True, True) for name in REAL},
}
WINDOWS = sum(v[0] for v in EXPECTED.values())  # 16


def write_manifest(folder: Path, clip_set, corrupt) -> tuple[Path, dict[str, dict]]:
    """A JSONL manifest of every case; returns it and key -> manifest entry."""
    entries = {name: {"uri": str(path)} for name, path in clip_set.items()}
    entries["corrupt"] = {"uri": str(corrupt)}
    entries["missing"] = {"uri": str(folder / "missing.mp4")}
    entries["span"] = {"uri": str(clip_set["long"]), "clip_id": "user-span", "start_s": 1.0, "end_s": 5.0,
                       "prompt": "What is heard?"}
    entries["bad_span"] = {"uri": str(clip_set["av"]), "start_s": 10.0, "end_s": 12.0}
    for name in REAL:
        entries[name] = {"uri": str(REAL_CLIPS_DIR / name)}
    path = folder / "manifest.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in entries.values()))
    return path, entries


def key_of(row: dict, entries: dict[str, dict]) -> str:
    """Which manifest entry produced this row: source_id is the hash of the entry's uri and span."""
    by_source = {stable_id(e["uri"], e.get("start_s"), e.get("end_s")): key for key, e in entries.items()}
    return by_source[row["source_id"]]


def part_files(output: Path) -> list[str]:
    return sorted(p.name for p in output.glob("*.parquet"))


def read_rows(output: Path) -> list[dict]:
    return pq.read_table(output, schema=OUTPUT_SCHEMA).to_pylist()  # pyarrow skips _avsieve/


@pytest.fixture(scope="module")
def first_run(ray_cluster, clip_set, corrupt_payload_clip, tmp_path_factory):
    folder = tmp_path_factory.mktemp("job")
    manifest, entries = write_manifest(folder, clip_set, corrupt_payload_clip)
    config = job_config(str(manifest), str(folder / "out"))
    summary = caption_job.run(config)
    return {"config": config, "summary": summary, "entries": entries, "output": folder / "out",
            "manifest": manifest, "folder": folder, "rows": read_rows(folder / "out")}


@pytest.fixture(scope="module")
def second_run(first_run):
    """The same job again, into a fresh folder, configured through a YAML file (keys mirror the flags)."""
    output = first_run["folder"] / "out2"
    settings = {"input": str(first_run["manifest"]), "output": str(output), "window-s": 4.0,
                "max_new_tokens": 4, "batch-size": 4, "progress": False}
    path = first_run["folder"] / "job.yaml"
    path.write_text(yaml.safe_dump(settings))
    assert caption_job.main(["--config", str(path)]) == 0
    return {"output": output, "rows": read_rows(output)}


@job
def test_one_row_per_window(first_run):
    rows, summary = first_run["rows"], first_run["summary"]
    assert len(rows) == WINDOWS == 16
    assert len({r["clip_id"] for r in rows}) == WINDOWS
    assert summary["windows"] == WINDOWS and summary["inputs"] == len(EXPECTED) == 14
    assert (summary["ok"], summary["error"]) == (10, 6)
    assert summary["ok_by_streams"] == {"video_and_sound": 8, "video_only": 1, "sound_only": 1}
    assert summary["errors_by_kind"]["missing"] == 1
    assert summary["errors_by_kind"]["decode"] >= 5  # truncated, zero, text, bad span, corrupt payload
    # 4 new tokens cut the trained model's captions (tens of tokens): the rows say so, and the summary counts them
    cut = [r for r in rows if r["caption_truncated"]]
    assert summary["captions_truncated"] == len(cut) > 0
    assert all(r["output_tokens"] == 4 for r in cut)


@job
@pytest.mark.parametrize("key", sorted(EXPECTED))
def test_status_per_input(first_run, key):
    windows, status, kind, has_audio, has_video = EXPECTED[key]
    rows = sorted((r for r in first_run["rows"] if key_of(r, first_run["entries"]) == key),
                  key=lambda r: r["window_index"])
    assert len(rows) == windows
    assert [r["window_index"] for r in rows] == list(range(windows))
    for row in rows:
        assert row["status"] == status, row["error"]
        if kind is not None:
            assert row["error_kind"] == kind
        assert row["has_audio"] == has_audio
        assert row["schema_version"] == SCHEMA_VERSION and row["config_hash"] == first_run["config"].config_hash()
        if status == "ok":
            assert row["error"] is None and isinstance(row["caption"], str)
            assert row["has_video"] == has_video
            assert 1 <= row["output_tokens"] <= 4 and (row["video_tokens"] > 0) == has_video
            assert (row["video_frames"] > 0, row["video_width"] is not None) == (has_video, has_video)
            assert (row["audio_tokens"] > 0) == has_audio
            assert row["model"] == model_label(resolve_model_source(None))
        else:
            assert row["error"] and row["caption"] is None and row["error_kind"]


@job
def test_spans_and_user_ids(first_run):
    rows = {key_of(r, first_run["entries"]): r for r in first_run["rows"]}
    span = rows["span"]
    assert (span["clip_id"], span["start_s"], span["end_s"], span["prompt"]) == ("user-span", 1.0, 5.0,
                                                                                 "What is heard?")
    long_rows = sorted((r for r in first_run["rows"] if key_of(r, first_run["entries"]) == "long"),
                       key=lambda r: r["window_index"])
    assert [round(r["start_s"], 3) for r in long_rows] == [0.0, 3.0, 6.0]
    assert round(long_rows[-1]["end_s"], 2) == 9.0
    assert rows["bbb_revenge_0281.5-0284.7.mp4"]["end_s"] == pytest.approx(3.2, abs=0.1)


@job
def test_output_files_schema_and_bookkeeping(first_run):
    output, summary, config = first_run["output"], first_run["summary"], first_run["config"]
    files = part_files(output)
    assert files
    for name in files:
        assert pq.read_schema(output / name).remove_metadata().equals(OUTPUT_SCHEMA)
    bookkeeping = output / "_avsieve"
    manifest = pq.read_table(bookkeeping / f"manifest-{config.config_hash()}.parquet")
    assert manifest.num_rows == len(EXPECTED)
    metrics = json.loads((bookkeeping / f"metrics-{config.config_hash()}.json").read_text())
    assert metrics["windows"] == WINDOWS and metrics == json.loads(json.dumps(summary))


@job
def test_rerun_into_fresh_dir_gives_the_same_rows(first_run, second_run):
    def key(rows):
        return sorted((r["clip_id"], r["status"], r["error_kind"], r["caption"], r["start_s"]) for r in rows)

    assert len(second_run["rows"]) == WINDOWS
    assert key(second_run["rows"]) == key(first_run["rows"])


@job
def test_rerun_gives_the_same_file_names(first_run, second_run):
    assert all(re.fullmatch(r"part-[0-9a-f]{20}\.parquet", n) for n in part_files(first_run["output"]))
    assert part_files(second_run["output"]) == part_files(first_run["output"])


@job
def test_empty_input_folder_writes_metrics_and_no_rows(ray_cluster, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("not media")
    summary = caption_job.run(job_config(str(tmp_path / "in"), str(tmp_path / "out")))
    assert (summary["inputs"], summary["windows"]) == (0, 0)
    assert list((tmp_path / "out" / "_avsieve").glob("metrics-*.json"))
    assert part_files(tmp_path / "out") == []


@job
def test_directory_input_of_real_clips(ray_cluster, real_clips, tmp_path):
    shutil.copy(REAL_CLIPS_DIR / "references.json", real_clips / "references.json")  # not media: ignored
    summary = caption_job.run(job_config(str(real_clips), str(tmp_path / "out"), window_s=2.0, batch_size=2))
    rows = read_rows(tmp_path / "out")
    # 4.0 s -> 2 windows, 3.2 s -> 2 windows (equal split, no tiny remainder), 3.0 s -> 2 windows
    assert len(rows) == summary["windows"] == 6 and summary["ok"] == 6
    assert summary["clips"] == summary["inputs"] == 3
    assert summary["not_taken"] == {"files": 1, "by_reason": {"extension": 1},
                                    "examples": {"extension": ["references.json"]}}


@job
def test_a_folder_of_video_sound_and_other_files(ray_cluster, clip_set, tmp_path):
    """Issue 29's folder: video with and without sound, sound alone (.m4a, and an .mp3 with cover art),
    a text file and a hidden file: one row per media window, the sound-alone rows captioned from audio
    alone, and the summary names what the listing did not take."""
    folder = tmp_path / "in"
    (folder / "podcasts").mkdir(parents=True)
    for name in ("av", "video_only", "sound"):
        shutil.copy(clip_set[name], folder / clip_set[name].name)
    media.write_sound(folder / "podcasts" / "episode.mp3", seconds=2.0, codec="libmp3lame", cover_art=True)
    (folder / "notes.txt").write_text("not media")
    (folder / ".DS_Store").write_bytes(b"x")
    summary = caption_job.run(job_config(str(folder), str(tmp_path / "out")))
    rows = {r["uri"].rsplit("/in/", 1)[1]: r for r in read_rows(tmp_path / "out")}
    assert sorted(rows) == ["av.mp4", "podcasts/episode.mp3", "sound.m4a", "video_only.mp4"]
    assert all(r["status"] == "ok" for r in rows.values())
    for name in ("sound.m4a", "podcasts/episode.mp3"):
        row = rows[name]
        assert (row["has_video"], row["has_audio"], row["video_tokens"], row["video_frames"]) == (False, True, 0, 0)
        assert row["audio_tokens"] > 0 and row["video_width"] is None and row["caption"]
    assert rows["av.mp4"]["has_video"] and rows["av.mp4"]["video_tokens"] > 0
    assert summary["ok_by_streams"] == {"video_and_sound": 1, "video_only": 1, "sound_only": 2}
    assert summary["not_taken"] == {"files": 2, "by_reason": {"extension": 1, "hidden": 1},
                                    "examples": {"extension": ["notes.txt"], "hidden": [".DS_Store"]}}


def test_trained_pruner_through_the_job(ray_cluster, real_clips, tmp_path):
    summary = caption_job.run(job_config(str(real_clips), str(tmp_path / "out"), pruner="avex", budget="adaptive",
                                         retention=0.3, batch_size=2))
    rows = read_rows(tmp_path / "out")
    assert summary["ok"] == len(rows) == 3
    kept = sum(r["video_tokens_kept"] + r["audio_tokens_kept"] for r in rows)
    total = sum(r["video_tokens"] + r["audio_tokens"] for r in rows)
    # Calibrated (in Ray tasks) on all three windows of the run itself: its mean meets the target.
    assert abs(kept / total - 0.3) <= 0.02, kept / total
    assert summary["budget_c_ref"] is not None and all(r["pruner"] == "avex" for r in rows)
    assert {r["pruner_weights_version"] for r in rows} == {r["model_version"] for r in rows} != {None}


def test_calibration_sample_size_keys_adaptive_runs_only():
    base = job_config("in", "out", pruner="uniform", budget="adaptive", retention=0.4)
    assert base.config_hash() != dataclasses.replace(base, calibration_windows=8).config_hash()
    fixed = dataclasses.replace(base, budget="fixed")
    assert fixed.config_hash() == dataclasses.replace(fixed, calibration_windows=8).config_hash()
    assert base.config_hash() == dataclasses.replace(base, calibration_windows=64).config_hash()  # the default


def test_missing_pruner_weights_stop_the_job_before_ray(real_clips, tmp_path):
    from operators.pruning.learned import PrunerWeightsError

    with pytest.raises(PrunerWeightsError, match="train_pruner"):
        caption_job.run(job_config(str(real_clips), str(tmp_path / "out"), pruner="echoingpixels",
                                   pruner_weights=str(tmp_path / "missing.safetensors")))
    assert not (tmp_path / "out").exists()



def test_missing_model_directory_stops_the_job_with_a_readable_error(real_clips, tmp_path):
    from operators.models.qwen2_5_omni import ModelNotFoundError

    # A mistyped local path used to surface as transformers' "couldn't connect to huggingface.co".
    with pytest.raises(ModelNotFoundError, match="neither a local Qwen2.5-Omni / Qwen3-Omni directory"):
        caption_job.run(job_config(str(real_clips), str(tmp_path / "out"), model=str(tmp_path / "model-v0")))
    assert not (tmp_path / "out").exists()

# ---- configuration: YAML keys mirror the flags ------------------------------------------------------


def test_every_config_field_has_a_flag():
    flags = {a.dest: a.option_strings for a in build_parser()._actions if a.dest != "help"}
    for name in CaptionConfig.__dataclass_fields__:
        assert flags[name] == ["--" + name.replace("_", "-")]
    assert "config" in flags


def test_yaml_keys_mirror_flags_and_flags_win(tmp_path):
    values = {"input": "s3://b/in/", "output": "s3://b/out/", "window-s": 12.5, "max_new_tokens": 16,
              "batch-size": 2, "progress": False, "pruner": "none", "max-pixels": 50176, "prompt": "P"}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(values))
    from_yaml = load_config(["--config", str(path)])
    from_flags = load_config(["--input", "s3://b/in/", "--output", "s3://b/out/", "--window-s", "12.5",
                              "--max-new-tokens", "16", "--batch-size", "2", "--progress", "false",
                              "--pruner", "none", "--max-pixels", "50176", "--prompt", "P"])
    assert from_yaml == from_flags
    assert from_yaml.config_hash() == from_flags.config_hash()
    overridden = load_config(["--config", str(path), "--window-s", "3", "--output", "/tmp/x"])
    assert (overridden.window_s, overridden.output, overridden.batch_size) == (3.0, "/tmp/x", 2)


def test_yaml_unknown_key_and_missing_io_are_rejected(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"input": "a", "output": "b", "windows": 3}))
    with pytest.raises(SystemExit, match="unknown key 'windows'"):
        load_config(["--config", str(path)])
    with pytest.raises(SystemExit, match="--input and --output"):
        load_config(["--input", "a"])
    with pytest.raises(SystemExit, match="drop --temperature"):
        load_config(["--input", "a", "--output", "b", "--num-beams", "3", "--temperature", "0.7"])
    with pytest.raises(SystemExit, match="at least 1"):
        load_config(["--input", "a", "--output", "b", "--num-beams", "0"])


def test_config_hash_tracks_caption_defining_fields_only():
    base = CaptionConfig(input="a", output="b")
    assert base.config_hash() == CaptionConfig(input="x", output="y", batch_size=9, actors=3).config_hash()
    assert base.config_hash() != CaptionConfig(input="a", output="b", window_s=10.0).config_hash()
    assert base.config_hash() != CaptionConfig(input="a", output="b", prompt="other").config_hash()


@job
def test_rerun_into_same_dir_keeps_one_row_per_window(ray_cluster, real_clips, tmp_path):
    config = job_config(str(real_clips / "mdn_stream-of-water.mp4"), str(tmp_path / "out"))
    first = caption_job.run(config)
    second = caption_job.run(config)
    assert first["windows"] == 1
    assert second["windows"] == 1 and len(read_rows(tmp_path / "out")) == 1
