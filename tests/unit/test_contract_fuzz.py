"""Fuzzing the contract: any input gives a parsed record or a Rejection (internal decoders: a
ContractError), never another exception; whatever is accepted satisfies every bound and
round-trips through its own ``to_bytes``.

The hypothesis tests are quick (a few hundred examples each); the ``slow`` test pushes 100,000+
seeded random messages through ``EventParser.parse`` and ``parse_item`` and counts escapes.
"""

from __future__ import annotations

import json
import math
import random
import unicodedata
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recsys.events import (
    EVENT_TYPES,
    FLOAT32_MAX,
    INT64_MAX,
    INT64_MIN,
    MIN_PROPENSITY,
    MIN_TS_MS,
    POSITION_LIMIT,
    REWARD_KINDS,
    ContractError,
    Event,
    EventParser,
    ItemRecord,
    ItemVector,
    Reason,
    Rejection,
    RewardRecord,
    Slate,
    SlateItem,
    parse_item,
)

NOW = 1_700_000_000_000
SKEW = 60_000
parser = EventParser(max_bytes=4096, max_clock_skew_ms=SKEW, clock_ms=lambda: NOW)
# Re-parses an accepted event's to_bytes(), which escapes non-ASCII and may outgrow max_bytes.
roomy = EventParser(max_bytes=1 << 20, max_clock_skew_ms=SKEW, clock_ms=lambda: NOW)
# Modest, to keep the whole file within seconds; the slow test below is the long run.
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BIDI = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"

# Byte strings that sit on the contract's edges, spliced into otherwise valid messages.
FRAGMENTS = [
    b"[",
    b"]",
    b"{",
    b"}",
    b'"',
    b"\\",
    b",",
    b":",
    b"-",
    b"0",
    b"e",
    b".",
    b"\x00",
    b"\xff",
    b"\xef\xbb\xbf",
    b"\xed\xa0\x80",
    b"\xc0\xaf",
    b"\\u0000",
    b"\\ud800",
    b"\\u202e",
    b"\\u200b",
    b"\\u0301",
    "\u00e9".encode(),
    "\u202e".encode(),
    "\U0001f642".encode(),
    b"NaN",
    b"-Infinity",
    b"1e999",
    b"5e-324",
    b"1e308",
    b"9" * 25,
    b"9223372036854775808",
    b"true",
    b"null",
    b'"type":"purchase"',
    b',"ts":0',
    b'"x":' + b"[" * 40,
    b"[" * 1000,
]

# -- strategies -----------------------------------------------------------------------------------

edge_ints = st.sampled_from(
    [
        0,
        -1,
        1,
        2**31 - 1,
        2**31,
        2**53 + 1,
        INT64_MAX,
        INT64_MAX + 1,
        INT64_MIN,
        INT64_MIN - 1,
        10**400,
        MIN_TS_MS - 1,
        MIN_TS_MS,
        NOW,
        NOW + SKEW,
        NOW + SKEW + 1,
        1000,
        1001,
    ]
)
edge_floats = st.sampled_from(
    [
        0.0,
        -0.0,
        5e-324,
        1e-31,
        MIN_PROPENSITY,
        1.0,
        1.0000001,
        FLOAT32_MAX,
        math.nextafter(FLOAT32_MAX, math.inf),
        1e308,
        -1e308,
        math.inf,
        -math.inf,
        math.nan,
    ]
)
edge_text = st.sampled_from(
    [
        "",
        "\x00",
        "a\x1f",
        "\x7f",
        "\x85",
        "\u202e",
        "\u2066",
        "\u200b",
        "\u200d",
        "\ufeff",
        "\u00a0",
        "\u2028",
        "\ue000",
        "\ud800",
        "e\u0301",
        "\u00e9",
        "\u212b",
        "x" * 300,
        "[" * 50,
        '"',
        "\\",
        "click",
        "purchase",
    ]
)
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | edge_ints
    | st.floats()
    | edge_floats
    | st.text(max_size=20)
    | edge_text
)
json_values = st.recursive(
    scalars,
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4)
    ),
    max_leaves=20,
)


def dumps(value: Any, ascii_only: bool) -> bytes:
    """JSON bytes for any value, NaN/Infinity literals included. Without ensure_ascii a lone
    surrogate goes out UTF-8-encoded (surrogatepass), which strict UTF-8 must reject."""
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


