"""serve_metrics: /metrics exposition, /healthz status codes, clean shutdown."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter

from recsys import metrics
from recsys.config import load_settings
from recsys.metrics_server import serve_metrics


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 (http on loopback)
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_metrics_and_health() -> None:
    metrics.EVENTS_REJECTED.labels(reason="bad_json", worker="test").inc()
    healthy = [True]
    with serve_metrics("127.0.0.1", 0, health=lambda: healthy[0]) as server:
        assert server.port > 0
        status, body = _get(server.url + "/metrics")
        assert status == 200
        assert 'recsys_events_rejected_total{reason="bad_json",worker="test"}' in body
        assert _get(server.url + "/healthz") == (200, "ok\n")
        healthy[0] = False
        assert _get(server.url + "/healthz")[0] == 503
        assert _get(server.url + "/nope")[0] == 404


def test_health_check_that_raises_is_unhealthy() -> None:
    def broken() -> bool:
        raise RuntimeError("boom")

    with serve_metrics("127.0.0.1", 0, health=broken) as server:
        assert _get(server.url + "/healthz")[0] == 503


def test_custom_registry_and_close_frees_the_port() -> None:
    registry = CollectorRegistry()
    Counter("recsys_test_only_total", "test", registry=registry).inc(3)
    server = serve_metrics("127.0.0.1", 0, registry=registry)
    port = server.port
    body = _get(server.url + "/metrics")[1]
    assert "recsys_test_only_total 3.0" in body
    assert "recsys_events_consumed_total" not in body
    server.close()
    server.close()  # idempotent
    with socket.socket() as sock, pytest.raises(ConnectionRefusedError):
        sock.connect(("127.0.0.1", port))  # nobody listens any more


def test_default_address_is_loopback() -> None:
    settings = load_settings()
    assert settings.metrics.host == "127.0.0.1"


def test_bad_port_is_rejected() -> None:
    with pytest.raises(ValueError, match="port"):
        serve_metrics("127.0.0.1", 70000)
