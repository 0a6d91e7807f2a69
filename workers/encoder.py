"""`recsys worker encoder`: items topic → pretrained text encoder (cached) → item-vectors topic.

The worker is :func:`recsys.encoder.sink.build`; this module only runs it.
"""

from __future__ import annotations

from recsys.app import run_consumer
from recsys.config import Settings
from recsys.encoder.sink import build


def run(settings: Settings) -> int:
    return run_consumer(settings, build(settings))
