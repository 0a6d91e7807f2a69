"""Event streams for the reward worker's kill test, throughput benchmark and integration tests.

- :func:`obd_events`: the Open Bandit Dataset sample as impressions and clicks.
- :func:`synthetic_events`: seeded browsing sessions: slates of impressions, then clicks, dwell,
  add-to-cart, purchases, skips and ratings; some feedback without ``request_id``, some organic,
  some late; delivered with a bounded delay (out of order) and a few duplicate deliveries.
- :func:`continuous_events`: hours of steady traffic (10% clicks, feedback minutes later), the
  stream of the commit-progress fault tests.
- :func:`poison_messages`: one bad message per rejection reason of the event contract, in turn,
  plus one 10 MB payload; each checked against the parser so the expected reason is exact.
- :func:`sentinels`: one organic event per partition, far enough in event time to close every
  window, so the oracle's defaults are all due.
- :func:`produce`, :func:`read_topic`: plain kafka-python helpers.
"""

from __future__ import annotations

import heapq
import json
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from kafka.partitioner.default import murmur2
from kafka.structs import TopicPartition

from recsys import datasets
from recsys.config import KafkaSettings, RewardSettings
from recsys.events import Event, EventParser, Reason, Rejection
from recsys.kafka import make_consumer, make_producer

OBD_PATH = datasets.path("obd")
BIG_PAYLOAD_BYTES = 10 * 1024 * 1024


def obd_events(path: Path = OBD_PATH) -> list[Event]:
    from recsys.data.obd import load_obd

    return list(load_obd(path).events())


def synthetic_events(
    n_events: int,
    seed: int = 0,
    *,
    start_ts: int = 1_574_553_600_000,  # 2019-11-24, the OBD sample's first day
    span_ms: int = 7 * 24 * 3600 * 1000,
    n_users: int = 3000,
    n_items: int = 500,
    max_delay_ms: int = 30_000,
    duplicate_rate: float = 0.005,
) -> list[Event]:
    """About ``n_events`` events of browsing sessions, in arrival order (bounded disorder)."""
    rng = random.Random(seed)
    timed: list[tuple[int, int, Event]] = []
    seq = 0

    def add(e: Event) -> None:
        nonlocal seq
        delay = rng.randrange(0, max_delay_ms + 1)
        timed.append((e.ts + delay, seq, e))
        seq += 1
        if rng.random() < duplicate_rate:  # a producer retry: same event, a little later
            timed.append((e.ts + delay + rng.randrange(0, 5000), seq, e))
            seq += 1

    n_sessions = 0
    while len(timed) < n_events:
        n_sessions += 1
        user = f"syn-u{rng.randrange(n_users)}"
        t = start_ts + rng.randrange(span_ms)
        for s in range(rng.randint(1, 4)):
            req = f"syn-r{seed}-{n_sessions}-{s}"
            t += rng.randrange(1000, 120_000)
            k = rng.randint(3, 5)
            items = rng.sample(range(n_items), k)
            for pos, item in enumerate(items):
                iid = f"syn-i{item}"
                imp = Event(
                    event_id=f"{req}:imp:{pos}",
                    type="impression",
                    user_id=user,
                    item_id=iid,
                    ts=t,
                    request_id=req,
                    position=pos,
                    propensity=round(rng.uniform(0.05, 1.0), 4),
                    model_version="sim-v1",
                )
                add(imp)
                u = rng.random()
                if u < 0.10:  # click, maybe dwell, cart, purchase
                    ct = t + rng.randrange(500, 600_000)
                    no_req = rng.random() < 0.1
                    add(_fb(f"{req}:click:{pos}", "click", imp, ct, no_req))
                    if rng.random() < 0.5:
                        add(
                            _fb(
                                f"{req}:dwell:{pos}",
                                "dwell",
                                imp,
                                ct + 1000,
                                no_req,
                                value=float(rng.randrange(1, 300)),
                            )
                        )
                    if rng.random() < 0.15:
                        add(_fb(f"{req}:cart:{pos}", "add_to_cart", imp, ct + 20_000, no_req))
                        if rng.random() < 0.4:
                            add(
                                _fb(
                                    f"{req}:buy:{pos}",
                                    "purchase",
                                    imp,
                                    ct + 90_000,
                                    no_req,
                                    value=round(rng.uniform(5, 200), 2),
                                )
                            )
                elif u < 0.13:
                    add(_fb(f"{req}:skip:{pos}", "skip", imp, t + rng.randrange(100, 5000), False))
                elif u < 0.14:  # late: after the window
                    lag = 30 * 60 * 1000 + rng.randrange(0, 20 * 60 * 1000)
                    add(_fb(f"{req}:late:{pos}", "click", imp, t + lag, rng.random() < 0.5))
            if rng.random() < 0.05:  # an organic rating of something never shown
                add(
                    Event(
                        event_id=f"syn-o{seed}-{n_sessions}-{s}",
                        type="rating",
                        user_id=user,
                        item_id=f"syn-i{rng.randrange(n_items)}",
                        ts=t + rng.randrange(0, 60_000),
                        value=float(rng.randint(1, 5)),
                    )
                )
    timed.sort(key=lambda x: (x[0], x[1]))
    return [e for _, _, e in timed]


