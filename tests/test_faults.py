"""Failure recovery with real processes.

- The driver of `python -m pipelines.caption` (its own local Ray) is SIGKILLed while an output part is
  half written; rerunning the same command captions only the missing windows: one row per window.
- A caption actor process dies mid-run (os._exit, like an OOM kill): Ray restarts it, its batch is
  retried, nothing is lost; a window that kills the process every time becomes a "crash" error row.

Faults come from AVSIEVE_FAULT_* variables (operators/faults.py). Cleanup kills exactly the processes of
the session the killed driver led (its Ray cluster included); nothing else, and never `ray stop`.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from operators.schema import OUTPUT_SCHEMA
from operators.sink import read_output
from pipelines import caption as caption_job
from pipelines.config import load_config

import media
from conftest import REPO_ROOT, job_config, vllm_or_skip

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def session_members(sid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                found.append(int(entry))
    return found


def kill_session(sid: int, wait_s: float = 20.0) -> None:
    """SIGKILL every process of the session started for the driver (its Ray head, raylet, workers)."""
    deadline = time.time() + wait_s
    while time.time() < deadline:
        members = session_members(sid)
        if not members:
            return
        for pid in members:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
    raise AssertionError(f"processes of session {sid} survive: {session_members(sid)}")


def parts(output: Path) -> list[Path]:
    return sorted(output.glob("part-*.parquet"))


def temps(output: Path) -> list[Path]:
    return sorted(output.glob(".tmp-*"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """8 one-window clips and one 3-window clip: 11 windows in 3 prepare blocks (4 inputs each)."""
    folder = tmp_path_factory.mktemp("faults")
    for i in range(8):
        media.write_clip(folder / f"c{i}.mp4", seconds=2.0)
    media.write_clip(folder / "long.mp4", seconds=9.0, fps=5)
    return folder


WINDOWS = 11


def test_driver_killed_during_a_write_then_rerun_resumes(ray_cluster, inputs, tmp_path):
    output = tmp_path / "out"
    argv = ["--input", str(inputs), "--output", str(output), "--window-s", "4", "--max-new-tokens", "4",
            "--batch-size", "1", "--progress", "false"]
    ray_tmp = tempfile.mkdtemp(prefix="avk-", dir="/tmp")  # short: Ray's socket paths live under it
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_TMPDIR=ray_tmp, RAY_USAGE_STATS_ENABLED="0", AVSIEVE_FAULT_SLEEP_S="0.2",
               AVSIEVE_FAULT_WRITE_SLEEP_S="3")  # each part stays half written for 3 s
    log_path = tmp_path / "driver.log"
    with open(log_path, "w") as log:
        driver = subprocess.Popen([sys.executable, "-m", "pipelines.caption", *argv], cwd=REPO_ROOT, env=env,
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        # One part done and the next one freshly half written (its 3 s pause has barely begun: on a loaded
        # machine a temp file seen late in its pause could be renamed before the kill lands).
        while not (parts(output) and any(time.time() - t.stat().st_mtime < 1.0 for t in temps(output))):
            assert driver.poll() is None, "driver ended before the kill:\n" + log_path.read_text()[-3000:]
            assert time.time() < deadline, "no part appeared:\n" + log_path.read_text()[-3000:]
            time.sleep(0.1)
        kill_session(driver.pid)  # the driver and its Ray processes at once, as when the node dies
        driver.wait(timeout=30)
    finally:
        kill_session(driver.pid)  # start_new_session: the session id is the driver's pid
        shutil.rmtree(ray_tmp, ignore_errors=True)
    done_before = pq.read_table(output, schema=OUTPUT_SCHEMA).num_rows  # readers skip the .tmp- file
    assert 1 <= done_before < WINDOWS
    assert temps(output), "the kill should have landed during a write"
    assert driver.returncode == -signal.SIGKILL

    summary = caption_job.run(load_config(argv))  # the same command again (in-process, shared cluster)
    assert summary["run"]["windows"] == WINDOWS - done_before  # only the missing windows
    assert summary["skipped"]["windows"] == done_before
    assert summary["windows"] == summary["ok"] == WINDOWS
    physical = pq.read_table(output, schema=OUTPUT_SCHEMA).to_pylist()
    assert len(physical) == len({r["clip_id"] for r in physical}) == WINDOWS  # none lost, none duplicated
    assert read_output(str(output)).num_rows == WINDOWS


@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_caption_actor_death_is_survived_and_a_poison_window_becomes_an_error(ray_cluster, inputs, tmp_path,
                                                                              monkeypatch, engine):
    if engine == "vllm":
        vllm_or_skip()  # each restart of the actor starts a new vLLM engine in it
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("c0.mp4", "c1.mp4", "c2.mp4", "c3.mp4", "long.mp4"):
        shutil.copy(inputs / name, folder / name)
    media.write_clip(folder / "poison.mp4", seconds=2.0)
    marker = tmp_path / "died-once"
    monkeypatch.setenv("AVSIEVE_FAULT_EXIT_AT_BATCH", f"2:{marker}")  # one death mid-run
    monkeypatch.setenv("AVSIEVE_FAULT_POISON", "poison.mp4")  # kills its process every time
    summary = caption_job.run(job_config(str(folder), str(tmp_path / "out"), batch_size=2, engine=engine))
    assert marker.exists()
    rows = {Path(r["uri"]).name: r for r in read_output(str(tmp_path / "out")).to_pylist()
            if r["window_index"] == 0}
    assert summary["windows"] == 4 + 3 + 1 and summary["ok"] == 7
    assert summary["errors_by_kind"] == {"crash": 1}
    assert (rows["poison.mp4"]["status"], rows["poison.mp4"]["error_kind"]) == ("error", "crash")
    assert "died 2 times" in rows["poison.mp4"]["error"]
    assert not (tmp_path / "out" / "_avsieve" / "journal" / summary["run_id"]).exists()  # removed at the end
