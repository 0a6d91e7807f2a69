"""The reward join's changelog: the layout of its durable state on a compacted topic.

Each partition of the events topic has the same-numbered partition of the state topic
(``RECSYS_TOPICS__REWARD_STATE``, ``cleanup.policy=compact``). Keys start with the consumer
group, the events topic and the partition (JSON: ``["recsys-reward","recsys.events",3,...``),
so groups sharing a state topic never read each other's state. Per batch the sink writes:

- **delta** records ``[..., "d", bucket, start, chunk]``: the batch's changed entries
  (:meth:`~recsys.rewards.join.RewardJoin.changes`) whose expiry (event time) falls in
  ``bucket`` (:data:`BUCKET_MS` of event time), ``start`` being the batch's first offset; up to
  :data:`CHUNK_ENTRIES` entries each, so no record is large. Entries expire by the clock, so a
  bucket's records are all dead once the clock passes the bucket: then they get tombstones. The
  changelog holds about window + lateness + retention (or the dedupe horizon) of entries, not
  one record per entry: a batch writes a few records per partition.
- **rating** records ``[..., "r", user, start]``: a user's rating mean (``rating_centre=user``),
  which never expires; the user's previous record gets a tombstone.
- **clock** record ``[..., "m"]``: the clock entry, the offset the state is valid up to
  (``upto``, the next offset to read). It is written only after the batch's rewards and deltas
  were acknowledged, so a clock record says: everything before ``upto`` is done.

Every delta and rating record carries ``upto``, the next offset after its batch. :func:`fold`
rebuilds the entries: records in log order, latest entry per (kind, key) winning, ignoring
records after the last clock record or with an ``upto`` beyond it (the partial batch of a crash,
re-done from ``upto`` by the next owner with identical results, which later overwrite it).
Tombstones are sent only once the clock record that makes their records dead was acknowledged.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kafka import KafkaConsumer
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError
from kafka.structs import TopicPartition

from recsys.config import KafkaSettings
from recsys.errors import ConfigError
from recsys.kafka import make_admin, make_consumer
from recsys.rewards.join import CLOCK_ENTRY, RATING_ENTRY, StateEntry

BUCKET_MS = 60_000  # event time per delta bucket
CHUNK_ENTRIES = 500  # entries per delta record (a few hundred KB at most)

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode


def key_prefix(group: str, topic: str, partition: int) -> bytes:
    """The start of every state key of one group's partition (an open JSON list)."""
    return _dumps([group, topic, partition])[:-1].encode() + b","


@dataclass
class Record:
    """One changelog record to produce: to the state topic's partition of the input partition."""

    key: bytes
    value: bytes | None


