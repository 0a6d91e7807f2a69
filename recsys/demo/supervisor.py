"""Run recsys workers as subprocesses, as Kubernetes would: one process each, env-configured."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)


class WorkerProcess:
    """One ``recsys worker NAME`` subprocess with its own environment and log file.

    Parameters
    ----------
    name:
        The worker (reward, learner, publisher, encoder).
    env:
        RECSYS_* variables added to the current environment.
    log_path:
        Where the worker's stdout and stderr go.
    """

    def __init__(self, name: str, env: Mapping[str, str], log_path: Path) -> None:
        self.name = name
        self.env = dict(env)
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> WorkerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, **self.env}
        cmd = [sys.executable, "-m", "recsys", "worker", self.name]
        self._proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        log.info("started %s worker (pid %d), log %s", self.name, self._proc.pid, self.log_path)
        return self

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc else None

    def kill(self) -> None:
        """SIGKILL, as a crash would: nothing gets a chance to flush."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGKILL)
            self._proc.wait()

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM (the worker finishes its batch, flushes and commits), then SIGKILL."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0fs; killing it", self.name, timeout_s)
                proc.kill()
                proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return proc.returncode if proc else None

    def tail(self, chars: int = 2000) -> str:
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-chars:]


def wait_for(predicate: object, timeout_s: float, interval_s: float = 0.1) -> bool:
    """Poll ``predicate()`` until it is truthy or ``timeout_s`` passes; returns the last result."""
    deadline = time.monotonic() + timeout_s
    while True:
        if callable(predicate) and predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)
