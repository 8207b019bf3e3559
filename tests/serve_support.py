"""Shared helpers for the serve tests: a real `charnn serve` process on a free loopback port.

``serve_process(model, *args)`` starts ``python -m charnn serve MODEL --port 0 ARGS`` on
127.0.0.1 (the repository on PYTHONPATH), reads the port from its ready line, waits for
``/health`` to say 200 and yields the base URL (a ``Served``: a str that also carries the
process and its stderr); on leaving it sends SIGTERM and waits for the exit. ``needs_serve`` skips a test module cleanly when the
serve stack (pip install 'charnn[serve]') is not installed.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVE_STACK = ("starlette", "uvicorn", "sse_starlette", "prometheus_client", "httpx")
MISSING = [m for m in SERVE_STACK if importlib.util.find_spec(m) is None]
needs_serve = pytest.mark.skipif(bool(MISSING), reason=f"the serve stack is not installed (missing {', '.join(MISSING)}; "
                                                       "pip install 'charnn[serve]' httpx)")
READY = re.compile(r"charnn serve: (http://\S+?)/ \(model (.+), (\d+) slots?\)")


class Served(str):
    """The base URL (http://127.0.0.1:PORT, no trailing slash; a str, so ``url + "/health"``
    works), with ``url`` (the same), ``proc`` (the process), ``lines`` (every stderr line so
    far, filled by a reader thread) and, once stopped, ``exit_code``."""

    def __new__(cls, url: str, proc: subprocess.Popen, lines: list):
        self = super().__new__(cls, url)
        self.proc, self.lines, self.exit_code = proc, lines, None
        return self

    @property
    def url(self) -> str:
        return str(self)

    def stderr(self) -> str:
        return "".join(self.lines)


def serve_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("CHARNN_API_KEY", None)
    env.update(extra or {})
    return env


@contextmanager
def serve_process(model=None, *args, env: dict | None = None, timeout: float = 90.0, stop_timeout: float = 10.0):
    """Start `charnn serve` on a free loopback port and yield a Served once /health is 200.

    Args:
        model: a model file or run folder (None: the bundled model).
        args: more options (``"--slots", "4"``).
        env: variables added to the environment (e.g. CHARNN_API_KEY).
        timeout: seconds to wait for the ready line and /health.
        stop_timeout: seconds to wait for the exit after SIGTERM (then it is killed).
    """
    import httpx

    cmd = [sys.executable, "-m", "charnn", "serve"] + ([str(model)] if model is not None else [])
    cmd += ["--host", "127.0.0.1", "--port", "0"] + [str(a) for a in args]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=serve_env(env), cwd=str(ROOT))
    lines: list = []
    found: list = []
    ready = threading.Event()

    def read():
        for line in proc.stderr:
            lines.append(line)
            m = READY.search(line)
            if m and not found:
                found.append(m.group(1))
                ready.set()
        ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    served = None
    try:
        if not ready.wait(timeout) or not found:
            raise AssertionError(f"charnn serve did not say it was ready: {''.join(lines)}")
        served = Served(found[0], proc, lines)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(served + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"charnn serve never became healthy: {served.stderr()}")
            time.sleep(0.05)
        yield served
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        reader.join(5)
        if served is not None:
            served.exit_code = proc.returncode
