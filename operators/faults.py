"""Fault injection for tests of recovery, driven by environment variables (all unset in real runs).

The caption stage calls these hooks; they do nothing unless a variable is set:

- AVSIEVE_FAULT_EXIT_AT_BATCH="N:MARKER"  the caption actor process exits (os._exit, like an OOM kill)
  at its N-th batch, once: MARKER is created first, so the restarted actor does not die again.
- AVSIEVE_FAULT_POISON="TEXT"  the caption process exits whenever the rows it is about to caption include
  a uri containing TEXT (a window that kills its process every time).
- AVSIEVE_FAULT_SLEEP_S="S"  sleep S seconds before each caption batch (slows a job so that a test can
  kill its driver mid-run).
- AVSIEVE_FAULT_WRITE_SLEEP_S="S"  sleep S seconds in the middle of writing each output part (the
  hidden temporary file is half written), so that a kill lands during a Parquet write.
- AVSIEVE_FAULT_GATE="PATH"  every caption batch creates PATH.waiting, then waits until PATH exists before
  any work: a test sees that a batch has reached an actor and can act (drain its node, say) before a
  window of it is captioned.
- AVSIEVE_FAULT_PREPARE_SLEEP_S="S"  sleep S seconds before preparing each input (slows the prepare
  tasks so that a test can lose a node while one runs there).
- AVSIEVE_FAULT_TRACE="DIR"  every model call and every input a prepare task starts appends one JSON line
  to DIR/<pid>.jsonl: what ("caption" with the clip ids, "prepare" with the uri), when, the process id and
  the node's AVSIEVE_TEST_NODE (the simulated cluster of tests/test_multinode.py names each node so):
  which windows were captioned more than once, and where.

pipelines/ray_adapter.py forwards these variables to the job's workers (prepare, caption, write).
"""

from __future__ import annotations

import json
import os
import time

PREFIX = "AVSIEVE_FAULT_"
_batches = 0


def forwarded_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(PREFIX)}


def on_batch() -> None:
    """Called once per caption batch, before any work."""
    global _batches
    _batches += 1
    sleep = os.environ.get(PREFIX + "SLEEP_S")
    if sleep:
        time.sleep(float(sleep))
    gate = os.environ.get(PREFIX + "GATE")
    if gate:
        open(gate + ".waiting", "a").close()
        while not os.path.exists(gate):
            time.sleep(0.1)
    spec = os.environ.get(PREFIX + "EXIT_AT_BATCH")
    if spec:
        at, marker = spec.split(":", 1)
        if _batches == int(at) and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(17)


def _trace(kind: str, **fields) -> None:
    trace = os.environ.get(PREFIX + "TRACE")
    if trace:
        line = {"kind": kind, "pid": os.getpid(), "node": os.environ.get("AVSIEVE_TEST_NODE"), "t": time.time(),
                **fields}
        with open(os.path.join(trace, f"{os.getpid()}.jsonl"), "a") as f:
            f.write(json.dumps(line) + "\n")


def on_prepare(row: dict) -> None:
    """Called when a prepare task starts on one input (manifest row)."""
    _trace("prepare", uri=row.get("uri"))
    sleep = os.environ.get(PREFIX + "PREPARE_SLEEP_S")
    if sleep:
        time.sleep(float(sleep))


def on_caption(rows: list[dict]) -> None:
    """Called right before the model runs on `rows`."""
    _trace("caption", clip_ids=[r.get("clip_id") for r in rows])
    poison = os.environ.get(PREFIX + "POISON")
    if poison and any(poison in (r.get("uri") or "") for r in rows):
        os._exit(18)


def on_write() -> None:
    """Called halfway through writing an output part's temporary file."""
    sleep = os.environ.get(PREFIX + "WRITE_SLEEP_S")
    if sleep:
        time.sleep(float(sleep))