@dataclass
class PartitionLog:
    """The changelog bookkeeping of one input partition: which record keys hold live state.

    :meth:`batch` turns a batch's changes into records (the clock record separately, to be sent
    after the rest was acknowledged); :meth:`durable` is called once the clock record was
    acknowledged and returns the tombstones that are then safe.
    """

    prefix: bytes
    bucket_ms: int = BUCKET_MS
    buckets: dict[int, list[bytes]] = field(default_factory=dict)  # bucket -> delta keys
    rating_keys: dict[str, bytes] = field(default_factory=dict)  # user -> latest record key
    stale: list[bytes] = field(default_factory=list)  # to tombstone after the next clock
    upto: int | None = None  # next offset of the last durable clock record
    clock: int | None = None

    def batch(
        self, entries: Sequence[StateEntry], start: int
    ) -> tuple[list[Record], Record | None, int | None]:
        """Records for one batch's changes (its first offset ``start``): (deltas and ratings,
        the clock record or None, its ``upto``)."""
        clock_entry: StateEntry | None = None
        by_bucket: dict[int, list[list[Any]]] = {}
        ratings: list[StateEntry] = []
        for e in entries:
            if e.kind == CLOCK_ENTRY:
                clock_entry = e
            elif e.kind == RATING_ENTRY:
                ratings.append(e)
            else:
                bucket = 0 if e.expires is None else e.expires // self.bucket_ms
                by_bucket.setdefault(bucket, []).append([e.kind, e.key, e.value])
        if clock_entry is None:
            if by_bucket or ratings:
                raise ValueError("state changes without a clock entry")
            return [], None, None
        upto = int(clock_entry.value[2])
        out: list[Record] = []
        p = self.prefix
        for bucket, items in by_bucket.items():
            keys = self.buckets.setdefault(bucket, [])
            for chunk, i in enumerate(range(0, len(items), CHUNK_ENTRIES)):
                key = p + f'"d",{bucket},{start},{chunk}]'.encode()
                value = _dumps({"upto": upto, "e": items[i : i + CHUNK_ENTRIES]}).encode()
                out.append(Record(key, value))
                keys.append(key)
        for e in ratings:
            key = p + b'"r",' + _dumps(e.key).encode() + f",{start}]".encode()
            value = _dumps({"upto": upto, "e": [[e.kind, e.key, e.value]]}).encode()
            out.append(Record(key, value))
            old = self.rating_keys.get(e.key)
            if old is not None and old != key:
                self.stale.append(old)
            if e.value is None:
                self.rating_keys.pop(e.key, None)
                self.stale.append(key)  # the removal itself can go once it is durable
            else:
                self.rating_keys[e.key] = key
        clock_rec = Record(
            p + b'"m"]', _dumps({"upto": upto, "e": [list(clock_entry[:3])]}).encode()
        )
        return out, clock_rec, upto

    def durable(self, upto: int, clock: int | None) -> list[Record]:
        """The clock record of ``upto`` was acknowledged: tombstones now safe to send."""
        self.upto, self.clock = upto, clock
        out: list[Record] = []
        if self.stale:
            # A re-done batch may have rewritten a partial batch's key: that one is live now.
            live = {k for keys in self.buckets.values() for k in keys}
            live.update(self.rating_keys.values())
            out = [Record(k, None) for k in self.stale if k not in live]
            self.stale = []
        if clock is not None:
            dead = [b for b in self.buckets if (b + 1) * self.bucket_ms <= clock]
            for b in dead:
                out.extend(Record(k, None) for k in self.buckets.pop(b))
        # Deduplicated: a key rewritten by a re-done batch is in its bucket's list twice.
        return list({r.key: r for r in out}.values())


def fold(
    records: Iterable[tuple[bytes | None, bytes | None]],
    prefix: bytes,
    bucket_ms: int = BUCKET_MS,
) -> tuple[list[StateEntry], PartitionLog]:
    """Rebuild one partition's entries from its changelog records ``(key, value)`` in log order.

    Returns the latest entry per (kind, key) of the complete batches (see the module doc) and
    the bookkeeping to continue writing: live record keys by bucket and user, and the keys of
    partial batches, to tombstone after the next clock record.
    """
    latest: dict[bytes, tuple[int, bytes]] = {}
    for i, (key, value) in enumerate(records):
        if key is None or not key.startswith(prefix):
            continue
        if value is None:
            latest.pop(key, None)
        else:
            latest[key] = (i, value)
    log = PartitionLog(prefix, bucket_ms)
    clock_key = prefix + b'"m"]'
    clock = latest.pop(clock_key, None)
    if clock is None:
        log.stale = list(latest)  # writes of a batch that never completed
        return [], log
    clock_pos, clock_raw = clock
    clock_value = json.loads(clock_raw)
    upto = int(clock_value["upto"])
    entries: dict[tuple[str, str], StateEntry] = {}
    for key, (pos, raw) in sorted(latest.items(), key=lambda kv: kv[1][0]):
        parts = json.loads(key)
        value = json.loads(raw)
        if pos > clock_pos or int(value["upto"]) > upto:
            log.stale.append(key)
            continue
        if parts[3] == "d":
            log.buckets.setdefault(int(parts[4]), []).append(key)
        elif parts[3] == "r":
            user = parts[4]
            old = log.rating_keys.get(user)
            if old is not None:
                log.stale.append(old)
            log.rating_keys[user] = key
        for kind, k, v in value["e"]:
            entries[(kind, k)] = StateEntry(kind, k, v, None)
    for kind, k, v in clock_value["e"]:
        entries[(kind, k)] = StateEntry(kind, k, v, None)
        log.clock = None if v[0] is None else int(v[0])
    log.upto = upto
    return list(entries.values()), log


