"""The `synthpert` CLI as a child process, for tests that interrupt, kill or time it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _default_sigint() -> None:
    # A suite started in the background by a non-interactive shell (`bash .ci/run &`) inherits SIGINT ignored,
    # and Python keeps an ignored SIGINT ignored: a test's Ctrl-C would then never reach the run.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def synthpert_process(*args, env: dict | None = None) -> subprocess.Popen:
    """`python -m synthpert.cli ARGS` from the repository root, pipes for both streams, SIGINT as a user's
    shell delivers it. ``env`` is added to this process's environment. PYTHONFAULTHANDLER: a run that hangs
    prints every thread's stack when ``communicate`` below sends it SIGABRT."""
    full = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONFAULTHANDLER": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "synthpert.cli", *map(str, args)], cwd=ROOT, env=full,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)


def communicate(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """``proc.communicate``, but a run that hangs fails with its threads' stacks and is not left running."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        _, stderr = proc.communicate(timeout=30)
        raise AssertionError(f"the run hung for {timeout} s; its stacks:\n{stderr[-6000:]}") from None


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_health(proc: subprocess.Popen, url: str, timeout: float) -> None:
    """Until ``url``/health answers 200; a server that exits or never comes up fails the test with its stderr."""
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the server at {url} did not come up: {proc.communicate()[1][-3000:]}")
        time.sleep(0.5)
