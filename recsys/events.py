"""The event contract: parse and validate behaviour events, catalogue records and internal records.

Nothing here raises on bad input. :meth:`EventParser.parse` and :func:`parse_item` take any bytes
at all and return the parsed record or a :class:`Rejection` with a machine-readable
:class:`Reason`, which workers count and send to the dead-letter topic. The decoders of the
internal topics (:meth:`RewardRecord.from_bytes`, :meth:`ItemVector.from_bytes`,
:meth:`Slate.from_bytes`) share the same strict decoding and raise :class:`ContractError` (a
``ValueError``, carrying the same ``Reason``) instead, since a bad record there is a bug in our
own writer, not data.

Contract rules (every limit is a constant or an :class:`~recsys.config.EventSettings` field):

Bytes and JSON (every message, external or internal)
    A message is one JSON text (RFC 8259) in strict UTF-8 of at most ``max_bytes`` bytes
    (``too_large``). Invalid UTF-8 (including encoded surrogates), a UTF-8 byte order mark, UTF-16
    or UTF-32 are ``not_json``: RFC 8259 section 8.1 forbids sending a BOM and requires UTF-8, and
    accepting one would let the same event arrive as two different byte strings. ``NaN`` and
    ``Infinity`` literals are ``non_finite``. A key twice in one object is ``duplicate_key``
    (otherwise the last one silently wins: ``type`` could flip from click to purchase). Arrays
    and objects nest at most :data:`MAX_DEPTH` deep (``too_deep``), checked by a scan of the raw
    bytes before ``json`` recurses. An integer literal longer than :data:`MAX_INT_LITERAL` (20)
    characters cannot be an int64 and is ``number_out_of_range``.

Ids (``event_id``, ``user_id``, ``item_id``, ``request_id``, ``model_version``; an item's
``item_id``)
    A string (``bad_type``), not empty and without lone surrogates (``bad_value``, as before),
    at most ``max_id_length`` code points (default 256), every character printable in the sense
    of ``str.isprintable`` (no Unicode category C: controls Cc such as NUL, format characters Cf
    such as bidi overrides and zero-width spaces, surrogates, private use and unassigned code
    points; no separators but the ASCII space), and already in Unicode NFC (``bad_id``). A
    non-NFC id is rejected, not normalised: ids are the app's own keys, recommendations are
    looked up by them, and rewriting one would make the app's lookup miss.

Numbers
    Every integer is within int64; ``ts`` and ``position`` beyond it are
    ``number_out_of_range``. ``ts`` (ms since the epoch) is at least :data:`MIN_TS_MS`
    (1990-01-01T00:00:00Z: ``ts=0``, or seconds instead of milliseconds, are ``bad_value``) and at
    most ``max_clock_skew_ms`` ahead of the clock (``ts_in_future``). ``position`` is within
    ``[0, max_position]`` (default 1000; ``bad_value``). ``value`` and ``propensity`` are finite
    (``non_finite``) and within float32 (absolute value at most :data:`FLOAT32_MAX`, else
    ``number_out_of_range``), since the learner trains in float32. ``propensity`` is within
    ``[MIN_PROPENSITY, 1]`` (``bad_propensity``): :data:`MIN_PROPENSITY` is 1e-30, a normal
    float32 (so never 0 on the GPU) and the smallest propensity the publisher logs
    (``recsys.policy.MIN_PROPENSITY``).

Item records
    ``item_id`` follows the id rule. ``title`` (at most ``max_title_length`` code points, default
    1024), ``description``, ``tags`` and ``attributes`` (keys and values) are display text: no
    lone surrogates, no control characters other than tab, LF and CR, and no bidi embedding,
    override or isolate characters (U+202A-U+202E, U+2066-U+2069) (all ``bad_value``). Other
    format characters (zero-width joiners, which Persian and emoji need) and non-NFC text are
    kept as sent. ``ts`` is an int64 >= 0.

Internal records (rewards, item vectors, slates)
    Written by our own workers from contract-valid events, so their decoders check what could
    crash or corrupt a consumer: exact field sets, types, int64/float32 ranges, propensity in
    ``[MIN_PROPENSITY, 1]``, positions within int32 (the replay buffer's dtype), strings valid
    Unicode and at most :data:`MAX_ID_LENGTH_LIMIT` code points (the ceiling of
    ``max_id_length``, so any configured value passes), ``ts`` >= 0. They do not re-check the id
    character rules or the ts floor, which the events they came from already passed.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn, TypeVar

if TYPE_CHECKING:
    from recsys.config import EventSettings

EVENT_TYPES = frozenset(
    {"impression", "click", "dwell", "add_to_cart", "purchase", "rating", "skip"}
)
FEEDBACK_TYPES = EVENT_TYPES - {"impression"}
REWARD_KINDS = frozenset({"joined", "default", "organic"})

#: Deepest nesting of arrays and objects accepted; the deepest real message (a slate) nests 3.
MAX_DEPTH = 32
#: Longest integer literal: "-9223372036854775808" (int64's minimum) has 20 characters.
MAX_INT_LITERAL = 20
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
#: Positions are stored as int32 by the replay buffer: the ceiling of ``max_position``.
POSITION_LIMIT = 2**31 - 1
#: The largest finite float32; ``value``, ``propensity``, ``reward`` and scores stay within it.
FLOAT32_MAX = 3.4028234663852886e38
#: 1990-01-01T00:00:00Z in ms: older event times are taken for a unit mistake (s for ms) or 0.
MIN_TS_MS = 631_152_000_000
#: Smallest propensity accepted; a normal float32, and recsys.policy.MIN_PROPENSITY.
MIN_PROPENSITY = 1e-30
#: Ceiling of the ``max_id_length`` setting, and the length bound of internal records' strings.
MAX_ID_LENGTH_LIMIT = 4096
#: Largest item vector accepted from the item-vectors topic.
MAX_VECTOR_DIM = 65536
#: Largest internal record (a slate, an item vector) accepted by the internal decoders.
INTERNAL_MAX_BYTES = 4 << 20

DEFAULT_MAX_BYTES = 64 * 1024
DEFAULT_MAX_ID_LENGTH = 256
DEFAULT_MAX_POSITION = 1000
DEFAULT_MAX_TITLE_LENGTH = 1024


class Reason(StrEnum):
    """Why a message was rejected; the value is the metric label and the DLQ header."""

    NOT_JSON = "not_json"
    TOO_LARGE = "too_large"
    BAD_TYPE = "bad_type"
    MISSING_FIELD = "missing_field"
    UNKNOWN_FIELD = "unknown_field"
    NON_FINITE = "non_finite"
    BAD_PROPENSITY = "bad_propensity"
    BAD_VALUE = "bad_value"
    TS_IN_FUTURE = "ts_in_future"
    UNKNOWN_EVENT_TYPE = "unknown_event_type"
    TOO_DEEP = "too_deep"
    NUMBER_OUT_OF_RANGE = "number_out_of_range"
    BAD_ID = "bad_id"
    DUPLICATE_KEY = "duplicate_key"


@dataclass(frozen=True, slots=True)
class Rejection:
    """A rejected message: the reason (for counting) and a human-readable detail.

    ``detail`` is short (at most a few hundred characters) and always encodable as UTF-8: any
    piece of the message in it is ``repr``-escaped and truncated.
    """

    reason: Reason
    detail: str


class ContractError(ValueError):
    """A record on an internal topic breaks the contract: a bug in the worker that wrote it.

    A ``ValueError``, so a caller's ``except ValueError`` keeps working; ``reason`` is the same
    :class:`Reason` a :class:`Rejection` would carry.
    """

    def __init__(self, what: str, reason: Reason, detail: str) -> None:
        super().__init__(f"bad {what}: {reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


class _Reject(Exception):
    """Raised by the checks below; the public entry points turn it into a Rejection or a
    ContractError. Not a ValueError, so json's own errors can never be mistaken for it."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _fail(reason: Reason, detail: str) -> NoReturn:
    raise _Reject(reason, detail)