ids = (
    st.text(st.characters(blacklist_categories=("C", "Z")) | st.just(" "), min_size=1, max_size=20)
    .map(lambda s: unicodedata.normalize("NFC", s))
    .filter(lambda s: s.isprintable() and unicodedata.is_normalized("NFC", s))
)
valid_events = st.builds(
    Event,
    event_id=ids,
    type=st.sampled_from(sorted(EVENT_TYPES)),
    user_id=ids,
    item_id=ids,
    ts=st.integers(MIN_TS_MS, NOW + SKEW),
    request_id=st.none() | ids,
    position=st.none() | st.integers(0, 1000),
    propensity=st.none() | st.floats(MIN_PROPENSITY, 1.0),
    value=st.none() | st.floats(-FLOAT32_MAX, FLOAT32_MAX),
    model_version=st.none() | ids,
)
# Display text as the item rule allows it: no surrogates, controls only tab/LF/CR, no bidi controls.
texts = st.text(
    st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters=BIDI)
    | st.sampled_from("\t\n\r"),
    max_size=30,
)
valid_items = st.builds(
    ItemRecord,
    item_id=ids,
    title=texts,
    ts=st.integers(0, INT64_MAX),
    description=st.none() | texts,
    tags=st.lists(texts, max_size=3).map(tuple),
    attributes=st.dictionaries(texts, texts, max_size=3),
)
internal_ids = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=20)
f32 = st.floats(-FLOAT32_MAX, FLOAT32_MAX)
valid_rewards = st.builds(
    RewardRecord,
    reward_id=internal_ids,
    user_id=internal_ids,
    item_id=internal_ids,
    reward=f32,
    ts=st.integers(0, INT64_MAX),
    kind=st.sampled_from(sorted(REWARD_KINDS)),
    propensity=st.none() | st.floats(MIN_PROPENSITY, 1.0),
    position=st.none() | st.integers(0, POSITION_LIMIT),
    model_version=st.none() | internal_ids,
    request_id=st.none() | internal_ids,
)
valid_slates = st.builds(
    Slate,
    request_id=internal_ids,
    user_id=internal_ids,
    model_version=internal_ids,
    ts=st.integers(0, INT64_MAX),
    items=st.lists(
        st.builds(
            SlateItem, internal_ids, f32, st.floats(MIN_PROPENSITY, 1.0), st.integers(0, 1000)
        ),
        max_size=4,
    ).map(tuple),
)
valid_vectors = st.builds(
    ItemVector,
    item_id=internal_ids,
    model=internal_ids,
    key=internal_ids,
    vector=st.lists(
        st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=1, max_size=8
    ).map(tuple),
)


@st.composite
def byte_mutants(draw: st.DrawFn, records: st.SearchStrategy[Any]) -> bytes:
    """A valid record's bytes with a few splices, deletions, duplications or flipped bytes."""
    raw = bytearray(draw(records).to_bytes())
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(raw)))
        op = draw(st.sampled_from(["insert", "delete", "duplicate", "flip"]))
        if op == "insert":
            raw[i:i] = draw(st.sampled_from(FRAGMENTS) | st.binary(min_size=1, max_size=4))
        elif op == "delete":
            del raw[i : i + draw(st.integers(1, 8))]
        elif op == "duplicate":
            raw[i:i] = raw[i : i + draw(st.integers(1, 40))]
        elif raw:
            raw[min(i, len(raw) - 1)] = draw(st.integers(0, 255))
    return bytes(raw)


@st.composite
def field_mutants(draw: st.DrawFn, records: st.SearchStrategy[Any], names: list[str]) -> bytes:
    """A valid record's JSON with fields replaced by, or added as, arbitrary JSON values."""
    obj = json.loads(draw(records).to_bytes())
    for _ in range(draw(st.integers(1, 3))):
        obj[draw(st.sampled_from(names) | st.text(max_size=6))] = draw(json_values)
    if draw(st.booleans()) and obj:
        del obj[draw(st.sampled_from(sorted(obj)))]
    return dumps(obj, draw(st.booleans()))


any_json = st.builds(dumps, json_values, st.booleans())
EVENT_FIELDS = [
    "event_id",
    "type",
    "user_id",
    "item_id",
    "ts",
    "request_id",
    "position",
    "propensity",
    "value",
    "model_version",
]
ITEM_FIELDS = ["item_id", "title", "ts", "description", "tags", "attributes"]
event_inputs = (
    st.binary(max_size=300)
    | any_json
    | byte_mutants(valid_events)
    | field_mutants(valid_events, EVENT_FIELDS)
)
item_inputs = (
    st.binary(max_size=300)
    | any_json
    | byte_mutants(valid_items)
    | field_mutants(valid_items, ITEM_FIELDS)
)

# -- what an accepted record must satisfy -------------------------------------------------------


def is_contract_id(v: Any, max_length: int = 256) -> bool:
    return (
        isinstance(v, str)
        and 0 < len(v) <= max_length
        and v.isprintable()
        and unicodedata.is_normalized("NFC", v)
    )


def check_rejection(r: Rejection) -> None:
    assert isinstance(r.reason, Reason)
    assert isinstance(r.detail, str)
    assert r.detail
    assert len(r.detail) <= 400  # the DLQ header keeps 500
    r.detail.encode("utf-8")  # no lone surrogate copied out of the message