def continuous_events(
    hours: float,
    events_per_s: float,
    seed: int = 0,
    *,
    start_ts: int = 1_700_000_000_000,
    click_rate: float = 0.10,
    max_feedback_delay_ms: int = 5 * 60 * 1000,
    max_disorder_ms: int = 30_000,
    n_users: int = 2000,
    n_items: int = 500,
    slate: int = 4,
) -> list[Event]:
    """Continuous traffic: ``hours`` of event time at ``events_per_s`` (impressions in slates
    of ``slate``, ``click_rate`` of them clicked up to ``max_feedback_delay_ms`` later, half of
    the clicks followed by a dwell), delivered in ts order with up to ``max_disorder_ms`` of
    delay. The stream that kept the old commit point at the partition's start: some window is
    always open, and every one overlaps the next."""
    rng = random.Random(seed)
    span = int(hours * 3600 * 1000)
    per_slate = slate * (1 + click_rate * 1.5)  # events one request makes, on average
    n_requests = max(1, round(hours * 3600 * events_per_s / per_slate))
    timed: list[tuple[int, int, Event]] = []
    for k in range(n_requests):
        t = start_ts + (k * span) // n_requests
        user = f"cu{rng.randrange(n_users)}"
        req = f"c{seed}-r{k}"
        for pos, item in enumerate(rng.sample(range(n_items), slate)):
            imp = Event(
                f"{req}:imp:{pos}",
                "impression",
                user,
                f"ci{item}",
                t,
                request_id=req,
                position=pos,
                propensity=round(rng.uniform(0.05, 1.0), 4),
                model_version="cont-v1",
            )
            timed.append((t + rng.randrange(max_disorder_ms + 1), len(timed), imp))
            if rng.random() < click_rate:
                ct = t + rng.randrange(500, max_feedback_delay_ms + 1)
                click = _fb(f"{req}:click:{pos}", "click", imp, ct, False)
                timed.append((ct + rng.randrange(max_disorder_ms + 1), len(timed), click))
                if rng.random() < 0.5:
                    dwell = _fb(
                        f"{req}:dwell:{pos}",
                        "dwell",
                        imp,
                        ct + 1000,
                        False,
                        value=float(rng.randrange(1, 300)),
                    )
                    arrival = ct + 1000 + rng.randrange(max_disorder_ms + 1)
                    timed.append((arrival, len(timed), dwell))
    timed.sort(key=lambda x: (x[0], x[1]))
    return [e for _, _, e in timed]


def _fb(
    eid: str, kind: str, imp: Event, ts: int, no_request: bool, value: float | None = None
) -> Event:
    return Event(
        event_id=eid,
        type=kind,
        user_id=imp.user_id,
        item_id=imp.item_id,
        ts=ts,
        request_id=None if no_request else imp.request_id,
        value=value,
    )


def merge_by_time(*streams: Sequence[Event]) -> list[Event]:
    """Interleave streams, each kept in its own (arrival) order, taking the earliest ts head."""
    iters = [iter(s) for s in streams]
    heads: list[tuple[int, int, Event]] = []
    for k, it in enumerate(iters):
        e = next(it, None)
        if e is not None:
            heads.append((e.ts, k, e))
    heapq.heapify(heads)
    out: list[Event] = []
    while heads:
        _, k, e = heapq.heappop(heads)
        out.append(e)
        nxt = next(iters[k], None)
        if nxt is not None:
            heapq.heappush(heads, (nxt.ts, k, nxt))
    return out


def kill_test_events(n_events: int, seed: int = 0) -> list[Event]:
    """The OBD sample plus synthetic sessions over the same week: ``n_events`` in all."""
    obd = obd_events() if OBD_PATH.is_dir() else []
    syn = synthetic_events(max(0, n_events - len(obd)), seed)
    return merge_by_time(obd, syn)


def partition_of(key: str, n_partitions: int) -> int:
    """kafka-python's default partitioner."""
    return (murmur2(key.encode()) & 0x7FFFFFFF) % n_partitions


def sentinels(events: Iterable[Event], n_partitions: int, rs: RewardSettings) -> list[Event]:
    """An organic click per partition, late enough in event time to close and expire all."""
    last = max((e.ts for e in events), default=0)
    ts = last + rs.window_ms + rs.allowed_lateness_ms + rs.late_retention_ms
    ts += rs.dedupe_horizon_ms + 1
    users: dict[int, str] = {}
    i = 0
    while len(users) < n_partitions:
        users.setdefault(partition_of(f"sentinel-{i}", n_partitions), f"sentinel-{i}")
        i += 1
    return [Event(f"sentinel-{p}", "click", users[p], "sentinel", ts) for p in sorted(users)]


@dataclass(frozen=True)
class Poison:
    key: bytes
    value: bytes
    reason: str


