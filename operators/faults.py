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

pipelines/ray_adapter.py forwards these variables to the job's workers.
"""

from __future__ import annotations

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
    spec = os.environ.get(PREFIX + "EXIT_AT_BATCH")
    if spec:
        at, marker = spec.split(":", 1)
        if _batches == int(at) and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(17)


def on_caption(rows: list[dict]) -> None:
    """Called right before the model runs on `rows`."""
    poison = os.environ.get(PREFIX + "POISON")
    if poison and any(poison in (r.get("uri") or "") for r in rows):
        os._exit(18)


def on_write() -> None:
    """Called halfway through writing an output part's temporary file."""
    sleep = os.environ.get(PREFIX + "WRITE_SLEEP_S")
    if sleep:
        time.sleep(float(sleep))
