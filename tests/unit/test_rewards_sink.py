"""The reward worker's sink with a fake producer and consumer (pure logic; the real broker is
in tests/integration): batching, DLQ, metrics, durable state and rebalance.

The fake producer keeps what was sent in order, so it doubles as the state topic's log for the
sink's :class:`FakeReader`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from kafka.errors import KafkaTimeoutError
from kafka.structs import TopicPartition
from prometheus_client import REGISTRY

from recsys.config import load_settings
from recsys.events import Event, Reason, RewardRecord
from recsys.rewards import feedback_reward_id, offline_join_for
from recsys.rewards.sink import RewardSink

SRC = "ev"
STATE = "state"
T0 = 1_700_000_000_000  # event times in ms since the epoch (the contract refuses pre-1990)


@dataclass
class FakeFuture:
    exception: Exception | None = None

    def failed(self) -> bool:
        return self.exception is not None


@dataclass
class FakeProducer:
    n_partitions: int = 3
    sent: list[tuple[str, bytes | None, bytes, int | None, Any]] = field(default_factory=list)
    fail: bool = False
    flushes: int = 0

    def send(self, topic, value=None, key=None, headers=None, partition=None):
        self.sent.append((topic, key, value, partition, headers))
        return FakeFuture(RuntimeError("broker said no") if self.fail else None)

    def flush(self, timeout=None) -> None:
        self.flushes += 1

    def partitions_for(self, topic: str) -> set[int]:
        return set(range(self.n_partitions))


@dataclass
class FakeReader:
    """The state topic as the fake producer received it (every send acked, in order)."""

    producer: FakeProducer
    ensured: list[int] = field(default_factory=list)

    def ensure(self, partitions: int) -> bool:
        self.ensured.append(partitions)
        return False

    def read(self, partitions: list[int]) -> dict[int, list[tuple[bytes | None, bytes | None]]]:
        sent = self.producer.sent
        return {q: [(k, v) for t, k, v, p, _ in sent if t == STATE and p == q] for q in partitions}

    def close(self) -> None:
        pass


@dataclass
class FakeConsumer:
    assigned: set[TopicPartition] = field(default_factory=set)
    commits: dict[TopicPartition, int] = field(default_factory=dict)
    seeks: list[tuple[TopicPartition, int]] = field(default_factory=list)

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    def committed(self, tp: TopicPartition) -> int | None:
        return self.commits.get(tp)

    def beginning_offsets(self, tps):
        return {tp: 0 for tp in tps}

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append((tp, offset))

    def partitions_for_topic(self, topic: str) -> set[int]:
        return {0, 1, 2}


def _settings():
    return load_settings(
        topics={"events": SRC, "rewards": "rw", "dlq": "dlq", "reward_state": STATE},
        rewards={
            "window_ms": 1000,
            "allowed_lateness_ms": 10,
            "late_retention_ms": 100,
            "dedupe_horizon_ms": 100,
        },
    )


def _sink(producer: FakeProducer | None = None, consumer: FakeConsumer | None = None):
    s = _settings()
    producer = producer or FakeProducer()
    sink = RewardSink(s, producer, reader=FakeReader(producer))  # type: ignore[arg-type]
    sink.on_assign(consumer or FakeConsumer(), [])  # how the loop hands the sink its consumer
    return sink, s


def _events(n: int = 60) -> list[Event]:
    out = []
    for k in range(n):
        u = f"u{k % 4}"
        out.append(
            Event(
                f"i{k}",
                "impression",
                u,
                f"a{k % 5}",
                T0 + k * 100,
                request_id=f"r{k}",
                position=0,
                propensity=0.5,
            )
        )
        if k % 3 == 0:
            out.append(
                Event(f"c{k}", "click", u, f"a{k % 5}", T0 + k * 100 + 50, request_id=f"r{k}")
            )
    out.append(Event("end", "click", "zz", "q", T0 + 10**7))
    return out


def _records(events: list[Event], partitions: int = 2) -> list[SimpleNamespace]:
    """Consumer records: each user's events on one partition, offsets per partition."""
    next_off = [0] * partitions
    out = []
    for e in events:
        p = int(e.user_id[-1], 36) % partitions
        out.append(
            SimpleNamespace(
                topic=SRC,
                partition=p,
                offset=next_off[p],
                key=e.user_id.encode(),
                value=e.to_bytes(),
            )
        )
        next_off[p] += 1
    return out


