"""Replay logic without a broker: serialisation, limit, pacing, failure reporting."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from recsys.data.backfill import ReplayError, replay
from recsys.events import Event

_text = st.text(min_size=1, max_size=12)
events = st.builds(
    Event,
    event_id=_text,
    type=st.sampled_from(["impression", "click", "rating"]),
    user_id=_text,
    item_id=_text,
    ts=st.integers(0, 2**45),
    request_id=st.none() | _text,
    position=st.none() | st.integers(0, 50),
    propensity=st.none() | st.floats(0.001, 1.0),
    value=st.none() | st.floats(-1e6, 1e6),
    model_version=st.none() | _text,
)


@given(events)
def test_event_wire_form_is_the_json_of_its_set_fields(event: Event) -> None:
    assert json.loads(event.to_bytes()) == {
        k: v for k, v in dataclasses.asdict(event).items() if v is not None
    }


class _Future:
    def __init__(self, error: Exception | None) -> None:
        self.error = error

    def add_errback(self, fn: Any) -> None:
        if self.error is not None:
            fn(self.error)


class _Producer:
    """Records sends; fails the ones whose index is in ``fail``."""

    def __init__(self, fail: frozenset[int] = frozenset()) -> None:
        self.sent: list[tuple[str, bytes, bytes]] = []
        self.flushes = 0
        self.fail = fail

    def send(self, topic: str, key: bytes, value: bytes) -> _Future:
        self.sent.append((topic, key, value))
        return _Future(RuntimeError("boom") if len(self.sent) - 1 in self.fail else None)

    def flush(self) -> None:
        self.flushes += 1


def _events(n: int) -> list[Event]:
    return [Event(f"e{i}", "click", f"u{i % 3}", "i", 1000 + i) for i in range(n)]


def test_replay_sends_keyed_by_user_and_flushes_once() -> None:
    producer = _Producer()
    summary = replay(_events(5), producer, "t", progress=False)
    assert summary.events_sent == 5
    assert [k for _, k, _ in producer.sent] == [b"u0", b"u1", b"u2", b"u0", b"u1"]
    assert producer.sent[0][2] == _events(1)[0].to_bytes()
    assert producer.flushes == 1


def test_replay_limit_and_rate() -> None:
    producer = _Producer()
    summary = replay(_events(100), producer, "t", max_rate=200, limit=40, progress=False)
    assert summary.events_sent == 40
    assert len(producer.sent) == 40
    assert summary.seconds >= 40 / 200 * 0.95


def test_replay_raises_on_failed_sends() -> None:
    with pytest.raises(ReplayError, match="2 of 10"):
        replay(_events(10), _Producer(frozenset({3, 7})), "t", progress=False)


@pytest.mark.parametrize(
    ("name", "kwargs"), [("max_rate", {"max_rate": 0}), ("limit", {"limit": -1})]
)
def test_replay_validates(name: str, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=name):
        replay([], _Producer(), "t", progress=False, **kwargs)
