"""Broker outages on durable broker storage (issue 13, fault tests 3 and 6).

The broker is Tansu with its ``s3://`` storage engine on a real moto_server; it is stopped
mid-stream and restarted on the same port and storage. The reward worker is a real
``recsys worker reward`` subprocess, the learner and the encoder are their real apps on the
real consumer loop in-process (so their counters can be read). The 5-minute (pipeline) and
150 s (encoder) outages are ``python -m recsys.testing.outage``.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest
from kafka.structs import TopicPartition

from recsys.kafka import create_topics, make_consumer, make_producer
from recsys.testing.outage import (
    RECOVERY_LIMIT_S,
    durable_broker,
    outage_kafka_settings,
    reread,
    run_encoder_outage,
    run_pipeline_outage,
)

pytest.importorskip("boto3")


def test_broker_restarted_on_s3_storage_keeps_records_and_committed_offsets(
    s3_endpoint: str,
) -> None:
    broker = durable_broker(s3_endpoint)
    try:
        kafka = outage_kafka_settings(broker.bootstrap)
        topic, group = f"t{uuid.uuid4().hex[:8]}", f"g{uuid.uuid4().hex[:8]}"
        create_topics(kafka, [topic], 2)
        producer = make_producer(kafka)
        for i in range(20):
            producer.send(topic, key=str(i).encode(), value=str(i).encode())
        producer.flush()
        producer.close()
        consumer = make_consumer(kafka, group)
        parts = [TopicPartition(topic, p) for p in range(2)]
        consumer.assign(parts)
        got = 0
        deadline = time.monotonic() + 30
        while got < 20 and time.monotonic() < deadline:
            got += sum(len(v) for v in consumer.poll(timeout_ms=200).values())
        consumer.commit()
        before = {tp: consumer.committed(tp) for tp in parts}
        consumer.close()
        port = broker.port

        broker.restart(down_s=1.0)

        assert broker.port == port
        after_consumer = make_consumer(kafka, group)
        try:
            after = {tp: after_consumer.committed(tp) for tp in parts}
        finally:
            after_consumer.close()
        values = sorted(int(v) for v in reread(kafka, topic, 2))
        print(f"\nafter restart: {len(values)} of 20 records, committed {after} (was {before})")
        assert got == 20
        assert values == list(range(20))
        assert after == before
        assert sum(after.values()) == 20
    finally:
        broker.stop()


@pytest.mark.slow
def test_pipeline_survives_a_30s_broker_outage(s3_endpoint: str, tmp_path) -> None:
    """Fault test 3: lost 0, duplicates trained 0, no worker exits, lag < 1 s within 60 s."""
    r = run_pipeline_outage(
        30.0,
        s3_endpoint=s3_endpoint,
        rate=50.0,
        before_s=15.0,
        after_s=20.0,
        log_dir=tmp_path,
        verbose=False,
    )
    print("\nbroker outage (30 s):\n" + json.dumps(r, indent=2))
    assert r["producer_failed"] == 0
    assert r["producer_error"] is None
    assert r["events_missing_from_topic"] == 0, r["events_missing_detail"]
    assert r["lost"] == 0, r["missing_sample"]
    assert r["wrong"] == 0
    assert r["learner_missing"] == 0
    assert r["duplicates_trained"] == 0
    assert r["workers_alive_during_outage"]
    assert r["workers_alive_after"]
    assert not r["reward_worker_pid_changed"]
    assert r["reward_worker_exit"] == 0
    for worker in ("reward", "learner"):
        recovery = r[f"recovery_s_{worker}"]
        assert recovery is not None, f"{worker}: lag never under 1 s's worth"
        assert recovery <= RECOVERY_LIMIT_S, (worker, recovery)


@pytest.mark.slow
def test_encoder_outage_longer_than_its_delivery_timeout(s3_endpoint: str, tmp_path) -> None:
    """Fault test 6: the outage outlasts the producer's delivery timeout; vectors produced =
    items consumed, and the encoder keeps running."""
    r = run_encoder_outage(
        25.0,
        s3_endpoint=s3_endpoint,
        delivery_timeout_s=8.0,
        before_s=6.0,
        after_s=8.0,
        log_dir=tmp_path,
        verbose=False,
    )
    print("\nencoder outage (25 s, delivery timeout 8 s):\n" + json.dumps(r, indent=2))
    assert r["encoder_send_failures"] >= 1, "the outage did not outlast the delivery timeout"
    assert r["producer_failed"] == 0
    assert r["items_unconsumed"] == 0
    assert r["distinct_items_in_topic"] == r["items_produced"]
    assert r["items_with_vectors"] == r["distinct_items_in_topic"]
    assert r["missing"] == 0
    assert r["encoder_alive_during_outage"]
    assert r["encoder_alive_after"]