@dataclass(frozen=True, slots=True)
class Event:
    """One behaviour event, exactly as in the contract (DESIGN.md)."""

    event_id: str
    type: str
    user_id: str
    item_id: str
    ts: int
    request_id: str | None = None
    position: int | None = None
    propensity: float | None = None
    value: float | None = None
    model_version: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The wire form: optional fields that are None are left out."""
        # getattr, not asdict: the fields are immutable scalars, so asdict's deep copy (most of
        # the time of a backfill) buys nothing.
        return {name: v for name in _EVENT_FIELDS if (v := getattr(self, name)) is not None}

    def to_bytes(self) -> bytes:
        return _compact(self.to_dict()).encode()

    @property
    def key(self) -> bytes:
        """Kafka message key: one user's events stay in one partition, in order."""
        return self.user_id.encode()


@dataclass(frozen=True, slots=True)
class ItemRecord:
    """A catalogue record from the items topic."""

    item_id: str
    title: str
    ts: int
    description: str | None = None
    tags: tuple[str, ...] = ()
    attributes: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"item_id": self.item_id, "title": self.title, "ts": self.ts}
        if self.description is not None:
            out["description"] = self.description
        out["tags"] = list(self.tags)
        out["attributes"] = dict(self.attributes)
        return out

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":")).encode()


