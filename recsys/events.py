"""The event contract: parse and validate behaviour events and catalogue records.

Parsing never raises on bad input: it returns a :class:`Rejection` with a machine-readable
:class:`Reason`, which workers count and send to the dead-letter topic.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any, NamedTuple

EVENT_TYPES = frozenset(
    {"impression", "click", "dwell", "add_to_cart", "purchase", "rating", "skip"}
)
FEEDBACK_TYPES = EVENT_TYPES - {"impression"}


class Reason(StrEnum):
    """Why an event was rejected; the value is the metric label and the DLQ header."""

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


@dataclass(frozen=True, slots=True)
class Rejection:
    """A rejected message: the reason (for counting) and a human-readable detail."""

    reason: Reason
    detail: str


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
        return {k: v for k, v in asdict(self).items() if v is not None}

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":")).encode()

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


_REQUIRED = ("event_id", "type", "user_id", "item_id", "ts")
_OPTIONAL = ("request_id", "position", "propensity", "value", "model_version")
_ALLOWED = frozenset(_REQUIRED + _OPTIONAL)
_STR_FIELDS = ("event_id", "user_id", "item_id", "request_id", "model_version")


class _NonFinite(ValueError):
    pass


def _reject_constant(name: str) -> float:
    # json.loads accepts NaN/Infinity literals by default; the contract does not.
    raise _NonFinite(name)


def _loads(raw: bytes | str) -> Any:
    return json.loads(raw, parse_constant=_reject_constant)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


class EventParser:
    """Validates raw event messages against the contract.

    Parameters
    ----------
    max_bytes:
        Messages longer than this are rejected as ``too_large`` before any parsing.
    max_clock_skew_ms:
        Events whose ``ts`` is more than this ahead of the clock are ``ts_in_future``.
    clock_ms:
        Returns "now" in ms since the epoch; injectable for tests.
    """

    def __init__(
        self,
        max_bytes: int = 64 * 1024,
        max_clock_skew_ms: int = 5 * 60 * 1000,
        clock_ms: Callable[[], int] | None = None,
    ) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        if max_clock_skew_ms < 0:
            raise ValueError(f"max_clock_skew_ms must be >= 0, got {max_clock_skew_ms}")
        self.max_bytes = max_bytes
        self.max_clock_skew_ms = max_clock_skew_ms
        self._clock_ms = clock_ms or (lambda: int(time.time() * 1000))

    def parse(self, raw: bytes | None) -> Event | Rejection:
        """Parse one message value into an Event, or say why not."""
        if raw is None:
            return Rejection(Reason.NOT_JSON, "empty message (tombstone)")
        if len(raw) > self.max_bytes:
            return Rejection(Reason.TOO_LARGE, f"{len(raw)} bytes > max_bytes {self.max_bytes}")
        try:
            obj = _loads(raw)
        except _NonFinite as exc:
            return Rejection(Reason.NON_FINITE, f"non-finite literal {exc}")
        except (ValueError, UnicodeDecodeError) as exc:
            return Rejection(Reason.NOT_JSON, str(exc)[:200])
        return self.validate(obj)

    def validate(self, obj: Any) -> Event | Rejection:
        """Validate an already-decoded JSON value."""
        if not isinstance(obj, dict):
            return Rejection(Reason.BAD_TYPE, f"expected a JSON object, got {type(obj).__name__}")
        unknown = obj.keys() - _ALLOWED
        if unknown:
            return Rejection(Reason.UNKNOWN_FIELD, f"unknown fields: {sorted(unknown)}")
        for name in _REQUIRED:
            if obj.get(name) is None:
                return Rejection(Reason.MISSING_FIELD, f"missing required field {name!r}")
        kind = obj["type"]
        if not isinstance(kind, str):
            return Rejection(Reason.BAD_TYPE, "field 'type' must be a string")
        if kind not in EVENT_TYPES:
            return Rejection(Reason.UNKNOWN_EVENT_TYPE, f"unknown event type {kind[:50]!r}")
        for name in _STR_FIELDS:
            v = obj.get(name)
            if v is not None and not isinstance(v, str):
                return Rejection(Reason.BAD_TYPE, f"field {name!r} must be a string")
            if v == "":
                return Rejection(Reason.BAD_VALUE, f"field {name!r} must not be empty")
            if v is not None and not _is_unicode(v):
                return Rejection(Reason.BAD_VALUE, f"field {name!r} holds a lone surrogate")
        ts = obj["ts"]
        if not _is_int(ts):
            return Rejection(Reason.BAD_TYPE, "field 'ts' must be an integer (ms since epoch)")
        if ts < 0:
            return Rejection(Reason.BAD_VALUE, "field 'ts' must be >= 0")
        position = obj.get("position")
        if position is not None:
            if not _is_int(position):
                return Rejection(Reason.BAD_TYPE, "field 'position' must be an integer")
            if position < 0:
                return Rejection(Reason.BAD_VALUE, "field 'position' must be >= 0")
        propensity = obj.get("propensity")
        if propensity is not None:
            if not _is_number(propensity):
                return Rejection(Reason.BAD_TYPE, "field 'propensity' must be a number")
            if not math.isfinite(propensity):
                return Rejection(Reason.NON_FINITE, "field 'propensity' is not finite")
            if not 0.0 < propensity <= 1.0:
                return Rejection(Reason.BAD_PROPENSITY, f"propensity {propensity} not in (0, 1]")
        value = obj.get("value")
        if value is not None:
            if not _is_number(value):
                return Rejection(Reason.BAD_TYPE, "field 'value' must be a number")
            if not math.isfinite(value):
                return Rejection(Reason.NON_FINITE, "field 'value' is not finite")
        if ts > self._clock_ms() + self.max_clock_skew_ms:
            return Rejection(Reason.TS_IN_FUTURE, f"ts {ts} is beyond the allowed clock skew")
        return Event(
            event_id=obj["event_id"],
            type=kind,
            user_id=obj["user_id"],
            item_id=obj["item_id"],
            ts=ts,
            request_id=obj.get("request_id"),
            position=position,
            propensity=None if propensity is None else float(propensity),
            value=None if value is None else float(value),
            model_version=obj.get("model_version"),
        )


def _is_unicode(s: str) -> bool:
    """False for a string with a lone UTF-16 surrogate: JSON's ``"\\ud800"`` escape decodes to
    one, and it cannot be encoded as UTF-8 (a Kafka key, a SQL value, a log line)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_item(raw: bytes | None) -> ItemRecord | Rejection:
    """Parse a catalogue record from the items topic."""
    if raw is None:
        return Rejection(Reason.NOT_JSON, "empty message (tombstone)")
    try:
        obj = _loads(raw)
    except _NonFinite as exc:
        return Rejection(Reason.NON_FINITE, f"non-finite literal {exc}")
    except (ValueError, UnicodeDecodeError) as exc:
        return Rejection(Reason.NOT_JSON, str(exc)[:200])
    if not isinstance(obj, dict):
        return Rejection(Reason.BAD_TYPE, "expected a JSON object")
    unknown = obj.keys() - {"item_id", "title", "description", "tags", "attributes", "ts"}
    if unknown:
        return Rejection(Reason.UNKNOWN_FIELD, f"unknown fields: {sorted(unknown)}")
    for name in ("item_id", "title", "ts"):
        if obj.get(name) is None:
            return Rejection(Reason.MISSING_FIELD, f"missing required field {name!r}")
    if not isinstance(obj["item_id"], str) or not isinstance(obj["title"], str):
        return Rejection(Reason.BAD_TYPE, "item_id and title must be strings")
    if not (_is_unicode(obj["item_id"]) and _is_unicode(obj["title"])):
        return Rejection(Reason.BAD_VALUE, "item_id or title holds a lone surrogate")
    if not _is_int(obj["ts"]):
        return Rejection(Reason.BAD_TYPE, "field 'ts' must be an integer")
    description = obj.get("description")
    if description is not None and not isinstance(description, str):
        return Rejection(Reason.BAD_TYPE, "field 'description' must be a string")
    tags = obj.get("tags") or []
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        return Rejection(Reason.BAD_TYPE, "field 'tags' must be a list of strings")
    attributes = obj.get("attributes") or {}
    if not isinstance(attributes, dict) or not all(isinstance(v, str) for v in attributes.values()):
        return Rejection(Reason.BAD_TYPE, "field 'attributes' must map strings to strings")
    return ItemRecord(
        item_id=obj["item_id"],
        title=obj["title"],
        ts=obj["ts"],
        description=description,
        tags=tuple(tags),
        attributes=dict(attributes),
    )


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
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> RewardRecord:
        """Decode a record written by :meth:`to_bytes`; raises ValueError on anything else."""
        obj = _loads(raw)
        if not isinstance(obj, dict):
            raise ValueError("reward record must be a JSON object")
        try:
            return cls(**obj)
        except TypeError as exc:
            raise ValueError(f"bad reward record: {exc}") from None


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
            # Spelled out: ``asdict`` deep-copies and was most of the publisher's serialising time.
            "items": [
                {
                    "item_id": i.item_id,
                    "score": i.score,
                    "propensity": i.propensity,
                    "position": i.position,
                }
                for i in self.items
            ],
        }

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Slate:
        obj = _loads(raw)
        try:
            items = tuple(SlateItem(**i) for i in obj["items"])
            return cls(obj["request_id"], obj["user_id"], obj["model_version"], obj["ts"], items)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"bad slate: {exc}") from None


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
        import numpy as np

        obj = _loads(raw)
        try:
            vec = np.frombuffer(base64.b64decode(obj["vector"], validate=True), dtype="<f4")
            if len(vec) != obj["dim"] or not np.isfinite(vec).all():
                raise ValueError("vector has the wrong size or non-finite values")
            return cls(str(obj["item_id"]), str(obj["model"]), str(obj["key"]), tuple(vec.tolist()))
        except (KeyError, TypeError, binascii.Error) as exc:
            raise ValueError(f"bad item vector: {exc}") from None
