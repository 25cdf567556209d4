"""What a (re)run still has to do: skip inputs whose windows are already written under this configuration.

A source (one manifest row) is complete when the output holds, for its current source_version and this
config_hash, a finished row for each of its `n_windows` windows. Finished means "ok", or an error of a
deterministic kind (operators/schema.py ERROR_KINDS: decode, missing, ...): those fail the same way
again, so a rerun keeps them unless --retry-errors. Transient errors (io, timeout, crash, model, oom,
internal) are retried by default. A changed input (size, mtime or ETag) has a new source_version and is
captioned again; its old rows become stale and read_output drops them. A changed model (new weights or
configs at the same path or hub id: a new model_version fingerprint) captions every input again; the
newest rows then win on read.

Complete sources are skipped in the driver and never reach Ray. A partly done source (the run was killed
between its windows) goes to Ray with `done_windows`, the clip ids prepare_windows must not redo.

Only a few small columns of this configuration's rows are read (a pushed-down filter), once per run:
O(rows already written), no per-row Python work for complete sources beyond a dictionary lookup.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from operators.schema import TRANSIENT_ERROR_KINDS
from operators.sink import read_output
from operators.sources import MANIFEST_SCHEMA, add_versions

JOB_MANIFEST_SCHEMA = MANIFEST_SCHEMA.append(pa.field("done_windows", pa.list_(pa.string())))
PLAN_COLUMNS = ["clip_id", "source_id", "window_index", "status", "error_kind", "n_windows", "source_version",
                "model_version"]


@dataclass
class RunPlan:
    todo: list[dict]  # manifest rows still to do (done_windows set for partly done sources)
    skipped_sources: int = 0  # complete: not sent to Ray at all
    skipped_windows: int = 0  # their windows, plus the done windows of partly done sources
    partial_sources: int = 0  # resumed: only their missing windows are done
    retried_errors: int = 0  # earlier error rows this run tries again
    skipped_ids: list[str] = field(default_factory=list)


def finished_mask(table: pa.Table, retry_errors: bool) -> pa.Array:
    ok = pc.equal(table.column("status"), "ok")
    if retry_errors:
        return pc.fill_null(ok, False)
    kept = pc.invert(pc.is_in(pc.fill_null(table.column("error_kind"), "internal"),
                              pa.array(sorted(TRANSIENT_ERROR_KINDS))))
    return pc.fill_null(pc.or_(ok, pc.and_(pc.equal(table.column("status"), "error"), kept)), False)


def plan_run(rows: list[dict], output: str, config_hash: str, recompute: bool = False,
             retry_errors: bool = False, model_version: str | None = None) -> RunPlan:
    """Split the listed `rows` into skipped and to-do against what `output` holds for `config_hash`.

    Rows another version of the model wrote do not count as done (the model at that path or hub id was
    retrained or updated). Rows without a model_version (written before the column existed) and runs whose
    model cannot be fingerprinted keep the old rule: the config hash alone decides."""
    if recompute or not rows:
        return RunPlan(todo=[dict(r, done_windows=None) for r in rows])
    written = read_output(output, dedupe=False, config_hash=config_hash, columns=PLAN_COLUMNS)
    if written.num_rows == 0:
        return RunPlan(todo=[dict(r, done_windows=None) for r in rows])
    seen = set(pc.unique(written.column("source_id")).to_pylist())
    add_versions([r for r in rows if r["source_id"] in seen])  # only inputs that may be skipped need one
    listed = pa.table({"source_id": [r["source_id"] for r in rows],
                       "source_version": [r.get("source_version") or "" for r in rows]})
    written = written.set_column(written.schema.get_field_index("source_version"), "source_version",
                                 pc.fill_null(written.column("source_version"), ""))
    current = written.join(listed, ["source_id", "source_version"], join_type="inner")  # this version only
    if model_version:
        written_by = current.column("model_version")
        current = current.filter(pc.or_kleene(pc.is_null(written_by), pc.equal(written_by, model_version)))
    done = finished_mask(current, retry_errors)
    finished, retried = current.filter(done), current.filter(pc.invert(done))
    per_source = finished.group_by("source_id").aggregate([("window_index", "count_distinct"),
                                                          ("n_windows", "max")])
    complete_mask = pc.fill_null(pc.greater_equal(per_source.column("window_index_count_distinct"),
                                                  per_source.column("n_windows_max")), False)
    complete = per_source.filter(complete_mask)
    n_windows = dict(zip(complete.column("source_id").to_pylist(), complete.column("n_windows_max").to_pylist()))
    # Clip ids are listed only for partly done sources (few): prepare skips those windows.
    partial = finished.filter(pc.invert(pc.is_in(finished.column("source_id"), complete.column("source_id"))))
    lists = partial.group_by("source_id").aggregate([("clip_id", "list")])
    done_ids = dict(zip(lists.column("source_id").to_pylist(), lists.column("clip_id_list").to_pylist()))
    plan = RunPlan(todo=[], retried_errors=_retried_windows(retried, finished))
    for row in rows:
        sid = row["source_id"]
        if sid in n_windows:
            plan.skipped_sources += 1
            plan.skipped_windows += n_windows[sid]
            plan.skipped_ids.append(sid)
        elif sid in done_ids:
            ids = sorted(set(done_ids[sid]))
            plan.partial_sources += 1
            plan.skipped_windows += len(ids)
            plan.todo.append(dict(row, done_windows=ids))
        else:
            plan.todo.append(dict(row, done_windows=None))
    return plan


def _retried_windows(retried: pa.Table, finished: pa.Table) -> int:
    """Windows whose earlier rows are all errors to retry (a window with a finished row is not retried)."""
    if retried.num_rows == 0:
        return 0
    finished = finished.filter(pc.is_in(finished.column("source_id"), pc.unique(retried.column("source_id"))))
    windows = lambda t: set(zip(t.column("source_id").to_pylist(), t.column("window_index").to_pylist()))  # noqa: E731
    return len(windows(retried) - windows(finished))
