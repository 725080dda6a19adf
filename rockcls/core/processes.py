"""Child processes started in a session of their own (servers, study workers): stopping one stops
everything it started, and only that."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from typing import Sequence


def stop_process_group(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM the process group of ``proc`` (started with ``start_new_session=True``), then SIGKILL
    it if it has not exited after ``timeout`` seconds."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_for_http(proc: subprocess.Popen, url: str, *, timeout: float, poll: float = 0.5) -> str:
    """Poll ``url`` until it answers 200 while ``proc`` (the server) runs. Returns "" when it
    answers, else why not: "exited with N" or "no answer in T s"."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"exited with {proc.returncode}"
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return ""
        except OSError:
            pass
        time.sleep(poll)
    return f"no answer in {timeout:.0f} s"


def hear_interrupts() -> None:
    """Make SIGINT raise KeyboardInterrupt in this process even if it was started with SIGINT
    ignored. A child that `interrupt_processes` stops must hear it: Python keeps an inherited
    SIG_IGN (a shell's background job, nohup, some schedulers start everything so), and such a
    child would train on until its parent's grace ends in SIGKILL, or finish and end its run
    FINISHED although the command was stopped."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def interrupt_processes(procs: Sequence[subprocess.Popen], grace_s: float = 60.0) -> None:
    """SIGINT each process still running (a rockcls command ends its runs as KILLED on it), then
    SIGKILL those still alive after ``grace_s`` seconds."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
