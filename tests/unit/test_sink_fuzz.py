"""Generated hostile messages through every worker's sink: nothing escapes, and every message is
either used or counted in ``recsys_events_rejected_total{reason,worker}`` and dead-lettered
with that reason.

The sinks are the real ones; only the Kafka producer is a stand-in that records what is sent
(the broker-level version of this is tests/integration/test_hostile_input.py).
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from kafka.structs import TopicPartition
from prometheus_client import REGISTRY

from recsys.config import load_settings
from recsys.encoder.sink import EncoderSink
from recsys.encoder.text import TextEncoder
from recsys.events import EventParser, ItemVector, Rejection, RewardRecord, parse_item
from recsys.kafka import DeadLetterWriter, Sink
from recsys.learner.config import LearnerConfig
from recsys.learner.online import OnlineLearner
from recsys.learner.sink import LearnerSink
from recsys.learner.trainer import Learner
from recsys.model import ModelConfig
from recsys.publisher.core import Publisher, PublisherConfig
from recsys.publisher.sink import PublisherSink
from recsys.rewards.sink import RewardSink
from recsys.store import Store
from tests.unit.test_contract_fuzz import (
    EVENT_FIELDS,
    ITEM_FIELDS,
    REWARD_FIELDS,
    SEED_EVENT,
    SEED_ITEM,
    random_message,
)
from tests.unit.test_rewards_sink import FakeConsumer, FakeProducer, FakeReader
from tests.unit.tiny_bert import make_tiny_bert

DLQ = "dlq"
SEED_REWARD = RewardRecord(
    "r1", "u1", "i1", 1.0, 1_700_000_000_000, "joined", 0.25, 3, "v1", "q1"
).to_bytes()
SEED_VECTOR = ItemVector("i1", "tiny", "k1", (0.5,) * 8).to_bytes()


class Future:
    def failed(self) -> bool:
        return False

    def succeeded(self) -> bool:
        return True

    def get(self, timeout: float | None = None) -> None:
        return None


class Producer:
    """Records sends; every send is acknowledged."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Any, dict[str, bytes]]] = []

    def send(self, topic, value=None, key=None, headers=None, partition=None):
        self.sent.append((topic, value, dict(headers or ())))
        return Future()

    def flush(self, timeout=None) -> None:
        return None

    def close(self) -> None:
        return None


def _rejected(worker: str) -> Counter[str]:
    out: Counter[str] = Counter()
    for metric in REGISTRY.collect():
        if metric.name != "recsys_events_rejected":
            continue
        for s in metric.samples:
            if s.name.endswith("_total") and s.labels.get("worker") == worker:
                out[s.labels["reason"]] += int(s.value)
    return out


def _drive(sink: Sink, producer: Any, topic_of: list[str], messages: list[bytes]) -> None:
    """Feed ``messages`` in batches of 500; each on its topic, offsets per topic."""
    offsets: Counter[str] = Counter()
    for start in range(0, len(messages), 500):
        batch = []
        for raw, topic in zip(
            messages[start : start + 500], topic_of[start : start + 500], strict=True
        ):
            batch.append(
                SimpleNamespace(
                    topic=topic, partition=0, offset=offsets[topic], key=b"k", value=raw, headers=[]
                )
            )
            offsets[topic] += 1
        sink.write(batch)
        sink.flush()


def _check(worker: str, before: Counter[str], producer: Producer, expected: Counter[str]) -> None:
    """Every rejection the contract predicts is counted and in the DLQ with its reason."""
    dlq = Counter(h["recsys.reason"].decode() for t, _, h in producer.sent if t == DLQ)
    assert {h["recsys.worker"] for t, _, h in producer.sent if t == DLQ} <= {worker.encode()}
    assert dlq == expected
    assert _rejected(worker) - before == expected
    print(f"{worker}: {sum(expected.values())} rejected by reason {dict(sorted(expected.items()))}")


def _reason(verdict: Any) -> str | None:
    return verdict.reason.value if isinstance(verdict, Rejection) else None


