"""One shape for every worker: a :class:`WorkerApp` (what to consume, into which sink) and
:func:`run_consumer`, which owns the wiring every worker shares.

Each worker package has ``build(settings) -> WorkerApp`` (:mod:`recsys.rewards.sink`,
:mod:`recsys.learner.sink`, :mod:`recsys.publisher.sink`, :mod:`recsys.encoder.sink`);
``workers/<name>.py`` is one call: ``run_consumer(settings, build(settings))``. Tests and
benchmarks run the same app in-process with :func:`make_loop`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from recsys.codecs import check_codecs
from recsys.config import Settings
from recsys.kafka import ConsumerLoop, Sink, make_consumer
from recsys.logsafe import install_secret_filter, settings_secrets
from recsys.metrics_server import serve_metrics

log = logging.getLogger(__name__)


@dataclass
class WorkerApp:
    """A worker, built but not started.

    ``on_start`` runs once the loop exists, before the first poll (e.g. start a background
    model watcher); ``on_stop`` runs after the loop's last flush and commit on a clean stop
    (e.g. a final checkpoint). The sink is closed in every case.
    """

    worker: str
    group_id: str
    topics: Sequence[str]
    sink: Sink
    max_records: int = 1000
    poll_timeout_ms: int = 100
    tick_interval_s: float = 0.5
    on_start: Callable[[], object] | None = None
    on_stop: Callable[[], None] | None = None


def configure_logging(settings: Settings) -> None:
    """Log format and level for a worker process; secrets never reach a log line (kafka-python
    logs its whole config, SASL password included, at DEBUG)."""
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    install_secret_filter(settings_secrets(settings))


def make_loop(settings: Settings, app: WorkerApp) -> ConsumerLoop:
    """The app's consume → sink → commit loop on a new consumer of ``app.group_id``."""
    return ConsumerLoop(
        make_consumer(settings.kafka, app.group_id),
        app.topics,
        app.sink,
        worker=app.worker,
        max_records=app.max_records,
        poll_timeout_ms=app.poll_timeout_ms,
        tick_interval_s=app.tick_interval_s,
    )


def run_consumer(settings: Settings, app: WorkerApp) -> int:
    """Serve /metrics and /healthz, then run the app's loop until SIGTERM/SIGINT.

    /healthz means "making progress": the loop polled recently and the sink is healthy.
    """
    configure_logging(settings)
    check_codecs()  # a missing codec library is a start-up error, not a crash on a batch
    loop = make_loop(settings, app)
    log.info("%s: consuming %s as group %s", app.worker, list(app.topics), app.group_id)
    loop.install_signal_handlers()
    server = serve_metrics(
        settings.metrics.host,
        settings.metrics.port,
        health=lambda: loop.healthy() and app.sink.healthy(),
    )
    try:
        if app.on_start is not None:
            app.on_start()
        loop.run()
        if app.on_stop is not None:
            app.on_stop()
    finally:
        server.close()
        app.sink.close()
    return 0
