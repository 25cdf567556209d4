"""Decode with a deadline: prepare a source's windows in a helper process that can be killed.

A thread with a deadline cannot stop a decoder stuck inside a C call (a FIFO, a dead network mount, a
decoder bug), and a segfaulting decoder takes its whole process down. So, when --decode-timeout-s is
set, each prepare worker keeps one long-lived helper process (started once, reused for every source:
imports and the processor load are paid once) and streams window rows back from it. If a window takes
longer than the deadline the helper is killed and replaced; that window becomes an error row of kind
"timeout" and the source's remaining windows are reported as not attempted (same kind, retried by the
next run). A helper that dies gives kind "crash".

Protocol (pickled tuples over a socket pair): parent -> ("prepare", row, settings); helper ->
("started",) after loading the processor, then prepare_events' ("plan", windows) / ("row", row)
messages, then ("end",).
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import signal
import socket
import subprocess
import sys
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Iterator

STARTUP_TIMEOUT_S = 300.0  # importing torch + transformers and loading the processor on a cold node

_helper: "Helper | None" = None


class Helper:
    """One helper process and the parent's end of its socket."""

    def __init__(self):
        parent, child = socket.socketpair()
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parent.parent)  # so `-m operators.isolate` imports this checkout
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen([sys.executable, "-m", "operators.isolate", str(child.fileno())],
                                     pass_fds=[child.fileno()], env=env, stdin=subprocess.DEVNULL)
        child.close()
        self.conn = Connection(parent.detach())
        self.receive(STARTUP_TIMEOUT_S)  # ("ready",)

    def send(self, message) -> None:
        self.conn.send(message)

    def receive(self, timeout: float):
        """The next message; TimeoutError after `timeout` seconds, HelperCrash if the helper died."""
        from operators.prepare import DecodeTimeout, HelperCrash

        try:
            ready = self.conn.poll(timeout)
            message = self.conn.recv() if ready else None
        except (EOFError, OSError) as err:
            code = self.proc.wait(timeout=10)
            how = f"signal {-code}" if code < 0 else f"exit code {code}"
            raise HelperCrash(f"decode helper process died ({how})") from err
        if not ready:
            raise DecodeTimeout(f"no result within {timeout:g} s (decode helper killed)")
        return message

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.conn.close()


def _get_helper() -> Helper:
    global _helper
    if _helper is None or _helper.proc.poll() is not None:
        _helper = Helper()
    return _helper


def _drop_helper() -> None:
    global _helper
    if _helper is not None:
        _helper.close()
        _helper = None


atexit.register(_drop_helper)


def prepare_isolated(row: dict, settings) -> Iterator[dict]:
    """prepare_windows(row, settings) run in the helper process, with settings.decode_timeout_s per window."""
    from operators import prepare as prep

    local = dataclasses.replace(settings, decode_timeout_s=None)
    plan, sent, finished = None, set(), False
    try:
        helper = _get_helper()
        helper.send(("prepare", row, local))
        helper.receive(STARTUP_TIMEOUT_S)  # ("started",): the processor is loaded, the clock starts now
        while True:
            message = helper.receive(settings.decode_timeout_s)
            if message[0] == "end":
                finished = True
                return
            if message[0] == "plan":
                plan = message[1]
            else:
                sent.add(message[1]["window_index"])
                yield message[1]
    except Exception as err:  # noqa: BLE001 - timeout, crash, or a failure to start the helper
        _drop_helper()  # a killed or confused helper is never reused
        kind = prep.classify_error(err)
        if plan is None:
            yield prep.error_row(row, err, kind)
            return
        left = [w for w in plan if w.index not in sent]
        for i, window in enumerate(left):
            failure = err if i == 0 else RuntimeError(f"not attempted: window {left[0].index} of this source "
                                                      f"failed first ({prep.error_text(err)})")
            yield prep.window_error(row, window, failure, kind)
    finally:
        if not finished:  # the consumer stopped early, or an error: unread messages must not leak
            _drop_helper()


def _die_with_parent() -> None:
    """Linux: SIGKILL this helper when its parent dies, even if it is stuck in a system call."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - elsewhere the helper still exits when its socket closes
        pass


def serve(fd: int) -> None:
    _die_with_parent()
    conn = Connection(fd)
    from operators import prepare as prep  # the heavy imports, once

    conn.send(("ready",))
    while True:
        try:
            _, row, settings = conn.recv()
        except EOFError:  # the parent is gone
            return
        try:
            prep._processor(settings.model)
        except Exception:  # noqa: BLE001 - reported per source by prepare_events
            pass
        conn.send(("started",))
        for event in prep.prepare_events(row, settings):
            conn.send(event)
        conn.send(("end",))


if __name__ == "__main__":
    serve(int(sys.argv[1]))
