"""Child processes of ``registry up`` (workers, dispatcher, MLflow UI): started together,
restarted with backoff when they die, stopped together."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .config import Settings

log = logging.getLogger("registry.supervisor")


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the parent dies, however it dies (Linux prctl)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass
class Child:
    name: str
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started_at: float = 0.0


@dataclass
class Supervisor:
    settings: Settings
    env: dict[str, str] = field(default_factory=dict)  # added to the environment of every child
    children: list[Child] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def add(self, name: str, argv: list[str]) -> None:
        self.children.append(Child(name, argv))

    def _spawn(self, child: Child) -> None:
        logdir = self.settings.home / "logs"
        logdir.mkdir(parents=True, exist_ok=True)
        with open(logdir / f"{child.name}.log", "ab") as out:
            child.proc = subprocess.Popen(child.argv, stdout=out, stderr=subprocess.STDOUT,
                                          env={**os.environ, **self.env, "PYTHONUNBUFFERED": "1"},
                                          start_new_session=True, preexec_fn=_die_with_parent)
        child.started_at = time.monotonic()

    def start(self) -> None:
        for c in self.children:
            self._spawn(c)
        self._thread = threading.Thread(target=self._watch, name="supervisor", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(1.0):
            for c in self.children:
                if c.proc is not None and c.proc.poll() is not None and not self._stop.is_set():
                    delay = min(30.0, 2.0 ** min(c.restarts, 5)) if time.monotonic() - c.started_at < 60 else 1.0
                    log.warning("%s exited with %s; restarting in %.0fs", c.name, c.proc.returncode, delay)
                    c.restarts += 1
                    if self._stop.wait(delay):
                        return
                    self._spawn(c)

    def when_answering(self, url: str, callback: Callable[[bool], None], timeout: float = 900.0) -> None:
        """Call ``callback(True)`` once ``url`` answers HTTP (any status), or ``callback(False)`` after
        ``timeout`` seconds; from a daemon thread, checking every second, until the supervisor stops.
        (`registry up` announces the MLflow UI this way: it takes a while to answer, ~100 s on a busy
        2-core machine, and an address printed before that only leads to "connection refused".)"""

        def poll() -> None:
            import httpx

            deadline = time.monotonic() + timeout
            while not self._stop.is_set():
                try:
                    httpx.get(url, timeout=2.0)
                except httpx.HTTPError:
                    if time.monotonic() > deadline:
                        callback(False)
                        return
                    self._stop.wait(1.0)
                    continue
                callback(True)
                return

        threading.Thread(target=poll, name=f"ready:{url}", daemon=True).start()

    def stop(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        for c in self.children:
            if c.proc is not None and c.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(c.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for c in self.children:
            if c.proc is None:
                continue
            try:
                c.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(c.proc.pid, signal.SIGKILL)