def read_partitions(
    consumer: KafkaConsumer, tps: Sequence[TopicPartition], timeout_s: float = 120.0
) -> dict[TopicPartition, list[tuple[bytes | None, bytes | None]]]:
    """Every ``(key, value)`` of each partition, from its beginning to its end now, in order
    (records that arrive meanwhile may be included: the caller owns the partitions' writes).
    Read together, so a restore of many partitions waits for one final empty poll, not one each.

    ``consumer`` is a group-less consumer of the caller's own (it is re-assigned to ``tps``).
    """
    out: dict[TopicPartition, list[tuple[bytes | None, bytes | None]]] = {tp: [] for tp in tps}
    if not tps:
        return out
    consumer.assign(list(tps))
    consumer.seek_to_beginning(*tps)
    end = consumer.end_offsets(list(tps))
    deadline = time.monotonic() + timeout_s
    drained = False
    # Past the reported ends, read on until a poll comes back empty: the embedded broker (Tansu)
    # reports the base offset of the last record batch as the end, not one past its last record.
    while not drained:
        if time.monotonic() > deadline:
            raise TimeoutError(f"reading {[str(tp) for tp in tps]} did not reach {end}")
        polled = consumer.poll(timeout_ms=200, max_records=10_000)
        for tp, recs in polled.items():
            out[tp].extend((r.key, r.value) for r in recs)
        drained = not polled and all(consumer.position(tp) >= end[tp] for tp in tps)
    return out


def read_partition(
    consumer: KafkaConsumer, tp: TopicPartition, timeout_s: float = 120.0
) -> list[tuple[bytes | None, bytes | None]]:
    """:func:`read_partitions` of one partition."""
    return read_partitions(consumer, [tp], timeout_s)[tp]


def ensure_state_topic(
    kafka: KafkaSettings, name: str, partitions: int, replication_factor: int = 1
) -> bool:
    """Create the compacted state topic unless it exists (as Kafka Streams creates its
    changelogs); True when this call created it."""
    admin = make_admin(kafka)
    try:
        if name in set(admin.list_topics()):
            return False
        topic = NewTopic(
            name, partitions, replication_factor, topic_configs={"cleanup.policy": "compact"}
        )
        try:
            admin.create_topics([topic])
        except TopicAlreadyExistsError:
            return False  # another worker won the race
        return True
    finally:
        admin.close()


class ChangelogReader:
    """The sink's access to the state topic for restores: makes sure the topic exists, reads a
    partition to its end (a group-less consumer of its own)."""

    def __init__(self, kafka: KafkaSettings, topic: str, replication_factor: int = 1) -> None:
        self.kafka = kafka
        self.topic = topic
        self.replication_factor = replication_factor
        self._consumer: KafkaConsumer | None = None

    def _client(self) -> KafkaConsumer:
        if self._consumer is None:
            self._consumer = make_consumer(self.kafka, None)
        return self._consumer

    def ensure(self, partitions: int) -> bool:
        """The topic exists with at least ``partitions`` partitions (created when missing);
        True when this call created it."""
        created = ensure_state_topic(self.kafka, self.topic, partitions, self.replication_factor)
        have = len(self._client().partitions_for_topic(self.topic) or ())
        deadline = time.monotonic() + 30
        # Only a topic just created (by us, or by another worker: none known yet) is waited
        # for while metadata catches up; an existing topic's partition count is final.
        while (have == 0 or created) and have < partitions and time.monotonic() < deadline:
            time.sleep(0.2)
            have = len(self._client().partitions_for_topic(self.topic) or ())
        if have < partitions:
            # A deployment error, not data: the worker stops with the setting to fix.
            raise ConfigError(
                f"RECSYS_TOPICS__REWARD_STATE: topic {self.topic} has {have} partitions, fewer "
                f"than the {partitions} of the events topic; each events partition needs its own "
                "(add partitions, or name a new topic)"
            )
        return created

    def read(self, partitions: Sequence[int]) -> dict[int, list[tuple[bytes | None, bytes | None]]]:
        """Each partition's records, read together (see :func:`read_partitions`)."""
        got = read_partitions(self._client(), [TopicPartition(self.topic, p) for p in partitions])
        return {tp.partition: recs for tp, recs in got.items()}

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None