def poison_messages(
    n: int, seed: int = 0, max_bytes: int = 64 * 1024, big: bool = True
) -> list[Poison]:
    """``n`` bad messages cycling through every rejection reason; the first too_large one is
    a 10 MB payload when ``big``. Each is checked against the parser's verdict."""
    rng = random.Random(seed)
    now = int(time.time() * 1000)
    parser = EventParser(max_bytes=max_bytes)
    reasons = list(Reason)
    out: list[Poison] = []
    big_done = not big
    for i in range(n):
        reason = reasons[i % len(reasons)]
        nonce = f"poison-{seed}-{i}"
        good = {
            "event_id": nonce,
            "type": "click",
            "user_id": f"pu{rng.randrange(50)}",
            "item_id": "x",
            "ts": 1_574_553_600_000,
        }
        obj: object = dict(good)
        raw: bytes | None = None
        if reason is Reason.NOT_JSON:
            raw = f'{{"event_id": "{nonce}", '.encode()
        elif reason is Reason.TOO_LARGE:
            size = BIG_PAYLOAD_BYTES if not big_done else max_bytes + 1024
            big_done = True
            pad = size - len(json.dumps({**good, "pad": ""}))
            raw = json.dumps({**good, "pad": "p" * pad}).encode()  # exactly `size` bytes
        elif reason is Reason.BAD_TYPE:
            obj = {**good, "ts": "yesterday"}
        elif reason is Reason.MISSING_FIELD:
            del good["item_id"]
            obj = good
        elif reason is Reason.UNKNOWN_FIELD:
            obj = {**good, "colour": "red"}
        elif reason is Reason.NON_FINITE:
            raw = json.dumps({**good, "type": "dwell"})[:-1].encode() + b', "value": NaN}'
        elif reason is Reason.BAD_PROPENSITY:
            obj = {**good, "propensity": 1.5}
        elif reason is Reason.BAD_VALUE:
            obj = {**good, "position": -1}
        elif reason is Reason.TS_IN_FUTURE:
            obj = {**good, "ts": now + 24 * 3600 * 1000}
        elif reason is Reason.UNKNOWN_EVENT_TYPE:
            obj = {**good, "type": "hover"}
        elif reason is Reason.TOO_DEEP:
            raw = b"[" * 1000 + b"]" * 1000
        elif reason is Reason.NUMBER_OUT_OF_RANGE:
            obj = {**good, "position": 2**63}
        elif reason is Reason.BAD_ID:
            obj = {**good, "user_id": "pu\x00nul"}
        elif reason is Reason.DUPLICATE_KEY:
            raw = json.dumps(good)[:-1].encode() + b', "type": "purchase"}'
        if raw is None:
            raw = json.dumps(obj).encode()
        verdict = parser.parse(raw)
        if not isinstance(verdict, Rejection) or verdict.reason is not reason:
            raise AssertionError(f"poison for {reason} parsed as {verdict}")
        out.append(Poison(f"pu{rng.randrange(50)}".encode(), raw, reason.value))
    return out


def with_poison(
    events: Sequence[Event], poison: Sequence[Poison], seed: int = 0
) -> list[tuple[bytes, bytes]]:
    """(key, value) messages: the events with the poison spread at random positions."""
    rng = random.Random(seed)
    msgs: list[tuple[bytes, bytes]] = [(e.user_id.encode(), e.to_bytes()) for e in events]
    slots = sorted(rng.sample(range(len(msgs) + len(poison)), len(poison)))
    out: list[tuple[bytes, bytes]] = []
    it = iter(msgs)
    pi = 0
    for k in range(len(msgs) + len(poison)):
        if pi < len(slots) and slots[pi] == k:
            out.append((poison[pi].key, poison[pi].value))
            pi += 1
        else:
            out.append(next(it))
    return out


def produce(
    settings: KafkaSettings,
    topic: str,
    messages: Iterable[tuple[bytes, bytes]],
    rate: float | None = None,
) -> int:
    """Send (key, value) messages; ``rate`` paces them (messages/s). Returns the count."""
    producer = make_producer(settings, linger_ms=20, batch_size=512 * 1024)
    n = 0
    start = time.monotonic()
    futures = []
    try:
        for key, value in messages:
            futures.append(producer.send(topic, key=key, value=value))
            n += 1
            if rate and n % 200 == 0:
                ahead = n / rate - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)
        producer.flush()
        for f in futures:
            f.get(0)
    finally:
        producer.close()
    return n


def read_topic(settings: KafkaSettings, topic: str, timeout_s: float = 60.0) -> list:
    """Every record of ``topic`` now (up to its end offsets when called)."""
    consumer = make_consumer(settings, None)
    try:
        parts = [
            TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])
        ]
        consumer.assign(parts)
        consumer.seek_to_beginning()
        end = consumer.end_offsets(parts)
        out = []
        deadline = time.monotonic() + timeout_s
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic} did not reach its end in {timeout_s}s")
            polled = consumer.poll(timeout_ms=200, max_records=10_000)
            for recs in polled.values():
                out.extend(recs)
            # The position counts records fetched, not returned: with more fetched than one
            # poll returns it reaches the end while records still wait in the consumer (a read
            # stopped at 2 x 10,000 of 20,234). Done only when a poll also comes back empty.
            if not polled and all(consumer.position(tp) >= end[tp] for tp in parts):
                return out
    finally:
        consumer.close()
