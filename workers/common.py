"""What every worker does the same way: logging, the metrics endpoint, the consumer loop."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from recsys.config import Settings
from recsys.kafka import ConsumerLoop, Sink, make_consumer
from recsys.metrics_server import serve_metrics


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )


def run_consumer(
    settings: Settings,
    worker: str,
    group_id: str,
    topics: Sequence[str],
    sink: Sink,
    health: Callable[[], bool] | None = None,
    on_exit: Callable[[], None] | None = None,
    bind: Callable[[ConsumerLoop], None] | None = None,
    **loop_options: float,
) -> int:
    """Serve /metrics and /healthz, then run the consume → sink → commit loop until SIGTERM.

    ``bind(loop)`` runs before the loop starts (e.g. to hand the sink the consumer's seek);
    ``on_exit`` runs after a clean stop (e.g. a final checkpoint).
    """
    configure_logging(settings)
    loop = ConsumerLoop(
        make_consumer(settings.kafka, group_id),
        topics,
        sink,
        worker=worker,
        **loop_options,  # type: ignore[arg-type]
    )
    if bind is not None:
        bind(loop)
    loop.install_signal_handlers()
    server = serve_metrics(settings.metrics.host, settings.metrics.port, health)
    try:
        loop.run()
        if on_exit is not None:
            on_exit()
    finally:
        server.close()
    return 0
