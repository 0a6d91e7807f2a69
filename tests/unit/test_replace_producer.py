"""``replace_producer``: a wedged producer is swapped for a new one, never for none."""

import pytest
from kafka.errors import KafkaTimeoutError

from recsys.kafka import DeadLetterWriter, replace_producer


class _Producer:
    def __init__(self) -> None:
        self.closed = False

    def close(self, timeout: float | None = None) -> None:
        self.closed = True


def test_the_old_producer_is_closed_and_the_dead_letter_writer_moves() -> None:
    old, new = _Producer(), _Producer()
    dlq = DeadLetterWriter(old, "dlq", "reward")
    got = replace_producer(old, lambda: new, "reward", dlq)
    assert got is new
    assert old.closed
    assert not new.closed
    assert dlq.producer is new


def test_a_new_producer_that_cannot_bootstrap_leaves_the_old_one_open() -> None:
    """In a broker outage the new producer cannot bootstrap: the old one must stay usable, or
    every later batch fails on a closed producer after the broker is back (seen in the 30 s
    outage test: the reward worker emitted nothing more)."""
    old = _Producer()
    dlq = DeadLetterWriter(old, "dlq", "reward")

    def unreachable() -> _Producer:
        raise KafkaTimeoutError("Unable to bootstrap")

    with pytest.raises(KafkaTimeoutError):
        replace_producer(old, unreachable, "reward", dlq)
    assert not old.closed
    assert dlq.producer is old
