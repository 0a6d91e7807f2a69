"""`recsys worker reward`: events → validation → dedupe + join → rewards topic.

A consumer group: run two or ten and they share the events topic's partitions. The worker is
:func:`recsys.rewards.sink.build`; this module only runs it.
"""

from __future__ import annotations

from recsys.app import run_consumer
from recsys.config import Settings
from recsys.rewards.sink import build


def run(settings: Settings) -> int:
    return run_consumer(settings, build(settings))
