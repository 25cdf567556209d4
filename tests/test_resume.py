"""Resume and scheduled reprocessing: what a rerun skips, redoes and keeps (operators/resume.py, sink.py).

Planning and reading are tested on hand-made output tables (fast); one module-scoped sequence of real
runs on the shared Ray cluster checks the whole loop: skip, retry a transient error, pick up a changed
file, write another configuration alongside, --recompute and --retry-errors.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from operators.resume import plan_run
from operators.schema import conform
from operators.sink import read_output, sweep_temp_parts, write_part
from operators.sources import add_versions, list_inputs, version_fields
from pipelines import caption as caption_job
from pipelines.config import CAPTION_DEFINING, CaptionConfig

import media
from conftest import job_config

T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)


def row(source, index, n, status="ok", kind=None, version="v1", config="h", age_days=0, **extra) -> dict:
    return {"clip_id": f"{source}{index}", "source_id": source, "window_index": index, "n_windows": n,
            "status": status, "error_kind": kind, "error": "boom" if status == "error" else None,
            "source_version": version, "config_hash": config, "created_at": T0 + timedelta(days=age_days),
            **extra}


def source(name, version="v1") -> dict:
    return {"source_id": name, "uri": f"/x/{name}.mp4", "source_version": version}


@pytest.fixture()
def written(tmp_path) -> str:
    out = str(tmp_path / "out")
    rows = [
        row("A", 0, 2), row("A", 1, 2),  # complete
        row("B", 0, 3),  # 1 of 3 windows: the run was killed
        row("C", 0, 1, version="old"),  # the file changed since
        row("D", 0, 1, "error", "decode"),  # deterministic error: kept
        row("E", 0, 1, "error", "io"),  # transient error: retried
        row("F", 0, 2), row("F", 1, 2, "error", "timeout"),  # one window to retry
        row("G", 0, 1, config="other"),  # another configuration only
    ]
    write_part(conform(rows), out)
    return out


def test_plan_skips_complete_resumes_partial_and_redoes_changed(written):
    listed = [source(s) for s in "ABCDEFGH"]
    plan = plan_run(listed, written, "h")
    todo = {r["source_id"]: r["done_windows"] for r in plan.todo}
    assert todo == {"B": ["B0"], "C": None, "E": None, "F": ["F0"], "G": None, "H": None}
    assert (plan.skipped_sources, plan.partial_sources) == (2, 2)  # A and D; B and F
    assert plan.skipped_windows == 2 + 1 + 1 + 1  # A's two, D's one, the done windows of B and F
    assert plan.retried_errors == 2  # E0 (io) and F1 (timeout)


def test_retry_errors_and_recompute(written):
    listed = [source(s) for s in "ADE"]
    assert [r["source_id"] for r in plan_run(listed, written, "h", retry_errors=True).todo] == ["D", "E"]
    forced = plan_run(listed, written, "h", recompute=True)
    assert [r["source_id"] for r in forced.todo] == ["A", "D", "E"] and forced.skipped_sources == 0
    assert all(r["done_windows"] is None for r in forced.todo)


def test_rows_of_another_model_version_are_not_done(tmp_path):
    out = str(tmp_path / "out")
    write_part(conform([
        row("A", 0, 1, model_version="m1"),
        row("B", 0, 2, model_version="m1"), row("B", 1, 2, model_version="m2"),
        row("L", 0, 1),  # written before rows carried a model version
    ]), out)
    listed = [source(s) for s in "ABL"]
    same = plan_run(listed, out, "h", model_version="m1")
    assert [(r["source_id"], r["done_windows"]) for r in same.todo] == [("B", ["B0"])]
    new = plan_run(listed, out, "h", model_version="m3")
    assert [(r["source_id"], r["done_windows"]) for r in new.todo] == [("A", None), ("B", None)]
    assert new.skipped_sources == 1  # L: no version to compare, the config hash decides
    assert len(plan_run(listed, out, "h").todo) == 0  # model not fingerprinted: the config hash decides


def test_empty_or_missing_output_plans_everything(tmp_path):
    plan = plan_run([source("A")], str(tmp_path / "none"), "h")
    assert [r["source_id"] for r in plan.todo] == ["A"] and plan.skipped_sources == 0


def test_read_output_keeps_the_current_row_per_window(tmp_path):
    out = str(tmp_path / "out")
    write_part(conform([
        row("A", 0, 1, caption="first"),
        row("B", 0, 2, caption="old version"), row("B", 1, 2, caption="old version"),
        row("E", 0, 1, "error", "io"),
        row("U", 0, 1, "error", "io", clip_id="U-open-failed"),  # the source failed to open, once
    ]), out)
    write_part(conform([
        row("A", 0, 1, "error", "model", age_days=1),  # a newer error does not hide an ok row
        row("B", 0, 1, version="v2", age_days=1, caption="new version"),  # the file changed: 1 window now
        row("E", 0, 1, age_days=1, caption="retried"),
        row("U", 0, 3, age_days=1), row("U", 1, 3, age_days=1), row("U", 2, 3, age_days=1),
    ]), out)
    current = {(r["source_id"], r["window_index"]): r for r in read_output(out).to_pylist()}
    assert sorted(current) == [("A", 0), ("B", 0), ("E", 0), ("U", 0), ("U", 1), ("U", 2)]
    assert current[("A", 0)]["caption"] == "first"
    assert current[("B", 0)]["caption"] == "new version"  # and B's old window 1 is gone
    assert current[("E", 0)]["caption"] == "retried"
    assert current[("U", 0)]["status"] == "ok"  # the old open-failure row does not linger
    assert read_output(out, dedupe=False).num_rows == 11
    assert read_output(out, config_hash="other").num_rows == 0
    assert read_output(out, columns=["clip_id"]).column_names == ["clip_id"]


def test_part_names_include_the_configuration(tmp_path):
    out = str(tmp_path / "out")
    a = write_part(conform([row("A", 0, 1, config="h1")]), out)
    b = write_part(conform([row("A", 0, 1, config="h2")]), out)
    assert a != b and Path(a).exists() and Path(b).exists()  # another config never overwrites a part
    assert write_part(conform([row("A", 0, 1, config="h1")]), out) == a  # same rows: same name


def test_sweep_removes_only_old_temporary_parts(tmp_path):
    old, young = tmp_path / ".tmp-old-part-1.parquet", tmp_path / ".tmp-young-part-2.parquet"
    old.write_bytes(b"half")
    young.write_bytes(b"half")
    past = time.time() - 7 * 3600
    os.utime(old, (past, past))
    assert sweep_temp_parts(str(tmp_path)) == 1
    assert not old.exists() and young.exists()


def test_list_inputs_records_the_source_version(tmp_path):
    clip = tmp_path / "in" / "a.mp4"
    clip.parent.mkdir()
    clip.write_bytes(b"12345")
    (first,) = list_inputs(str(clip.parent))
    assert (first["source_size"], first["source_etag"]) == (5, None) and first["source_mtime"] > 0
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"uri": str(clip)}) + "\n")
    listed = list_inputs(str(manifest))
    assert listed[0]["source_version"] is None  # manifests are not stat-ed up front
    add_versions(listed)
    assert listed[0]["source_version"] == first["source_version"]  # info() == the folder listing
    os.utime(clip, (first["source_mtime"] + 10, first["source_mtime"] + 10))
    assert list_inputs(str(clip.parent))[0]["source_version"] != first["source_version"]
    # Object stores: ETag and LastModified; a manifest may carry the fields itself (no stat at all).
    s3 = version_fields({"size": 5, "LastModified": T0, "ETag": '"abc"'})
    assert (s3["source_mtime"], s3["source_etag"]) == (T0.timestamp(), "abc")
    manifest.write_text(json.dumps({"uri": "s3://b/x.mp4", "source_size": 5, "source_etag": "abc"}) + "\n")
    assert list_inputs(str(manifest))[0]["source_version"] == version_fields({"size": 5, "etag": "abc"})[
        "source_version"]


def test_new_settings_keep_existing_config_hashes():
    """Outputs written before these settings existed must still be recognised (no mass recompute)."""
    base = CaptionConfig(input="a", output="b")
    legacy = {name: getattr(base, name) for name in CAPTION_DEFINING}
    digest = hashlib.sha1(json.dumps(legacy, sort_keys=True, default=str).encode()).hexdigest()[:12]
    assert base.config_hash() == digest
    same = CaptionConfig(input="a", output="b", recompute=True, retry_errors=True, decode_timeout_s=5.0)
    assert same.config_hash() == digest
    assert CaptionConfig(input="a", output="b", max_prompt_tokens=512).config_hash() != digest
    assert CaptionConfig(input="a", output="b", num_beams=1).config_hash() == digest  # greedy, as before
    assert CaptionConfig(input="a", output="b", num_beams=4).config_hash() != digest



def test_retrained_pruner_weights_change_the_config_hash(tmp_path):
    """A scheduled rerun after retraining a pruner must caption again, not skip under the old hash."""
    import os
    import shutil

    from operators.models.qwen2_5_omni import resolve_model_source
    from operators.pruning.learned import default_weights

    shipped = default_weights(resolve_model_source("embedded"), "avex")
    weights = tmp_path / "avex.safetensors"
    shutil.copy(shipped, weights)
    by_path = CaptionConfig(input="a", output="b", pruner="avex", pruner_weights=str(weights))
    first = by_path.config_hash()
    assert CaptionConfig(input="a", output="b", pruner="avex").config_hash() != first  # path is keyed too
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))  # same path, new weights, written later (as a retrain would)
    os.utime(weights, ns=(shipped.stat().st_atime_ns, shipped.stat().st_mtime_ns + 10**9))
    assert by_path.config_hash() != first
    shutil.copy2(shipped, weights)
    assert by_path.config_hash() == first
    assert CaptionConfig(input="a", output="b", pruner="uniform").config_hash() == \
        CaptionConfig(input="a", output="b", pruner="uniform").config_hash()

# ---- the whole loop, on the shared Ray cluster -------------------------------------------------------


def rows_of(output: Path, config_hash: str) -> dict:
    return {(r["uri"], r["window_index"]): r for r in read_output(str(output), config_hash=config_hash).to_pylist()}


@pytest.fixture(scope="module")
def loop(ray_cluster, tmp_path_factory):
    """a.mp4 (1 window), b.mp4 (2 windows), c.mp4 (1 window), gone.mp4 (missing) via a manifest; a first run."""
    folder = tmp_path_factory.mktemp("sched")
    a = media.write_clip(folder / "a.mp4", seconds=2.0)
    b = media.write_clip(folder / "b.mp4", seconds=6.0, fps=5)
    c = media.write_clip(folder / "c.mp4", seconds=2.0)
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({"uri": str(p)}) + "\n" for p in (a, b, c, folder / "gone.mp4")))
    config = job_config(str(manifest), str(folder / "out"))
    first = caption_job.run(config)
    return {"config": config, "first": first, "a": a, "b": b, "c": c, "out": folder / "out", "folder": folder}


def rewrite_output(out: Path, rows: list[dict]) -> None:
    for part in out.glob("part-*.parquet"):
        part.unlink()
    write_part(conform(rows), str(out))


@pytest.mark.slow
def test_scheduled_rerun_skips_everything_without_starting_work(loop):
    assert loop["first"]["run"]["windows"] == loop["first"]["windows"] == 5
    t0 = time.perf_counter()
    again = caption_job.run(loop["config"])
    assert again["run"]["windows"] == 0 and again["windows"] == 5
    assert again["skipped"] == {"sources": 4, "windows": 5, "partial_sources": 0}
    assert time.perf_counter() - t0 < 10  # nothing to do: no Ray job at all


@pytest.mark.slow
def test_rerun_retries_transient_errors_resumes_partial_sources_and_recaptions_changed_files(loop):
    config, out = loop["config"], loop["out"]
    h = config.config_hash()
    before = read_output(str(out), config_hash=h).to_pylist()
    lost = next(r for r in before if r["uri"] == str(loop["b"]) and r["window_index"] == 1)
    edited = []
    for r in read_output(str(out), dedupe=False).to_pylist():
        if r["uri"] == str(loop["a"]):  # an earlier run failed on a.mp4 with a transient error
            r = dict(r, status="error", error_kind="io", error="OSError: connection reset", caption=None)
        if r["clip_id"] != lost["clip_id"]:  # ... and was killed before b.mp4's second window was written
            edited.append(r)
    rewrite_output(out, edited)
    media.write_clip(loop["c"], seconds=9.0, fps=5)  # c.mp4 changes on disk: 3 windows now
    summary = caption_job.run(config)
    assert summary["retried_errors"] == 1
    assert summary["skipped"] == {"sources": 1, "windows": 1 + 1, "partial_sources": 1}  # gone; b's window 0
    assert summary["run"]["windows"] == 1 + 1 + 3  # a retried, b's window 1, c recaptioned
    current = rows_of(out, h)
    assert len(current) == summary["windows"] == 1 + 2 + 3 + 1
    assert current[(str(loop["a"]), 0)]["status"] == "ok"
    b1 = current[(str(loop["b"]), 1)]
    assert (b1["clip_id"], b1["caption"]) == (lost["clip_id"], lost["caption"])  # greedy: the same caption
    assert [current[(str(loop["c"]), i)]["n_windows"] for i in range(3)] == [3, 3, 3]
    assert current[(str(loop["folder"] / "gone.mp4"), 0)]["error_kind"] == "missing"


@pytest.mark.slow
def test_another_configuration_writes_alongside(loop):
    config, out = loop["config"], loop["out"]
    before = {p.name: p.stat().st_mtime for p in out.glob("part-*.parquet")}
    other = job_config(config.input, str(out), prompt="What is heard?", limit=1)
    summary = caption_job.run(other)
    assert summary["run"]["windows"] == 1 and summary["config_hash"] != config.config_hash()
    assert {p.name: p.stat().st_mtime for p in out.glob("part-*.parquet") if p.name in before} == before
    (alongside,) = rows_of(out, other.config_hash()).values()
    assert alongside["prompt"] == "What is heard?" and len(rows_of(out, config.config_hash())) == 7
    assert pq.read_table(out).num_rows > 7  # runs append; readers see one current row per window


@pytest.fixture()
def handed(monkeypatch) -> dict:
    """Records which input files the driver hands to Ray ("uris"), instead of running the Ray job (the Ray
    part is the same as in every other run)."""
    from pipelines import ray_adapter

    handed = {}

    def fake_job(manifest, output, prepare, caption, **_):
        handed["uris"] = sorted(Path(u).name for u in pq.read_table(manifest).column("uri").to_pylist())

    monkeypatch.setattr(ray_adapter, "connect", lambda address: None)
    monkeypatch.setattr(ray_adapter, "run_caption_job", fake_job)
    return handed


@pytest.mark.slow
def test_recompute_and_retry_errors_flags_reach_the_plan(loop, handed):
    """Which manifest rows the driver hands to Ray."""
    config = loop["config"]
    caption_job.run(job_config(config.input, str(loop["out"]), recompute=True))
    assert handed.pop("uris") == ["a.mp4", "b.mp4", "c.mp4", "gone.mp4"]
    caption_job.run(job_config(config.input, str(loop["out"]), retry_errors=True))
    assert handed.pop("uris") == ["gone.mp4"]  # the one deterministic error
    summary = caption_job.run(config)
    assert "uris" not in handed and summary["skipped"]["sources"] == 4


@pytest.mark.slow
def test_rows_record_the_model_version_and_a_new_model_captions_again(loop, handed):
    from operators.models.fingerprint import model_version
    from operators.models.qwen2_5_omni import resolve_model_source

    config, out = loop["config"], loop["out"]
    current = read_output(str(out), config_hash=config.config_hash(), dedupe=False).to_pylist()
    assert {r["model_version"] for r in current} == {model_version(resolve_model_source(config.model))}
    # a.mp4's rows were written by an earlier version of the model at the same path.
    rewrite_output(out, [dict(r, model_version="0ldm0de1") if r["uri"] == str(loop["a"]) else r for r in current])
    caption_job.run(config)
    assert handed["uris"] == ["a.mp4"]


def test_reprocessing_flags_parse_as_switches():
    from pipelines.config import load_config

    config = load_config(["--input", "a", "--output", "b", "--recompute", "--retry-errors", "--progress", "false",
                          "--decode-timeout-s", "30", "--max-prompt-tokens", "4096"])
    assert (config.recompute, config.retry_errors, config.progress) == (True, True, False)
    assert (config.decode_timeout_s, config.max_prompt_tokens) == (30.0, 4096)
    assert load_config(["--input", "a", "--output", "b", "--recompute", "false"]).recompute is False
