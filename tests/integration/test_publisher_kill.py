"""SIGKILL the publisher worker mid-batch: no slate lost, none half-written, no event forgotten."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recsys.demo.supervisor import wait_for
from recsys.kafka import create_topics, make_producer
from recsys.store import Store
from tests.checkpoints import make_checkpoint
from tests.integration.publisher_helpers import (
    ITEMS,
    click,
    read_topic,
    slates_by_partition,
)

REPO = Path(__file__).resolve().parents[2]


def _start(env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "recsys", "worker", "publisher"],
        cwd=REPO,
        env=env,
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
    )


def _entries(store: Store) -> int:
    return sum(len(v) for _, v in store.load_histories())


@pytest.mark.slow
def test_sigkill_mid_batch_loses_nothing(kafka_settings, topic_prefix, tmp_path):
    events_topic, recs_topic = f"{topic_prefix}.events", f"{topic_prefix}.recs"
    create_topics(kafka_settings, [events_topic, recs_topic], partitions=2)
    ckpt_dir = tmp_path / "ckpt"
    make_checkpoint(ckpt_dir, 1, ITEMS)
    db = tmp_path / "store.db"
    env = {
        **os.environ,
        "RECSYS_KAFKA__BOOTSTRAP_SERVERS": kafka_settings.bootstrap_servers,
        "RECSYS_KAFKA__SESSION_TIMEOUT_MS": "3000",
        "RECSYS_KAFKA__HEARTBEAT_INTERVAL_MS": "500",
        "RECSYS_KAFKA__MAX_POLL_INTERVAL_MS": "5000",
        "RECSYS_TOPICS__EVENTS": events_topic,
        "RECSYS_TOPICS__RECOMMENDATIONS": recs_topic,
        "RECSYS_STORE__URL": f"sqlite:///{db}",
        "RECSYS_METRICS__PORT": "0",
        "RECSYS_PUBLISHER__GROUP_ID": f"{topic_prefix}.pub",
        "RECSYS_PUBLISHER__CHECKPOINT_DIR": str(ckpt_dir),
        "RECSYS_PUBLISHER__K": "5",
        "RECSYS_PUBLISHER__HISTORY_LEN": "10",
        "RECSYS_PUBLISHER__BATCH_INTERVAL_MS": "50",
        "RECSYS_PUBLISHER__DEVICE": "cpu",
    }
    log = tmp_path / "worker.log"
    users = [f"u{i}'; --" if i % 5 == 0 else f"u{i}" for i in range(40)]
    producer = make_producer(kafka_settings)
    sent = []

    def produce(start: int, n: int, pause: float) -> None:
        for k in range(start, start + n):
            e = click(k, users[k % len(users)], ITEMS[(k * 11) % len(ITEMS)])
            producer.send(events_topic, key=e.key, value=e.to_bytes())
            sent.append(e)
            if pause:
                time.sleep(pause)
        producer.flush()

    kills = 0
    total = 0
    try:
        for _round in range(3):
            proc = _start(env, log)
            # Wait for the worker to publish something, then kill it while events still flow.
            with Store(f"sqlite:///{db}") as store:
                deadline = time.monotonic() + 60
                before = _entries(store)
                produce(total, 150, 0.005)
                total += 150
                while time.monotonic() < deadline and _entries(store) <= before:
                    time.sleep(0.05)
            produce(total, 100, 0.0)  # a burst: the kill lands while batches are in flight
            total += 100
            time.sleep(0.1)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            kills += 1
        # A final, undisturbed run catches up and is stopped cleanly. It must be consuming
        # first: the killed runs may have stored everything already, and a SIGTERM during its
        # start-up (before its handlers are installed) kills it and tests nothing.
        assigned = log.read_bytes().count(b"publisher assigned partitions")
        proc = _start(env, log)
        consuming = wait_for(
            lambda: (
                log.read_bytes().count(b"publisher assigned partitions") > assigned
                or proc.poll() is not None
            ),
            60,
        )
        assert proc.poll() is None, log.read_text()[-2000:]
        assert consuming, "the final run never got its partitions"
        with Store(f"sqlite:///{db}") as store:
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                hist = dict(store.load_histories())
                got = sum(len(v) for v in hist.values())
                if got >= sum(1 for e in sent if e.type == "click") and len(
                    store.known_users()
                ) >= len(users):
                    break
                time.sleep(0.2)
        time.sleep(1.0)  # let an in-flight batch finish
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        producer.close()
        if proc.poll() is None:
            proc.kill()
    assert kills == 3

    clicks: dict[str, set[str]] = {}
    for e in sent:
        if e.type == "click":
            clicks.setdefault(e.user_id, set()).add(e.event_id)
    records = read_topic(kafka_settings, recs_topic)
    topic_slates = [s for ss in slates_by_partition(records).values() for s in ss]
    by_request = {s.request_id: s for s in topic_slates}
    assert all(len(s.items) == 5 for s in topic_slates), "a half-written slate on the topic"
    with Store(f"sqlite:///{db}") as store:
        histories = dict(store.load_histories())
        for u in users:
            stored = store.get_recommendation(u)
            assert stored is not None, f"slate of {u!r} lost"
            # Store and topic agree: the stored slate was published, whole.
            assert by_request[stored.slate.request_id] == stored.slate
            # No event forgotten or double-counted across the kills: the persisted history holds
            # each click exactly once (history_len 10 * 2 retained >= clicks per user here).
            ids = [e[2] for e in histories.get(u, [])]
            assert sorted(ids) == sorted(clicks.get(u, set())), u
            # The last slate reflects every click: consumed items are excluded.
            clicked_items = {e.item_id for e in sent if e.user_id == u and e.type == "click"}
            assert not clicked_items & {i.item_id for i in stored.slate.items}
        assert sum(store.load_popularity().values()) == sum(len(v) for v in clicks.values())