def _produced(producer: FakeProducer) -> dict[str, RewardRecord]:
    got = {}
    for topic, key, value, _, _ in producer.sent:
        if topic == "rw":
            r = RewardRecord.from_bytes(value)
            assert key == r.user_id.encode("utf-8", "surrogatepass")
            got[r.reward_id] = r
    return got


@pytest.mark.parametrize("batch", [1, 7, 1000])
def test_batches_give_the_oracle_and_commit_the_position(batch: int) -> None:
    events = _events()
    sink, s = _sink()
    records = _records(events)
    safe: dict[TopicPartition, int] = {}
    for i in range(0, len(records), batch):
        sink.write(records[i : i + batch])
        safe.update(sink.flush() or {})
    rs = s.rewards
    oracle = offline_join_for(events, rs)
    # The last event (far in the future) closed every window of its partition; the other
    # partition's last windows close when its clock moves, so compare what is due.
    got = _produced(sink.producer)
    assert got.keys() <= oracle.keys()
    assert all(oracle[k] == v for k, v in got.items())
    missing = oracle.keys() - got.keys()
    assert all(oracle[k].kind == "default" for k in missing)
    # Twice per batch: rewards and state deltas, then the clock records.
    assert 0 < sink.producer.flushes <= 2 * len(range(0, len(records), batch))
    ends = {
        TopicPartition(SRC, p): 1 + max(r.offset for r in records if r.partition == p)
        for p in (0, 1)
    }
    assert safe == ends  # the committed offset is the position, whatever is still open


def test_rewards_are_keyed_by_user_and_partitioned_by_the_producer() -> None:
    sink, _ = _sink()
    sink.write(_records(_events(10)))
    assert sink.producer.sent
    for topic, key, value, partition, _ in sink.producer.sent:
        if topic != "rw":
            continue
        assert partition is None  # kafka-python's own partitioner hashes the key
        assert key == RewardRecord.from_bytes(value).user_id.encode()


