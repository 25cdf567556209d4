"""Inputs (and once the output) on remote filesystems: a real local HTTP server and a moto S3 server.

The HTTP server is Python's http.server in a thread (fsspec's http:// goes through aiohttp); S3 is moto's
standalone server on the port that conftest handed to the Ray cluster's environment (AWS_ENDPOINT_URL).
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import fsspec
import pytest

from operators.prepare import prepare_windows
from operators.sink import read_output
from operators.sources import list_inputs
from pipelines import caption as job

from conftest import REAL_CLIPS_DIR, S3_ENV, S3_PORT, job_config, release_s3_port

REAL = "bbb_revenge_0281.5-0284.7.mp4"
BUCKET = "avsieve-test"


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep test output readable
        pass


@pytest.fixture(scope="module")
def http_root(clip_set, tmp_path_factory):
    """http://127.0.0.1:PORT serving clips/{av, video_only, zero, REAL}.mp4 and manifest.jsonl."""
    root = tmp_path_factory.mktemp("www")
    (root / "clips").mkdir()
    for name in ("av", "video_only", "zero"):
        shutil.copy(clip_set[name], root / "clips" / f"{name}.mp4")
    shutil.copy(REAL_CLIPS_DIR / REAL, root / "clips" / REAL)
    (root / "clips" / "readme.txt").write_text("not media")
    manifest = [{"uri": f"clips/{n}.mp4"} for n in ("av", "video_only", "zero", "missing")]
    manifest.append({"uri": f"clips/{REAL}", "clip_id": "real-1"})
    (root / "manifest.jsonl").write_text("".join(json.dumps(m) + "\n" for m in manifest))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=root))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _wait_for_port(port: int, process, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"moto server exited with code {process.returncode}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"moto server not listening on {port} after {timeout_s:g} s")


@pytest.fixture(scope="module")
def s3(clip_set):
    """moto S3 with s3://BUCKET/in/clips/{av, silent, text, sub/video_only}.mp4, a notes.txt and a CSV manifest.

    The server runs in its own process: in this one, its Flask context proxies would sit in module globals
    that vLLM's CPU platform scans when an engine starts later in the session (and raise there)."""
    saved = {k: os.environ.get(k) for k in S3_ENV}
    os.environ.update(S3_ENV)
    release_s3_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(S3_PORT)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import boto3

        _wait_for_port(S3_PORT, server)

        client = boto3.client("s3", endpoint_url=S3_ENV["AWS_ENDPOINT_URL"])
        client.create_bucket(Bucket=BUCKET)
        for key, name in [("in/clips/av.mp4", "av"), ("in/clips/silent.mp4", "silent"),
                          ("in/clips/text.mp4", "text"), ("in/clips/sub/video_only.mp4", "video_only")]:
            client.upload_file(str(clip_set[name]), BUCKET, key)
        client.put_object(Bucket=BUCKET, Key="in/clips/notes.txt", Body=b"not media")
        client.put_object(Bucket=BUCKET, Key="in/manifest.csv",
                          Body=b"uri,start_s,end_s\nclips/av.mp4,0.5,2.5\nclips/gone.mp4,,\n")
        fsspec.filesystem("s3").invalidate_cache()
        yield client
    finally:
        server.terminate()
        server.wait(timeout=30)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def by_name(rows):
    return {r["uri"].rsplit("/", 1)[-1]: r for r in rows}


# ---- HTTP ------------------------------------------------------------------------------------------


def test_http_folder_listing_finds_only_media(http_root):
    rows = list_inputs(f"{http_root}/clips/")
    assert [r["uri"] for r in rows] == [f"{http_root}/clips/{n}" for n in
                                        sorted(["av.mp4", "video_only.mp4", "zero.mp4", REAL])]


def test_http_manifest_resolves_relative_uris(http_root):
    rows = list_inputs(f"{http_root}/manifest.jsonl")
    assert sorted(r["uri"] for r in rows) == sorted(
        f"{http_root}/clips/{n}" for n in ["av.mp4", "video_only.mp4", "zero.mp4", "missing.mp4", REAL])
    assert by_name(rows)[REAL]["clip_id"] == "real-1"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_http_manifest_job(ray_cluster, http_root, tmp_path):
    summary = job.run(job_config(f"{http_root}/manifest.jsonl", str(tmp_path / "out")))
    rows = by_name(read_output(str(tmp_path / "out")).to_pylist())
    assert summary["windows"] == len(rows) == 5
    got = {name: (r["status"], r["error_kind"], r["has_audio"]) for name, r in rows.items()}
    assert got == {
        "av.mp4": ("ok", None, True),
        "video_only.mp4": ("ok", None, False),
        "zero.mp4": ("error", "decode", None),
        "missing.mp4": ("error", "missing", None),
        REAL: ("ok", None, True),
    }
    assert rows[REAL]["clip_id"] == "real-1" and rows[REAL]["uri"] == f"{http_root}/clips/{REAL}"


# ---- S3 --------------------------------------------------------------------------------------------


def test_s3_prefix_listing_and_glob(s3):
    rows = list_inputs(f"s3://{BUCKET}/in/clips/")
    assert [r["uri"] for r in rows] == [f"s3://{BUCKET}/in/clips/{n}" for n in
                                        ["av.mp4", "silent.mp4", "sub/video_only.mp4", "text.mp4"]]
    assert [r["uri"] for r in list_inputs(f"s3://{BUCKET}/in/clips/*.mp4")] == [
        f"s3://{BUCKET}/in/clips/{n}" for n in ["av.mp4", "silent.mp4", "text.mp4"]]


def test_s3_manifest_rows_are_read_and_decoded(s3, prepare_settings):
    rows = list_inputs(f"s3://{BUCKET}/in/manifest.csv")
    assert [(r["uri"], r["start_s"], r["end_s"]) for r in rows] == [
        (f"s3://{BUCKET}/in/clips/av.mp4", 0.5, 2.5), (f"s3://{BUCKET}/in/clips/gone.mp4", None, None)]
    windows = [w for r in rows for w in prepare_windows(r, prepare_settings)]
    assert [(w["status"], w["error_kind"], w["has_audio"]) for w in windows] == [
        ("ok", None, True), ("error", "missing", None)]
    assert (windows[0]["start_s"], windows[0]["end_s"]) == (0.5, 2.5)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_s3_prefix_job_with_s3_output(ray_cluster, s3):
    output = f"s3://{BUCKET}/out/run1"
    summary = job.run(job_config(f"s3://{BUCKET}/in/clips/", output))
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    rows = by_name(read_output(output).to_pylist())
    assert summary["windows"] == len(rows) == 4
    assert {n: (r["status"], r["error_kind"], r["has_audio"]) for n, r in rows.items()} == {
        "av.mp4": ("ok", None, True),
        "silent.mp4": ("ok", None, True),
        "video_only.mp4": ("ok", None, False),
        "text.mp4": ("error", "decode", None),
    }
    keys = fs.find(f"{BUCKET}/out/run1")
    assert any(k.endswith(".parquet") and "/_avsieve/" not in k for k in keys)
    bookkeeping = {k.rsplit("/", 1)[-1] for k in keys if "/_avsieve/" in k}
    assert bookkeeping == {f"manifest-{summary['config_hash']}.parquet", f"metrics-{summary['config_hash']}.json"}
    with fs.open(f"{BUCKET}/out/run1/_avsieve/metrics-{summary['config_hash']}.json") as f:
        assert json.load(f)["windows"] == 4