_EVENT_FIELDS = tuple(f.name for f in fields(Event))
_compact = json.JSONEncoder(separators=(",", ":")).encode
_json_str = json.encoder.encode_basestring_ascii  # what json.dumps uses for str (ensure_ascii)


def _opt(v: Any, encode: Callable[[Any], str]) -> str:
    return "null" if v is None else encode(v)


def _finite_or_none(v: float | None) -> bool:
    return v is None or math.isfinite(v)


# -- decoding: bytes -> JSON value ----------------------------------------------------------------


def _reject_constant(name: str) -> NoReturn:
    # json accepts NaN/Infinity literals by default; the contract does not.
    _fail(Reason.NON_FINITE, f"non-finite literal {name}")


def _parse_int(literal: str) -> int:
    # Refused before int() sees it: no int64 has more characters, a 400-digit integer would
    # overflow math.isfinite later, and past 4,300 digits int() itself raises.
    if len(literal) > MAX_INT_LITERAL:
        _fail(Reason.NUMBER_OUT_OF_RANGE, f"an integer of {len(literal)} characters is not int64")
    return int(literal)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json keeps the last of duplicate keys silently; the contract rejects them instead.
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                _fail(Reason.DUPLICATE_KEY, f"key {_quote(key)} appears more than once")
            seen.add(key)
    return obj


# One decoder for every message: json.loads with keyword arguments builds a new one per call,
# which was about a third of the parser's time.
_DECODER = json.JSONDecoder(
    parse_constant=_reject_constant, parse_int=_parse_int, object_pairs_hook=_unique_keys
)

# Removes every JSON string and every run of other non-bracket bytes, leaving the brackets. An
# unterminated string runs to the end (the optional closing quote) and the quantifiers are
# possessive, so this is one linear pass whatever the input. UTF-8 continuation bytes are never
# ASCII, so scanning bytes is exact.
_NOT_BRACKETS = re.compile(rb'"(?:[^"\\]++|\\.)*+"?|[^"\[\]{}]++', re.DOTALL)


def _too_deep(raw: bytes) -> bool:
    """Whether arrays/objects nest deeper than MAX_DEPTH, counted outside strings.

    Checked before json.loads, whose C scanner recurses once per level and raises RecursionError
    near 1,000. Depth may go negative on invalid JSON; json stops there with an error anyway.
    """
    depth = 0
    for c in _NOT_BRACKETS.sub(b"", raw):
        if c == 0x5B or c == 0x7B:  # [ {
            depth += 1
            if depth > MAX_DEPTH:
                return True
        else:
            depth -= 1
    return False


