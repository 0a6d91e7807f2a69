"""Compressed topics: batches in every Kafka codec, from two producer libraries, consume intact.

An app may produce its events with any codec; the reward worker crashed on lz4/snappy/zstd
batches (``UnsupportedCodecError``) because kafka-python had no library to decode them.
"""

from __future__ import annotations

import json
import time

import pytest
from kafka import KafkaProducer, codec

from recsys.codecs import ALL_CODECS, check_codecs
from recsys.config import KafkaSettings
from recsys.errors import ConfigError
from recsys.kafka import create_topics, make_consumer

N = 300


def _events(tag: str) -> list[tuple[bytes, bytes]]:
    """Event-shaped (key, value) pairs: repetitive JSON (compresses) with unique fields."""
    out = []
    for k in range(N):
        event = {
            "event_id": f"{tag}-{k}",
            "type": "click" if k % 3 else "impression",
            "user_id": f"u{k % 17}",
            "item_id": f"i{k % 41}",
            "ts": 1_700_000_000_000 + k,
            "value": k * 0.5,
            "request_id": "r" * (k % 50),  # sizes vary, so batches are not all alike
        }
        out.append((f"u{k % 17}".encode(), json.dumps(event).encode()))
    return out


def _consume_all(settings: KafkaSettings, topic: str, want: int) -> list[tuple[bytes, bytes]]:
    consumer = make_consumer(settings, None, topic, consumer_timeout_ms=1000)
    got: list[tuple[bytes, bytes]] = []
    try:
        deadline = time.monotonic() + 60
        while len(got) < want and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                got.extend((r.key, r.value) for r in records)
    finally:
        consumer.close()
    return got


def _check_round_trip(settings: KafkaSettings, topic: str, sent: list[tuple[bytes, bytes]]) -> None:
    got = _consume_all(settings, topic, len(sent))
    # One partition: order is preserved exactly, so compare the lists, not just the sets.
    assert got == sent


@pytest.mark.parametrize("compression", ["none", "gzip", "snappy", "lz4", "zstd"])
def test_kafka_python_producer_every_codec(
    kafka_settings: KafkaSettings, topic_prefix: str, compression: str
) -> None:
    topic = f"{topic_prefix}.events.{compression}"
    create_topics(kafka_settings, [topic], 1)
    sent = _events(compression)
    producer = KafkaProducer(
        **kafka_settings.client_kwargs(),
        compression_type=None if compression == "none" else compression,
        linger_ms=20,  # several records per batch, so the codec sees real batches
    )
    try:
        for key, value in sent:
            producer.send(topic, key=key, value=value)
        producer.flush(timeout=30)
    finally:
        producer.close()
    _check_round_trip(kafka_settings, topic, sent)


@pytest.mark.parametrize("compression", ["snappy", "lz4", "zstd"])
def test_librdkafka_producer_codecs(
    kafka_settings: KafkaSettings, topic_prefix: str, compression: str
) -> None:
    # Most apps produce with librdkafka (confluent-kafka), whose codec implementations (e.g. its
    # own lz4 framing, xerial-less snappy) are not kafka-python's: decode what it writes too.
    confluent_kafka = pytest.importorskip("confluent_kafka")
    topic = f"{topic_prefix}.rdkafka.{compression}"
    create_topics(kafka_settings, [topic], 1)
    sent = _events(f"rd-{compression}")
    producer = confluent_kafka.Producer(
        {
            "bootstrap.servers": kafka_settings.bootstrap_servers,
            "compression.codec": compression,
            "linger.ms": 20,
        }
    )
    errors: list[object] = []

    def delivered(err: object, _msg: object) -> None:
        if err is not None:
            errors.append(err)

    for key, value in sent:
        producer.produce(topic, key=key, value=value, on_delivery=delivered)
        producer.poll(0)
    assert producer.flush(30) == 0, "librdkafka did not deliver everything"
    assert errors == []
    _check_round_trip(kafka_settings, topic, sent)


def test_check_codecs_passes_with_the_dependencies_installed() -> None:
    check_codecs()
    check_codecs(["gzip", "none"])


def test_check_codecs_names_a_missing_codec_and_its_package(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Hide every lz4 binding kafka-python probes for, as an image without lz4 would have it.
    for attr in ("lz4", "lz4f", "lz4framed"):
        monkeypatch.setattr(codec, attr, None)
    with pytest.raises(ConfigError, match=r"lz4 \(needs the lz4 package\)") as info:
        check_codecs()
    assert "zstd" not in str(info.value)
    check_codecs(["gzip", "zstd"])  # only the codecs asked for are checked
    with pytest.raises(ConfigError, match="unknown Kafka compression codec 'brotli'"):
        check_codecs(["brotli"])
    assert set(ALL_CODECS) == {"none", "gzip", "snappy", "lz4", "zstd"}
