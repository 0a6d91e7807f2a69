"""The publisher on the embedded broker with SQLite and PostgreSQL: hot swap while events flow."""

from __future__ import annotations

import functools
import threading
import time

from recsys import metrics
from recsys.cli import main as cli_main
from recsys.kafka import ConsumerLoop, create_topics, make_consumer, make_producer
from recsys.publisher.core import Publisher, PublisherConfig
from recsys.publisher.sink import PublisherSink
from recsys.serving.model import load_serving_model
from recsys.serving.watcher import ModelWatcher
from recsys.store import Store
from tests.checkpoints import make_checkpoint
from tests.integration.publisher_helpers import (
    ITEMS,
    click,
    read_topic,
    slates_by_partition,
)

USERS = ["alice", "bob's", "c;d", "дмитрий", "🦊"] + [f"user-{i}" for i in range(25)]


def _histogram_count(h) -> float:
    return next(s.value for m in h.collect() for s in m.samples if s.name.endswith("_count"))


def test_hot_swap_while_events_flow(kafka_settings, topic_prefix, tmp_path, store_url, capsys):
    events_topic, recs_topic = f"{topic_prefix}.events", f"{topic_prefix}.recs"
    create_topics(kafka_settings, [events_topic, recs_topic], partitions=3)
    ckpt_dir = tmp_path / "ckpt"
    make_checkpoint(ckpt_dir, 1, ITEMS)
    cfg = PublisherConfig(k=5, history_len=10, batch_interval_s=0.1, device="cpu", seed=0)
    watcher = ModelWatcher(
        ckpt_dir,
        functools.partial(load_serving_model, policy_kwargs=cfg.policy_kwargs()),
        interval_s=0.1,
    )
    watcher.poll()
    store = Store(store_url)
    users = [f"{u}-{topic_prefix}" for u in USERS]  # the PostgreSQL database is shared
    publisher = Publisher(cfg, lambda: watcher.current)
    producer = make_producer(kafka_settings)
    sink = PublisherSink(publisher, producer, recs_topic, store)
    loop = ConsumerLoop(
        make_consumer(kafka_settings, f"{topic_prefix}.pub"),
        [events_topic],
        sink,
        worker="publisher",
        poll_timeout_ms=50,
        tick_interval_s=0.05,
    )
    fresh_before = _histogram_count(metrics.FRESHNESS_SECONDS)
    watcher.start()
    runner = threading.Thread(target=loop.run, daemon=True)
    runner.start()
    events_out = make_producer(kafka_settings)
    sent = []
    try:
        deadline = time.monotonic() + 30
        while not loop.consumer.assignment() and time.monotonic() < deadline:
            time.sleep(0.05)  # the group join takes a few seconds
        for n in range(600):
            if n == 300:
                while sink.batches < 3 and time.monotonic() < deadline + 30:
                    time.sleep(0.05)  # v1 is being served ...
                make_checkpoint(ckpt_dir, 2, ITEMS, seed=1)  # ... and a new version lands
            e = click(n, users[n % len(users)], ITEMS[(n * 7) % len(ITEMS)])
            events_out.send(events_topic, key=e.key, value=e.to_bytes())
            sent.append(e)
            time.sleep(0.004)
        events_out.flush()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            stored = store.all_recommendations()
            mine = {u: stored.get(u) for u in users}
            if (
                all(
                    s is not None and s.slate.model_version == "v000000000002"
                    for s in mine.values()
                )
                and not publisher.pending
            ):
                break
            time.sleep(0.2)
    finally:
        loop.stop()
        runner.join(30)
        watcher.stop()
        events_out.close()
        producer.close()

    assert watcher.current is not None
    assert watcher.current.version == "v000000000002"
    records = read_topic(kafka_settings, recs_topic)
    by_part = slates_by_partition(records)
    all_slates = [s for ss in by_part.values() for s in ss]
    assert {s.model_version for s in all_slates} == {"v000000000001", "v000000000002"}
    for slates in by_part.values():
        versions = [s.model_version for s in slates]
        if "v000000000002" in versions:
            first_new = versions.index("v000000000002")
            assert set(versions[first_new:]) == {"v000000000002"}, "old version after the swap"
    # Keys are user ids; request ids are fresh per slate.
    assert all(r.key.decode() == Slate_user(r) for r in records)
    assert len({s.request_id for s in all_slates}) == len(all_slates)
    by_request = {s.request_id: s for s in all_slates}
    positives: dict[str, set[str]] = {}
    for e in sent:
        if e.type == "click":
            positives.setdefault(e.user_id, set()).add(e.item_id)
    for u in users:
        got = store.get_recommendation(u)
        assert got is not None, u
        assert got.slate.user_id == u  # stored verbatim
        assert got.slate.model_version == "v000000000002"
        assert by_request[got.slate.request_id] == got.slate, "store and topic disagree"
        assert len(got.slate.items) == 5
        assert all(0 < i.propensity <= 1 for i in got.slate.items)
        # The final slate reflects every click: consumed items are excluded.
        assert not positives.get(u, set()) & {i.item_id for i in got.slate.items}
    assert _histogram_count(metrics.FRESHNESS_SECONDS) > fresh_before
    versions = {v["version"] for v in store.model_versions()}
    assert {"v000000000001", "v000000000002"} <= versions

    # `recsys recommend` prints what the store holds, for a user id with quotes and Unicode.
    capsys.readouterr()
    assert cli_main(["recommend", users[1], "--store-url", store_url]) == 0
    out = capsys.readouterr().out
    assert users[1] in out
    assert "v000000000002" in out
    assert store.get_recommendation(users[1]).slate.items[0].item_id in out
    assert cli_main(["recommend", f"never-seen-{topic_prefix}", "--store-url", store_url]) == 0
    assert "cold_start" in capsys.readouterr().out
    store.close()


def Slate_user(record) -> str:
    from recsys.events import Slate

    return Slate.from_bytes(record.value).user_id
