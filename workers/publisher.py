"""`recsys worker publisher`: events -> fresh slates to the recommendations topic and the store.

Thin wiring: consumer loop (group ``settings.publisher.group_id`` on the events topic) ->
:class:`recsys.publisher.PublisherSink` (produce, await acks, one store transaction per batch)
-> offsets committed. A :class:`recsys.publisher.ModelWatcher` hot-swaps model versions.
"""

from __future__ import annotations

import functools
import logging

from recsys.config import Settings
from recsys.events import EventParser
from recsys.kafka import ConsumerLoop, make_consumer, make_producer
from recsys.metrics_server import serve_metrics
from recsys.publisher.core import Publisher, PublisherConfig
from recsys.publisher.sink import PublisherSink
from recsys.rewards.rules import RewardRules
from recsys.serving.model import load_serving_model
from recsys.serving.watcher import ModelWatcher
from recsys.store import Store

log = logging.getLogger(__name__)


def run(settings: Settings) -> int:
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    ps = settings.publisher
    cfg = PublisherConfig(
        k=ps.k,
        history_len=ps.history_len or settings.learner.max_history,
        exploration=ps.exploration,
        temperature=ps.temperature,
        epsilon=ps.epsilon,
        cold_start_temperature=ps.cold_start_temperature,
        batch_interval_s=ps.batch_interval_ms / 1000.0,
        refresh_batch_users=ps.refresh_batch_users,
        chunk_size=ps.chunk_size,
        device=None if ps.device == "auto" else ps.device,
        seed=ps.seed,
        refresh_on_impression=ps.refresh_on_impression,
    )
    root = ps.checkpoint_dir or settings.learner.checkpoint_dir
    watcher = ModelWatcher(
        root,
        functools.partial(load_serving_model, policy_kwargs=cfg.policy_kwargs()),
        ps.watch_interval_s,
    )
    watcher.poll()  # start on the newest valid version, if any
    store = Store(settings.store.url)
    publisher = Publisher(cfg, lambda: watcher.current, RewardRules.from_settings(settings.rewards))
    publisher.restore(store.load_histories(), store.load_popularity(), store.known_users())
    log.info("publisher: %d known users restored from the store", len(publisher.known))
    producer = make_producer(settings.kafka)
    sink = PublisherSink(
        publisher,
        producer,
        settings.topics.recommendations,
        store,
        EventParser(settings.events.max_bytes, settings.events.max_clock_skew_ms),
    )
    loop = ConsumerLoop(
        make_consumer(settings.kafka, ps.group_id),
        [settings.topics.events],
        sink,
        worker="publisher",
        poll_timeout_ms=50,
        tick_interval_s=max(0.01, min(0.5, cfg.batch_interval_s / 2)),
    )
    loop.install_signal_handlers()
    server = serve_metrics(
        settings.metrics.host, settings.metrics.port, health=lambda: watcher.alive
    )
    watcher.start()
    try:
        loop.run()
    finally:
        watcher.stop()
        server.close()
        producer.close()
        store.close()
    return 0