def check_float32(v: Any) -> None:
    assert type(v) is float
    assert math.isfinite(v)
    assert abs(v) <= FLOAT32_MAX
    assert np.isfinite(np.float32(v))


def check_event(e: Event, p: EventParser = parser) -> None:
    assert type(e) is Event
    for name in ("event_id", "user_id", "item_id"):
        assert is_contract_id(getattr(e, name), p.max_id_length), name
    for name in ("request_id", "model_version"):
        v = getattr(e, name)
        assert v is None or is_contract_id(v, p.max_id_length), name
    assert e.type in EVENT_TYPES
    assert type(e.ts) is int
    assert MIN_TS_MS <= e.ts <= NOW + SKEW
    assert e.position is None or (type(e.position) is int and 0 <= e.position <= p.max_position)
    if e.propensity is not None:
        check_float32(e.propensity)
        assert MIN_PROPENSITY <= e.propensity <= 1.0
        assert np.float32(e.propensity) > 0
    if e.value is not None:
        check_float32(e.value)
    assert roomy.parse(e.to_bytes()) == e


def no_bad_text(s: Any) -> bool:
    return isinstance(s, str) and not any(
        ("\x00" <= c < " " and c not in "\t\n\r")
        or "\x7f" <= c <= "\x9f"
        or "\u202a" <= c <= "\u202e"
        or "\u2066" <= c <= "\u2069"
        or "\ud800" <= c <= "\udfff"
        for c in s
    )


def check_item(item: ItemRecord) -> None:
    assert type(item) is ItemRecord
    assert is_contract_id(item.item_id)
    assert no_bad_text(item.title)
    assert len(item.title) <= 1024
    assert item.description is None or no_bad_text(item.description)
    assert isinstance(item.tags, tuple)
    assert all(no_bad_text(t) for t in item.tags)
    assert all(no_bad_text(k) and no_bad_text(v) for k, v in item.attributes.items())
    assert type(item.ts) is int
    assert 0 <= item.ts <= INT64_MAX
    assert parse_item(item.to_bytes(), max_bytes=1 << 20) == item


def run_event(raw: Any) -> None:
    result = parser.parse(raw)
    if isinstance(result, Rejection):
        check_rejection(result)
    else:
        check_event(result)


def run_item(raw: Any) -> None:
    result = parse_item(raw)
    if isinstance(result, Rejection):
        check_rejection(result)
    else:
        check_item(result)


def run_internal(decode: Callable[[bytes], Any], raw: bytes) -> Any:
    """The decoded record, or None when it raised ContractError (any other exception escapes)."""
    try:
        record = decode(raw)
    except ContractError as exc:
        check_rejection(Rejection(exc.reason, exc.detail))
        return None
    assert decode(record.to_bytes()) == record
    return record


def check_reward(r: RewardRecord) -> None:
    for name in ("reward_id", "user_id", "item_id"):
        assert isinstance(getattr(r, name), str)
        assert getattr(r, name)
    check_float32(r.reward)
    assert type(r.ts) is int
    assert 0 <= r.ts <= INT64_MAX
    assert r.kind in REWARD_KINDS
    assert r.propensity is None or MIN_PROPENSITY <= r.propensity <= 1.0
    assert r.position is None or 0 <= r.position <= POSITION_LIMIT


# -- the properties -------------------------------------------------------------------------------


@FAST
@given(event_inputs)
def test_parse_never_raises_and_accepted_events_keep_every_bound(raw):
    run_event(raw)


@FAST
@given(valid_events)
def test_valid_events_are_accepted_unchanged(event):
    assert parser.parse(event.to_bytes()) == event
    check_event(event)


@FAST
@given(json_values)
def test_validate_never_raises_on_any_json_value(value):
    result = parser.validate(value)
    if isinstance(result, Rejection):
        check_rejection(result)
    else:
        check_event(result)


@FAST
@given(item_inputs)
def test_parse_item_never_raises_and_accepted_items_keep_every_bound(raw):
    run_item(raw)


@FAST
@given(valid_items)
def test_valid_items_are_accepted_unchanged(item):
    assert parse_item(item.to_bytes()) == item


REWARD_FIELDS = [
    "reward_id",
    "user_id",
    "item_id",
    "reward",
    "ts",
    "kind",
    "propensity",
    "position",
    "model_version",
    "request_id",
]


@FAST
@given(
    st.binary(max_size=200)
    | any_json
    | byte_mutants(valid_rewards)
    | field_mutants(valid_rewards, REWARD_FIELDS)
)
def test_reward_decoder_raises_only_contract_error(raw):
    record = run_internal(RewardRecord.from_bytes, raw)
    if record is not None:
        check_reward(record)


