"""The event contract: every rejection reason, exactly; valid events round-trip."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from recsys.events import (
    EVENT_TYPES,
    Event,
    EventParser,
    ItemRecord,
    Reason,
    Rejection,
    RewardRecord,
    Slate,
    SlateItem,
    item_text,
    parse_item,
)

NOW = 1_700_000_000_000
parser = EventParser(max_bytes=1024, max_clock_skew_ms=60_000, clock_ms=lambda: NOW)
VALID = {"event_id": "e1", "type": "click", "user_id": "u1", "item_id": "i1", "ts": NOW}


def with_(**changes):
    obj = {**VALID, **changes}
    return json.dumps({k: v for k, v in obj.items() if v is not ...}).encode()


INVALID = [
    (b"not json at all", Reason.NOT_JSON),
    (b"\xff\xfe\x00garbage", Reason.NOT_JSON),
    (b"", Reason.NOT_JSON),
    (None, Reason.NOT_JSON),
    (b'{"event_id": "e1",', Reason.NOT_JSON),
    (b"x" * 1025, Reason.TOO_LARGE),
    (json.dumps({**VALID, "pad": "y" * 2000}).encode(), Reason.TOO_LARGE),
    (b"[1, 2, 3]", Reason.BAD_TYPE),
    (b'"a string"', Reason.BAD_TYPE),
    (with_(event_id=...), Reason.MISSING_FIELD),
    (with_(user_id=None), Reason.MISSING_FIELD),
    (with_(ts=...), Reason.MISSING_FIELD),
    (with_(type=...), Reason.MISSING_FIELD),
    (with_(extra_field=1), Reason.UNKNOWN_FIELD),
    (with_(type="buy_now"), Reason.UNKNOWN_EVENT_TYPE),
    (with_(type=3), Reason.BAD_TYPE),
    (with_(user_id=42), Reason.BAD_TYPE),
    (with_(ts="2024-01-01"), Reason.BAD_TYPE),
    (with_(ts=1.5e12), Reason.BAD_TYPE),
    (with_(ts=True), Reason.BAD_TYPE),
    (with_(position="1"), Reason.BAD_TYPE),
    (with_(value="3.5"), Reason.BAD_TYPE),
    (with_(propensity="0.5"), Reason.BAD_TYPE),
    (
        b'{"event_id":"e1","type":"dwell","user_id":"u","item_id":"i","ts":1,"value":NaN}',
        Reason.NON_FINITE,
    ),
    (
        b'{"event_id":"e1","type":"dwell","user_id":"u","item_id":"i","ts":1,"value":Infinity}',
        Reason.NON_FINITE,
    ),
    (
        b'{"event_id":"e1","type":"dwell","user_id":"u","item_id":"i","ts":1,"value":1e999}',
        Reason.NON_FINITE,
    ),
    (
        b'{"event_id":"e1","type":"click","user_id":"u","item_id":"i","ts":1,"propensity":-Infinity}',
        Reason.NON_FINITE,
    ),
    (with_(propensity=0), Reason.BAD_PROPENSITY),
    (with_(propensity=1.0001), Reason.BAD_PROPENSITY),
    (with_(propensity=-0.2), Reason.BAD_PROPENSITY),
    (with_(ts=NOW + 60_001), Reason.TS_IN_FUTURE),
    (with_(user_id=""), Reason.BAD_VALUE),
    (with_(position=-1), Reason.BAD_VALUE),
    (with_(ts=-5), Reason.BAD_VALUE),
    (
        b'{"event_id":"e\\ud800","type":"click","user_id":"u","item_id":"i","ts":1}',
        Reason.BAD_VALUE,
    ),
    (
        b'{"event_id":"e1","type":"click","user_id":"u\\udfff","item_id":"i","ts":1}',
        Reason.BAD_VALUE,
    ),
]


@pytest.mark.parametrize(("raw", "reason"), INVALID)
def test_invalid_inputs_are_rejected_with_their_exact_reason(raw, reason):
    result = parser.parse(raw)
    assert isinstance(result, Rejection), result
    assert result.reason == reason, result.detail
    assert result.detail


def test_every_reason_is_exercised():
    assert {r for _, r in INVALID} == set(Reason)


def test_boundaries_are_accepted():
    assert isinstance(parser.parse(with_(ts=NOW + 60_000)), Event)
    assert isinstance(parser.parse(with_(propensity=1)), Event)
    assert isinstance(parser.parse(with_(position=0, value=-3)), Event)
    exact = b"x" * 0 + with_()
    assert isinstance(EventParser(max_bytes=len(exact), clock_ms=lambda: NOW).parse(exact), Event)


def test_parser_validates_its_parameters():
    with pytest.raises(ValueError, match="max_bytes"):
        EventParser(max_bytes=0)
    with pytest.raises(ValueError, match="max_clock_skew_ms"):
        EventParser(max_clock_skew_ms=-1)


ids = st.text(min_size=1, max_size=30)
events = st.builds(
    Event,
    event_id=ids,
    type=st.sampled_from(sorted(EVENT_TYPES)),
    user_id=ids,
    item_id=ids,
    ts=st.integers(0, NOW),
    request_id=st.none() | ids,
    position=st.none() | st.integers(0, 100),
    propensity=st.none() | st.floats(1e-9, 1.0),
    value=st.none() | st.floats(allow_nan=False, allow_infinity=False, width=64),
    model_version=st.none() | ids,
)


@given(events)
def test_valid_events_round_trip(event):
    big = EventParser(max_bytes=1 << 20, clock_ms=lambda: NOW)
    assert big.parse(event.to_bytes()) == event


@given(events)
def test_key_is_the_user(event):
    assert event.key == event.user_id.encode()


def test_items_parse_and_text_changes_with_content():
    raw = ItemRecord("m1", "Heat (1995)", 5, tags=("Action", "Crime")).to_bytes()
    item = parse_item(raw)
    assert isinstance(item, ItemRecord)
    assert item_text(item) == "Heat (1995). Tags: Action, Crime"
    changed = ItemRecord("m1", "Heat (1995)", 5, tags=("Action",))
    assert item_text(changed) != item_text(item)
    assert parse_item(b'{"item_id":"x","title":"t","ts":1,"colour":"red"}').reason == (
        Reason.UNKNOWN_FIELD
    )
    assert parse_item(b'{"item_id":"x","ts":1}').reason == Reason.MISSING_FIELD
    assert parse_item(b'{"item_id":"x","title":"t","ts":1,"tags":[1]}').reason == Reason.BAD_TYPE


def test_reward_and_slate_records_round_trip():
    r = RewardRecord("r1", "u", "i", 1.5, 10, "joined", 0.25, 2, "v3", "req")
    assert RewardRecord.from_bytes(r.to_bytes()) == r
    with pytest.raises(ValueError, match="bad reward record"):
        RewardRecord.from_bytes(b'{"reward_id": "r"}')
    s = Slate("req", "u", "v3", 10, (SlateItem("i", 0.5, 0.2, 0), SlateItem("j", 0.1, 0.1, 1)))
    assert Slate.from_bytes(s.to_bytes()) == s
