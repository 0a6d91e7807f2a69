"""The event contract: every rejection reason, exactly; every bound at its edge; valid events
round-trip; the internal records' decoders reject with ContractError."""

from __future__ import annotations

import json
import math
import time
import unicodedata
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from recsys.config import EventSettings
from recsys.events import (
    EVENT_TYPES,
    FLOAT32_MAX,
    INT64_MAX,
    MAX_DEPTH,
    MAX_ID_LENGTH_LIMIT,
    MIN_PROPENSITY,
    MIN_TS_MS,
    POSITION_LIMIT,
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
    item_text,
    parse_item,
)

NOW = 1_700_000_000_000
parser = EventParser(max_bytes=1024, max_clock_skew_ms=60_000, clock_ms=lambda: NOW)
# For the cases that need a message larger than 1 KB to reach the check they test.
big = EventParser(max_bytes=1 << 20, max_clock_skew_ms=60_000, clock_ms=lambda: NOW)
VALID = {"event_id": "e1", "type": "click", "user_id": "u1", "item_id": "i1", "ts": NOW}


def with_(**changes):
    obj = {**VALID, **changes}
    return json.dumps({k: v for k, v in obj.items() if v is not ...}).encode()


def reason_of(result: object) -> Reason:
    assert isinstance(result, Rejection), result
    return result.reason


def accepted(result: Event | Rejection) -> Event:
    assert isinstance(result, Event), result
    return result


