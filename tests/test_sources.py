"""operators/sources.py: --input (folder, glob, single file, manifest) -> manifest rows with stable ids."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from operators.sources import MANIFEST_SCHEMA, list_inputs, read_manifest, stable_id, window_id


@pytest.fixture()
def tree(tmp_path):
    """clips/{b.mp4, a.MOV, notes.txt, sub/c.webm, sub/d.json}: three media files, two others."""
    root = tmp_path / "clips"
    (root / "sub").mkdir(parents=True)
    for name in ("b.mp4", "a.MOV", "notes.txt", "sub/c.webm", "sub/d.json"):
        (root / name).write_bytes(b"x")
    return root


def test_stable_id_is_deterministic_short_hex_and_span_sensitive():
    a = stable_id("s3://b/x.mp4", 0.0, 4.0)
    assert a == stable_id("s3://b/x.mp4", 0.0, 4.0)
    assert len(a) == 20 and int(a, 16) >= 0
    assert a != stable_id("s3://b/x.mp4", 0.0, 4.5)
    assert a != stable_id("s3://b/y.mp4", 0.0, 4.0)
    # Floats are compared at millisecond precision, so re-planned windows keep their id.
    assert a == stable_id("s3://b/x.mp4", 0.0, 4.0001)
    # None and "" are the same missing part; the part separator keeps ("ab","c") != ("a","bc").
    assert stable_id("u", None) == stable_id("u", "")
    assert stable_id("ab", "c") != stable_id("a", "bc")


def test_window_id_uses_user_clip_id_and_suffixes_windows():
    assert window_id("clip-7", "u", 0.0, 3.0, 1, 0) == "clip-7"
    assert window_id("clip-7", "u", 3.0, 6.0, 3, 1) == "clip-7#w1"
    assert window_id(None, "u", 0.0, 3.0, 1, 0) == stable_id("u", 0.0, 3.0)
    assert window_id(None, "u", 0.0, 3.0, 2, 0) != window_id(None, "u", 3.0, 6.0, 2, 1)


def test_folder_lists_media_recursively_sorted_with_stable_ids(tree):
    rows = list_inputs(str(tree), default_prompt="P")
    assert [r["uri"] for r in rows] == [str(tree / "a.MOV"), str(tree / "b.mp4"), str(tree / "sub/c.webm")]
    assert all(r["prompt"] == "P" and r["clip_id"] is None and r["start_s"] is None for r in rows)
    assert [r["source_id"] for r in rows] == [stable_id(r["uri"], None, None) for r in rows]
    assert rows == list_inputs(str(tree) + "/", default_prompt="P")  # trailing slash: same rows
    assert set(rows[0]) == set(MANIFEST_SCHEMA.names)
    assert [r["uri"] for r in list_inputs(str(tree), limit=2)] == [str(tree / "a.MOV"), str(tree / "b.mp4")]


def test_glob_and_single_and_missing_file(tree):
    assert [r["uri"] for r in list_inputs(str(tree / "*.mp4"))] == [str(tree / "b.mp4")]
    assert [r["uri"] for r in list_inputs(str(tree / "**" / "*.webm"))] == [str(tree / "sub/c.webm")]
    assert [r["uri"] for r in list_inputs(str(tree / "b.mp4"))] == [str(tree / "b.mp4")]
    # A missing path is kept as one input: it must come out as an error row, not vanish.
    missing = list_inputs(str(tree / "gone.mp4"))
    assert [r["uri"] for r in missing] == [str(tree / "gone.mp4")]


def test_empty_folder_has_no_inputs(tmp_path):
    assert list_inputs(str(tmp_path)) == []


def test_jsonl_manifest_relative_uris_spans_ids_and_prompts(tmp_path):
    lines = [
        {"uri": "clips/a.mp4", "clip_id": "A", "start_s": 1, "end_s": 5.5, "prompt": "What is heard?"},
        {"uri": "/abs/b.mp4"},
        {"uri": "s3://bucket/c.mp4", "clip_id": ""},
        {"uri": "clips/a.mp4", "start_s": 5.5},  # same file, another span: another source
    ]
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    rows = list_inputs(str(path), default_prompt="default")
    by_uri = [(r["uri"], r["start_s"]) for r in rows]
    a = str(tmp_path / "clips/a.mp4")
    assert by_uri == [("/abs/b.mp4", None), (a, 1.0), (a, 5.5), ("s3://bucket/c.mp4", None)]
    first = rows[1]
    assert (first["clip_id"], first["end_s"], first["prompt"]) == ("A", 5.5, "What is heard?")
    assert rows[0]["prompt"] == "default" and rows[3]["clip_id"] is None
    assert len({r["source_id"] for r in rows}) == 4
    assert first["source_id"] == stable_id(a, 1.0, 5.5)


def test_csv_and_parquet_manifests_give_the_same_rows(tmp_path):
    table = pa.table({"uri": ["x.mp4", "y.mp4"], "start_s": [0.0, 2.0], "end_s": [4.0, None]})
    pq.write_table(table, tmp_path / "m.parquet")
    (tmp_path / "m.csv").write_text("uri,start_s,end_s\nx.mp4,0,4\ny.mp4,2,\n")
    from_parquet = list_inputs(str(tmp_path / "m.parquet"))
    assert from_parquet == list_inputs(str(tmp_path / "m.csv"))
    assert [(r["uri"], r["start_s"], r["end_s"]) for r in from_parquet] == [
        (str(tmp_path / "x.mp4"), 0.0, 4.0), (str(tmp_path / "y.mp4"), 2.0, None)]


def test_single_line_json_array_manifest(tmp_path):
    (tmp_path / "m.json").write_text(json.dumps([{"uri": "/a.mp4"}, {"uri": "/b.mp4"}]))
    assert [r["uri"] for r in list_inputs(str(tmp_path / "m.json"))] == ["/a.mp4", "/b.mp4"]


def test_manifest_without_uri_column_is_rejected(tmp_path):
    (tmp_path / "m.csv").write_text("path\n/a.mp4\n")
    with pytest.raises(ValueError, match="no 'uri' column"):
        read_manifest(str(tmp_path / "m.csv"))


def test_pretty_printed_json_array_manifest(tmp_path):
    (tmp_path / "m.json").write_text(json.dumps([{"uri": "/a.mp4"}, {"uri": "/b.mp4"}], indent=1))
    assert [r["uri"] for r in list_inputs(str(tmp_path / "m.json"))] == ["/a.mp4", "/b.mp4"]


def test_csv_manifest_keeps_clip_ids_verbatim(tmp_path):
    (tmp_path / "m.csv").write_text("uri,clip_id\n/a.mp4,007\n/b.mp4,12e3\n")
    assert [r["clip_id"] for r in list_inputs(str(tmp_path / "m.csv"))] == ["007", "12e3"]


def test_a_folder_listing_reports_every_file_it_does_not_take(tmp_path):
    """Nothing is skipped in silence: audio files are taken (captioned from their sound), hidden files and
    other extensions are counted by reason with their names, and a manifest row is never left out."""
    from operators.sources import AUDIO_EXTENSIONS, scan_inputs

    audio = [f"sound{ext.upper() if i % 2 else ext}" for i, ext in enumerate(AUDIO_EXTENSIONS)]
    for name in ("a.mp4", "sub/b.MKV", "sub/take.wav", "notes.txt", ".DS_Store", "sub/._a.mp4",
                 ".cache/c.mp4", "empty.mp4", *audio):
        path = tmp_path / "in" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"" if name == "empty.mp4" else b"x")
    rows, not_taken = scan_inputs(str(tmp_path / "in"))
    assert sorted(r["uri"].rsplit("/in/", 1)[1] for r in rows) == sorted(["a.mp4", "empty.mp4", "sub/b.MKV",
                                                                          "sub/take.wav", *audio])
    assert len(audio) == 8
    report = not_taken.as_dict()
    assert report["files"] == 4
    assert report["by_reason"] == {"extension": 1, "hidden": 3}
    assert sorted(report["examples"]["hidden"]) == [".DS_Store", ".cache/c.mp4", "sub/._a.mp4"]
    assert "4 file(s)" in not_taken.line() and "notes.txt" in not_taken.line()
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps({"uri": u}) for u in ("in/song.m4a", "in/notes.txt", "gone.mp4")))
    rows, not_taken = scan_inputs(str(manifest))
    assert len(rows) == 3 and not_taken.as_dict()["files"] == 0 and not_taken.line() is None
