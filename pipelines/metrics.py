"""The caption job's end-of-run summary (printed, and written to OUTPUT/_avsieve/metrics-<config>.json).

Top-level counts describe the output as it stands for this run's inputs and configuration (what a user
asks "is my corpus captioned?"); `run` describes only the rows this run wrote (what it cost); `skipped`
what it found already done.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

TOKEN_COLUMNS = ("text_tokens", "video_tokens", "audio_tokens", "video_tokens_kept", "audio_tokens_kept",
                 "output_tokens")
STAGE_COLUMNS = ("decode_ms", "prefill_ms", "generate_ms")  # decode = decode + tokenize (CPU)


def _sum(table: pa.Table, name: str) -> float:
    return pc.sum(table.column(name)).as_py() or 0


def counts(table: pa.Table) -> dict:
    status = table.column("status")
    ok = int(pc.sum(pc.equal(status, "ok")).as_py() or 0)
    errors = table.filter(pc.equal(status, "error"))
    kinds = pc.value_counts(pc.fill_null(errors.column("error_kind"), "unknown")).to_pylist()
    return {
        "windows": table.num_rows, "ok": ok, "error": table.num_rows - ok,
        "errors_by_kind": {k["values"]: k["counts"] for k in sorted(kinds, key=lambda k: k["values"])},
        "clips": len(pc.unique(table.column("source_id"))),
        "captions_truncated": int(pc.sum(pc.fill_null(table.column("caption_truncated"), False)).as_py() or 0),
        "ok_by_streams": ok_by_streams(table.filter(pc.equal(status, "ok"))),
        **{name: int(_sum(table, name)) for name in TOKEN_COLUMNS},
        **{name: round(float(_sum(table, name)), 1) for name in STAGE_COLUMNS},
    }


def ok_by_streams(ok: pa.Table) -> dict:
    """Captioned windows by what the model got: picture and sound, picture alone, sound alone (rows from
    before schema 4 have no has_video and count as having a picture)."""
    video = pc.fill_null(ok.column("has_video"), True)
    audio = pc.fill_null(ok.column("has_audio"), False)
    both = int(pc.sum(pc.and_(video, audio)).as_py() or 0)
    video_only = int(pc.sum(pc.and_(video, pc.invert(audio))).as_py() or 0)
    return {"video_and_sound": both, "video_only": video_only, "sound_only": ok.num_rows - both - video_only}


def summarize(table: pa.Table, seconds: float, run_id: str | None = None, plan=None) -> dict:
    """table: current rows (read_output) of this run's inputs under its configuration."""
    mine = table.filter(pc.equal(table.column("run_id"), run_id)) if run_id else table.slice(0, 0)
    run = counts(mine)
    run["windows_per_s"] = round(run["windows"] / seconds, 3) if seconds > 0 else None
    summary = counts(table)
    summary.update(
        seconds=round(seconds, 2),
        windows_per_s=run["windows_per_s"],  # windows this run captioned (or failed) per wall-clock second
        run=run,
        skipped={"sources": plan.skipped_sources if plan else 0, "windows": plan.skipped_windows if plan else 0,
                 "partial_sources": plan.partial_sources if plan else 0},
        retried_errors=plan.retried_errors if plan else 0,
    )
    return summary
