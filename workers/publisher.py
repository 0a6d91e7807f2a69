"""`recsys worker publisher`: events → fresh slates to the recommendations topic and the store.

The worker is :func:`recsys.publisher.sink.build`; this module only runs it.
"""

from __future__ import annotations

from recsys.app import run_consumer
from recsys.config import Settings
from recsys.publisher.sink import build


def run(settings: Settings) -> int:
    return run_consumer(settings, build(settings))
