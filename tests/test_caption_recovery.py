"""operators/caption.py recovery without Ray: a second attempt per failing row, and the crash journal."""

from __future__ import annotations

import json

import pytest

from operators.caption import CaptionSettings, Captioner, CrashJournal
from operators.prepare import prepare_windows


@pytest.fixture(scope="module")
def rows(clip_set, prepare_settings) -> list[dict]:
    out = []
    for name in ("av", "video_only", "silent"):
        base = {"source_id": name, "clip_id": None, "uri": str(clip_set[name]), "start_s": None, "end_s": None,
                "prompt": None}
        out.extend(prepare_windows(base, prepare_settings))
    return out


@pytest.fixture(scope="module")
def captioner(model_source) -> Captioner:
    return Captioner(CaptionSettings(model=model_source, device="cpu", max_new_tokens=4, config_hash="h",
                                     run_id="r1"))


class Flaky:
    """Wraps Captioner._caption: raises for the given clip ids, `times` times each."""

    def __init__(self, real, failing: set[str], times: int):
        self.real, self.left, self.calls = real, {c: times for c in failing}, []

    def __call__(self, batch):
        self.calls.append([r["clip_id"] for r in batch])
        for r in batch:
            if self.left.get(r["clip_id"], 0) > 0:
                self.left[r["clip_id"]] -= 1
                raise RuntimeError("transient")
        return self.real(batch)


def test_a_row_that_fails_once_is_captioned_on_its_second_attempt(captioner, rows, monkeypatch):
    flaky = Flaky(captioner._caption, {rows[1]["clip_id"]}, times=2)  # fails the batch, then alone once
    monkeypatch.setattr(captioner, "_caption", flaky)
    out = captioner.caption_rows(rows)
    assert [r["status"] for r in out] == ["ok"] * 3
    assert flaky.calls[0] == [r["clip_id"] for r in rows] and flaky.calls.count([rows[1]["clip_id"]]) == 2
    assert {r["run_id"] for r in out} == {"r1"} and all(r["created_at"] is not None for r in out)


def test_a_row_that_fails_twice_alone_becomes_a_model_error(captioner, rows, monkeypatch):
    monkeypatch.setattr(captioner, "_caption", Flaky(captioner._caption, {rows[0]["clip_id"]}, times=3))
    out = captioner.caption_rows(rows)
    assert [(r["status"], r["error_kind"]) for r in out] == [("error", "model"), ("ok", None), ("ok", None)]
    assert out[0]["error"] == "RuntimeError: transient"


def test_journal_isolates_windows_in_flight_at_a_death(captioner, rows, tmp_path, monkeypatch):
    path = tmp_path / "journal.json"
    ids = [r["clip_id"] for r in rows]
    # What a dead predecessor left: windows 0 and 1 in flight, and window 0 already in flight once before.
    path.write_text(json.dumps({"in_flight": ids[:2], "crashes": {ids[0]: 1}}))
    journal = CrashJournal(str(path))
    assert journal.crashes == {ids[0]: 2, ids[1]: 1}
    monkeypatch.setattr(captioner, "journal", journal)
    flaky = Flaky(captioner._caption, set(), 0)
    monkeypatch.setattr(captioner, "_caption", flaky)
    out = captioner.caption_rows(rows)
    assert (out[0]["status"], out[0]["error_kind"]) == ("error", "crash")  # never tried a third time
    assert [r["status"] for r in out[1:]] == ["ok", "ok"]
    assert sorted(flaky.calls) == sorted([[ids[2]], [ids[1]]])  # the suspect alone, the clean rest together
    assert json.loads(path.read_text())["in_flight"] == []  # nothing in flight between batches


def test_journal_without_crashes_leaves_no_file(tmp_path):
    path = tmp_path / "j.json"
    journal = CrashJournal(str(path))
    journal.begin(["a", "b"])
    assert json.loads(path.read_text())["in_flight"] == ["a", "b"]
    journal.end()
    assert not path.exists()
    assert CrashJournal(None).crashes == {}
