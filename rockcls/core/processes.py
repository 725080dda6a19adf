"""Child processes started in a session of their own (servers, study workers): stopping one stops
everything it started, and only that."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
import urllib.request
from typing import Iterator, Sequence


class Terminated(KeyboardInterrupt):
    """SIGTERM reached the process (``kill PID``, a scheduler or container stopping the job;
    under torchrun, another rank failed). An interrupt, so it travels where Ctrl-C does: no
    ``except Exception`` swallows it (Optuna's trial loop marks the trial failed and stops), the
    processes the command started are stopped; unlike Ctrl-C its runs end FAILED with its text as
    the reason, and the command prints one line and exits with status 2."""

    def __str__(self) -> str:
        return "terminated by SIGTERM (the command was stopped; under torchrun, another rank may have failed)"


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Inside the block SIGTERM raises `Terminated` in this process (Python's default is to die on
    the spot, leaving its runs RUNNING for ever). Processes forked inside the block (data-loader
    workers) inherit the handler; in them SIGTERM keeps its default meaning."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    owner = os.getpid()

    def _raise(signum, frame) -> None:
        if os.getpid() != owner:  # a forked child: die as SIGTERM would have made it
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        # once: a second SIGTERM (torchrun may repeat it) must not interrupt the clean-up that
        # ends the runs; SIGKILL is the way to force
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
