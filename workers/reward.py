"""Reward worker (`recsys worker reward`): events → validation → dedupe + join → rewards topic.

A consumer group: run two or ten and they share the events topic's partitions. The logic is
:class:`recsys.rewards.sink.RewardSink`; this module only wires it to the consumer loop.
"""

from __future__ import annotations

import logging

from recsys.config import Settings
from recsys.kafka import ConsumerLoop
from recsys.rewards.sink import WORKER, make_sink
from workers.common import run_consumer

log = logging.getLogger(__name__)


def run(settings: Settings) -> int:
    """`recsys worker reward`: run until SIGTERM/SIGINT, serving /metrics and /healthz."""
    sink = make_sink(settings)
    loops: list[ConsumerLoop] = []

    def bind(loop: ConsumerLoop) -> None:
        sink.consumer = loop.consumer
        loops.append(loop)

    log.info(
        "reward worker: %s -> %s (group %s)",
        settings.topics.events,
        settings.topics.rewards,
        settings.rewards.group_id,
    )
    try:
        return run_consumer(
            settings,
            WORKER,
            settings.rewards.group_id,
            [settings.topics.events],
            sink,
            health=lambda: bool(loops) and not loops[0].stopping,
            bind=bind,
            max_records=settings.rewards.max_batch,
        )
    finally:
        sink.producer.close()