def _sample(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def _rejected(reason: str) -> float:
    return _sample("recsys_events_rejected_total", {"reason": reason, "worker": "reward"})


def test_rejects_go_to_the_dlq_with_reason_and_are_counted() -> None:
    sink, _ = _sink()
    good = Event("g", "click", "u", "a", T0 + 5)
    bad = [b"{not json", json.dumps({"event_id": "x"}).encode(), b"[1]", None]
    records = [
        SimpleNamespace(topic=SRC, partition=0, offset=k, key=b"u", value=v)
        for k, v in enumerate([*bad, good.to_bytes()])
    ]
    before = {r: _rejected(r) for r in ("not_json", "missing_field", "bad_type")}
    sink.write(records)
    safe = sink.flush()
    dlq = [x for x in sink.producer.sent if x[0] == "dlq"]
    assert [dict(h)["recsys.reason"] for *_, h in dlq] == [
        b"not_json",
        b"missing_field",
        b"bad_type",
        b"not_json",
    ]
    assert [dict(h)["recsys.source_offset"] for *_, h in dlq] == [b"0", b"1", b"2", b"3"]
    assert (
        _sample("recsys_events_rejected_total", {"reason": "not_json", "worker": "reward"})
        == before["not_json"] + 2
    )
    assert (
        _sample("recsys_events_rejected_total", {"reason": "bad_type", "worker": "reward"})
        == before["bad_type"] + 1
    )
    assert len([x for x in sink.producer.sent if x[0] == "rw"]) == 1
    assert safe == {TopicPartition(SRC, 0): 5}  # the position: the state went with it
    assert Reason.NOT_JSON.value == "not_json"


def test_negative_and_extreme_rewards_are_produced() -> None:
    sink, _ = _sink()
    gain = _sample("recsys_reward_positive_sum_total", {"kind": "organic"})
    loss = _sample("recsys_reward_negative_sum_total", {"kind": "organic"})
    events = [
        Event("s", "skip", "u", "a", T0 + 5),
        Event(
            "r", "rating", "u", "b", T0 + 6, value=1e38
        ),  # near float32's max, the contract's ceiling
        Event("q", "rating", "u", "c", T0 + 7, value=-1e38),
    ]
    sink.write(_records(events, partitions=1))
    sink.flush()
    got = sorted(r.reward for r in _produced(sink.producer).values())
    assert got[0] < -1e37
    assert got[1] == pytest.approx(-0.2)
    assert got[2] > 1e37
    assert _sample("recsys_reward_positive_sum_total", {"kind": "organic"}) > gain + 1e37
    assert _sample("recsys_reward_negative_sum_total", {"kind": "organic"}) > loss + 1e37


def test_lone_surrogates_in_ids_go_to_the_dlq_and_the_worker_goes_on() -> None:
    sink, _ = _sink()
    raw = (
        b'{"event_id":"e\\ud800","type":"click","user_id":"u\\udfff","item_id":"a",'
        b'"ts":1700000000005}'
    )
    good = Event("g", "click", "u", "a", T0 + 5).to_bytes()
    sink.write(
        [
            SimpleNamespace(topic=SRC, partition=0, offset=0, key=b"u", value=raw),
            SimpleNamespace(topic=SRC, partition=0, offset=1, key=b"u", value=good),
        ]
    )
    sink.flush()
    dlq = [x for x in sink.producer.sent if x[0] == "dlq"]
    assert [dict(h)["recsys.reason"] for *_, h in dlq] == [b"bad_value"]
    assert [dict(h)["recsys.source_offset"] for *_, h in dlq] == [b"0"]
    (rec,) = _produced(sink.producer).values()
    assert rec.user_id == "u"


def test_failed_send_raises_in_flush_so_nothing_is_committed() -> None:
    sink, _ = _sink(FakeProducer(fail=True))
    sink.write(_records([Event("g", "click", "u", "a", T0 + 5)]))
    with pytest.raises(RuntimeError, match="broker said no"):
        sink.flush()


@dataclass
class WedgedProducer(FakeProducer):
    """A producer whose flush never finishes (kafka-python raises KafkaTimeoutError)."""

    closed: bool = False

    def flush(self, timeout=None) -> None:
        raise KafkaTimeoutError(f"flush not done in {timeout}s")

    def close(self, timeout=None) -> None:
        self.closed = True


def test_a_wedged_producer_is_replaced_and_the_batch_fails() -> None:
    tp = TopicPartition(SRC, 0)
    consumer = FakeConsumer(assigned={tp})
    wedged, fresh = WedgedProducer(), FakeProducer()
    s = _settings()
    sink = RewardSink(
        s, wedged, reader=FakeReader(fresh), new_producer=lambda: fresh, flush_timeout_s=0.1
    )  # type: ignore[arg-type]
    sink.on_assign(consumer, [])
    records = _imps(4)
    sink.write(records)
    with pytest.raises(KafkaTimeoutError):
        sink.flush()  # nothing of the batch may be committed
    assert wedged.closed
    assert sink.producer is fresh
    assert sink.dlq is not None
    assert sink.dlq.producer is fresh
    assert sink.producers_replaced == 1
    sink.write(records)  # the loop hands the partition back: restored, then the batch again
    assert sink.flush() == {tp: 4}
    assert fresh.sent, "the new producer carries the batch"


def test_after_a_failed_batch_the_state_is_restored_and_its_clock_never_sent() -> None:
    tp = TopicPartition(SRC, 0)
    consumer = FakeConsumer(assigned={tp})
    producer = FakeProducer()
    sink, _ = _sink(producer, consumer)
    records = _imps(8)
    sink.write(records[:3])
    consumer.commits.update(sink.flush() or {})
    producer.fail = True
    sink.write(records[3:6])
    with pytest.raises(RuntimeError, match="broker said no"):
        sink.flush()
    producer.fail = False

    def clocks() -> int:
        return sum(1 for t, k, *_ in producer.sent if t == STATE and k and k.endswith(b'"m"]'))

    before = clocks()
    sink.write(records[6:])  # the consumer went on at 6: the sink seeks back to 3 instead
    assert consumer.seeks == [(tp, 3)]
    assert sink.joins[0].open_windows == 3
    assert sink.flush() == {tp: 3}
    assert clocks() == before  # the failed batch's clock record was never sent
    sink.write(records[3:])
    assert sink.flush() == {tp: 8}


def test_gauges_follow_the_state() -> None:
    sink, _ = _sink()
    sink.write(_records([Event("i", "impression", "u", "a", T0 + 5, request_id="r")]))
    sink.flush()
    assert _sample("recsys_open_windows") == 1
    assert _sample("recsys_dedupe_entries") == 1
    dupes = _sample("recsys_events_duplicate_total")
    sink.write(
        [
            SimpleNamespace(
                topic=SRC,
                partition=0,
                offset=1,
                key=b"u",
                value=Event("i", "impression", "u", "a", T0 + 5, request_id="r").to_bytes(),
            )
        ]
    )
    sink.flush()
    assert _sample("recsys_events_duplicate_total") == dupes + 1


def _imps(n: int) -> list[SimpleNamespace]:
    events = [Event(f"i{k}", "impression", "u", "a", T0 + k, request_id=f"r{k}") for k in range(n)]
    return [
        SimpleNamespace(topic=SRC, partition=0, offset=k, key=b"u", value=e.to_bytes())
        for k, e in enumerate(events)
    ]


def test_a_partition_that_stays_keeps_its_state_without_a_seek() -> None:
    tp = TopicPartition(SRC, 0)
    consumer = FakeConsumer(assigned={tp})
    sink, _ = _sink(consumer=consumer)
    records = _imps(8)
    sink.write(records[:5])
    consumer.commits.update(sink.flush() or {})  # what the loop does
    join = sink.joins[0]
    sink.on_revoke([tp])
    sink.on_assign(consumer, [tp])
    sink.write(records[5:])
    assert consumer.seeks == []
    assert sink.joins[0] is join
    assert join.open_windows == 8


def test_a_new_owner_restores_the_state_and_resumes_where_it_ends() -> None:
    """The clock record is ahead of the committed offset when a crash came between the two:
    the new owner resumes at the clock record and re-reads nothing."""
    tp = TopicPartition(SRC, 0)
    log = FakeProducer()
    first, _ = _sink(log, FakeConsumer(assigned={tp}))
    records = _imps(8)
    first.write(records[:5])
    first.flush()  # durable up to offset 5; the commit (say 3) never happened
    first.write(records[5:])  # deltas of a batch whose clock record never came
    consumer = FakeConsumer(assigned={tp}, commits={tp: 3})
    second, _ = _sink(log, consumer)
    second.on_assign(consumer, [tp])
    second.write(records[3:])  # fetched from the committed offset
    assert consumer.seeks == [(tp, 5)]
    assert second.joins[0].open_windows == 5  # the partial batch was ignored
    emitted = len(_produced(log))
    second.write(records[5:])
    assert second.joins[0].open_windows == 8
    assert second.flush() == {tp: 8}
    assert len(_produced(log)) == emitted  # impressions emit nothing until they close


def test_a_revoked_partition_is_dropped() -> None:
    tp = TopicPartition(SRC, 1)
    consumer = FakeConsumer(assigned=set())
    sink, _ = _sink(consumer=consumer)
    sink.write(
        [
            SimpleNamespace(
                topic=SRC,
                partition=1,
                offset=0,
                key=b"u",
                value=Event("i", "impression", "u", "a", T0 + 1).to_bytes(),
            )
        ]
    )
    sink.on_revoke([tp])
    sink.write([])
    assert sink.joins == {}
    assert consumer.seeks == []
    assert sink.flush() == {}


def test_first_assignment_without_commit_starts_at_the_beginning() -> None:
    tp = TopicPartition(SRC, 0)
    consumer = FakeConsumer(assigned={tp})
    sink, _ = _sink(consumer=consumer)
    sink.on_assign(consumer, [tp])
    sink.write(_records([Event("g", "click", "u", "a", T0 + 5)], partitions=1))
    assert consumer.seeks == []  # already at offset 0
    assert sink.flush() == {tp: 1}


def test_the_future_check_reads_the_record_timestamp_so_every_read_agrees() -> None:
    """An event 10 minutes ahead of its record's timestamp is ts_in_future on every read, and
    one within the skew of its record is accepted on every read, whatever the wall clock."""
    sink, _ = _sink()
    before = _rejected("ts_in_future")
    stamped = 1_800_000_000_000  # record timestamps: any fixed time, not the wall clock
    skew = 5 * 60 * 1000
    records = [
        SimpleNamespace(
            topic=SRC,
            partition=0,
            offset=k,
            key=b"u",
            value=Event(f"e{k}", "click", "u", "a", stamped + ahead).to_bytes(),
            timestamp=stamped,
        )
        for k, ahead in enumerate([2 * skew, skew // 2])
    ]
    sink.write(records)
    sink.flush()
    assert _rejected("ts_in_future") == before + 1
    (rec,) = _produced(sink.producer).values()
    assert rec.reward_id == feedback_reward_id("e1")
    assert sink.joins[0].clock == stamped  # capped at the record's time