@FAST
@given(valid_rewards)
def test_valid_rewards_round_trip(record):
    assert RewardRecord.from_bytes(record.to_bytes()) == record


@FAST
@given(
    st.binary(max_size=200)
    | any_json
    | byte_mutants(valid_slates)
    | field_mutants(valid_slates, ["request_id", "user_id", "model_version", "ts", "items"])
    | valid_slates.map(Slate.to_bytes)
)
def test_slate_decoder_raises_only_contract_error(raw):
    slate = run_internal(Slate.from_bytes, raw)
    if slate is not None:
        for i in slate.items:
            check_float32(i.score)
            assert MIN_PROPENSITY <= i.propensity <= 1.0
            assert 0 <= i.position <= POSITION_LIMIT


@FAST
@given(
    st.binary(max_size=200)
    | any_json
    | byte_mutants(valid_vectors)
    | field_mutants(valid_vectors, ["item_id", "model", "key", "dim", "vector"])
    | valid_vectors.map(ItemVector.to_bytes)
)
def test_item_vector_decoder_raises_only_contract_error(raw):
    vec = run_internal(ItemVector.from_bytes, raw)
    if vec is not None:
        assert len(vec.vector) >= 1
        assert all(math.isfinite(x) for x in vec.vector)


# -- the long run ---------------------------------------------------------------------------------

SEED_EVENT = Event("e1", "impression", "u1", "i1", NOW, "r1", 3, 0.25, None, "v1").to_bytes()
SEED_ITEM = ItemRecord("m1", "Heat (1995)", 5, "A heist.", ("Crime",), {"year": "1995"}).to_bytes()
SCALARS: list[Any] = [
    None,
    True,
    0,
    -1,
    7,
    1000,
    1001,
    2**31,
    INT64_MAX,
    INT64_MAX + 1,
    10**30,
    MIN_TS_MS - 1,
    NOW,
    0.5,
    5e-324,
    1e-31,
    1.0,
    1e308,
    math.nan,
    math.inf,
    "",
    "x",
    "\x00",
    "\u202e",
    "\u200b",
    "e\u0301",
    "\ud800",
    "click",
    "purchase",
    "[[[",
    "y" * 300,
]


def random_value(rng: random.Random, depth: int = 0) -> Any:
    roll = rng.random()
    if depth > 3 or roll < 0.6:
        return rng.choice(SCALARS) if rng.random() < 0.7 else rng.uniform(-1e3, 1e3)
    if roll < 0.8:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {
        rng.choice(EVENT_FIELDS + ITEM_FIELDS + ["k"]): random_value(rng, depth + 1)
        for _ in range(rng.randrange(4))
    }


def random_message(rng: random.Random, seed: bytes, names: list[str]) -> bytes:
    kind = rng.randrange(4)
    if kind == 0:
        return rng.randbytes(rng.randrange(64))
    if kind == 1:
        return dumps(random_value(rng), rng.random() < 0.5)
    if kind == 2:
        obj = json.loads(seed)
        for _ in range(rng.randrange(1, 3)):
            obj[rng.choice(names)] = random_value(rng)
        return dumps(obj, rng.random() < 0.5)
    raw = bytearray(seed)
    for _ in range(rng.randrange(1, 4)):
        i = rng.randrange(len(raw) + 1)
        op = rng.randrange(3)
        if op == 0:
            raw[i:i] = rng.choice(FRAGMENTS)
        elif op == 1:
            del raw[i : i + rng.randrange(1, 8)]
        else:
            raw[i:i] = raw[i : i + rng.randrange(1, 40)]
    return bytes(raw)


@pytest.mark.slow
def test_a_hundred_thousand_random_messages_raise_nothing():
    rng = random.Random(14)
    escaped: list[tuple[bytes, BaseException]] = []
    outcomes: dict[str, int] = {}
    n = 100_000
    for k in range(n):
        for run, seed, names in (
            (run_event, SEED_EVENT, EVENT_FIELDS),
            (run_item, SEED_ITEM, ITEM_FIELDS),
        ):
            raw = random_message(rng, seed, names)
            try:
                run(raw)
            except Exception as exc:  # what the contract promises never happens
                escaped.append((raw, exc))
        if k % 10 == 0:  # a sample of the verdicts, to show the corpus reaches every check
            verdict = parser.parse(random_message(rng, SEED_EVENT, EVENT_FIELDS))
            label = verdict.reason.value if isinstance(verdict, Rejection) else "accepted"
            outcomes[label] = outcomes.get(label, 0) + 1
    print(f"{2 * n} messages (parse and parse_item): {len(escaped)} exceptions escaped")
    print("sampled verdicts:", dict(sorted(outcomes.items())))
    assert escaped == [], escaped[:3]
    assert len(outcomes) >= 10
