"""The /metrics and /healthz endpoint every worker serves, in a daemon thread.

    server = serve_metrics(settings.metrics.host, settings.metrics.port, health=loop.healthy)
    ...
    server.close()

``/metrics`` is the prometheus_client text exposition of ``registry`` (the default registry,
where :mod:`recsys.metrics` defines everything). ``/healthz`` answers 200 ``ok`` while
``health()`` returns true and 503 otherwise (also when it raises: a health check that crashes is
not healthy). Kubernetes probes and Prometheus both read this one port.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)

HealthCheck = Callable[[], bool]


class MetricsServer:
    """A running metrics endpoint; ``close()`` stops it and joins its thread."""

    def __init__(
        self,
        host: str,
        port: int,
        health: HealthCheck | None = None,
        registry: CollectorRegistry = REGISTRY,
    ) -> None:
        if not host:
            raise ValueError("host must be a non-empty address")
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {port}")
        handler = _make_handler(registry, health)
        self._httpd = ThreadingHTTPServer((host, port), handler)
        self._httpd.daemon_threads = True
        self.host: str = str(self._httpd.server_address[0])
        self.port: int = int(self._httpd.server_address[1])
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.2},
            name=f"metrics-{self.port}",
            daemon=True,
        )
        self._thread.start()
        self._closed = False
        log.info("metrics endpoint on http://%s:%d/metrics", self.host, self.port)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def serve_metrics(
    host: str,
    port: int,
    health: HealthCheck | None = None,
    registry: CollectorRegistry = REGISTRY,
) -> MetricsServer:
    """Start serving /metrics and /healthz on ``host:port`` (port 0: any free port).

    Returns at once; the server runs in a daemon thread until ``close()``.
    """
    return MetricsServer(host, port, health, registry)


def _make_handler(
    registry: CollectorRegistry, health: HealthCheck | None
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path in ("/healthz", "/health"):
                ok = _healthy(health)
                self._send(200 if ok else 503, b"ok\n" if ok else b"unhealthy\n")
            else:
                self._send(404, b"not found\n")

        def _send(self, status: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            # Scrapes and probes every few seconds would flood the worker's log.
            log.debug("%s " + format, self.address_string(), *args)

    return Handler


def _healthy(health: HealthCheck | None) -> bool:
    if health is None:
        return True
    try:
        return bool(health())
    except Exception:
        log.exception("health check raised; reporting unhealthy")
        return False
