"""Fault test 5 (issue 13): publisher replicas that join and leave during a model-version change.

Two replicas share the group; a third joins and the first leaves (stopped cleanly, or a worker
process SIGKILLed mid-burst) while a new version lands.
Every user's stored history equals the offline oracle, every user's final slate is of the new
version, and once the group has settled every user is served by exactly one replica (the owner
of their partition), and every user still gets a fresh slate after a click. Replicas hold at
most ``MAX_USERS`` users each, fewer than they own, so users are evicted and reloaded from the
store throughout.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from recsys.events import Event
from recsys.kafka import ConsumerLoop, create_topics, make_consumer, make_producer
from recsys.publisher.core import Batch, Publisher, PublisherConfig
from recsys.publisher.sink import PublisherSink
from recsys.serving.model import load_serving_model
from recsys.serving.watcher import ModelWatcher
from recsys.store import Store, partition_for
from tests.checkpoints import make_checkpoint
from tests.integration.publisher_helpers import ITEMS, read_topic, slates_by_partition

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
PARTITIONS = 4
MAX_USERS = 8
V1, V2 = "v000000000001", "v000000000002"


class RecordingSink(PublisherSink):
    """The publisher's sink, noting when each batch was stored and whose slates it held."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.published: list[tuple[float, list[str]]] = []

    def publish(self, batch: Batch) -> None:
        super().publish(batch)
        self.published.append((time.time(), [w.slate.user_id for w in batch.slates]))


@dataclass
class Replica:
    name: str
    watcher: ModelWatcher
    sink: RecordingSink
    loop: ConsumerLoop
    thread: threading.Thread

    def owned(self) -> set[int]:
        return {tp.partition for tp in self.loop.consumer.assignment()}

    def stop(self) -> None:
        self.loop.stop()
        self.thread.join(30)
        self.watcher.stop()
        self.sink.producer.close()
        self.sink.store.close()


def _start(name, kafka_settings, group, events_topic, recs_topic, ckpt_dir, store_url) -> Replica:
    cfg = PublisherConfig(
        k=5, history_len=10, batch_interval_s=0.05, device="cpu", seed=0, max_users=MAX_USERS
    )
    watcher = ModelWatcher(
        ckpt_dir,
        functools.partial(load_serving_model, policy_kwargs=cfg.policy_kwargs()),
        interval_s=0.1,
    )
    watcher.poll()
    store = Store(store_url)
    publisher = Publisher(cfg, lambda: watcher.current, store=store)
    publisher.load_popularity(store.load_popularity())
    sink = RecordingSink(
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
    watcher.start()
    thread = threading.Thread(target=loop.run, daemon=True, name=f"publisher-{name}")
    thread.start()
    return Replica(name, watcher, sink, loop, thread)


def _worker(kafka_settings, group, events_topic, recs_topic, ckpt_dir, url, log: Path):
    """The publisher worker as Kubernetes runs it, in its own process (to be SIGKILLed)."""
    env = {
        **os.environ,
        "RECSYS_KAFKA__BOOTSTRAP_SERVERS": kafka_settings.bootstrap_servers,
        "RECSYS_KAFKA__SESSION_TIMEOUT_MS": str(kafka_settings.session_timeout_ms),
        "RECSYS_KAFKA__HEARTBEAT_INTERVAL_MS": str(kafka_settings.heartbeat_interval_ms),
        "RECSYS_KAFKA__MAX_POLL_INTERVAL_MS": str(kafka_settings.max_poll_interval_ms),
        "RECSYS_TOPICS__EVENTS": events_topic,
        "RECSYS_TOPICS__RECOMMENDATIONS": recs_topic,
        "RECSYS_STORE__URL": url,
        "RECSYS_METRICS__PORT": "0",
        "RECSYS_PUBLISHER__GROUP_ID": group,
        "RECSYS_PUBLISHER__CHECKPOINT_DIR": str(ckpt_dir),
        "RECSYS_PUBLISHER__WATCH_INTERVAL_S": "0.1",
        "RECSYS_PUBLISHER__K": "5",
        "RECSYS_PUBLISHER__HISTORY_LEN": "10",
        "RECSYS_PUBLISHER__BATCH_INTERVAL_MS": "50",
        "RECSYS_PUBLISHER__DEVICE": "cpu",
        "RECSYS_PUBLISHER__MAX_USERS": str(MAX_USERS),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "recsys", "worker", "publisher"],
        cwd=REPO,
        env=env,
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
    )