def _decode(raw: Any, max_bytes: int) -> Any:
    """The JSON value of one message, or _Reject."""
    if raw is None:
        _fail(Reason.NOT_JSON, "empty message (tombstone)")
    if not isinstance(raw, bytes):
        if not isinstance(raw, bytearray | memoryview):
            _fail(Reason.NOT_JSON, f"message value must be bytes, not {type(raw).__name__}")
        raw = bytes(raw)
    if len(raw) > max_bytes:
        _fail(Reason.TOO_LARGE, f"{len(raw)} bytes > max_bytes {max_bytes}")
    if raw.startswith(b"\xef\xbb\xbf"):
        _fail(Reason.NOT_JSON, "starts with a UTF-8 byte order mark (RFC 8259 section 8.1)")
    # The bracket count bounds the depth: only a message with many brackets needs the scan.
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and _too_deep(raw):
        _fail(Reason.TOO_DEEP, f"arrays/objects nest deeper than {MAX_DEPTH}")
    try:
        text = raw.decode("utf-8")  # strict: no encoded surrogates, no UTF-16/32 detection
    except UnicodeDecodeError as exc:
        _fail(Reason.NOT_JSON, f"not UTF-8: {exc.reason} at byte {exc.start}")
    try:
        return _DECODER.decode(text)
    except RecursionError:  # a safety net: the depth scan makes it unreachable
        _fail(Reason.TOO_DEEP, "nesting too deep for the JSON decoder")
    except ValueError as exc:
        _fail(Reason.NOT_JSON, str(exc)[:200])


# -- field checks (each returns the checked value or raises _Reject) ------------------------------


def _quote(v: str) -> str:
    """A piece of the message for a detail: escaped (so always UTF-8) and short."""
    return repr(v[:50])[:80]


def _names(keys: Any) -> str:
    return ", ".join(sorted(_quote(k) if isinstance(k, str) else repr(k)[:50] for k in keys)[:5])


def _fields(obj: Any, required: tuple[str, ...], allowed: frozenset[str]) -> dict[str, Any]:
    if not isinstance(obj, dict):
        _fail(Reason.BAD_TYPE, f"expected a JSON object, got {type(obj).__name__}")
    unknown = obj.keys() - allowed
    if unknown:
        _fail(Reason.UNKNOWN_FIELD, f"unknown fields: {_names(unknown)}")
    for name in required:
        if obj.get(name) is None:
            _fail(Reason.MISSING_FIELD, f"missing required field {name!r}")
    return obj


_SURROGATE = re.compile("[\ud800-\udfff]")


def _id(v: Any, name: str, max_length: int) -> str:
    """An id field: see "Ids" in the module docstring."""
    if not isinstance(v, str):
        _fail(Reason.BAD_TYPE, f"field {name!r} must be a string")
    # Fast path for the usual id: ASCII is always NFC, and its only unprintables are controls.
    if v.isascii() and v.isprintable() and 0 < len(v) <= max_length:
        return v
    if not v:
        _fail(Reason.BAD_VALUE, f"field {name!r} must not be empty")
    if len(v) > max_length:
        _fail(Reason.BAD_ID, f"field {name!r} has {len(v)} characters > max {max_length}")
    if _SURROGATE.search(v):
        _fail(Reason.BAD_VALUE, f"field {name!r} holds a lone surrogate")
    if not v.isprintable():
        c = next(c for c in v if not c.isprintable())
        _fail(
            Reason.BAD_ID,
            f"field {name!r} holds U+{ord(c):04X} (category {unicodedata.category(c)})",
        )
    if not unicodedata.is_normalized("NFC", v):
        _fail(Reason.BAD_ID, f"field {name!r} is not in Unicode NFC")
    return v