def raw_with(field: str, literal: str) -> bytes:
    """A valid event with ``field`` set to a raw JSON literal (json.dumps cannot write some)."""
    body = with_()[:-1].decode()
    return f'{body},"{field}":{literal}}}'.encode()


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
    (raw_with("value", "NaN"), Reason.NON_FINITE),
    (raw_with("value", "Infinity"), Reason.NON_FINITE),
    (raw_with("value", "1e999"), Reason.NON_FINITE),
    (raw_with("propensity", "-Infinity"), Reason.NON_FINITE),
    (with_(propensity=0), Reason.BAD_PROPENSITY),
    (with_(propensity=1.0001), Reason.BAD_PROPENSITY),
    (with_(propensity=-0.2), Reason.BAD_PROPENSITY),
    (with_(ts=NOW + 60_001), Reason.TS_IN_FUTURE),
    (with_(user_id=""), Reason.BAD_VALUE),
    (with_(position=-1), Reason.BAD_VALUE),
    (with_(ts=-5), Reason.BAD_VALUE),
    (with_(event_id="e\ud800"), Reason.BAD_VALUE),
    (with_(user_id="u\udfff"), Reason.BAD_VALUE),
    # -- the review's corpus (issue 14) ---------------------------------------------------------
    (b"[" * 1000, Reason.TOO_DEEP),  # 1 KB, RecursionError out of json before
    (raw_with("x", "[" * (MAX_DEPTH) + "]" * (MAX_DEPTH)), Reason.TOO_DEEP),  # 1 + 32 levels
    (raw_with("value", "9" * 400), Reason.NUMBER_OUT_OF_RANGE),  # OverflowError before
    (raw_with("propensity", "1" + "0" * 399), Reason.NUMBER_OUT_OF_RANGE),
    (raw_with("ts", "-" + "9" * 400), Reason.NUMBER_OUT_OF_RANGE),
    (with_(position=2**63), Reason.NUMBER_OUT_OF_RANGE),  # past the learner's int64 packing
    (with_(position=-(2**63) - 1), Reason.NUMBER_OUT_OF_RANGE),
    (with_(ts=2**63), Reason.NUMBER_OUT_OF_RANGE),
    (with_(position=1001), Reason.BAD_VALUE),  # beyond max_position
    (with_(position=2**63 - 1), Reason.BAD_VALUE),
    (with_(value=1e308), Reason.NUMBER_OUT_OF_RANGE),  # inf in float32
    (with_(value=-3.5e38), Reason.NUMBER_OUT_OF_RANGE),
    (with_(value=10**30 * 10**9), Reason.NUMBER_OUT_OF_RANGE),  # an int beyond float32
    (with_(propensity=5e-324), Reason.BAD_PROPENSITY),  # 0 in float32
    (with_(propensity=9.9e-31), Reason.BAD_PROPENSITY),
    (with_(ts=0), Reason.BAD_VALUE),
    (with_(ts=NOW // 1000), Reason.BAD_VALUE),  # seconds, not milliseconds
    (with_(ts=MIN_TS_MS - 1), Reason.BAD_VALUE),
    (with_(event_id="e\x00"), Reason.BAD_ID),  # PostgreSQL rejects NUL in text
    (with_(user_id="\x00"), Reason.BAD_ID),
    (with_(item_id="i\x1f"), Reason.BAD_ID),
    (with_(item_id="i\n"), Reason.BAD_ID),
    (with_(item_id="i\x7f"), Reason.BAD_ID),
    (with_(item_id="i\x85"), Reason.BAD_ID),  # NEL: a C1 control
    (with_(user_id="admin\u202e"), Reason.BAD_ID),  # right-to-left override
    (with_(user_id="u\u2066x\u2069"), Reason.BAD_ID),  # bidi isolate
    (with_(user_id="u\u200b1"), Reason.BAD_ID),  # zero-width space
    (with_(user_id="u\u200d1"), Reason.BAD_ID),  # zero-width joiner
    (with_(user_id="\ufeffu1"), Reason.BAD_ID),  # zero-width no-break space (BOM)
    (with_(user_id="u\u00a01"), Reason.BAD_ID),  # no-break space: a separator
    (with_(user_id="u\u2028"), Reason.BAD_ID),  # line separator
    (with_(user_id="u\ue000"), Reason.BAD_ID),  # private use
    (with_(request_id="r\x00"), Reason.BAD_ID),
    (with_(model_version="v\u202e1"), Reason.BAD_ID),
    (with_(user_id="e\u0301"), Reason.BAD_ID),  # not NFC (NFC is "\u00e9")
    (with_(item_id="\u212b"), Reason.BAD_ID),  # the Angstrom sign; NFC is U+00C5
    (with_(event_id="e" * 257), Reason.BAD_ID),
    (with_(request_id="r\ud800"), Reason.BAD_VALUE),
    (with_(model_version=""), Reason.BAD_VALUE),
    (with_()[:-1] + b',"type":"purchase"}', Reason.DUPLICATE_KEY),  # click flipping to purchase
    (with_()[:-1] + b',"ts":' + str(NOW).encode() + b"}", Reason.DUPLICATE_KEY),  # same value
    (raw_with("x", '{"a":1,"a":1}'), Reason.DUPLICATE_KEY),
    (b"\xef\xbb\xbf" + with_(), Reason.NOT_JSON),  # a UTF-8 byte order mark
    (json.dumps(VALID).encode("utf-16"), Reason.NOT_JSON),
    (json.dumps(VALID).encode("utf-32-le"), Reason.NOT_JSON),
    (with_(user_id="u").replace(b'"u"', b'"u\xc3\x28"'), Reason.NOT_JSON),  # invalid UTF-8
    (with_(user_id="u").replace(b'"u"', b'"\xc0\xaf"'), Reason.NOT_JSON),  # overlong
    (with_(user_id="u").replace(b'"u"', b'"\xed\xa0\x80"'), Reason.NOT_JSON),  # encoded surrogate
    (with_(user_id="u").replace(b'"u"', b'"\xf4\x90\x80\x80"'), Reason.NOT_JSON),  # > U+10FFFF
]


@pytest.mark.parametrize(("raw", "reason"), INVALID)
def test_invalid_inputs_are_rejected_with_their_exact_reason(raw, reason):
    result = parser.parse(raw)
    assert isinstance(result, Rejection), result
    assert result.reason == reason, result.detail
    assert result.detail


def test_every_reason_is_exercised():
    assert {r for _, r in INVALID} == set(Reason)
    assert {r for _, r in LARGE} < set(Reason)


def test_existing_reason_labels_are_unchanged():
    # They are metric labels and DLQ headers: renaming one breaks dashboards and alerts.
    assert [r.value for r in Reason][:10] == [
        "not_json",
        "too_large",
        "bad_type",
        "missing_field",
        "unknown_field",
        "non_finite",
        "bad_propensity",
        "bad_value",
        "ts_in_future",
        "unknown_event_type",
    ]


LARGE = [
    (b"[" * 1000 + b"]" * 1000, Reason.TOO_DEEP),
    (b'{"a":' * 500 + b"1" + b"}" * 500, Reason.TOO_DEEP),
    (with_(request_id="\u00e9" * 257), Reason.BAD_ID),
    (raw_with("x", "1" * 5000), Reason.NUMBER_OUT_OF_RANGE),  # past int()'s 4,300-digit limit
    (b"[" * 100_000, Reason.TOO_DEEP),
    (b'{"a":' * 20_000 + b"1" + b"}" * 20_000, Reason.TOO_DEEP),
    (with_(event_id="e" * 65_536), Reason.BAD_ID),  # a 64 KB id
    (with_(user_id="u" * (MAX_ID_LENGTH_LIMIT + 1)), Reason.BAD_ID),
]


@pytest.mark.parametrize(("raw", "reason"), LARGE)
def test_large_hostile_messages_are_rejected(raw, reason):
    result = big.parse(raw)
    assert isinstance(result, Rejection), result
    assert result.reason == reason, result.detail


def test_boundaries_are_accepted():
    assert isinstance(parser.parse(with_(ts=NOW + 60_000)), Event)
    assert isinstance(parser.parse(with_(propensity=1)), Event)
    assert isinstance(parser.parse(with_(position=0, value=-3)), Event)
    exact = with_()
    assert isinstance(EventParser(max_bytes=len(exact), clock_ms=lambda: NOW).parse(exact), Event)
    edges = {
        "ts": MIN_TS_MS,
        "position": 1000,
        "propensity": MIN_PROPENSITY,
        "value": FLOAT32_MAX,
        "event_id": "e" * 256,
        "user_id": "\u00e9" * 256,  # code points, not bytes
    }
    for name, v in edges.items():
        assert isinstance(big.parse(with_(**{name: v})), Event), (name, v)
    assert accepted(parser.parse(with_(value=-FLOAT32_MAX))).value == -FLOAT32_MAX
    beyond = math.nextafter(FLOAT32_MAX, math.inf)
    assert reason_of(parser.parse(with_(value=beyond))) == Reason.NUMBER_OUT_OF_RANGE
    assert reason_of(parser.parse(with_(ts=INT64_MAX))) == Reason.TS_IN_FUTURE
    assert (
        accepted(parser.parse(with_(value=10**19))).value == 1e19
    )  # 20 digits: an int64-sized literal


def test_printable_unicode_ids_are_accepted_as_sent():
    for v in ["\u00e9t\u00e9", "\u7528\u6237-42", "\U0001f642", "a b", "\u0645\u0633", 'x[{"]}']:
        event = parser.parse(with_(user_id=v))
        assert isinstance(event, Event), (v, event)
        assert event.user_id == v


def test_nesting_up_to_the_limit_reaches_the_field_checks():
    deep = raw_with("x", "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1))  # 32 levels in all
    assert reason_of(parser.parse(deep)) == Reason.UNKNOWN_FIELD


def test_brackets_inside_strings_do_not_count_as_nesting():
    ids = ["[" * 200, "{" * 100 + "[" * 100, '\\"[' * 60, "]" * 50 + "[" * 150]
    for v in ids:
        event = big.parse(with_(event_id=v))
        assert isinstance(event, Event), (v[:10], event)
        assert event.event_id == v
    # An unterminated string swallows the brackets after it: the JSON is broken, not deep.
    assert reason_of(parser.parse(b'{"event_id": "' + b"[" * 900)) == Reason.NOT_JSON


def test_the_depth_scan_is_linear_on_quote_heavy_input():
    # A naive string regex retries from every quote of an unterminated string: quadratic (2.3 s
    # at 8,000 escapes here, hours at 300,000). The possessive scan takes milliseconds.
    # 40 brackets, so the scan runs; then one string that never closes, full of escaped quotes.
    hostile = b"[]" * 40 + b'"' + b'\\"' * 300_000
    start = time.perf_counter()
    result = EventParser(max_bytes=1 << 21).parse(hostile)
    assert time.perf_counter() - start < 2.0
    assert reason_of(result) == Reason.NOT_JSON


def test_non_bytes_values_are_rejected_and_bytes_likes_parsed():
    values: list[Any] = ["{}", 42, object(), ["x"]]
    for value in values:
        assert reason_of(parser.parse(value)) == Reason.NOT_JSON
    raw = with_()
    assert parser.parse(bytearray(raw)) == parser.parse(memoryview(raw)) == parser.parse(raw)


def test_validate_takes_any_python_value():
    assert reason_of(parser.validate(None)) == Reason.BAD_TYPE
    assert reason_of(parser.validate({1: "x", "a": 2})) == Reason.UNKNOWN_FIELD  # mixed key types
    assert reason_of(parser.validate({**VALID, "value": math.nan})) == Reason.NON_FINITE
    assert reason_of(parser.validate({**VALID, "value": 10**400})) == Reason.NUMBER_OUT_OF_RANGE
    assert (
        reason_of(parser.validate({**VALID, "propensity": 10**400})) == Reason.NUMBER_OUT_OF_RANGE
    )
    assert reason_of(parser.validate({**VALID, "ts": 10**400})) == Reason.NUMBER_OUT_OF_RANGE


def test_parser_validates_its_parameters():
    with pytest.raises(ValueError, match="max_bytes"):
        EventParser(max_bytes=0)
    with pytest.raises(ValueError, match="max_clock_skew_ms"):
        EventParser(max_clock_skew_ms=-1)
    with pytest.raises(ValueError, match="max_id_length"):
        EventParser(max_id_length=MAX_ID_LENGTH_LIMIT + 1)
    with pytest.raises(ValueError, match="max_position"):
        EventParser(max_position=-1)


def test_from_settings_takes_every_limit():
    s = EventSettings(
        max_bytes=300, max_clock_skew_ms=7, max_id_length=4, max_position=3, max_title_length=9
    )
    p = EventParser.from_settings(s, clock_ms=lambda: NOW)
    assert (p.max_bytes, p.max_clock_skew_ms, p.max_id_length, p.max_position) == (300, 7, 4, 3)
    assert isinstance(p.parse(with_(user_id="abcd", position=3, ts=NOW + 7)), Event)
    assert reason_of(p.parse(with_(user_id="abcde"))) == Reason.BAD_ID
    assert reason_of(p.parse(with_(position=4))) == Reason.BAD_VALUE
    assert reason_of(p.parse(with_(ts=NOW + 8))) == Reason.TS_IN_FUTURE


def test_setting_ceilings_are_the_decoders_limits():
    # The internal decoders accept up to these constants, so any configured value must fit.
    def le(name):
        return next(m.le for m in EventSettings.model_fields[name].metadata if hasattr(m, "le"))

    assert le("max_id_length") == MAX_ID_LENGTH_LIMIT
    assert le("max_position") == POSITION_LIMIT


def _nfc_printable(s: str) -> bool:
    return s.isprintable() and unicodedata.is_normalized("NFC", s)


ids = (
    st.text(st.characters(blacklist_categories=("C", "Z")) | st.just(" "), min_size=1, max_size=30)
    .map(lambda s: unicodedata.normalize("NFC", s))
    .filter(_nfc_printable)
)
events = st.builds(
    Event,
    event_id=ids,
    type=st.sampled_from(sorted(EVENT_TYPES)),
    user_id=ids,
    item_id=ids,
    ts=st.integers(MIN_TS_MS, NOW),
    request_id=st.none() | ids,
    position=st.none() | st.integers(0, 1000),
    propensity=st.none() | st.floats(MIN_PROPENSITY, 1.0),
    value=st.none() | st.floats(-FLOAT32_MAX, FLOAT32_MAX),
    model_version=st.none() | ids,
)


@given(events)
def test_valid_events_round_trip(event):
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
    assert reason_of(parse_item(b'{"item_id":"x","title":"t","ts":1,"colour":"red"}')) == (
        Reason.UNKNOWN_FIELD
    )
    assert reason_of(parse_item(b'{"item_id":"x","ts":1}')) == Reason.MISSING_FIELD
    assert (
        reason_of(parse_item(b'{"item_id":"x","title":"t","ts":1,"tags":[1]}')) == Reason.BAD_TYPE
    )


def item_with(**changes) -> bytes:
    obj = {"item_id": "m1", "title": "Heat (1995)", "ts": 5, **changes}
    return json.dumps({k: v for k, v in obj.items() if v is not ...}).encode()


ITEM_INVALID = [
    (None, Reason.NOT_JSON),
    (b"[" * 1000, Reason.TOO_DEEP),
    (
        item_with(attributes={"a": "b"}).replace(b'"a": "b"', b'"a":"b","a":"c"'),
        Reason.DUPLICATE_KEY,
    ),
    (b"\xef\xbb\xbf" + item_with(), Reason.NOT_JSON),
    (item_with(title="t").replace(b'"t"', b'"\xed\xb0\x80"'), Reason.NOT_JSON),
    (item_with(ts=...), Reason.MISSING_FIELD),
    (item_with(ts="5"), Reason.BAD_TYPE),
    (item_with(ts=-1), Reason.BAD_VALUE),
    (item_with(ts=2**63), Reason.NUMBER_OUT_OF_RANGE),
    (item_with().replace(b'"ts": 5', b'"ts": ' + b"9" * 400), Reason.NUMBER_OUT_OF_RANGE),
    (item_with(item_id=7), Reason.BAD_TYPE),
    (item_with(item_id=""), Reason.BAD_VALUE),
    (item_with(item_id="m\x00"), Reason.BAD_ID),
    (item_with(item_id="m\u200b"), Reason.BAD_ID),
    (item_with(item_id="m" * 257), Reason.BAD_ID),
    (item_with(item_id="m\ud800"), Reason.BAD_VALUE),
    (item_with(title="Heat\x00"), Reason.BAD_VALUE),
    (item_with(title="Heat\u202e(5991)"), Reason.BAD_VALUE),
    (item_with(title="t\ud800"), Reason.BAD_VALUE),
    (item_with(title="t" * 1025), Reason.BAD_VALUE),
    (item_with(title=3), Reason.BAD_TYPE),
    (item_with(description="a\x07b"), Reason.BAD_VALUE),
    (item_with(description=5), Reason.BAD_TYPE),
    (item_with(tags="Action"), Reason.BAD_TYPE),
    (item_with(tags=0), Reason.BAD_TYPE),  # a falsy non-list was taken for "no tags" before
    (item_with(tags=["ok", "b\u2067ad"]), Reason.BAD_VALUE),
    (item_with(attributes=[]), Reason.BAD_TYPE),
    (item_with(attributes={"k": 1}), Reason.BAD_TYPE),
    (item_with(attributes={"k\x01": "v"}), Reason.BAD_VALUE),
    (item_with(attributes={"k": "v\ud800"}), Reason.BAD_VALUE),
    (item_with(extra=1), Reason.UNKNOWN_FIELD),
]


@pytest.mark.parametrize(("raw", "reason"), ITEM_INVALID)
def test_invalid_items_are_rejected_with_their_exact_reason(raw, reason):
    result = parse_item(raw)
    assert isinstance(result, Rejection), result
    assert result.reason == reason, result.detail


def test_item_text_fields_keep_what_text_needs():
    text = (
        "Persian \u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645, emoji \U0001f469\u200d\U0001f4bb"
    )
    raw = item_with(title=text, description="line 1\nline 2\ttab\r\n", tags=["e\u0301"])
    item = parse_item(raw)
    assert isinstance(item, ItemRecord), item
    assert (item.title, item.tags) == (text, ("e\u0301",))  # kept as sent, not normalised
    assert parse_item(item_with(tags=None, attributes=None)) == ItemRecord("m1", "Heat (1995)", 5)
    long_title = parse_item(item_with(title="t" * 1025), max_title_length=2000)
    assert isinstance(long_title, ItemRecord)
    assert long_title.title == "t" * 1025
    long_id = parse_item(item_with(item_id="m" * 300), max_id_length=300)
    assert isinstance(long_id, ItemRecord)
    assert long_id.item_id == "m" * 300
    assert reason_of(parse_item(item_with(), max_bytes=10)) == Reason.TOO_LARGE


def test_reward_and_slate_records_round_trip():
    r = RewardRecord("r1", "u", "i", 1.5, 10, "joined", 0.25, 2, "v3", "req")
    assert RewardRecord.from_bytes(r.to_bytes()) == r
    with pytest.raises(ValueError, match="bad reward record"):
        RewardRecord.from_bytes(b'{"reward_id": "r"}')
    s = Slate("req", "u", "v3", 10, (SlateItem("i", 0.5, 0.2, 0), SlateItem("j", 0.1, 0.1, 1)))
    assert Slate.from_bytes(s.to_bytes()) == s
    v = ItemVector("m1", "minilm", "k1", (0.5, -1.25, 3.0))
    assert ItemVector.from_bytes(v.to_bytes()) == v


def test_internal_records_do_not_recheck_the_id_characters():
    # Their ids come from contract-valid events; the decoders check what could break a consumer.
    r = RewardRecord("x" * 40, 'u"\\\u00e9', "i\n", 0.3, 0, "organic")
    assert RewardRecord.from_bytes(r.to_bytes()) == r
    long_id = "u" * MAX_ID_LENGTH_LIMIT  # any configured max_id_length passes
    r = RewardRecord("r", long_id, "i", 1.0, 1, "default", 1.0, POSITION_LIMIT)
    assert RewardRecord.from_bytes(r.to_bytes()) == r


GOOD_REWARD = RewardRecord("r1", "u", "i", 1.5, 10, "joined", 0.25, 2, "v3", "req").to_dict()


def reward_with(**changes) -> bytes:
    obj = {**GOOD_REWARD, **changes}
    return json.dumps({k: v for k, v in obj.items() if v is not ...}).encode()


REWARD_INVALID = [
    (b"", Reason.NOT_JSON),
    (b"[" * 1000, Reason.TOO_DEEP),
    (b"[]", Reason.BAD_TYPE),
    (reward_with()[:-1] + b',"reward":2.0}', Reason.DUPLICATE_KEY),
    (b"\xef\xbb\xbf" + reward_with(), Reason.NOT_JSON),
    (reward_with(kind=...), Reason.MISSING_FIELD),
    (reward_with(reward=None), Reason.MISSING_FIELD),
    (reward_with(colour="red"), Reason.UNKNOWN_FIELD),
    (reward_with(user_id=5), Reason.BAD_TYPE),
    (reward_with(user_id=""), Reason.BAD_VALUE),
    (reward_with(item_id="i\ud800"), Reason.BAD_VALUE),
    (reward_with(model_version="m" * (MAX_ID_LENGTH_LIMIT + 1)), Reason.BAD_VALUE),
    (reward_with(reward="1"), Reason.BAD_TYPE),
    (reward_with(reward=True), Reason.BAD_TYPE),
    (reward_with().replace(b'"reward": 1.5', b'"reward": NaN'), Reason.NON_FINITE),
    (reward_with(reward=1e39), Reason.NUMBER_OUT_OF_RANGE),
    (
        reward_with().replace(b'"reward": 1.5', b'"reward": ' + b"7" * 400),
        Reason.NUMBER_OUT_OF_RANGE,
    ),
    (reward_with(ts=1.5), Reason.BAD_TYPE),
    (reward_with(ts=-1), Reason.BAD_VALUE),
    (reward_with(ts=2**63), Reason.NUMBER_OUT_OF_RANGE),
    (reward_with(kind="bonus"), Reason.BAD_VALUE),
    (reward_with(kind=1), Reason.BAD_TYPE),
    (reward_with(propensity=0.0), Reason.BAD_PROPENSITY),
    (reward_with(propensity=5e-324), Reason.BAD_PROPENSITY),
    (reward_with(propensity="0.5"), Reason.BAD_TYPE),
    (reward_with(position=POSITION_LIMIT + 1), Reason.BAD_VALUE),  # the replay buffer's int32
    (reward_with(position=2**63), Reason.NUMBER_OUT_OF_RANGE),
    (reward_with(position=-1), Reason.BAD_VALUE),
    (reward_with(request_id=7), Reason.BAD_TYPE),
]


@pytest.mark.parametrize(("raw", "reason"), REWARD_INVALID)
def test_bad_reward_records_raise_contract_error(raw, reason):
    with pytest.raises(ContractError, match="bad reward record") as info:
        RewardRecord.from_bytes(raw)
    assert info.value.reason == reason, info.value.detail
    assert isinstance(info.value, ValueError)  # workers/learner.py catches ValueError


def test_reward_optional_fields_may_be_null_or_absent():
    organic = RewardRecord("r1", "u", "i", -0.5, 10, "organic")
    assert RewardRecord.from_bytes(organic.to_bytes()) == organic
    bare = reward_with(propensity=..., position=..., model_version=..., request_id=...)
    assert RewardRecord.from_bytes(bare) == RewardRecord("r1", "u", "i", 1.5, 10, "joined")
    assert RewardRecord.from_bytes(reward_with(reward=2)).reward == 2.0


def vector_with(**changes) -> bytes:
    good = json.loads(ItemVector("m1", "minilm", "k1", (0.5, -1.25)).to_bytes())
    obj = {**good, **changes}
    return json.dumps({k: v for k, v in obj.items() if v is not ...}).encode()


VECTOR_INVALID = [
    (b"{", Reason.NOT_JSON),
    (b"[" * 1000, Reason.TOO_DEEP),
    (vector_with()[:-1] + b',"dim":2}', Reason.DUPLICATE_KEY),
    (vector_with(dim=...), Reason.MISSING_FIELD),
    (vector_with(extra=1), Reason.UNKNOWN_FIELD),
    (vector_with(item_id=5), Reason.BAD_TYPE),  # was silently str()-ed before
    (vector_with(model=""), Reason.BAD_VALUE),
    (vector_with(dim=3), Reason.BAD_VALUE),  # 8 bytes are not 3 floats
    (vector_with(dim=0, vector=""), Reason.BAD_VALUE),
    (vector_with(dim="2"), Reason.BAD_TYPE),
    (vector_with(dim=2**64), Reason.NUMBER_OUT_OF_RANGE),
    (vector_with(vector=5), Reason.BAD_TYPE),
    (vector_with(vector="not base64!"), Reason.BAD_VALUE),
    (vector_with(vector="\u00e9\u00e9\u00e9\u00e9"), Reason.BAD_VALUE),
    (ItemVector("m1", "minilm", "k1", (0.5, math.nan)).to_bytes(), Reason.NON_FINITE),
    (ItemVector("m1", "minilm", "k1", (math.inf,)).to_bytes(), Reason.NON_FINITE),
]


@pytest.mark.parametrize(("raw", "reason"), VECTOR_INVALID)
def test_bad_item_vectors_raise_contract_error(raw, reason):
    with pytest.raises(ContractError, match="bad item vector") as info:
        ItemVector.from_bytes(raw)
    assert info.value.reason == reason, info.value.detail


def slate_with(items=None, **changes) -> bytes:
    good = Slate("req", "u", "v3", 10, (SlateItem("i", 0.5, 0.2, 0),)).to_dict()
    if items is not None:
        good["items"] = items
    return json.dumps({**good, **changes}).encode()


SLATE_INVALID = [
    (b"null", Reason.BAD_TYPE),
    (b'{"items":' + b"[" * 1000, Reason.TOO_DEEP),
    (slate_with(items="i"), Reason.BAD_TYPE),
    (slate_with(items=[["i", 0.5, 0.2, 0]]), Reason.BAD_TYPE),
    (slate_with(items=[{"item_id": "i", "score": 0.5, "propensity": 0.2}]), Reason.MISSING_FIELD),
    (
        slate_with(items=[{"item_id": "i", "score": 0.5, "propensity": 0.0, "position": 0}]),
        Reason.BAD_PROPENSITY,
    ),
    (
        slate_with(items=[{"item_id": "i", "score": 1e39, "propensity": 0.2, "position": 0}]),
        Reason.NUMBER_OUT_OF_RANGE,
    ),
    (
        slate_with(items=[{"item_id": "i", "score": 1, "propensity": 1, "position": -1}]),
        Reason.BAD_VALUE,
    ),
    (slate_with(ts="10"), Reason.BAD_TYPE),
    (slate_with(colour="red"), Reason.UNKNOWN_FIELD),
]


@pytest.mark.parametrize(("raw", "reason"), SLATE_INVALID)
def test_bad_slates_raise_contract_error(raw, reason):
    with pytest.raises(ContractError, match="bad slate") as info:
        Slate.from_bytes(raw)
    assert info.value.reason == reason, info.value.detail