def _wait(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


# Pairwise, not the full product: each store and each way of leaving once (the store code is
# shared; the 2x2 grid took 105 s of the default run for no more coverage of either axis).
@pytest.mark.parametrize(
    ("store_url", "leave"),
    [("sqlite", "sigkill"), ("postgresql", "clean")],
    indirect=["store_url"],
)
def test_replicas_join_and_leave_during_a_version_change(
    kafka_settings, topic_prefix, tmp_path, store_url, leave
):
    events_topic, recs_topic = f"{topic_prefix}.events", f"{topic_prefix}.recs"
    group = f"{topic_prefix}.pub"
    create_topics(kafka_settings, [events_topic, recs_topic], partitions=PARTITIONS)
    ckpt_dir = tmp_path / "ckpt"
    make_checkpoint(ckpt_dir, 1, ITEMS)
    users = [f"u{i}'-{topic_prefix}" for i in range(40)]  # the PostgreSQL database is shared
    start = lambda name: _start(  # noqa: E731
        name, kafka_settings, group, events_topic, recs_topic, ckpt_dir, store_url
    )
    out = make_producer(kafka_settings)
    sent: list[Event] = []
    t0 = int(time.time() * 1000)

    def produce(n_events: int, pause: float = 0.002) -> None:
        for _ in range(n_events):
            n = len(sent)
            kind = "impression" if n % 4 == 3 else "click"
            e = Event(f"e{n}", kind, users[n % len(users)], ITEMS[(n * 7) % len(ITEMS)], t0 + n)
            out.send(events_topic, key=e.key, value=e.to_bytes())
            sent.append(e)
            time.sleep(pause)
        out.flush()

    replicas: dict[str, Replica] = {}
    store = Store(store_url)
    pop_before = store.load_popularity()  # the PostgreSQL database is shared by the session
    proc: subprocess.Popen | None = None
    try:
        if leave == "clean":
            replicas["a"] = start("a")
            a_owned = replicas["a"].owned
        else:  # A is a worker process: it dies by SIGKILL, mid-batch, with state not stored
            args = (kafka_settings, group, events_topic, recs_topic, ckpt_dir, store_url)
            proc = _worker(*args, tmp_path / "a.log")
            a_owned = lambda: set(range(PARTITIONS)) - replicas["b"].owned()  # noqa: E731
        replicas["b"] = start("b")
        _wait(
            lambda: (
                0 < len(replicas["b"].owned()) < PARTITIONS
                and a_owned() | replicas["b"].owned() == set(range(PARTITIONS))
            ),
            90,
            "a and b to share the partitions",
        )
        produce(200)
        _wait(lambda: len(store.load_user_states(users)) == len(users), 60, "every user stored")

        # C joins, the new version lands while the group rebalances, and A leaves.
        replicas["c"] = start("c")
        produce(50)
        make_checkpoint(ckpt_dir, 2, ITEMS, seed=1)
        produce(50)
        _wait(lambda: len(replicas["c"].owned()) > 0, 60, "c to get partitions")
        if proc is None:
            replicas.pop("a").stop()
            produce(100)
        else:
            produce(100, pause=0.0)  # a burst: the kill lands while batches are in flight
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)

        live = list(replicas.values())

        def settled() -> bool:
            owned = [r.owned() for r in live]
            stored = store.all_recommendations()
            return (
                set().union(*owned) == set(range(PARTITIONS))
                and sum(len(o) for o in owned) == PARTITIONS
                and all(r.watcher.current and r.watcher.current.version == V2 for r in live)
                and all(u in stored and stored[u].slate.model_version == V2 for u in users)
                and not any(r.sink.publisher.pending or r.sink.publisher.refreshing for r in live)
            )

        _wait(settled, 90, "the group to settle on v2")
        owner = {p: r.name for r in live for p in r.owned()}
        settled_at = time.time()

        # Fresh slates after the rebalance: one more click per user, on an item they never saw.
        fresh = ITEMS[-1]
        for n, u in enumerate(users):
            e = Event(f"fresh{n}", "click", u, fresh, t0 + 10_000 + n)
            out.send(events_topic, key=e.key, value=e.to_bytes())
            sent.append(e)
        out.flush()

        def all_fresh() -> bool:
            stored = store.all_recommendations()
            return all(
                u in stored
                and stored[u].event_ts == t0 + 10_000 + n
                and not any(r.sink.publisher.pending for r in live)
                for n, u in enumerate(users)
            )

        _wait(all_fresh, 60, "a fresh slate for every user")
        assert {r.name: r.owned() for r in live} == {
            name: {p for p, o in owner.items() if o == name} for name in ("b", "c")
        }, "the assignment moved after it settled"
    finally:
        for r in replicas.values():
            r.stop()
        out.close()
        if proc is not None and proc.poll() is None:
            proc.kill()

    # The stored history of every user equals the offline oracle: each click exactly once, in
    # event-time order (40 users, at most 14 clicks each, fit history_len 10 * 2 retained).
    oracle: dict[str, list[tuple[int, str, str]]] = {u: [] for u in users}
    for e in sent:
        if e.type == "click":
            oracle[e.user_id].append((e.ts, e.item_id, e.event_id))
    rows = store.load_user_states(users)
    for u in users:
        assert [(ts, i, eid) for ts, i, eid, _ in rows[u].entries] == sorted(oracle[u]), u
        # The source partition recorded with the user is the one kafka-python's partitioner
        # (murmur2) chose: the store can compute it for rows written before it recorded it.
        assert rows[u].partition == partition_for(u, PARTITIONS), u
    pop = store.load_popularity()
    # Popularity counted each click once, whichever replica saw it (none was re-read and
    # counted twice: a new owner starts at the offset stored with the state it takes over).
    counted = sum(pop.get(i, 0) - pop_before.get(i, 0) for i in ITEMS)
    assert counted == sum(len(v) for v in oracle.values())

    stored = store.all_recommendations()
    records = read_topic(kafka_settings, recs_topic)
    topic_slates = [s for ss in slates_by_partition(records).values() for s in ss]
    by_request = {s.request_id: s for s in topic_slates}
    clicked: dict[str, set[str]] = {}
    for e in sent:
        if e.type == "click":
            clicked.setdefault(e.user_id, set()).add(e.item_id)
    for u in users:
        got = stored[u]
        assert got.slate.model_version == V2, u
        assert by_request[got.slate.request_id] == got.slate, "store and topic disagree"
        assert not clicked[u] & {i.item_id for i in got.slate.items}, u

    # After the group settled, each user was published by one replica only: their owner's.
    served: dict[str, set[str]] = {}
    for r in live:
        for when, users_in_batch in r.sink.published:
            if when > settled_at:
                for u in users_in_batch:
                    served.setdefault(u, set()).add(r.name)
    assert set(served) == set(users), "some user got no fresh slate"
    for u, names in served.items():
        assert names == {owner[partition_for(u, PARTITIONS)]}, (u, names)
    store.close()
    evictions = {r.name: r.sink.publisher._users.evictions for r in live}
    assert all(n > 0 for n in evictions.values()), evictions  # reloads were exercised
    print(
        f"\nscale-out: {len(users)} users, {len(sent)} events, replicas a+b, c joined, a left "
        f"({leave}) "
        f"during {V1}->{V2}; histories equal the oracle for {len(users)}/{len(users)} users; "
        f"after settling each user served by 1 replica ({owner}); evictions {evictions}"
    )