# Controls other than tab/LF/CR, bidi embeddings/overrides/isolates, and lone surrogates.
_BAD_TEXT = re.compile(
    "[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)


def _text(v: Any, name: str, max_length: int | None = None) -> str:
    """A display-text field of an item: see "Item records" in the module docstring."""
    if not isinstance(v, str):
        _fail(Reason.BAD_TYPE, f"field {name!r} must be a string")
    if max_length is not None and len(v) > max_length:
        _fail(Reason.BAD_VALUE, f"field {name!r} has {len(v)} characters > max {max_length}")
    bad = _BAD_TEXT.search(v)
    if bad:
        c = bad.group()
        what = "a lone surrogate" if "\ud800" <= c <= "\udfff" else f"U+{ord(c):04X}"
        _fail(Reason.BAD_VALUE, f"field {name!r} holds {what}")
    return v


def _internal_str(v: Any, name: str) -> str:
    """A string of an internal record: see "Internal records" in the module docstring."""
    if not isinstance(v, str):
        _fail(Reason.BAD_TYPE, f"field {name!r} must be a string")
    if not v:
        _fail(Reason.BAD_VALUE, f"field {name!r} must not be empty")
    if len(v) > MAX_ID_LENGTH_LIMIT:
        _fail(Reason.BAD_VALUE, f"field {name!r} has {len(v)} characters > {MAX_ID_LENGTH_LIMIT}")
    if not v.isascii() and _SURROGATE.search(v):
        _fail(Reason.BAD_VALUE, f"field {name!r} holds a lone surrogate")
    return v


def _opt_internal_str(v: Any, name: str) -> str | None:
    return None if v is None else _internal_str(v, name)


def _int(v: Any, name: str, lo: int, hi: int) -> int:
    """An integer within int64 (else number_out_of_range) and within [lo, hi] (else bad_value)."""
    if not isinstance(v, int) or isinstance(v, bool):
        _fail(Reason.BAD_TYPE, f"field {name!r} must be an integer")
    if not INT64_MIN <= v <= INT64_MAX:
        _fail(Reason.NUMBER_OUT_OF_RANGE, f"field {name!r} is outside int64")
    if not lo <= v <= hi:
        _fail(Reason.BAD_VALUE, f"field {name!r} = {v} is outside [{lo}, {hi}]")
    return v


def _float32(v: Any, name: str) -> float:
    """A finite number within float32, as a float."""
    if not isinstance(v, int | float) or isinstance(v, bool):
        _fail(Reason.BAD_TYPE, f"field {name!r} must be a number")
    if isinstance(v, float) and not math.isfinite(v):
        _fail(Reason.NON_FINITE, f"field {name!r} is not finite")
    # Compared, not converted: an int of any size compares exactly with a float.
    if not -FLOAT32_MAX <= v <= FLOAT32_MAX:
        _fail(Reason.NUMBER_OUT_OF_RANGE, f"field {name!r} is outside float32")
    return float(v)


def _propensity(v: Any, name: str = "propensity") -> float:
    p = _float32(v, name)
    if not MIN_PROPENSITY <= p <= 1.0:
        _fail(Reason.BAD_PROPENSITY, f"{name} {p!r} not in [{MIN_PROPENSITY}, 1]")
    return p


# -- events ---------------------------------------------------------------------------------------

_REQUIRED = ("event_id", "type", "user_id", "item_id", "ts")
_OPTIONAL = ("request_id", "position", "propensity", "value", "model_version")
_ALLOWED = frozenset(_REQUIRED + _OPTIONAL)


class EventParser:
    """Validates raw event messages against the contract (see the module docstring).

    Parameters
    ----------
    max_bytes:
        Messages longer than this are rejected as ``too_large`` before any parsing.
    max_clock_skew_ms:
        Events whose ``ts`` is more than this ahead of the clock are ``ts_in_future``.
    clock_ms:
        Returns "now" in ms since the epoch; injectable for tests.
    max_id_length:
        Longest id, in code points (``bad_id`` beyond).
    max_position:
        Largest slate position (``bad_value`` beyond).
    """

    def __init__(
        self,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_clock_skew_ms: int = 5 * 60 * 1000,
        clock_ms: Callable[[], int] | None = None,
        *,
        max_id_length: int = DEFAULT_MAX_ID_LENGTH,
        max_position: int = DEFAULT_MAX_POSITION,
    ) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        if max_clock_skew_ms < 0:
            raise ValueError(f"max_clock_skew_ms must be >= 0, got {max_clock_skew_ms}")
        if not 1 <= max_id_length <= MAX_ID_LENGTH_LIMIT:
            raise ValueError(f"max_id_length must be in [1, {MAX_ID_LENGTH_LIMIT}]")
        if not 0 <= max_position <= POSITION_LIMIT:
            raise ValueError(f"max_position must be in [0, {POSITION_LIMIT}]")
        self.max_bytes = max_bytes
        self.max_clock_skew_ms = max_clock_skew_ms
        self.max_id_length = max_id_length
        self.max_position = max_position
        self._clock_ms = clock_ms or (lambda: int(time.time() * 1000))

    @classmethod
    def from_settings(
        cls, settings: EventSettings, clock_ms: Callable[[], int] | None = None
    ) -> EventParser:
        """A parser with every limit of the ``events`` settings section."""
        return cls(
            settings.max_bytes,
            settings.max_clock_skew_ms,
            clock_ms,
            max_id_length=settings.max_id_length,
            max_position=settings.max_position,
        )

    def parse(self, raw: bytes | bytearray | memoryview | None) -> Event | Rejection:
        """Parse one message value into an Event, or say why not. Never raises."""
        try:
            return self._event(_decode(raw, self.max_bytes))
        except _Reject as exc:
            return Rejection(exc.reason, exc.detail)

    def validate(self, obj: Any) -> Event | Rejection:
        """Validate an already-decoded JSON value (any Python value). Never raises."""
        try:
            return self._event(obj)
        except _Reject as exc:
            return Rejection(exc.reason, exc.detail)

    def _event(self, obj: Any) -> Event:
        _fields(obj, _REQUIRED, _ALLOWED)
        kind = obj["type"]
        if not isinstance(kind, str):
            _fail(Reason.BAD_TYPE, "field 'type' must be a string")
        if kind not in EVENT_TYPES:
            _fail(Reason.UNKNOWN_EVENT_TYPE, f"unknown event type {_quote(kind)}")
        n = self.max_id_length
        event_id = _id(obj["event_id"], "event_id", n)
        user_id = _id(obj["user_id"], "user_id", n)
        item_id = _id(obj["item_id"], "item_id", n)
        request_id = obj.get("request_id")
        if request_id is not None:
            _id(request_id, "request_id", n)
        model_version = obj.get("model_version")
        if model_version is not None:
            _id(model_version, "model_version", n)
        ts = _int(obj["ts"], "ts", INT64_MIN, INT64_MAX)
        if ts < MIN_TS_MS:
            _fail(Reason.BAD_VALUE, f"ts {ts} is before {MIN_TS_MS} (1990-01-01 in ms since epoch)")
        position = obj.get("position")
        if position is not None:
            _int(position, "position", 0, self.max_position)
        propensity = obj.get("propensity")
        if propensity is not None:
            propensity = _propensity(propensity)
        value = obj.get("value")
        if value is not None:
            value = _float32(value, "value")
        if ts > self._clock_ms() + self.max_clock_skew_ms:
            _fail(Reason.TS_IN_FUTURE, f"ts {ts} is beyond the allowed clock skew")
        return Event(
            event_id,
            kind,
            user_id,
            item_id,
            ts,
            request_id,
            position,
            propensity,
            value,
            model_version,
        )


# -- catalogue records ----------------------------------------------------------------------------

_ITEM_REQUIRED = ("item_id", "title", "ts")
_ITEM_ALLOWED = frozenset({*_ITEM_REQUIRED, "description", "tags", "attributes"})


def parse_item(
    raw: bytes | bytearray | memoryview | None,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_id_length: int = DEFAULT_MAX_ID_LENGTH,
    max_title_length: int = DEFAULT_MAX_TITLE_LENGTH,
) -> ItemRecord | Rejection:
    """Parse a catalogue record from the items topic, or say why not. Never raises."""
    try:
        obj = _fields(_decode(raw, max_bytes), _ITEM_REQUIRED, _ITEM_ALLOWED)
        item_id = _id(obj["item_id"], "item_id", max_id_length)
        title = _text(obj["title"], "title", max_title_length)
        ts = _int(obj["ts"], "ts", 0, INT64_MAX)
        description = obj.get("description")
        if description is not None:
            _text(description, "description")
        tags = obj.get("tags")
        if tags is None:
            tags = []
        elif not isinstance(tags, list):
            _fail(Reason.BAD_TYPE, "field 'tags' must be a list of strings")
        for tag in tags:
            _text(tag, "tags")
        attributes = obj.get("attributes")
        if attributes is None:
            attributes = {}
        elif not isinstance(attributes, dict):
            _fail(Reason.BAD_TYPE, "field 'attributes' must map strings to strings")
        for key, v in attributes.items():
            _text(key, "attributes")
            _text(v, "attributes")
    except _Reject as exc:
        return Rejection(exc.reason, exc.detail)
    return ItemRecord(item_id, title, ts, description, tuple(tags), dict(attributes))


def item_text(item: ItemRecord) -> str:
    """The one text the item encoder sees; a changed text means a new vector."""
    parts = [item.title]
    if item.tags:
        parts.append("Tags: " + ", ".join(item.tags))
    if item.attributes:
        parts.append("; ".join(f"{k}: {v}" for k, v in sorted(item.attributes.items())))
    if item.description:
        parts.append(item.description)
    return ". ".join(parts)


# -- internal records -----------------------------------------------------------------------------


_T = TypeVar("_T")


def _decode_internal(raw: Any, what: str, build: Callable[[Any], _T]) -> _T:
    """``build(json value)`` for a record of an internal topic; ContractError on any breach."""
    try:
        return build(_decode(raw, INTERNAL_MAX_BYTES))
    except _Reject as exc:
        raise ContractError(what, exc.reason, exc.detail) from None


@dataclass(frozen=True, slots=True)
class RewardRecord:
    """One reward on the rewards topic (keyed by user_id), produced by the reward worker.

    ``kind``: ``joined`` (feedback joined to an impression), ``default`` (an impression whose
    window closed without feedback) or ``organic`` (feedback with no impression; propensity
    unknown). ``ts`` is the impression's time (organic: the feedback's time).
    """

    reward_id: str
    user_id: str
    item_id: str
    reward: float
    ts: int
    kind: str
    propensity: float | None = None
    position: int | None = None
    model_version: str | None = None
    request_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_bytes(self) -> bytes:
        """The wire form, spelled out field by field: this runs once per reward in the reward
        worker, where ``asdict`` + ``json.dumps`` cost several times as much."""
        if not (math.isfinite(self.reward) and _finite_or_none(self.propensity)):
            raise ValueError(f"reward fields must be finite: {self.reward}, {self.propensity}")
        return (
            f'{{"reward_id":{_json_str(self.reward_id)},"user_id":{_json_str(self.user_id)},'
            f'"item_id":{_json_str(self.item_id)},"reward":{float.__repr__(float(self.reward))},'
            f'"ts":{int(self.ts)},"kind":{_json_str(self.kind)},'
            f'"propensity":{_opt(self.propensity, float.__repr__)},'
            f'"position":{_opt(self.position, int.__repr__)},'
            f'"model_version":{_opt(self.model_version, _json_str)},'
            f'"request_id":{_opt(self.request_id, _json_str)}}}'
        ).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> RewardRecord:
        """Decode a record written by :meth:`to_bytes`; raises ContractError (a ValueError) on
        anything else."""
        return _decode_internal(raw, "reward record", _reward)


_REWARD_REQUIRED = ("reward_id", "user_id", "item_id", "reward", "ts", "kind")
_REWARD_ALLOWED = frozenset(
    {*_REWARD_REQUIRED, "propensity", "position", "model_version", "request_id"}
)


def _reward(obj: Any) -> RewardRecord:
    _fields(obj, _REWARD_REQUIRED, _REWARD_ALLOWED)
    kind = obj["kind"]
    if not isinstance(kind, str):
        _fail(Reason.BAD_TYPE, "field 'kind' must be a string")
    if kind not in REWARD_KINDS:
        _fail(Reason.BAD_VALUE, f"unknown reward kind {_quote(kind)}")
    propensity = obj.get("propensity")
    position = obj.get("position")
    return RewardRecord(
        _internal_str(obj["reward_id"], "reward_id"),
        _internal_str(obj["user_id"], "user_id"),
        _internal_str(obj["item_id"], "item_id"),
        _float32(obj["reward"], "reward"),
        _int(obj["ts"], "ts", 0, INT64_MAX),
        kind,
        None if propensity is None else _propensity(propensity),
        None if position is None else _int(position, "position", 0, POSITION_LIMIT),
        _opt_internal_str(obj.get("model_version"), "model_version"),
        _opt_internal_str(obj.get("request_id"), "request_id"),
    )


class SlateItem(NamedTuple):
    """One ranked item of a slate. A named tuple: the publisher builds ~10 per user on every
    refresh, and it constructs several times faster than a frozen dataclass."""

    item_id: str
    score: float
    propensity: float
    position: int


@dataclass(frozen=True, slots=True)
class Slate:
    """Published recommendations for one user (recommendations topic, keyed by user_id)."""

    request_id: str
    user_id: str
    model_version: str
    ts: int
    items: tuple[SlateItem, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "user_id": self.user_id,
            "model_version": self.model_version,
            "ts": self.ts,
            "items": slate_items_to_json(self.items),
        }

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Slate:
        """Decode a slate written by :meth:`to_bytes`; raises ContractError (a ValueError) on
        anything else."""
        return _decode_internal(raw, "slate", _slate)


_SLATE_FIELDS = ("request_id", "user_id", "model_version", "ts", "items")
_SLATE_ITEM_FIELDS = ("item_id", "score", "propensity", "position")


def slate_items_to_json(items: Sequence[SlateItem]) -> list[dict[str, Any]]:
    """The wire form of a slate's items: on the recommendations topic and in the store."""
    # Spelled out: ``asdict`` deep-copies and was most of the publisher's serialising time.
    return [
        {"item_id": i.item_id, "score": i.score, "propensity": i.propensity, "position": i.position}
        for i in items
    ]


def slate_items_from_json(raw: Any) -> tuple[SlateItem, ...]:
    """Inverse of :func:`slate_items_to_json` (a JSON value, e.g. a store column), with the
    internal-record checks; raises ContractError."""
    try:
        return _slate_items(raw)
    except _Reject as exc:
        raise ContractError("slate items", exc.reason, exc.detail) from None


def _slate_items(raw_items: Any) -> tuple[SlateItem, ...]:
    if not isinstance(raw_items, list):
        _fail(Reason.BAD_TYPE, "field 'items' must be a list")
    allowed = frozenset(_SLATE_ITEM_FIELDS)
    items = []
    for i in raw_items:
        _fields(i, _SLATE_ITEM_FIELDS, allowed)
        items.append(
            SlateItem(
                _internal_str(i["item_id"], "item_id"),
                _float32(i["score"], "score"),
                _propensity(i["propensity"]),
                _int(i["position"], "position", 0, POSITION_LIMIT),
            )
        )
    return tuple(items)


def _slate(obj: Any) -> Slate:
    _fields(obj, _SLATE_FIELDS, frozenset(_SLATE_FIELDS))
    return Slate(
        _internal_str(obj["request_id"], "request_id"),
        _internal_str(obj["user_id"], "user_id"),
        _internal_str(obj["model_version"], "model_version"),
        _int(obj["ts"], "ts", 0, INT64_MAX),
        _slate_items(obj["items"]),
    )


@dataclass(frozen=True, slots=True)
class ItemVector:
    """An encoded item text on the item-vectors topic (keyed by item_id), encoder → learner.

    ``key`` is the text's cache key (model + text hash): a consumer that already holds this key
    for the item has nothing to update. The vector travels as base64 of little-endian float32.
    """

    item_id: str
    model: str
    key: str
    vector: tuple[float, ...]

    def to_bytes(self) -> bytes:
        import numpy as np

        blob = np.asarray(self.vector, dtype="<f4").tobytes()
        return json.dumps(
            {
                "item_id": self.item_id,
                "model": self.model,
                "key": self.key,
                "dim": len(self.vector),
                "vector": base64.b64encode(blob).decode(),
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> ItemVector:
        """Decode a vector written by :meth:`to_bytes`; raises ContractError (a ValueError) on
        anything else."""
        return _decode_internal(raw, "item vector", _item_vector)


_VECTOR_FIELDS = ("item_id", "model", "key", "dim", "vector")


def _item_vector(obj: Any) -> ItemVector:
    import numpy as np

    _fields(obj, _VECTOR_FIELDS, frozenset(_VECTOR_FIELDS))
    dim = _int(obj["dim"], "dim", 1, MAX_VECTOR_DIM)
    encoded = obj["vector"]
    if not isinstance(encoded, str):
        _fail(Reason.BAD_TYPE, "field 'vector' must be a base64 string")
    try:
        blob = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:  # ValueError: a non-ASCII character
        _fail(Reason.BAD_VALUE, f"field 'vector' is not base64: {exc}")
    if len(blob) != 4 * dim:
        _fail(Reason.BAD_VALUE, f"vector has {len(blob)} bytes, dim {dim} needs {4 * dim}")
    vec = np.frombuffer(blob, dtype="<f4")
    if not np.isfinite(vec).all():
        _fail(Reason.NON_FINITE, "vector has non-finite values")
    return ItemVector(
        _internal_str(obj["item_id"], "item_id"),
        _internal_str(obj["model"], "model"),
        _internal_str(obj["key"], "key"),
        tuple(vec.tolist()),
    )
