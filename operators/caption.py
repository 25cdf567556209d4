"""GPU (or CPU) stage: prepared window rows -> output rows with captions.

`CaptionActor` loads the model once per actor; `caption_rows` is the plain function it calls, so the
stage can be tested on a list of dicts without Ray. A failure in a batch is retried row by row; a row
gets two attempts on its own, then becomes an error row: nothing is dropped.

Process deaths (out of memory, a crashing kernel) are survived with a `CrashJournal`: before each
model call the actor notes which windows it is working on in a small local file. When Ray restarts the
dead actor and retries the batch, the new incarnation reads the note: those windows are captioned one
at a time, and a window that was in flight during two deaths becomes an error row of kind "crash"
instead of killing the actor forever.
"""

from __future__ import annotations

import json
import logging
import posixpath
from dataclasses import dataclass
from datetime import datetime, timezone

import fsspec
import pyarrow as pa

from operators import faults
from operators.prepare import error_text
from operators.schema import conform
from operators.sources import VERSION_FIELDS

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class CaptionSettings:
    model: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    attn_implementation: str = "sdpa"
    max_new_tokens: int  # no default here: the job's default lives in pipelines/config.py
    temperature: float = 0.0
    seed: int = 0
    num_beams: int = 1
    no_repeat_sentences: bool = False
    pruner: str = "none"
    pruner_weights: str | None = None
    allow_foreign_pruner_weights: bool = False
    budget: str = "fixed"
    retention: float | None = None  # None = the method's published default
    budget_c_ref: float | None = None  # adaptive budget's calibrated content level (pipelines/caption.py)
    config_hash: str = ""
    run_id: str = ""
    model_version: str | None = None  # fingerprint of the model's files, written to every row
    engine: str = "hf"  # resolved engine (operators/engines): hf or vllm


MAX_ATTEMPTS = 2  # a window that fails (raises, or is in flight when the process dies) twice is an error row
PASSED_THROUGH = ("clip_id", "source_id", "uri", "window_index", "start_s", "end_s", "prompt", "status", "error",
                  "error_kind", "has_audio", "has_video", "decode_ms", "schema_version", "n_windows", *VERSION_FIELDS,
                  "video_frames", "video_fps", "video_width", "video_height")


def _output_row(row: dict, settings: CaptionSettings, label: str) -> dict:
    out = {k: row.get(k) for k in PASSED_THROUGH}
    out.update(model=label, pruner=settings.pruner, budget=settings.budget, config_hash=settings.config_hash,
               run_id=settings.run_id or None, model_version=settings.model_version, engine=settings.engine)
    return out


class CrashJournal:
    """Which windows were in flight when this actor's process died, and how often (a JSON file).

    `path` is an fsspec URI that must survive the process and be private to the actor, and be readable
    wherever Ray restarts it, on any node: ray_adapter puts it in the output's `_avsieve/journal/`, keyed
    by run and actor id (which Ray keeps across restarts). None disables the journal.
    """

    def __init__(self, path: str | None):
        self.path = path
        self.crashes: dict[str, int] = {}
        if not path:
            return
        self.fs, self.fs_path = fsspec.core.url_to_fs(path)
        state = {}
        if self.fs.exists(self.fs_path):
            try:
                with self.fs.open(self.fs_path, "r") as f:
                    state = json.load(f)
            except (OSError, ValueError):
                state = {}
        self.crashes = dict(state.get("crashes", {}))
        for clip_id in state.get("in_flight", []):
            self.crashes[clip_id] = self.crashes.get(clip_id, 0) + 1
        if state.get("in_flight"):
            log.warning("caption process died on %d window(s) last time; retrying them one by one",
                        len(state["in_flight"]))
        self._write([])

    def begin(self, clip_ids: list[str]) -> None:
        self._write(clip_ids)

    def end(self) -> None:
        self._write([])

    def _write(self, in_flight: list[str]) -> None:
        if not self.path:
            return
        if not in_flight and not self.crashes:
            if self.fs.exists(self.fs_path):
                self.fs.rm(self.fs_path)
            return
        self.fs.makedirs(posixpath.dirname(self.fs_path) or ".", exist_ok=True)
        # Whole-object write: object stores replace atomically; locally a temporary file is renamed, so a
        # death mid-write leaves the previous note.
        temp = f"{self.fs_path}.tmp"
        with self.fs.open(temp, "w") as f:
            json.dump({"in_flight": in_flight, "crashes": self.crashes}, f)
        self.fs.mv(temp, self.fs_path)


def _model_error_kind(err: BaseException) -> str:
    return "oom" if "OutOfMemory" in type(err).__name__ else "model"


class Captioner:
    """A loaded caption engine (operators/engines); captions lists of prepared rows."""

    def __init__(self, settings: CaptionSettings, journal_path: str | None = None, engine=None):
        from operators.engines import make_engine

        self.settings = settings
        self.journal = CrashJournal(journal_path)
        self.engine = engine or make_engine(settings)  # an engine passed in is shared (tests start one)

    def _caption(self, rows: list[dict]) -> list[dict]:
        faults.on_caption(rows)
        results = self.engine.caption([r["model_inputs"] for r in rows])
        if len(results) != len(rows):  # an engine bug must not shift captions onto other windows
            raise RuntimeError(f"engine returned {len(results)} results for {len(rows)} windows")
        return results

    def caption_rows(self, rows: list[dict]) -> list[dict]:
        faults.on_batch()
        now = datetime.now(timezone.utc)
        extra = {"retention_target": self.engine.retention, "created_at": now,
                 "pruner_weights_version": getattr(self.engine, "pruner_weights_version", None)}
        out = [_output_row(r, self.settings, self.engine.label) | extra for r in rows]
        todo = [i for i, r in enumerate(rows) if r.get("status") == "ok"]
        # Windows in flight during an earlier death of this actor: alone, and not past MAX_ATTEMPTS.
        attempts = {i: self.journal.crashes.get(rows[i]["clip_id"], 0) for i in todo}
        for i in [i for i in todo if attempts[i] >= MAX_ATTEMPTS]:
            out[i].update(status="error", error_kind="crash",
                          error=f"caption process died {attempts[i]} times while captioning this window")
        suspects = [i for i in todo if 0 < attempts[i] < MAX_ATTEMPTS]
        clean = [i for i in todo if attempts[i] == 0]
        groups = [[i] for i in suspects] + ([clean] if clean else [])
        while groups:
            group = groups.pop()
            self.journal.begin([rows[i]["clip_id"] for i in group])
            try:
                results = self._caption([rows[i] for i in group])
            except Exception as err:  # noqa: BLE001 - isolate the failing row
                self.journal.end()
                if len(group) > 1:
                    log.warning("batch of %d failed (%s); retrying one by one", len(group), error_text(err))
                    groups.extend([i] for i in group)
                    continue
                (i,) = group
                attempts[i] += 1
                if attempts[i] < MAX_ATTEMPTS:
                    groups.append(group)
                else:
                    out[i].update(status="error", error=error_text(err), error_kind=_model_error_kind(err))
                continue
            self.journal.end()
            for i, result in zip(group, results):
                out[i].update(status="ok", error=None, error_kind=None, **result)
        return out


class CaptionActor:
    """Ray Data callable class: one model per actor, batches in and out as Arrow tables."""

    def __init__(self, settings: CaptionSettings, journal_path: str | None = None):
        self.captioner = Captioner(settings, journal_path)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return conform(self.captioner.caption_rows(batch.to_pylist()))