def _events(rng: random.Random, n: int) -> list[bytes]:
    return [random_message(rng, SEED_EVENT, EVENT_FIELDS) for _ in range(n)]


def run_fuzz(n: int, tmp_path: Path) -> None:
    rng = random.Random(n)
    settings = load_settings(topics={"events": "ev", "rewards": "rw", "dlq": DLQ})
    parser = EventParser.from_settings(settings.events)
    quarter = n // 4

    # reward worker (its changelog read back from what the stand-in producer was sent)
    events = _events(rng, quarter)
    expected = Counter(r for raw in events if (r := _reason(parser.parse(raw))))
    fake = FakeProducer()
    reward = RewardSink(settings, fake, reader=FakeReader(fake))  # type: ignore[arg-type]
    tp = TopicPartition("ev", 0)
    reward.on_assign(FakeConsumer(assigned={tp}), [tp])  # type: ignore[arg-type]
    before = _rejected("reward")
    _drive(reward, fake, ["ev"] * len(events), events)
    producer = Producer()
    producer.sent = [(t, v, dict(h or ())) for t, _, v, _, h in fake.sent]
    _check("reward", before, producer, expected)

    # publisher (cold start: no model version yet)
    events = _events(rng, quarter)
    expected = Counter(r for raw in events if (r := _reason(parser.parse(raw))))
    producer = Producer()
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    publisher = Publisher(PublisherConfig(batch_interval_s=0.0, device="cpu"), lambda: None)
    pub = PublisherSink(
        publisher, producer, "recs", store, parser, dlq=DeadLetterWriter(producer, DLQ, "publisher")
    )  # type: ignore[arg-type]
    before = _rejected("publisher")
    _drive(pub, producer, ["ev"] * len(events), events)
    _check("publisher", before, producer, expected)
    store.close()

    # encoder
    items = [random_message(rng, SEED_ITEM, ITEM_FIELDS) for _ in range(quarter)]
    expected = Counter(r for raw in items if (r := _reason(parse_item(raw))))
    producer = Producer()
    encoder = TextEncoder(make_tiny_bert(tmp_path / "bert", hidden=8), device="cpu")
    enc = EncoderSink(
        encoder,
        None,
        producer,
        "vectors",  # type: ignore[arg-type]
        DeadLetterWriter(producer, DLQ, "encoder"),
    )  # type: ignore[arg-type]
    before = _rejected("encoder")
    _drive(enc, producer, ["items"] * len(items), items)
    _check("encoder", before, producer, expected)

    # learner: rewards and item vectors
    msgs, topics = [], []
    for _ in range(quarter):
        if rng.random() < 0.5:
            msgs.append(random_message(rng, SEED_REWARD, REWARD_FIELDS))
            topics.append("rw")
        else:
            msgs.append(random_message(rng, SEED_VECTOR, ["item_id", "model", "key", "vector"]))
            topics.append("vectors")
    expected = Counter()
    for raw, topic in zip(msgs, topics, strict=True):
        decode = RewardRecord.from_bytes if topic == "rw" else ItemVector.from_bytes
        try:
            decode(raw)
        except ValueError as exc:
            expected[exc.reason.value] += 1  # type: ignore[attr-defined]
    producer = Producer()
    learner = Learner(
        ModelConfig(text_dim=8, dim=8, max_history=8),
        LearnerConfig(batch_size=16, device="cpu", buffer_capacity=1000),
    )
    online = OnlineLearner(learner, tmp_path / "ckpt")
    sink = LearnerSink(online, "rw", "vectors", {}, DeadLetterWriter(producer, DLQ, "learner"))  # type: ignore[arg-type]
    before = _rejected("learner")
    _drive(sink, producer, topics, msgs)
    _check("learner", before, producer, expected)


def test_generated_messages_through_every_sink(tmp_path: Path) -> None:
    run_fuzz(4_000, tmp_path)


@pytest.mark.slow
def test_a_hundred_thousand_generated_messages_through_every_sink(tmp_path: Path) -> None:
    run_fuzz(100_000, tmp_path)
