"""A publisher whose store is ahead of its committed offsets (a crash after the store write,
before the commit) resumes at the offset stored with the state: nothing is counted twice.

Rating stats (the user-centred rating rule) are the state a re-read would corrupt: the
history deduplicates by event id, a running mean cannot.
"""

from __future__ import annotations

import functools
import threading
import time

import pytest
from kafka.structs import OffsetAndMetadata, TopicPartition

from recsys.events import Event
from recsys.kafka import ConsumerLoop, create_topics, make_consumer, make_producer
from recsys.publisher.core import Publisher, PublisherConfig
from recsys.publisher.sink import PublisherSink
from recsys.rewards.rules import RewardRules
from recsys.serving.model import load_serving_model
from recsys.serving.watcher import ModelWatcher
from recsys.store import Store
from tests.checkpoints import make_checkpoint
from tests.integration.publisher_helpers import ITEMS

pytestmark = pytest.mark.slow

PARTITIONS = 2


def _run_until(kafka_settings, group, events_topic, recs_topic, ckpt_dir, url, done) -> None:
    cfg = PublisherConfig(k=5, history_len=10, batch_interval_s=0.05, device="cpu", max_users=4)
    watcher = ModelWatcher(
        ckpt_dir, functools.partial(load_serving_model, policy_kwargs=cfg.policy_kwargs())
    )
    watcher.poll()
    store = Store(url)
    rules = RewardRules(rating_centre="user")
    publisher = Publisher(cfg, lambda: watcher.current, rules, store=store)
    sink = PublisherSink(
        publisher, make_producer(kafka_settings), recs_topic, store, group_id=group
    )
    loop = ConsumerLoop(
        make_consumer(kafka_settings, group),
        [events_topic],
        sink,
        worker="publisher",
        poll_timeout_ms=50,
        tick_interval_s=0.05,
    )
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not (loop.consumer.assignment() and done(store) and not publisher.pending):
            assert time.monotonic() < deadline, "the publisher did not catch up"
            time.sleep(0.1)
        time.sleep(0.5)  # a few more polls: nothing left to read
    finally:
        loop.stop()
        thread.join(30)
        sink.producer.close()
        store.close()


def test_restart_behind_the_store_resumes_at_the_stored_offset(
    kafka_settings, topic_prefix, tmp_path
):
    events_topic, recs_topic = f"{topic_prefix}.events", f"{topic_prefix}.recs"
    group = f"{topic_prefix}.pub"
    create_topics(kafka_settings, [events_topic, recs_topic], partitions=PARTITIONS)
    ckpt_dir = tmp_path / "ckpt"
    make_checkpoint(ckpt_dir, 1, ITEMS)
    url = f"sqlite:///{tmp_path / 'store.db'}"
    users = [f"u{i}" for i in range(10)]
    out = make_producer(kafka_settings)
    t0 = 1_700_000_000_000

    def ratings(tag: str, values: list[float]) -> None:
        for n, u in enumerate(users):
            for j, v in enumerate(values):
                e = Event(f"{tag}-{n}-{j}", "rating", u, ITEMS[(n + j) % 60], t0 + n, value=v)
                out.send(events_topic, key=e.key, value=e.to_bytes())
        out.flush()

    def rated(count: int):
        def check(store: Store) -> bool:
            rows = store.load_user_states(users)
            return len(rows) == len(users) and all(r.rating_n == count for r in rows.values())

        return check

    run = functools.partial(
        _run_until, kafka_settings, group, events_topic, recs_topic, ckpt_dir, url
    )
    try:
        ratings("a", [5.0, 4.0, 1.0])
        run(rated(3))
        with Store(url) as store:
            before = store.load_user_states(users)
            stored_offsets = store.publisher_offsets(group)
            popularity = store.load_popularity()
        assert sum(stored_offsets.values()) == 3 * len(users)

        # As if the worker had died after its store write, before any commit: offsets back to 0.
        rewind = make_consumer(kafka_settings, group)
        tps = [TopicPartition(events_topic, p) for p in range(PARTITIONS)]
        rewind.assign(tps)
        rewind.commit({tp: OffsetAndMetadata(0, "", -1) for tp in tps})
        rewind.close()

        ratings("b", [2.0])
        run(rated(4))
    finally:
        out.close()
    with Store(url) as store:
        after = store.load_user_states(users)
        assert store.load_popularity() == popularity  # 2 stars is below every user's mean
    for u in users:
        assert after[u].rating_n == before[u].rating_n + 1, u
        assert after[u].rating_sum == before[u].rating_sum + 2.0, u
        assert after[u].entries == before[u].entries, u
