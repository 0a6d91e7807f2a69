"""A real Prometheus server scrapes a process serving recsys metrics through serve_metrics.

Prometheus (Debian's `prometheus` binary) runs on a free loopback port with a 1 s scrape interval
and our alert rules loaded; the target is a separate Python process that increments recsys
metrics and serves them with :func:`recsys.metrics_server.serve_metrics`, as every worker does.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "recsys-alerts.yml"
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}

TARGET = textwrap.dedent(
    """
    import sys
    from recsys import metrics
    from recsys.drift import DriftMonitor
    from recsys.metrics_server import serve_metrics

    metrics.EVENTS_CONSUMED.labels(worker="reward", topic="recsys.events").inc(42)
    metrics.CONSUMER_LAG.labels(worker="reward", topic="recsys.events", partition="0").set(7)
    metrics.FRESHNESS_SECONDS.observe(0.3)
    monitor = DriftMonitor(["loss"])
    server = serve_metrics("127.0.0.1", 0, health=lambda: True)
    print(server.port, flush=True)
    for command in sys.stdin:  # serve until the test closes our stdin
        if command.strip() == "drift":
            for i in range(2000):
                monitor.update("loss", 1.0 if i < 1000 else 5.0)
    server.close()
    """
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 (http on loopback)
        return json.load(resp)


@pytest.fixture
def target() -> Iterator[tuple[int, subprocess.Popen[str]]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", TARGET],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip().isdigit(), f"target did not start: {line!r}"
        yield int(line), proc
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def prometheus(target: tuple[int, subprocess.Popen[str]], tmp_path: Path) -> Iterator[str]:
    binary = shutil.which("prometheus")
    if binary is None:
        message = "prometheus binary not found; run scripts/install-tools.sh"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    config = tmp_path / "prometheus.yml"
    config.write_text(
        textwrap.dedent(
            f"""
            global:
              scrape_interval: 1s
              evaluation_interval: 1s
            rule_files: ["{RULES}"]
            scrape_configs:
              - job_name: recsys
                static_configs:
                  - targets: ["127.0.0.1:{target[0]}"]
            """
        )
    )
    port = _free_port()
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(base + "/-/ready", timeout=2) as resp:  # noqa: S310
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    "prometheus did not start:\n" + (tmp_path / "prometheus.log").read_text()
                )
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _query_until(base: str, query: str, timeout: float = 30.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        url = base + "/api/v1/query?" + urllib.parse.urlencode({"query": query})
        body = _get_json(url)
        assert body["status"] == "success", body
        if body["data"]["result"] or time.monotonic() > deadline:
            return list(body["data"]["result"])
        time.sleep(0.5)


def test_prometheus_scrapes_recsys_series(prometheus: str) -> None:
    result = _query_until(prometheus, 'recsys_events_consumed_total{job="recsys"}')
    assert len(result) == 1
    assert result[0]["metric"]["worker"] == "reward"
    assert float(result[0]["value"][1]) == 42.0

    up = _query_until(prometheus, 'up{job="recsys"}')
    assert [float(r["value"][1]) for r in up] == [1.0]

    drift = _query_until(prometheus, 'recsys_drift_detected_total{signal="loss"}')
    assert float(drift[0]["value"][1]) == 0.0  # exported before any detection

    p99 = _query_until(
        prometheus, "histogram_quantile(0.99, sum by (le) (recsys_freshness_seconds_bucket))"
    )
    assert 0.25 <= float(p99[0]["value"][1]) <= 0.5  # the one observation is in (0.25, 0.5]


def test_drift_alert_fires_on_a_real_detection(
    prometheus: str, target: tuple[int, subprocess.Popen[str]]
) -> None:
    body = _get_json(prometheus + "/api/v1/rules")
    names = {r["name"] for g in body["data"]["groups"] for r in g["rules"]}
    assert {"RecsysWorkerDown", "RecsysDriftDetected", "RecsysFreshnessP99High"} <= names
    # Once Prometheus has seen the zero count, make the target's detector fire.
    _query_until(prometheus, 'recsys_drift_detected_total{signal="loss"}')
    proc = target[1]
    assert proc.stdin is not None
    proc.stdin.write("drift\n")
    proc.stdin.flush()
    detected = _query_until(prometheus, 'recsys_drift_detected_total{signal="loss"} > 0')
    assert float(detected[0]["value"][1]) >= 1.0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        alerts = _get_json(prometheus + "/api/v1/alerts")["data"]["alerts"]
        if any(a["labels"]["alertname"] == "RecsysDriftDetected" for a in alerts):
            break
        time.sleep(0.5)
    else:
        pytest.fail("RecsysDriftDetected never became active")
